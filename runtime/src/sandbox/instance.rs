//! [`GuestInstance`]: one live instance of a module over a projection's
//! database — instantiate, check the state version, `init`, and call
//! `handle` inside a transaction, each call armed with the projection's
//! limits.
//!
//! A guest's linear memory is a cache, never the truth: an instance that
//! trapped is thrown away and a fresh one made from its `InstancePre`.

use crate::bindings::{Event, Failure, Projection};
use crate::sandbox::engine::{LoadedModule, ProjectorEngine};
use crate::sandbox::host::{GuestHost, Origin};
use crate::store;
use anyhow::{Context as _, Result, bail};
use rusqlite::Connection;
use std::sync::Arc;
use wasmtime::{Store, Trap};

/// How one `handle` call in a transaction ended.
#[derive(Debug, Clone)]
pub enum Attempt {
    /// The batch's writes and whatever `before_commit` wrote are committed.
    Committed,
    /// The module returned a failure; everything was rolled back.
    Failed(Failure),
    /// The module trapped (the reason names a broken limit, if one was);
    /// everything was rolled back and the instance re-made.
    Trapped(String),
    /// The module trapped by using up the call's whole deadline or fuel:
    /// as [`Attempt::Trapped`], but trying again costs that much again.
    Exhausted(String),
}

/// A live instance of a projection module.
pub struct GuestInstance {
    engine: Arc<ProjectorEngine>,
    module: LoadedModule,
    store: Store<GuestHost>,
    guest: Projection,
    reader: bool,
}

/// How one `query` call ended.
#[derive(Debug, Clone)]
pub enum QueryOutcome {
    /// The module's answer.
    Answer(Vec<u8>),
    /// The module refused the request, with its reason.
    Refused(String),
    /// The module trapped; the instance was re-made.
    Trapped(String),
}

impl GuestInstance {
    /// Instantiate `module` over `host`'s database and run its `init`.
    pub fn new(engine: Arc<ProjectorEngine>, module: LoadedModule, host: GuestHost) -> Result<Self> {
        let (store, guest) = instantiate(&engine, &module, host, true)?;
        Ok(GuestInstance { engine, module, store, guest, reader: false })
    }

    /// An instance for serving `query` over a read-only connection: no
    /// `init` (it would write), and every call reads one snapshot.
    pub fn reader(engine: Arc<ProjectorEngine>, module: LoadedModule, host: GuestHost) -> Result<Self> {
        let (store, guest) = instantiate(&engine, &module, host, false)?;
        Ok(GuestInstance { engine, module, store, guest, reader: true })
    }

    /// The state version the module declares.
    pub fn state_version(&mut self) -> Result<u32> {
        let limits = *self.store.data().limits();
        limits.arm(&mut self.store, self.engine.fuel_enabled())?;
        match self.guest.call_state_version(&mut self.store) {
            Ok(version) => Ok(version),
            Err(trap) => bail!("the module trapped in state-version: {}", limits.describe_trap(trap)),
        }
    }

    /// Call the module's `query` with `request`, inside one read
    /// transaction, under the projection's limits.
    pub fn query(&mut self, request: &[u8]) -> Result<QueryOutcome> {
        let limits = *self.store.data().limits();
        limits.arm(&mut self.store, self.engine.fuel_enabled())?;
        self.store.data_mut().set_batch(&[], &[]);
        self.db().prepare_cached("BEGIN")?.execute([])?;
        let result = self.guest.call_query(&mut self.store, request);
        self.db().prepare_cached("ROLLBACK")?.execute([])?;
        match result {
            Ok(Ok(answer)) => Ok(QueryOutcome::Answer(answer)),
            Ok(Err(reason)) => Ok(QueryOutcome::Refused(reason)),
            Err(trap) => {
                if let Some(err) = self.store.data_mut().take_host_error() {
                    return Err(err.context("the host failed serving a query"));
                }
                let reason = limits.describe_trap(trap);
                self.remake()?;
                Ok(QueryOutcome::Trapped(reason))
            }
        }
    }

    /// The module this instance runs.
    pub fn module(&self) -> &LoadedModule {
        &self.module
    }

    /// How many events the last `handle` call emitted into the outbox
    /// (committed only if that call's [`Attempt`] is
    /// [`Attempt::Committed`]).
    pub fn emitted(&self) -> u64 {
        self.store.data().emitted()
    }

    /// The projection's database (this instance's connection).
    pub fn db(&self) -> &Connection {
        self.store.data().db()
    }

