//! order-fees: the fee an approved order is charged, from the `orders`
//! stream, and an `order_charged` event for each charge.
//!
//! Events (data is JSON):
//! - `setting_changed` `{setting: "fee"|"discount", enabled: bool,
//!   amount: int, version: int}`: settings arrive out of order, so a change
//!   whose version is not above the one held is ignored;
//! - `order_captured` `{order_id, fee: int, discount: int}`: the order's
//!   snapshot of what it costs, taken when it was captured;
//! - `order_approved` `{order_id}`.
//!
//! Rules:
//! - keeps the current settings, and for each order its captured snapshot
//!   (a later capture replaces it until the order is approved; after that,
//!   captures change nothing);
//! - on `order_approved`: records a ledger entry with the order's captured
//!   fee (never the current setting) and the current fee setting beside it,
//!   and emits `order_charged` `{order_id, fee}` on stream `charges` (its
//!   subject the order id), which carries the approval's correlation id and
//!   the approval's id as its causation id;
//! - an approval of an order never captured is rejected (a dead letter);
//!   approving an order twice records and emits once;
//! - a missing field, a wrong type, a setting other than `fee` or
//!   `discount`, or a negative amount, fee or discount is rejected. Other
//!   event types are ignored.
//!
//! Reads (`query`, JSON):
//! - `{"setting": "fee"|"discount"}` → `{"enabled": bool, "amount": int,
//!   "version": int}` (`{"enabled": false, "amount": 0, "version": 0}` when
//!   none was seen);
//! - `{"order_id": "…"}` → `{"status": "captured"|"approved"|"unknown",
//!   "fee": int|null, "discount": int|null}`;
//! - `{"ledger": "fees"}` → `{"charged": int, "orders": int,
//!   "at_current_setting": int}`: the sum of the fees charged, the number of
//!   approved orders, and what those orders would have cost at the current
//!   fee setting (orders × its amount when it is enabled, else 0).

use projector_sdk::{Context, Event, Failure, Projection, SqlError, query_json};
use serde::{Deserialize, Serialize};

/// The projection.
pub struct OrderFees;

/// The stream `order_charged` goes to.
pub const CHARGES_STREAM: &str = "charges";

/// The settings there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettingName {
    /// The fee charged per order.
    Fee,
    /// The discount.
    Discount,
}

impl SettingName {
    fn as_str(self) -> &'static str {
        match self {
            SettingName::Fee => "fee",
            SettingName::Discount => "discount",
        }
    }
}

#[derive(Deserialize)]
struct SettingChanged {
    setting: SettingName,
    enabled: bool,
    amount: i64,
    version: i64,
}

#[derive(Deserialize)]
struct OrderCaptured {
    order_id: String,
    fee: i64,
    discount: i64,
}

#[derive(Deserialize)]
struct OrderApproved {
    order_id: String,
}

/// A setting as held (or its default when none was seen).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    /// Whether it applies.
    pub enabled: bool,
    /// Its amount, in minor units.
    pub amount: i64,
    /// The version of the change that set it.
    pub version: i64,
}

/// An order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Captured, not approved yet.
    Captured,
    /// Approved and charged.
    Approved,
    /// Never captured.
    Unknown,
}

/// What `{"order_id": "…"}` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderAnswer {
    /// Where the order stands.
    pub status: Status,
    /// Its captured fee.
    pub fee: Option<i64>,
    /// Its captured discount.
    pub discount: Option<i64>,
}

/// What `{"ledger": "fees"}` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerAnswer {
    /// The sum of the fees charged.
    pub charged: i64,
    /// How many orders were approved.
    pub orders: i64,
    /// What those orders would cost at the current fee setting.
    pub at_current_setting: i64,
}

/// The event `order_charged` carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCharged {
    /// The order charged.
    pub order_id: String,
    /// The fee charged: the order's captured fee.
    pub fee: i64,
}

/// A request: exactly one of its fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    setting: Option<SettingName>,
    order_id: Option<String>,
    ledger: Option<String>,
}

/// Any of the answers.
#[derive(Serialize)]
#[serde(untagged)]
enum Answer {
    Setting(Setting),
    Order(OrderAnswer),
    Ledger(LedgerAnswer),
}

const REQUESTS: &str = r#"ask {"setting": "fee"|"discount"}, {"order_id": "…"} or {"ledger": "fees"}"#;

impl Projection for OrderFees {
    const STATE_VERSION: u32 = 1;

    const MIGRATIONS: &'static [&'static str] = &[
        "CREATE TABLE settings (
            setting TEXT PRIMARY KEY NOT NULL,
            enabled INTEGER NOT NULL,
            amount INTEGER NOT NULL,
            version INTEGER NOT NULL
        ) WITHOUT ROWID",
        "CREATE TABLE orders (
            order_id TEXT PRIMARY KEY NOT NULL,
            fee INTEGER NOT NULL,
            discount INTEGER NOT NULL,
            status TEXT NOT NULL
        ) WITHOUT ROWID",
        "CREATE TABLE fee_ledger (
            order_id TEXT PRIMARY KEY NOT NULL,
            fee INTEGER NOT NULL,
            setting_enabled INTEGER NOT NULL,
            setting_amount INTEGER NOT NULL,
            setting_version INTEGER NOT NULL,
            approved_by TEXT NOT NULL
        ) WITHOUT ROWID",
    ];

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        match event.event_type() {
            "setting_changed" => setting_changed(ctx, event),
            "order_captured" => order_captured(ctx, event),
            "order_approved" => order_approved(ctx, event),
            _ => Ok(()),
        }
    }

    fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
        query_json(request, |request: Request| {
            Ok(match (request.setting, request.order_id, request.ledger) {
                (Some(name), None, None) => Answer::Setting(setting(ctx, name)?),
                (None, Some(order_id), None) => Answer::Order(order(ctx, &order_id)?),
                (None, None, Some(ledger)) if ledger == "fees" => Answer::Ledger(fee_ledger(ctx)?),
                (None, None, Some(ledger)) => {
                    return Err(format!("there is no ledger {ledger:?}: {REQUESTS}"));
                }
                _ => return Err(format!("one question at a time: {REQUESTS}")),
            })
        })
    }
}

