//! wallet-ledger: wallet balances from the `ledger` stream.
//!
//! Events (data is JSON):
//! - `wallet_credited` `{wallet_id, entry_id, amount}`;
//! - `wallet_debited` `{wallet_id, entry_id, amount}`;
//!
//! `amount` is a positive integer in minor units (cents).
//!
//! Rules:
//! - an entry is applied once per `entry_id`, even when it is republished
//!   under a new event id: the business key is the entry, not the event (a
//!   republished entry that differs from the first is logged and ignored);
//! - a non-positive or non-integer amount, or a missing field, is rejected
//!   (a dead letter), as is an entry that would take a balance past the
//!   range of a 64-bit integer;
//! - debits may take a balance below zero: an overdraft is reported, not
//!   refused.
//!
//! Other event types are ignored.
//!
//! Reads: `query` takes `{"wallet_id": "…"}` and answers
//! `{"balance": int, "entries": int, "overdrawn": bool}` (`0, 0, false` for
//! an unknown wallet).

use projector_sdk::{Context, Event, Failure, Projection, query_json};
use serde::{Deserialize, Serialize};

/// The projection.
pub struct WalletLedger;

#[derive(Deserialize)]
struct Entry {
    wallet_id: String,
    entry_id: String,
    amount: i64,
}

/// `{"wallet_id": "…"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalletQuery {
    /// The wallet asked about.
    pub wallet_id: String,
}

/// The answer to a [`WalletQuery`].
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WalletAnswer {
    /// Credits minus debits, in minor units.
    pub balance: i64,
    /// How many entries were applied to the wallet.
    pub entries: i64,
    /// Whether the balance is below zero.
    pub overdrawn: bool,
}

/// An entry as applied first.
#[derive(Deserialize)]
struct Applied {
    wallet_id: String,
    amount: i64,
}

impl Projection for WalletLedger {
    const STATE_VERSION: u32 = 1;

    const MIGRATIONS: &'static [&'static str] = &[
        "CREATE TABLE entries (
            entry_id TEXT PRIMARY KEY NOT NULL,
            wallet_id TEXT NOT NULL,
            amount INTEGER NOT NULL,
            event_id TEXT NOT NULL
        ) WITHOUT ROWID",
        "CREATE TABLE wallets (
            wallet_id TEXT PRIMARY KEY NOT NULL,
            balance INTEGER NOT NULL,
            entries INTEGER NOT NULL
        ) WITHOUT ROWID",
    ];

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        let sign = match event.event_type() {
            "wallet_credited" => 1,
            "wallet_debited" => -1,
            _ => return Ok(()),
        };
        let entry: Entry = event.data_json()?;
        let reject =
            |why: String| Failure::reject(format!("event {} ({}): {why}", event.id(), event.event_type()));
        if entry.amount <= 0 {
            return Err(reject(format!("amount {} is not positive", entry.amount)));
        }
        if entry.wallet_id.is_empty() || entry.entry_id.is_empty() {
            return Err(reject("wallet_id and entry_id must not be empty".into()));
        }
        // Debits are stored negative: the entry's effect on the balance.
        let amount = sign * entry.amount;
        let new = ctx.sql().execute(
            "INSERT OR IGNORE INTO entries (entry_id, wallet_id, amount, event_id) VALUES (?1, ?2, ?3, ?4)",
            (&entry.entry_id, &entry.wallet_id, amount, event.id()),
        )?;
        if new == 0 {
            let first: Option<Applied> = ctx.sql().query_first(
                "SELECT wallet_id, amount FROM entries WHERE entry_id = ?1",
                (&entry.entry_id,),
            )?;
            if let Some(first) = first
                && (first.wallet_id != entry.wallet_id || first.amount != amount)
            {
                ctx.log().warn(&format!(
                    "entry {} was applied before as {} on wallet {}; event {} says {amount} on wallet {}: ignored",
                    entry.entry_id,
                    first.amount,
                    first.wallet_id,
                    event.id(),
                    entry.wallet_id
                ));
            }
            return Ok(());
        }
        let balance: i64 = ctx
            .sql()
            .query_first("SELECT balance FROM wallets WHERE wallet_id = ?1", (&entry.wallet_id,))?
            .unwrap_or(0);
        let balance = balance
            .checked_add(amount)
            .ok_or_else(|| reject(format!("the balance of wallet {} would overflow", entry.wallet_id)))?;
        ctx.sql().execute(
            "INSERT INTO wallets (wallet_id, balance, entries) VALUES (?1, ?2, 1) \
             ON CONFLICT (wallet_id) DO UPDATE SET balance = excluded.balance, entries = entries + 1",
            (&entry.wallet_id, balance),
        )?;
        Ok(())
    }

    fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
        query_json(request, |q: WalletQuery| {
            let wallet: Option<(i64, i64)> = ctx
                .sql()
                .query_first("SELECT balance, entries FROM wallets WHERE wallet_id = ?1", (&q.wallet_id,))?;
            Ok(wallet.map_or_else(WalletAnswer::default, |(balance, entries)| WalletAnswer {
                balance,
                entries,
                overdrawn: balance < 0,
            }))
        })
    }
}

projector_sdk::export!(WalletLedger);
