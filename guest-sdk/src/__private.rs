//! The glue between the generated bindings and [`crate::Projection`]; only
//! [`crate::export!`] uses it. Hidden: guest authors never see wit-bindgen.

pub use std::vec::Vec;
pub use wit_bindgen;

#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "packed-projection",
        // Import parameters borrow the guest's values: no copy of a string
        // or blob just to hand it to the host.
        ownership: Borrowing { duplicate_if_necessary: true },
        pub_export_macro: true,
        export_macro_name: "__export_projection",
        default_bindings_module: "::projector_sdk::__private::bindings",
        runtime_path: "::projector_sdk::__private::wit_bindgen::rt",
    });
}

use crate::context::{Backend, Context, Level, Rows, Value};
use crate::event::Fields;
use crate::text::same_text;
use crate::{Event, Failure, Param, Projection};
use bindings::projector::projection::{batch, deferred_packed, emit, log, prepared, sql, state};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

pub use bindings::Guest;
pub use bindings::exports::projector::projection::packed::Guest as PackedGuest;
pub use bindings::projector::projection::types::{Event as WitEvent, Failure as WitFailure};

/// Calls the world's imports: the projection's database and log, in the host.
struct WasmBackend;

/// Statements kept prepared in the host at most: past this many, a new
/// statement text is sent whole on every call, as a module that writes
/// values into its SQL would need.
const PREPARED: usize = 256;

/// A statement prepared in the host: its handle and its columns' names.
type Prepared = (u32, Arc<[String]>);

thread_local! {
    /// The statements prepared in the host, by text: each statement's text
    /// crosses the boundary once, then only its handle does, and its rows
    /// come back without the column names.
    static STATEMENTS: RefCell<HashMap<String, Prepared>> = RefCell::new(HashMap::new());
    /// The statements last looked up, by where their text was: a statement
    /// is usually a literal, at the same address on every call, so a lookup
    /// is a compare of its text with the one found there, with no hashing.
    static RECENT: RefCell<[Option<Recent>; RECENT_SLOTS]> = const { RefCell::new([const { None }; RECENT_SLOTS]) };
}

