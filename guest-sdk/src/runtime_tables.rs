//! The tables the runtime keeps in a projection's database, and the rules
//! of the `emit` import that writes one of them, in one place for the host
//! (`runtime/src/store.rs`, `runtime/src/sandbox/host.rs`) and the
//! SDK's native harness (`projector_sdk::testing`): a database the harness
//! built has the host's layout, and an event emitted in a test is checked
//! and recorded as the host checks and records it.

/// The runtime's tables and the guest's key/value table, created if
/// missing. Run it inside a transaction.
///
/// - `projector_kv`: the guest's key/value state;
/// - `projector_checkpoints`: the position per source whose effect is
///   committed;
/// - `projector_meta`: module hash, state version, run state, last error;
/// - `projector_dead_letters`: events parked with the reason;
/// - `projector_discarded`, `projector_resolved`: dead letters an operator
///   discarded, and those a retry applied. A rebuild carries both into the
///   new generation: it hands a discarded event to no module and parks it no
///   more, and hands a resolved one to the module again if it parks it.
/// - `projector_outbox`: events the projection emitted, written in the
///   transaction of the batch that caused them and removed once published
///   (`runtime/src/projection/outbox.rs`).
///   `id` is deterministic ([`emit_id`]), so handling the same event again
///   (a rebuild) emits the same ids and a log that keeps ids unique does not
///   take them twice.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS projector_kv (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS projector_checkpoints (
    source TEXT PRIMARY KEY NOT NULL,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS projector_meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT
);
CREATE TABLE IF NOT EXISTS projector_dead_letters (
    source TEXT NOT NULL,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    stream TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT,
    time TEXT,
    correlation_id TEXT,
    causation_id TEXT,
    data BLOB NOT NULL,
    reason TEXT NOT NULL,
    module TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    parked_at TEXT NOT NULL,
    PRIMARY KEY (source, position)
);
CREATE TABLE IF NOT EXISTS projector_discarded (
    source TEXT NOT NULL,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    discarded_at TEXT NOT NULL,
    PRIMARY KEY (source, position)
);
CREATE TABLE IF NOT EXISTS projector_resolved (
    source TEXT NOT NULL,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    resolved_at TEXT NOT NULL,
    PRIMARY KEY (source, position)
);
CREATE TABLE IF NOT EXISTS projector_outbox (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    stream TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT,
    data BLOB NOT NULL,
    correlation_id TEXT,
    causation_id TEXT NOT NULL,
    source TEXT NOT NULL,
    time TEXT NOT NULL,
    position INTEGER NOT NULL,
    partition TEXT
);
";

/// Records one emitted event: `?1` id, `?2` stream, `?3` type, `?4`
/// subject, `?5` data, `?6` correlation id, `?7` causation id, `?8` source,
/// `?9` where its cause leaves the checkpoint of `?10`, the cause's
/// partition (`NULL` for a source's only partition). The time is SQLite's
/// clock, RFC 3339 in UTC.
pub const OUTBOX_INSERT: &str = "INSERT INTO projector_outbox (id, stream, type, subject, data, \
     correlation_id, causation_id, source, time, position, partition) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?9, ?10)";

/// An emitted event, as [`record_emitted`] writes it to the outbox.
pub struct Emitted<'a> {
    /// Its deterministic id ([`emit_id`]).
    pub id: &'a str,
    pub stream: &'a str,
    pub event_type: &'a str,
    pub subject: Option<&'a str>,
    pub data: &'a [u8],
    /// The correlation id and id of the event that caused it.
    pub correlation_id: Option<&'a str>,
    pub causation_id: &'a str,
    /// The projection that emitted it: its source is [`emit_source`].
    pub projection: &'a str,
    /// Where its cause leaves the checkpoint of `partition`.
    pub position: u64,
    pub partition: Option<&'a str>,
}

/// Record `event` in the outbox ([`OUTBOX_INSERT`]), in the transaction of
/// the batch that caused it.
pub fn record_emitted(conn: &rusqlite::Connection, event: &Emitted<'_>) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(OUTBOX_INSERT)?;
    stmt.execute(rusqlite::params![
        event.id,
        event.stream,
        event.event_type,
        event.subject,
        event.data,
        event.correlation_id,
        event.causation_id,
        emit_source(event.projection),
        i64::try_from(event.position).unwrap_or(i64::MAX),
        event.partition,
    ])?;
    Ok(())
}

/// The longest event type or subject an emitted event may carry, bytes.
pub const MAX_EMIT_NAME_BYTES: usize = 1024;

/// The id of the `index`th event (from 0) that `projection` emitted while
/// handling the event at `position` (of `partition`, for a source of
/// several partitions, where positions repeat across partitions): the same
/// every time that event is handled, so a republished outbox row is
/// recognised as the same event.
pub fn emit_id(projection: &str, partition: Option<&str>, position: u64, index: u32) -> String {
    match partition {
        None => format!("{projection}:{position}:{index}"),
        Some(partition) => format!("{projection}:{partition}:{position}:{index}"),
    }
}

/// The CloudEvents `source` of the events `projection` emits.
pub fn emit_source(projection: &str) -> String {
    format!("projector/{projection}")
}

/// The embedded log's rule for stream names (`event_log::validate_stream_name`
/// in the runtime, which a test keeps in step with this one), in its words.
pub fn check_stream_name(stream: &str) -> Result<(), String> {
    let ok = !stream.is_empty()
        && stream.len() <= 128
        && stream.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(format!(
            "invalid stream name {stream:?}: use 1 to 128 ASCII letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

/// The rules on an emitted event's type and subject (the stream is checked
/// by [`check_stream_name`]); the data's size is the value limit's.
pub fn check_emit_names(event_type: &str, subject: Option<&str>) -> Result<(), String> {
    if event_type.is_empty() {
        return Err("the event type is empty: name what happened, e.g. \"order_charged\"".into());
    }
    if event_type.len() > MAX_EMIT_NAME_BYTES {
        return Err(format!(
            "the event type is {} bytes long, over the limit of {MAX_EMIT_NAME_BYTES} bytes",
            event_type.len()
        ));
    }
    if let Some(subject) = subject
        && subject.len() > MAX_EMIT_NAME_BYTES
    {
        return Err(format!(
            "the subject is {} bytes long, over the limit of {MAX_EMIT_NAME_BYTES} bytes",
            subject.len()
        ));
    }
    Ok(())
}

/// Why an emit named a position that is not an event of the batch.
pub fn not_in_batch(position: u64) -> String {
    format!(
        "position {position} is not an event of the batch being handled: emit from `handle`, \
         on the context of the event that caused it"
    )
}
