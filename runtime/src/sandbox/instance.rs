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
use wasmtime::component::Func;
use wasmtime::{Store, Trap};

/// A batch is handed to the packed `handle` when the module has it and the
/// batch packs into at most this many bytes; a bigger one goes to
/// `handle`, which needs no second copy of it in the guest's memory.
const PACKED_MAX: usize = 4 << 20;

/// The most a packed batch's buffer keeps between batches.
const PACKED_KEPT: usize = 256 << 10;

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
    /// The module's packed `handle`, when it has one.
    packed: Option<Func>,
    /// The last packed batch's buffer, kept for the next when small.
    buffer: Vec<u8>,
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
        let (store, guest, packed) = instantiate(&engine, &module, host, true)?;
        Ok(GuestInstance { engine, module, store, guest, packed, buffer: Vec::new(), reader: false })
    }

    /// An instance for serving `query` over a read-only connection: no
    /// `init` (it would write), and every call reads one snapshot.
    pub fn reader(engine: Arc<ProjectorEngine>, module: LoadedModule, host: GuestHost) -> Result<Self> {
        let (store, guest, packed) = instantiate(&engine, &module, host, false)?;
        Ok(GuestInstance { engine, module, store, guest, packed, buffer: Vec::new(), reader: true })
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
        let result = with_deferred(&mut self.store, result, |message| message);
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
        let result = match self.packed {
            Some(packed) if pack(events, origins, &mut self.buffer) => packed
                .typed::<(&[u8],), (Result<(), Failure>,)>(&self.store)
                .and_then(|handle| handle.call(&mut self.store, (&self.buffer,)))
                .map(|(result,)| result),
            _ => self.guest.call_handle(&mut self.store, events),
        };
        let result = with_deferred(&mut self.store, result, Failure::Reject);
        // Kept for small batches only: a hundred projections that caught
        // up in big batches must not each hold the last one.
        if self.buffer.capacity() > PACKED_KEPT {
            self.buffer = Vec::new();
        }
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
        let (store, guest, packed) = instantiate(&self.engine, &self.module, old.into_data(), !self.reader)?;
        self.store = store;
        self.guest = guest;
        self.packed = packed;
        Ok(())
    }
}