thread_local! {
    /// Statements deferred and not sent yet, as `deferred-packed.execute`
    /// takes them: sent when [`SEND_DEFERRED`] bytes are waiting, before
    /// any other call to the host, and before the module returns.
    static DEFERRED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Bytes of deferred statements sent at once: the host's writer starts on
/// the first ones while the module defers the next.
const SEND_DEFERRED: usize = 8 << 10;

/// Send the statements deferred so far.
fn send_deferred() {
    DEFERRED.with_borrow_mut(|waiting| {
        if waiting.is_empty() {
            return;
        }
        deferred_packed::execute(waiting);
        waiting.clear();
        if waiting.capacity() > 4 * SEND_DEFERRED {
            *waiting = Vec::new();
        }
    });
}

/// Add a deferred statement to those waiting, in the layout of
/// `deferred-packed.execute`.
fn pack_deferred(handle: u32, params: &[Param<'_>]) -> usize {
    DEFERRED.with_borrow_mut(|waiting| {
        waiting.extend_from_slice(&handle.to_le_bytes());
        waiting.extend_from_slice(&(params.len() as u32).to_le_bytes());
        for param in params {
            match *param {
                Param::Null => waiting.push(0),
                Param::Integer(n) => {
                    waiting.push(1);
                    waiting.extend_from_slice(&n.to_le_bytes());
                }
                Param::Real(x) => {
                    waiting.push(2);
                    waiting.extend_from_slice(&x.to_le_bytes());
                }
                Param::Text(text) => {
                    waiting.push(3);
                    waiting.extend_from_slice(&(text.len() as u32).to_le_bytes());
                    waiting.extend_from_slice(text.as_bytes());
                }
                Param::Blob(blob) => {
                    waiting.push(4);
                    waiting.extend_from_slice(&(blob.len() as u32).to_le_bytes());
                    waiting.extend_from_slice(blob);
                }
            }
        }
        waiting.len()
    })
}

/// Slots in [`RECENT`].
const RECENT_SLOTS: usize = 32;

/// A statement looked up lately: where its text was, the text, and what
/// the host prepared for it.
struct Recent {
    at: usize,
    text: Box<str>,
    prepared: Prepared,
}

/// The slot of [`RECENT`] for a text at `at` of `len` bytes.
fn recent_slot(at: usize, len: usize) -> usize {
    (at.wrapping_mul(0x9E37_79B9) ^ len) % RECENT_SLOTS
}

/// The host's handle for `statement` and its columns' names, prepared on
/// first use; `None` once [`PREPARED`] statements are (run it unprepared).
fn prepared(statement: &str) -> Result<Option<Prepared>, String> {
    let (at, slot) = (statement.as_ptr() as usize, recent_slot(statement.as_ptr() as usize, statement.len()));
    let recent = RECENT.with_borrow(|recent| match &recent[slot] {
        Some(found) if found.at == at && same_text(found.text.as_bytes(), statement.as_bytes()) => {
            Some(found.prepared.clone())
        }
        _ => None,
    });
    if recent.is_some() {
        return Ok(recent);
    }
    let found = match STATEMENTS.with_borrow(|statements| statements.get(statement).cloned()) {
        Some(found) => found,
        None if STATEMENTS.with_borrow(HashMap::len) >= PREPARED => return Ok(None),
        None => {
            // A statement deferred before may make this one preparable (a
            // table it creates).
            send_deferred();
            let prepared = prepared::prepare(statement)?;
            let entry = (prepared.handle, Arc::<[String]>::from(prepared.columns));
            STATEMENTS.with_borrow_mut(|statements| statements.insert(statement.to_string(), entry.clone()));
            entry
        }
    };
    RECENT.with_borrow_mut(|recent| {
        recent[slot] = Some(Recent { at, text: statement.into(), prepared: found.clone() });
    });
    Ok(Some(found))
}

impl Backend for WasmBackend {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        send_deferred();
        state::get(key)
    }
    fn set(&self, key: &str, value: &[u8]) {
        send_deferred();
        state::set(key, value)
    }
    fn delete(&self, key: &str) {
        send_deferred();
        state::delete(key)
    }
    fn scan(&self, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        send_deferred();
        state::scan(prefix, limit)
    }
    fn execute(&self, statement: &str, params: &[Param<'_>]) -> Result<u64, String> {
        send_deferred();
        match prepared(statement)? {
            Some((handle, _)) => prepared::execute(handle, &to_wit_values(params)),
            None => sql::execute(statement, &to_wit_values(params)),
        }
    }
    fn defer(&self, statement: &str, params: &[Param<'_>]) -> Result<(), String> {
        match prepared(statement)? {
            Some((handle, _)) => {
                if pack_deferred(handle, params) >= SEND_DEFERRED {
                    send_deferred();
                }
                Ok(())
            }
            // Past the statements kept prepared: run it now.
            None => {
                send_deferred();
                sql::execute(statement, &to_wit_values(params)).map(drop)
            }
        }
    }
    fn query(&self, statement: &str, params: &[Param<'_>]) -> Result<Rows, String> {
        send_deferred();
        let (columns, rows) = match prepared(statement)? {
            Some((handle, columns)) => (columns, prepared::query(handle, &to_wit_values(params))?),
            None => {
                let rows = sql::query(statement, &to_wit_values(params))?;
                (rows.columns.into(), rows.rows)
            }
        };
        Ok(Rows::new(
            columns,
            rows.into_iter().map(|row| row.into_iter().map(from_wit_value).collect()).collect(),
        ))
    }
    fn log(&self, level: Level, message: &str, position: Option<u64>) {
        let level = match level {
            Level::Trace => log::Level::Trace,
            Level::Debug => log::Level::Debug,
            Level::Info => log::Level::Info,
            Level::Warn => log::Level::Warn,
            Level::Error => log::Level::Error,
        };
        log::write(level, message, position)
    }
    fn emit(
        &self,
        stream: &str,
        event_type: &str,
        subject: Option<&str>,
        data: &[u8],
        position: u64,
        index: Option<u32>,
    ) -> Result<(), String> {
        send_deferred();
        match index {
            Some(index) => batch::emit(index, stream, event_type, subject, data),
            None => emit::emit(stream, event_type, subject, data, position),
        }
    }
}

fn to_wit_values<'a>(params: &[Param<'a>]) -> Vec<sql::ValueParam<'a>> {
    params
        .iter()
        .map(|param| match *param {
            Param::Null => sql::ValueParam::Null,
            Param::Integer(n) => sql::ValueParam::Integer(n),
            Param::Real(x) => sql::ValueParam::Real(x),
            Param::Text(s) => sql::ValueParam::Text(s),
            Param::Blob(b) => sql::ValueParam::Blob(b),
        })
        .collect()
}

fn from_wit_value(value: sql::ValueResult) -> Value {
    match value {
        sql::ValueResult::Null => Value::Null,
        sql::ValueResult::Integer(n) => Value::Integer(n),
        sql::ValueResult::Real(x) => Value::Real(x),
        sql::ValueResult::Text(s) => Value::Text(s),
        sql::ValueResult::Blob(b) => Value::Blob(b),
    }
}

pub fn init<P: Projection>(found: Option<u32>) -> Result<(), String> {
    let ctx = Context::new(&WasmBackend);
    let result = crate::migrations::apply(&ctx, P::MIGRATIONS).and_then(|()| P::init(&ctx, found));
    send_deferred();
    result
}

pub fn handle<P: Projection>(events: Vec<WitEvent>) -> Result<(), WitFailure> {
    let partitions = batch::partitions();
    let events: Vec<Event> = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            Event::from_fields(Fields {
                stream: &e.stream,
                id: &e.id,
                event_type: &e.type_,
                subject: e.subject.as_deref(),
                time: e.time.as_deref(),
                correlation_id: e.correlation_id.as_deref(),
                causation_id: e.causation_id.as_deref(),
                data: &e.data,
                position: e.position,
                partition: partitions.get(i).copied().flatten(),
                index: u32::try_from(i).ok(),
            })
        })
        .collect();
    apply::<P>(&events)
}

/// `handle`, with the batch packed into one buffer.
pub fn handle_packed<P: Projection>(batch: Vec<u8>) -> Result<(), WitFailure> {
    // Only a host that breaks the contract's layout gets here: a trap says
    // so, where a rejection would park events that are not at fault.
    let events = crate::packed::unpack(&batch)
        .unwrap_or_else(|err| panic!("the host handed a malformed packed batch: {err}"));
    drop(batch);
    apply::<P>(&events)
}

fn apply<P: Projection>(events: &[Event]) -> Result<(), WitFailure> {
    let result = P::handle_batch(&Context::new(&WasmBackend), events);
    send_deferred();
    result.map_err(|failure| match failure {
        Failure::Retry(reason) => WitFailure::Retry(reason),
        Failure::Reject(reason) => WitFailure::Reject(reason),
    })
}

pub fn query<P: Projection>(request: Vec<u8>) -> Result<Vec<u8>, String> {
    let answer = P::query(&Context::new(&WasmBackend), &request);
    send_deferred();
    answer
}
