//! wallet-allowlist: the backend allowlists a wallet once its owner has
//! passed KYC.
//!
//! Events (published by the frontend API):
//! - `wallet_updated` `{user_id, wallet_address, created_at}`: the user's
//!   current wallet is now `wallet_address`;
//! - `kyc_verified` `{user_id, kyc_verified_at}`: the user passed KYC.
//!
//! Rule: at `kyc_verified` the user's current wallet is allowlisted; each
//! `wallet_updated` of a verified user allowlists the new wallet. The
//! allowlist only grows: a wallet replaced before its owner was verified is
//! never allowlisted, and an allowlisted wallet stays. Other event types are
//! ignored.
//!
//! Reads: `query` takes `{"wallet_address": "0x…"}` and answers
//! `{"allowlisted": true|false, "user_id": "…"|null}`.
//!
//! Every event is two writes and no read: the user's row is upserted, then
//! the allowlist is filled from it by `INSERT … SELECT` when the user is
//! verified and has a wallet. Both are deferred (`Sql::defer`): the host
//! runs them on a thread of its own while this module decodes the next
//! event.

use projector_sdk::{Context, Event, Failure, Projection, query_json};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The projection.
pub struct WalletAllowlist;

#[derive(Deserialize)]
struct WalletUpdated<'a> {
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    wallet_address: Cow<'a, str>,
    #[serde(borrow, default)]
    created_at: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct KycVerified<'a> {
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow, default)]
    kyc_verified_at: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct AllowlistQuery {
    wallet_address: String,
}

#[derive(Serialize)]
struct AllowlistAnswer {
    allowlisted: bool,
    user_id: Option<String>,
}

/// Allowlist wallet ?1 of user ?2 at ?3, if the user is verified.
const ALLOWLIST_IF_VERIFIED: &str = "INSERT INTO allowlist (wallet_address, user_id, allowlisted_at) \
                                     SELECT ?1, ?2, ?3 FROM users \
                                     WHERE user_id = ?2 AND kyc_verified_at IS NOT NULL \
                                     ON CONFLICT (wallet_address) DO NOTHING";

/// Allowlist the current wallet of user ?1 at ?2, if the user has one.
const ALLOWLIST_CURRENT_WALLET: &str = "INSERT INTO allowlist (wallet_address, user_id, allowlisted_at) \
                                        SELECT wallet_address, user_id, ?2 FROM users \
                                        WHERE user_id = ?1 AND wallet_address IS NOT NULL \
                                        ON CONFLICT (wallet_address) DO NOTHING";

impl Projection for WalletAllowlist {
    const STATE_VERSION: u32 = 1;

    fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
        ctx.sql().execute(
            "CREATE TABLE IF NOT EXISTS allowlist (
                wallet_address TEXT PRIMARY KEY NOT NULL,
                user_id TEXT NOT NULL,
                allowlisted_at TEXT
            ) WITHOUT ROWID",
            (),
        )?;
        ctx.sql().execute(
            "CREATE TABLE IF NOT EXISTS users (
                user_id TEXT PRIMARY KEY NOT NULL,
                wallet_address TEXT,
                kyc_verified_at TEXT
            ) WITHOUT ROWID",
            (),
        )?;
        Ok(())
    }

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        match event.event_type() {
            "wallet_updated" => wallet_updated(ctx, event),
            "kyc_verified" => kyc_verified(ctx, event),
            _ => Ok(()),
        }
    }

    fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
        query_json(request, |q: AllowlistQuery| {
            let user_id: Option<String> = ctx.sql().query_first(
                "SELECT user_id FROM allowlist WHERE wallet_address = ?1",
                (&q.wallet_address,),
            )?;
            Ok(AllowlistAnswer { allowlisted: user_id.is_some(), user_id })
        })
    }
}

fn wallet_updated(ctx: &Context, event: &Event) -> Result<(), Failure> {
    let update: WalletUpdated = event.data_json()?;
    let at = update.created_at.as_deref().or(event.time());
    ctx.sql().defer(
        "INSERT INTO users (user_id, wallet_address) VALUES (?1, ?2) \
         ON CONFLICT (user_id) DO UPDATE SET wallet_address = excluded.wallet_address",
        (&update.user_id, &update.wallet_address),
    )?;
    ctx.sql().defer(ALLOWLIST_IF_VERIFIED, (&update.wallet_address, &update.user_id, at))?;
    Ok(())
}

fn kyc_verified(ctx: &Context, event: &Event) -> Result<(), Failure> {
    let kyc: KycVerified = event.data_json()?;
    let at = kyc.kyc_verified_at.as_deref().or(event.time()).unwrap_or("");
    ctx.sql().defer(
        "INSERT INTO users (user_id, kyc_verified_at) VALUES (?1, ?2) \
         ON CONFLICT (user_id) DO UPDATE \
         SET kyc_verified_at = coalesce(users.kyc_verified_at, excluded.kyc_verified_at)",
        (&kyc.user_id, at),
    )?;
    ctx.sql().defer(ALLOWLIST_CURRENT_WALLET, (&kyc.user_id, at))?;
    Ok(())
}

projector_sdk::export!(WalletAllowlist);
