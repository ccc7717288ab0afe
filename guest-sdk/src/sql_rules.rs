//! The rules guest SQL runs under, in one place for the host
//! (`runtime/src/guest_host.rs`) and the SDK's native harness
//! (`projector_sdk::testing`), so a projection tested natively meets the
//! same refusals it meets in the host, in the same words. Both install
//! them with [`guard`], prepare guest statements under [`GUEST_SQL_PREFIX`],
//! cap the values SQL makes with [`cap_lengths`], and turn a refusal into a
//! message that names the statement, the rule and what to do instead with
//! [`GuestRules::explain`].

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, ErrorCode};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Tables the runtime owns inside a projection's database; the guest may
/// neither read nor write them (it could forge its checkpoint, hide its
/// dead letters or publish events no handled event caused).
/// `projector_kv` is the guest's own key/value state.
pub const RUNTIME_TABLES: [&str; 6] = [
    "projector_checkpoints",
    "projector_dead_letters",
    "projector_discarded",
    "projector_meta",
    "projector_outbox",
    "projector_resolved",
];

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

/// Run a guest statement whole, stepping through any rows a `RETURNING`
/// gives, and say how many rows it changed as `execute` reports it: none
/// for a read, nor for a CREATE or DROP (SQLite's `changes` would still be
/// the last INSERT, UPDATE or DELETE's count).
pub fn execute_whole(
    conn: &Connection,
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
) -> rusqlite::Result<u64> {
    let (readonly, before) = (stmt.readonly(), conn.total_changes());
    let mut rows = stmt.query(params)?;
    while rows.next()?.is_some() {}
    Ok(if readonly || conn.total_changes() == before { 0 } else { conn.changes() })
}

/// The guest's rules on one connection, as [`guard`] installed them.
#[derive(Clone)]
pub struct GuestRules {
    /// Whether the rules apply now: set while a guest statement is prepared
    /// and run, clear for the connection owner's own statements.
    pub active: Arc<AtomicBool>,
    /// The first rule the statement being run broke, to say which.
    refusal: Arc<Mutex<Option<Refusal>>>,
}

impl GuestRules {
    /// Apply the rules from now on, to a new guest statement.
    pub fn begin(&self) {
        *self.refusal.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        self.active.store(true, Ordering::Relaxed);
    }

    /// Stop applying them: the owner's statements follow.
    pub fn end(&self) {
        self.active.store(false, Ordering::Relaxed);
    }

    /// If `err` is the authorizer's refusal of `statement`, what to tell
    /// the guest: the statement (shortened), the rule it broke and what to
    /// do instead. `None` for every other error.
    ///
    /// A refusal ends the statement with `SQLITE_AUTH`, or for a function
    /// with a plain `SQLITE_ERROR`: what tells them apart from other errors
    /// is that the authorizer recorded a rule broken.
    pub fn explain(&self, statement: &str, err: &rusqlite::Error) -> Option<String> {
        let refusal = self.refusal.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let rule = match refusal {
            Some(refusal) => refusal.to_string(),
            None if err.sqlite_error_code() == Some(ErrorCode::AuthorizationForStatementDenied) => {
                "it breaks the host's rules for guest SQL".to_string()
            }
            None => return None,
        };
        Some(format!("statement {:?} refused: {rule}", shortened(statement)))
    }
}

/// Install the guest's rules as `conn`'s SQLite authorizer. They apply
/// between [`GuestRules::begin`] and [`GuestRules::end`]: around a guest
/// statement, never around the connection owner's own.
pub fn guard(conn: &mut Connection) -> rusqlite::Result<GuestRules> {
    let rules = GuestRules { active: Arc::new(AtomicBool::new(false)), refusal: Arc::default() };
    let (active, refusal) = (rules.active.clone(), rules.refusal.clone());
    conn.authorizer(Some(move |ctx: AuthContext<'_>| {
        if !active.load(Ordering::Relaxed) {
            return Authorization::Allow;
        }
        match refuse_guest(&ctx) {
            None => Authorization::Allow,
            Some(reason) => {
                let mut first = refusal.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                first.get_or_insert(reason);
                Authorization::Deny
            }
        }
    }))?;
    Ok(rules)
}

/// What a module is told when it writes from `query`, whose connection is
/// read-only: SQLite's error (the plain `SQLITE_READONLY`, which no other
/// guest connection gives), and where writes belong. `None` for any other
/// error.
pub fn written_in_query(err: &rusqlite::Error) -> Option<String> {
    match err {
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.extended_code == rusqlite::ffi::SQLITE_READONLY =>
        {
            Some(format!(
                "{err}: `query` serves reads on a read-only connection; write state in `handle` or `init`"
            ))
        }
        _ => None,
    }
}

/// The longest statement text a refusal quotes, in characters.
const QUOTED_STATEMENT_CHARS: usize = 80;