/// `result` of a call, with how the statements the call deferred ended: a
/// failed one fails a call that succeeded (`failure` makes the guest's
/// failure of its message), and a trap in one traps the call.
fn with_deferred<T, E>(
    store: &mut Store<GuestHost>,
    result: wasmtime::Result<Result<T, E>>,
    failure: impl FnOnce(String) -> E,
) -> wasmtime::Result<Result<T, E>> {
    match (result, store.data_mut().take_deferred_failure()) {
        (Ok(Ok(_)), Ok(Some(message))) => Ok(Err(failure(message))),
        (Ok(_), Err(trap)) => Err(wasmtime::Error::from_anyhow(trap)),
        (result, _) => result,
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
) -> Result<(Store<GuestHost>, Projection, Option<Func>)> {
    let name = host.projection().to_string();
    let shown = module.path.display();
    let limits = *host.limits();
    let mut store = Store::new(engine.engine(), host);
    store.limiter(|host| host);
    store.epoch_deadline_trap();
    limits.arm(&mut store, engine.fuel_enabled())?;
    let instance = module
        .pre
        .instance_pre()
        .instantiate(&mut store)
        .and_then(|instance| Ok((Projection::new(&mut store, &instance)?, instance)));
    let (guest, instance) = instance
        .map_err(anyhow::Error::from)
        .with_context(|| format!("projection {name}: module {shown} failed to instantiate"))?;
    let packed = module.packed.as_ref().and_then(|index| instance.get_func(&mut store, index));
    if !init {
        return Ok((store, guest, packed));
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
    let result = guest.call_init(&mut store, found);
    match with_deferred(&mut store, result, |message| message) {
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
    Ok((store, guest, packed))
}

/// Pack `events` for the packed `handle` into `out`, as the `packed`
/// interface lays them out: the count, every string end to end, every
/// payload end to end, then each event's position, flags, partition and
/// lengths. False (and `out` empty) when they would take more than
/// [`PACKED_MAX`] bytes.
fn pack(events: &[Event], origins: &[Origin], out: &mut Vec<u8>) -> bool {
    out.clear();
    let text: usize = events.iter().flat_map(strings).map(str::len).sum();
    let payloads: usize = events.iter().map(|event| event.data.len()).sum();
    // Records take at most 9 + 4 + 8 × 4 bytes an event.
    let most = 12 + text + payloads + events.len() * 45;
    if most > PACKED_MAX {
        return false;
    }
    // One allocation, not one per doubling with the batch copied each time.
    out.reserve(most);
    // Under PACKED_MAX, every count and length fits in a u32.
    let u32_le = |n: usize| (n as u32).to_le_bytes();
    out.extend_from_slice(&u32_le(events.len()));
    out.extend_from_slice(&u32_le(text));
    for string in events.iter().flat_map(strings) {
        out.extend_from_slice(string.as_bytes());
    }
    out.extend_from_slice(&u32_le(payloads));
    for event in events {
        out.extend_from_slice(&event.data);
    }
    for (i, event) in events.iter().enumerate() {
        let partition = origins.get(i).and_then(|origin| origin.number);
        let mut flags = 0u8;
        for (bit, field) in optional(event).iter().enumerate() {
            if field.is_some() {
                flags |= 1 << bit;
            }
        }
        if partition.is_some() {
            flags |= 16;
        }
        out.extend_from_slice(&event.position.to_le_bytes());
        out.push(flags);
        if let Some(partition) = partition {
            out.extend_from_slice(&partition.to_le_bytes());
        }
        for string in strings(event) {
            out.extend_from_slice(&u32_le(string.len()));
        }
        out.extend_from_slice(&u32_le(event.data.len()));
    }
    true
}

/// An event's subject, time, correlation and causation ids, as packed.
fn optional(event: &Event) -> [Option<&str>; 4] {
    [&event.subject, &event.time, &event.correlation_id, &event.causation_id].map(|field| field.as_deref())
}

/// An event's strings in the order they are packed.
fn strings(event: &Event) -> impl Iterator<Item = &str> {
    [event.stream.as_str(), event.id.as_str(), event.type_.as_str()]
        .into_iter()
        .chain(optional(event).into_iter().flatten())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::store::runtime_tables;
    use std::path::Path;

    fn module(engine: &ProjectorEngine, crate_name: &str) -> LoadedModule {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/projections/{crate_name}.wasm"));
        engine.load_file(&path).unwrap_or_else(|err| panic!("{err:#}: run scripts/build-guests first"))
    }

    fn instance(engine: &Arc<ProjectorEngine>, module: &LoadedModule) -> GuestInstance {
        let db = Connection::open_in_memory().unwrap();
        db.execute_batch(runtime_tables::SCHEMA).unwrap();
        let host = GuestHost::new(db, "recorder".into(), Limits::default()).unwrap();
        GuestInstance::new(engine.clone(), module.clone(), host).unwrap()
    }

    /// Every optional field set on some events and not on others, a
    /// partition on some, and strings that are not ASCII.
    fn events() -> (Vec<Event>, Vec<Origin>) {
        let events = (0..50u64)
            .map(|i| Event {
                stream: if i % 2 == 0 { "wallets" } else { "комменты" }.into(),
                position: i + 1,
                id: format!("e-{i}"),
                type_: if i % 3 == 0 { "wallet_updated" } else { "kyc_verified" }.into(),
                subject: (i % 2 == 0).then(|| format!("user-{i}")),
                time: (i % 3 == 0).then(|| format!("2026-12-03T12:00:{:02}Z", i % 60)),
                correlation_id: (i % 4 == 0).then(|| format!("corr-{i}")),
                causation_id: (i % 5 == 0).then(|| format!("cause-{i} ✓")),
                data: if i % 7 == 0 { Vec::new() } else { format!("{{\"n\":{i}}}").into_bytes() },
            })
            .collect();
        let origins = (0..50u64)
            .map(|i| Origin { partition: None, number: (i % 2 == 1).then_some(i as u32 % 3), through: i + 1 })
            .collect();
        (events, origins)
    }

    fn handled(instance: &GuestInstance) -> Vec<Vec<rusqlite::types::Value>> {
        let db = instance.db();
        let mut stmt = db.prepare("SELECT * FROM handled ORDER BY rowid").unwrap();
        let width = stmt.column_count();
        stmt.query_map([], |row| (0..width).map(|i| row.get(i)).collect())
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn a_packed_batch_applies_exactly_as_the_worlds_handle_would() {
        let engine = Arc::new(ProjectorEngine::new(false).unwrap());
        let recorder = module(&engine, "event_recorder");
        assert!(recorder.packed.is_some(), "the SDK's modules export the packed handle");
        let (events, origins) = events();

        let mut packed = instance(&engine, &recorder);
        assert!(packed.packed.is_some());
        let attempt = packed.handle_in_transaction(&events, &origins, |_| Ok(())).unwrap();
        assert!(matches!(attempt, Attempt::Committed), "{attempt:?}");

        let mut plain = instance(&engine, &recorder);
        plain.packed = None;
        let attempt = plain.handle_in_transaction(&events, &origins, |_| Ok(())).unwrap();
        assert!(matches!(attempt, Attempt::Committed), "{attempt:?}");

        let (rows, expected) = (handled(&packed), handled(&plain));
        assert_eq!(rows.len(), 50);
        assert_eq!(rows, expected);
        // And what both saw is what was sent: every field of one event.
        use rusqlite::types::Value::{Integer, Null, Text};
        assert_eq!(
            rows[15],
            [
                Integer(16),
                Text("e-15".into()),
                Text("комменты".into()),
                Text("wallet_updated".into()),
                Integer(0),
                Null,
                Null,
                Text("{\"n\":15}".into()),
                Text("2026-12-03T12:00:15Z".into()),
                Text("cause-15 ✓".into()),
            ]
        );
    }

    #[test]
    fn a_module_built_for_the_first_contract_has_no_packed_handle() {
        let engine = ProjectorEngine::new(false).unwrap();
        assert!(module(&engine, "contract_v0_1").packed.is_none());
    }

    #[test]
    fn only_a_small_packed_batchs_buffer_is_kept_for_the_next() {
        let engine = Arc::new(ProjectorEngine::new(false).unwrap());
        let mut recorder = instance(&engine, &module(&engine, "event_recorder"));
        let (mut events, origins) = events();
        let attempt = recorder.handle_in_transaction(&events, &origins, |_| Ok(())).unwrap();
        assert!(matches!(attempt, Attempt::Committed), "{attempt:?}");
        assert!(recorder.buffer.capacity() > 0, "a small batch's buffer is kept");
        // 1.5 MB packed: applied, then let go.
        for event in &mut events[..3] {
            event.data = vec![b'x'; 500_000];
        }
        let attempt = recorder.handle_in_transaction(&events, &origins, |_| Ok(())).unwrap();
        assert!(matches!(attempt, Attempt::Committed), "{attempt:?}");
        assert_eq!(handled(&recorder).len(), 100);
        assert_eq!(recorder.buffer.capacity(), 0);
    }

    #[test]
    fn a_batch_too_big_to_pack_goes_to_the_worlds_handle() {
        let (mut events, origins) = events();
        let mut buffer = Vec::new();
        assert!(pack(&events, &origins, &mut buffer));
        // Eight events of 600 KB (each under the limit on a value).
        for event in &mut events[10..18] {
            event.data = vec![b'x'; 600_000];
        }
        assert!(!pack(&events, &origins, &mut buffer));

        // It still applies, through `handle`.
        let engine = Arc::new(ProjectorEngine::new(false).unwrap());
        let mut recorder = instance(&engine, &module(&engine, "event_recorder"));
        let attempt = recorder.handle_in_transaction(&events, &origins, |_| Ok(())).unwrap();
        assert!(matches!(attempt, Attempt::Committed), "{attempt:?}");
        assert_eq!(handled(&recorder).len(), 50);
    }
}
