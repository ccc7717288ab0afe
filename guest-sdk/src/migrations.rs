//! [`crate::Projection::MIGRATIONS`], applied: before every `init`, in the
//! module and in the test harness alike, the migrations the database has not
//! had yet run in order, each recorded in the SDK's own table in the same
//! transaction. The table holds each applied statement, so a migration
//! edited after it ran is caught instead of silently diverging.

use crate::Context;

/// The SDK's table of applied migrations, in the projection's database.
pub(crate) const TABLE: &str = "projector_sdk_migrations";

/// A statement with its runs of whitespace made one space: reindenting a
/// migration is not changing it.
fn normalized(statement: &str) -> String {
    statement.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Apply the `migrations` that `ctx`'s database has not had yet.
pub(crate) fn apply(ctx: &Context, migrations: &[&str]) -> Result<(), String> {
    // Raw rows, not typed ones: a module that lists no migrations should
    // not carry the row deserializer for this.
    let exists =
        ctx.sql().query("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1", (TABLE,))?;
    if exists.is_empty() {
        if migrations.is_empty() {
            return Ok(());
        }
        ctx.sql().execute(
            "CREATE TABLE projector_sdk_migrations (
                n INTEGER PRIMARY KEY NOT NULL,
                statement TEXT NOT NULL,
                applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
            )",
            (),
        )?;
    }
    let rows = ctx.sql().query("SELECT n, statement FROM projector_sdk_migrations ORDER BY n", ())?;
    let applied: Vec<(i64, &str)> =
        rows.iter().map(|row| (row[0].as_i64().unwrap_or(0), row[1].as_str().unwrap_or(""))).collect();
    if applied.len() > migrations.len() {
        return Err(format!(
            "the database has had {} migrations but this module lists {}: it is older than the \
             database's schema. Deploy a module that lists every migration applied (they are \
             append-only), or raise STATE_VERSION to rebuild the state from the log",
            applied.len(),
            migrations.len()
        ));
    }
    for (i, ((n, was), now)) in applied.iter().zip(migrations).enumerate() {
        if *n != i as i64 + 1 || normalized(was) != normalized(now) {
            return Err(format!(
                "migration {} was changed after it was applied to this database (applied: {:?}; \
                 now: {:?}). Migrations are append-only: put the change in a new migration at the \
                 end, or raise STATE_VERSION to rebuild the state from the log",
                i + 1,
                normalized(was),
                normalized(now)
            ));
        }
    }
    for (i, statement) in migrations.iter().enumerate().skip(applied.len()) {
        let n = i as i64 + 1;
        ctx.sql()
            .execute(statement, ())
            .map_err(|err| format!("migration {n} of {} failed: {err}", migrations.len()))?;
        ctx.sql()
            .execute("INSERT INTO projector_sdk_migrations (n, statement) VALUES (?1, ?2)", (n, statement))?;
    }
    Ok(())
}
