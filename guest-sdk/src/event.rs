//! [`Event`]: one event as a projection sees it, with typed accessors.

use crate::Failure;
use serde::Deserialize;

/// One event delivered to a projection.
///
/// Built by the host in a module; built with [`Event::new`] and the `with_*`
/// methods in native tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub(crate) stream: String,
    pub(crate) position: u64,
    pub(crate) id: String,
    pub(crate) event_type: String,
    pub(crate) subject: Option<String>,
    pub(crate) time: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<String>,
    pub(crate) data: Vec<u8>,
    pub(crate) partition: Option<u32>,
    /// Its place in the batch the host handed the module: what names it
    /// as the cause of an event it emits.
    pub(crate) index: Option<u32>,
}

impl Event {
    /// An event of `event_type` carrying `data` (JSON by convention), for
    /// tests. Stream, id and position are filled in by the test harness
    /// unless set with the `with_*` methods.
    pub fn new(event_type: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        Event {
            stream: String::new(),
            position: 0,
            id: String::new(),
            event_type: event_type.into(),
            subject: None,
            time: None,
            correlation_id: None,
            causation_id: None,
            data: data.into(),
            partition: None,
            index: None,
        }
    }

    /// An event of `event_type` whose data is `value` serialized as JSON.
    pub fn json(event_type: impl Into<String>, value: &impl serde::Serialize) -> Self {
        let data = serde_json::to_vec(value).expect("a serde value serializes to JSON");
        Event::new(event_type, data)
    }

    /// Set the stream.
    pub fn with_stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = stream.into();
        self
    }
    /// Set the position.
    pub fn with_position(mut self, position: u64) -> Self {
        self.position = position;
        self
    }
    /// Set the source partition (a Kafka topic's partition number).
    pub fn with_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }
    /// Set the id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }
    /// Set the subject.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }
    /// Set the time (RFC 3339).
    pub fn with_time(mut self, time: impl Into<String>) -> Self {
        self.time = Some(time.into());
        self
    }
    /// Set the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
    /// Set the causation id.
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// The stream the event was appended to.
    pub fn stream(&self) -> &str {
        &self.stream
    }
    /// The event's position in its source.
    pub fn position(&self) -> u64 {
        self.position
    }
    /// The source partition the event came from: a Kafka topic's partition
    /// number; `None` for a source without partitions of its own (the
    /// embedded log, a JetStream stream, a Redis stream key). Positions are
    /// ordered within one `(stream, partition)`.
    pub fn partition(&self) -> Option<u32> {
        self.partition
    }
    /// The publisher's unique id for the event.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The event type, e.g. `wallet_updated`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    /// What the event is about, if the publisher said.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }
    /// When it happened (RFC 3339), if the publisher said.
    pub fn time(&self) -> Option<&str> {
        self.time.as_deref()
    }
    /// The correlation id shared by one business operation's events.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }
    /// The id of what caused this event.
    pub fn causation_id(&self) -> Option<&str> {
        self.causation_id.as_deref()
    }
    /// The raw payload.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The payload parsed as JSON into `T` (which may borrow from the event). Data that does not parse is an
    /// event that can never be applied, so the error is a
    /// [`Failure::Reject`] naming the event and what is wrong.
    pub fn data_json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, Failure> {
        serde_json::from_slice(&self.data).map_err(|err| {
            Failure::Reject(format!(
                "event {} ({}): data is not a valid {}: {err}",
                self.id,
                self.event_type,
                short_type_name::<T>(),
            ))
        })
    }
}

/// `my_crate::WalletUpdated<'_>` → `WalletUpdated`: what a reason should say.
pub(crate) fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let without_generics = full.split('<').next().unwrap_or(full);
    without_generics.rsplit("::").next().unwrap_or(without_generics)
}