/// `statement` on one line, its runs of whitespace made one space, cut to
/// [`QUOTED_STATEMENT_CHARS`] with an ellipsis.
pub fn shortened(statement: &str) -> String {
    let one_line = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= QUOTED_STATEMENT_CHARS {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(QUOTED_STATEMENT_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// A rule of the guest's, broken.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    Transaction,
    Savepoint,
    Attach,
    Pragma { name: String, arg: Option<String> },
    VirtualTable,
    LoadExtension,
    RuntimeTable { table: String },
    TempTrigger,
    TriggerOnHostTable { table: String },
    Shadowing { name: String },
}

/// Pragmas that read a table's or an index's schema: what the guest may
/// have wanted, and can have from `sqlite_schema`.
const SCHEMA_PRAGMAS: [&str; 7] = [
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
];

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Transaction => f.write_str(
                "transaction control is the host's: every call already runs in the transaction \
                 that commits its writes together with the checkpoint; remove the statement (to \
                 undo a call's writes, return an error from it)",
            ),
            Refusal::Savepoint => f.write_str(
                "savepoints are the host's: every call already runs in one transaction; to undo a \
                 call's writes, return an error from it, or check before writing",
            ),
            Refusal::Attach => f.write_str(
                "a projection reaches only its own database: ATTACH and DETACH are not allowed to \
                 guests",
            ),
            Refusal::Pragma { name, arg } if SCHEMA_PRAGMAS.iter().any(|p| name.eq_ignore_ascii_case(p)) => {
                let table = arg.as_deref().unwrap_or("your_table").trim_matches(['\'', '"']);
                write!(
                    f,
                    "pragmas are not allowed to guests, nor their table-valued forms \
                     (pragma_{name}(…)); read the schema from sqlite_schema instead: \
                     SELECT sql FROM sqlite_schema WHERE tbl_name = '{table}'"
                )
            }
            Refusal::Pragma { name, .. } => write!(
                f,
                "pragmas are not allowed to guests (PRAGMA {name}): the host sets the connection \
                 up and shares it; write the projection so it needs no connection setting"
            ),
            Refusal::VirtualTable => f.write_str(
                "virtual tables (FTS5, R*Tree, …) are not allowed to guests: their modules run \
                 outside the rules guest SQL runs under; use ordinary tables and indexes",
            ),
            Refusal::LoadExtension => f.write_str(
                "loading SQLite extensions is not allowed to guests: a projection runs only its \
                 own module's code",
            ),
            Refusal::RuntimeTable { table } if table.eq_ignore_ascii_case("projector_outbox") => write!(
                f,
                "{table} belongs to the runtime: publish events with ctx.emit(…) while handling \
                 the event that causes them"
            ),
            Refusal::RuntimeTable { table } => write!(
                f,
                "{table} belongs to the runtime (checkpoints, dead letters, metadata and the \
                 outbox are the host's); keep your state in your own tables or in ctx.state()"
            ),
            Refusal::TempTrigger => f.write_str(
                "temp triggers are not allowed to guests: one could fire inside the host's own \
                 statements, with the host's rights; create the trigger (not TEMP) on one of your \
                 own tables",
            ),
            Refusal::TriggerOnHostTable { table } => write!(
                f,
                "a trigger on {table} would fire inside the host's own statements, with the \
                 host's rights; put triggers on your own tables"
            ),
            Refusal::Shadowing { name } => write!(
                f,
                "a temp table or view named {name} would take the place of the host's table in \
                 the host's own statements; choose another name"
            ),
        }
    }
}

/// The rule a guest statement's action breaks, if any: no transaction
/// control, savepoints, ATTACH/DETACH, pragmas, virtual tables or
/// `load_extension`; nothing on the runtime's tables; no trigger or
/// shadowing temp object that the host's own statements would run or
/// resolve with the host's rights.
fn refuse_guest(ctx: &AuthContext<'_>) -> Option<Refusal> {
    let runtime_table = |name: &str| RUNTIME_TABLES.iter().any(|t| name.eq_ignore_ascii_case(t));
    let host_writes = |name: &str| runtime_table(name) || name.eq_ignore_ascii_case(KV_TABLE);
    match ctx.action {
        // The host's statements run with this authorizer off, so a trigger
        // they fire would run with the host's rights (hide dead letters,
        // forge the checkpoint). A trigger on the guest's own tables is
        // fine: only guest statements fire it, and its body is authorized
        // as theirs. A temp trigger can sit on any schema's table: none.
        AuthAction::CreateTempTrigger { .. } | AuthAction::DropTempTrigger { .. } => {
            Some(Refusal::TempTrigger)
        }
        AuthAction::CreateTrigger { table_name, .. } if host_writes(table_name) => {
            Some(Refusal::TriggerOnHostTable { table: table_name.to_string() })
        }
        // The temp schema is searched first: a temp table or view named
        // like one of the host's would take its place in host statements.
        AuthAction::CreateTempTable { table_name } | AuthAction::CreateTempView { view_name: table_name }
            if host_writes(table_name) =>
        {
            Some(Refusal::Shadowing { name: table_name.to_string() })
        }
        AuthAction::Transaction { .. } => Some(Refusal::Transaction),
        AuthAction::Savepoint { .. } => Some(Refusal::Savepoint),
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => Some(Refusal::Attach),
        AuthAction::Pragma { pragma_name, pragma_value } => {
            Some(Refusal::Pragma { name: pragma_name.to_string(), arg: pragma_value.map(str::to_string) })
        }
        AuthAction::CreateVtable { .. } | AuthAction::DropVtable { .. } => Some(Refusal::VirtualTable),
        AuthAction::Function { function_name } if function_name.eq_ignore_ascii_case("load_extension") => {
            Some(Refusal::LoadExtension)
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
            Some(Refusal::RuntimeTable { table: table_name.to_string() })
        }
        _ => None,
    }
}