    /// `BEGIN`; `handle(events)` (`origins`: each event's source
    /// partition, or empty for a source of one); on success `before_commit`
    /// (the checkpoint, a dead letter's removal) and `COMMIT`; else
    /// `ROLLBACK`. Fails only when the host itself fails (its database, a
    /// commit).
    pub fn handle_in_transaction(
        &mut self,
        events: &[Event],
        origins: &[Origin],
        before_commit: impl FnOnce(&Connection) -> Result<()>,
    ) -> Result<Attempt> {
        let limits = *self.store.data().limits();
        if let Err(err) = self.db().prepare_cached("BEGIN IMMEDIATE")?.execute([]) {
            // Another writer (a dead-letter retry from another process)
            // held the database past the busy timeout: try again later.
            if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) {
                return Ok(Attempt::Failed(Failure::Retry(format!(
                    "the projection's database is busy (another writer holds it): {err}"
                ))));
            }
            return Err(err.into());
        }
        limits.arm(&mut self.store, self.engine.fuel_enabled())?;
        self.store.data_mut().set_batch(events, origins);
        let result = self.guest.call_handle(&mut self.store, events);
        let dropped = self.store.data_mut().take_log_dropped();
        if dropped > 0 {
            tracing::warn!(
                projection = self.store.data().projection(),
                dropped,
                "guest log lines dropped over limits.log_lines_per_second"
            );
        }
        match result {
            Ok(Ok(())) => {
                let committed = before_commit(self.db())
                    .and_then(|()| Ok(self.db().prepare_cached("COMMIT")?.execute([])?));
                if let Err(err) = committed {
                    let _ = self.db().execute_batch("ROLLBACK");
                    return Err(err.context(format!(
                        "projection {}: cannot commit a batch",
                        self.store.data().projection()
                    )));
                }
                Ok(Attempt::Committed)
            }
            Ok(Err(failure)) => {
                self.db().prepare_cached("ROLLBACK")?.execute([])?;
                Ok(Attempt::Failed(failure))
            }
            Err(trap) => {
                self.db().prepare_cached("ROLLBACK")?.execute([])?;
                if let Some(err) = self.store.data_mut().take_host_error() {
                    return Err(err
                        .context(format!("projection {}: the host failed", self.store.data().projection())));
                }
                let exhausted =
                    matches!(trap.downcast_ref::<Trap>(), Some(Trap::Interrupt | Trap::OutOfFuel));
                let reason = limits.describe_trap(trap);
                let (event_id, correlation_id) = single_event_ids(events);
                tracing::warn!(
                    projection = self.store.data().projection(),
                    first_position = events.first().map_or(0, |e| e.position),
                    events = events.len(),
                    event_id,
                    correlation_id,
                    "{reason}; making a fresh instance"
                );
                self.remake()?;
                Ok(if exhausted { Attempt::Exhausted(reason) } else { Attempt::Trapped(reason) })
            }
        }
    }

    /// Throw this instance away and make a fresh one over the same database.
    fn remake(&mut self) -> Result<()> {
        // A placeholder store holds nothing; it lives only while the old
        // store's data moves into the new one.
        let placeholder = GuestHost::new(
            Connection::open_in_memory()?,
            self.store.data().projection().into(),
            *self.store.data().limits(),
        )?;
        let old = std::mem::replace(&mut self.store, Store::new(self.engine.engine(), placeholder));
        let (store, guest) = instantiate(&self.engine, &self.module, old.into_data(), !self.reader)?;
        self.store = store;
        self.guest = guest;
        Ok(())
    }
}

/// The event id and correlation id a log line about `events` carries: those
/// of the event when there is one (a split has narrowed a failure down to
/// it), else empty.
pub fn single_event_ids(events: &[Event]) -> (&str, &str) {
    match events {
        [event] => (&event.id, event.correlation_id.as_deref().unwrap_or("")),
        _ => ("", ""),
    }
}

/// A fresh instance over `host`: instantiate, and unless it only serves
/// reads, check the state version the database holds against the module's
/// and run `init` in a transaction.
fn instantiate(
    engine: &ProjectorEngine,
    module: &LoadedModule,
    host: GuestHost,
    init: bool,
) -> Result<(Store<GuestHost>, Projection)> {
    let name = host.projection().to_string();
    let shown = module.path.display();
    let limits = *host.limits();
    let mut store = Store::new(engine.engine(), host);
    store.limiter(|host| host);
    store.epoch_deadline_trap();
    limits.arm(&mut store, engine.fuel_enabled())?;
    let guest = module
        .pre
        .instantiate(&mut store)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("projection {name}: module {shown} failed to instantiate"))?;
    if !init {
        return Ok((store, guest));
    }
    let version = match guest.call_state_version(&mut store) {
        Ok(version) => version,
        Err(trap) => bail!(
            "projection {name}: module {shown} trapped in state-version: {}",
            limits.describe_trap(trap)
        ),
    };
    let db = store.data().db();
    let found = store::meta(db, "state_version")?
        .map(|v| v.parse::<u32>())
        .transpose()
        .context("the database's state_version is not a number")?;
    if let Some(found) = found
        && found != version
    {
        bail!(
            "projection {name}: module {shown} builds state version {version} but the database \
             {} holds version {found}; remove the database to rebuild it from the log",
            db.path().unwrap_or("?")
        );
    }
    limits.arm(&mut store, engine.fuel_enabled())?;
    // No event is being handled: `init` may not emit.
    store.data_mut().set_batch(&[], &[]);
    store.data().db().prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    match guest.call_init(&mut store, found) {
        Ok(Ok(())) => {
            let db = store.data().db();
            store::set_meta(db, "state_version", Some(&version.to_string()))?;
            db.prepare_cached("COMMIT")?.execute([])?;
        }
        Ok(Err(reason)) => {
            store.data().db().prepare_cached("ROLLBACK")?.execute([])?;
            bail!("projection {name}: module {shown} refused to init: {reason}");
        }
        Err(trap) => {
            store.data().db().prepare_cached("ROLLBACK")?.execute([])?;
            if let Some(err) = store.data_mut().take_host_error() {
                return Err(err.context(format!("projection {name}: the host failed in init")));
            }
            bail!("projection {name}: module {shown} trapped in init: {}", limits.describe_trap(trap));
        }
    }
    Ok((store, guest))
}
