//! The rules guest SQL runs under, in one place for the host
//! (`runtime/src/guest_host.rs`) and the SDK's native harness
//! (`projector_sdk::testing`), so a projection tested natively meets the
//! same refusals it meets in the host. Both install them with [`guard`],
//! prepare guest statements under [`GUEST_SQL_PREFIX`] and cap the values
//! SQL makes with [`cap_lengths`].

use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Tables the runtime owns inside a projection's database; the guest may
/// neither read nor write them (it could forge its checkpoint or hide its
/// dead letters). `projector_kv` is the guest's own key/value state.
pub const RUNTIME_TABLES: [&str; 3] = ["projector_checkpoints", "projector_dead_letters", "projector_meta"];

/// The guest's key/value table: the guest may use it, but the host writes
/// it too (`state.set`), so nothing of the guest's may hang off it.
pub const KV_TABLE: &str = "projector_kv";

/// Prepended to every guest statement. The connection's statement cache is
/// shared with its owner, and a cached statement of the owner's (its
/// `COMMIT`, a checkpoint update) was authorized as the owner's: under this
/// prefix, which no statement of the owner's carries, a guest is never
/// handed one.
pub const GUEST_SQL_PREFIX: &str = "/* guest */ ";

/// The largest row the host itself expects to write on a projection's
/// connection: a dead letter holds a whole event, and events arrive over
/// HTTP (16 MiB by default, `--max-body-kib`) or from files with no cap.
const HOST_ROW_BYTES: usize = 64 << 20;

/// SQLite's own ceiling for SQLITE_LIMIT_LENGTH (SQLITE_MAX_LENGTH).
const SQLITE_MAX_LENGTH: usize = 1_000_000_000;

/// Set `conn`'s SQLITE_LIMIT_LENGTH: the longest string or blob, and the
/// largest row, SQLite will make or store.
///
/// Parameters are checked against the value limit (`limits.value_kib`,
/// `value_bytes` here), but SQL makes its own values (`zeroblob(500000000)`,
/// `randomblob`, `printf('%.*c', …)`). The owner shares the connection, so
/// the cap leaves it room for its own rows (a dead letter holds a whole
/// event): twice the larger of the value limit and [`HOST_ROW_BYTES`] — a
/// row holds a value plus its other columns — within SQLite's own ceiling.
pub fn cap_lengths(conn: &Connection, value_bytes: usize) {
    let bytes = value_bytes.max(HOST_ROW_BYTES).saturating_mul(2).min(SQLITE_MAX_LENGTH);
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, i32::try_from(bytes).unwrap_or(i32::MAX))
        .expect("SQLITE_LIMIT_LENGTH is a limit SQLite knows");
}

/// Install the guest's rules as `conn`'s SQLite authorizer. They apply
/// while the returned flag is set: set it around preparing a guest
/// statement, and clear it for the connection owner's own statements.
pub fn guard(conn: &mut Connection) -> rusqlite::Result<Arc<AtomicBool>> {
    let guest_sql = Arc::new(AtomicBool::new(false));
    let flag = guest_sql.clone();
    conn.authorizer(Some(move |ctx: AuthContext<'_>| {
        if flag.load(Ordering::Relaxed) { authorize_guest(&ctx) } else { Authorization::Allow }
    }))?;
    Ok(guest_sql)
}

/// The authorizer for guest statements: no transaction control, savepoints,
/// ATTACH/DETACH, pragmas, virtual tables or `load_extension`; nothing on
/// the runtime's tables; no trigger or shadowing temp object that the
/// host's own statements would run or resolve with the host's rights.
fn authorize_guest(ctx: &AuthContext<'_>) -> Authorization {
    let runtime_table = |name: &str| RUNTIME_TABLES.iter().any(|t| name.eq_ignore_ascii_case(t));
    let host_writes = |name: &str| runtime_table(name) || name.eq_ignore_ascii_case(KV_TABLE);
    match ctx.action {
        // The host's statements run with this authorizer off, so a trigger
        // they fire would run with the host's rights (hide dead letters,
        // forge the checkpoint). A trigger on the guest's own tables is
        // fine: only guest statements fire it, and its body is authorized
        // as theirs. A temp trigger can sit on any schema's table: none.
        AuthAction::CreateTempTrigger { .. } | AuthAction::DropTempTrigger { .. } => Authorization::Deny,
        AuthAction::CreateTrigger { table_name, .. } if host_writes(table_name) => Authorization::Deny,
        // The temp schema is searched first: a temp table or view named
        // like one of the host's would take its place in host statements.
        AuthAction::CreateTempTable { table_name } | AuthAction::CreateTempView { view_name: table_name }
            if host_writes(table_name) =>
        {
            Authorization::Deny
        }
        AuthAction::Transaction { .. }
        | AuthAction::Savepoint { .. }
        | AuthAction::Attach { .. }
        | AuthAction::Detach { .. }
        | AuthAction::Pragma { .. }
        | AuthAction::CreateVtable { .. }
        | AuthAction::DropVtable { .. } => Authorization::Deny,
        AuthAction::Function { function_name } if function_name.eq_ignore_ascii_case("load_extension") => {
            Authorization::Deny
        }
        AuthAction::Read { table_name, .. }
        | AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name }
        | AuthAction::DropTable { table_name }
        | AuthAction::CreateTable { table_name }
        | AuthAction::AlterTable { table_name, .. }
        | AuthAction::CreateIndex { table_name, .. }
        | AuthAction::DropIndex { table_name, .. }
        | AuthAction::CreateTrigger { table_name, .. }
        | AuthAction::DropTrigger { table_name, .. }
            if runtime_table(table_name) =>
        {
            Authorization::Deny
        }
        _ => Authorization::Allow,
    }
}