fn reject(event: &Event, why: impl std::fmt::Display) -> Failure {
    Failure::reject(format!("event {} ({}): {why}", event.id(), event.event_type()))
}

fn not_negative(event: &Event, fields: &[(&str, i64)]) -> Result<(), Failure> {
    match fields.iter().find(|(_, value)| *value < 0) {
        Some((name, value)) => Err(reject(event, format!("{name} {value} is negative"))),
        None => Ok(()),
    }
}

fn setting(ctx: &Context, name: SettingName) -> Result<Setting, SqlError> {
    Ok(ctx
        .sql()
        .query_first("SELECT enabled, amount, version FROM settings WHERE setting = ?1", (name.as_str(),))?
        .unwrap_or_default())
}

fn order(ctx: &Context, order_id: &str) -> Result<OrderAnswer, SqlError> {
    let order: Option<(Status, i64, i64)> =
        ctx.sql().query_first("SELECT status, fee, discount FROM orders WHERE order_id = ?1", (order_id,))?;
    Ok(match order {
        Some((status, fee, discount)) => OrderAnswer { status, fee: Some(fee), discount: Some(discount) },
        None => OrderAnswer { status: Status::Unknown, fee: None, discount: None },
    })
}

fn fee_ledger(ctx: &Context) -> Result<LedgerAnswer, String> {
    let (charged, orders): (i64, i64) = ctx
        .sql()
        .query_first("SELECT coalesce(sum(fee), 0), count(*) FROM fee_ledger", ())?
        .unwrap_or_default();
    let fee = setting(ctx, SettingName::Fee)?;
    let at_current_setting = match fee.enabled {
        true => {
            orders.checked_mul(fee.amount).ok_or("orders × the current fee overflows a 64-bit integer")?
        }
        false => 0,
    };
    Ok(LedgerAnswer { charged, orders, at_current_setting })
}

fn setting_changed(ctx: &Context, event: &Event) -> Result<(), Failure> {
    let change: SettingChanged = event.data_json()?;
    not_negative(event, &[("amount", change.amount), ("version", change.version)])?;
    let applied = ctx.sql().execute(
        "INSERT INTO settings (setting, enabled, amount, version) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (setting) DO UPDATE SET enabled = excluded.enabled, amount = excluded.amount, \
         version = excluded.version WHERE excluded.version > settings.version",
        (change.setting.as_str(), change.enabled, change.amount, change.version),
    )?;
    if applied == 0 {
        ctx.log().info(&format!(
            "setting {} version {} is not above the one held: ignored",
            change.setting.as_str(),
            change.version
        ));
    }
    Ok(())
}

fn order_captured(ctx: &Context, event: &Event) -> Result<(), Failure> {
    let capture: OrderCaptured = event.data_json()?;
    if capture.order_id.is_empty() {
        return Err(reject(event, "order_id is empty"));
    }
    not_negative(event, &[("fee", capture.fee), ("discount", capture.discount)])?;
    let applied = ctx.sql().execute(
        "INSERT INTO orders (order_id, fee, discount, status) VALUES (?1, ?2, ?3, 'captured') \
         ON CONFLICT (order_id) DO UPDATE SET fee = excluded.fee, discount = excluded.discount \
         WHERE orders.status = 'captured'",
        (&capture.order_id, capture.fee, capture.discount),
    )?;
    if applied == 0 {
        ctx.log().info(&format!(
            "order {} is approved already: capture {} ignored",
            capture.order_id,
            event.id()
        ));
    }
    Ok(())
}

fn order_approved(ctx: &Context, event: &Event) -> Result<(), Failure> {
    let approval: OrderApproved = event.data_json()?;
    let order = order(ctx, &approval.order_id)?;
    let fee = match (order.status, order.fee) {
        (Status::Unknown, _) | (_, None) => {
            return Err(reject(event, format!("order {:?} was never captured", approval.order_id)));
        }
        (Status::Approved, _) => {
            ctx.log().info(&format!(
                "order {} is approved already: {} ignored",
                approval.order_id,
                event.id()
            ));
            return Ok(());
        }
        (Status::Captured, Some(fee)) => fee,
    };
    let current = setting(ctx, SettingName::Fee)?;
    ctx.sql().execute(
        "INSERT INTO fee_ledger (order_id, fee, setting_enabled, setting_amount, setting_version, approved_by) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        (&approval.order_id, fee, current.enabled, current.amount, current.version, event.id()),
    )?;
    ctx.sql().execute("UPDATE orders SET status = 'approved' WHERE order_id = ?1", (&approval.order_id,))?;
    let charged = OrderCharged { order_id: approval.order_id, fee };
    ctx.emit_with_subject(CHARGES_STREAM, "order_charged", &charged.order_id, &charged)?;
    Ok(())
}

projector_sdk::export!(OrderFees);
