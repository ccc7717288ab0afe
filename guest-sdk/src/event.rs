//! [`Event`]: one event as a projection sees it, with typed accessors.

use crate::Failure;
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;

/// One event delivered to a projection.
///
/// Built by the host in a module; built with [`Event::new`] and the `with_*`
/// methods in native tests.
#[derive(Clone)]
pub struct Event {
    /// The event's strings, end to end: in a module, the strings of the
    /// whole batch, shared by its events (one allocation a batch, not one
    /// a string).
    text: Arc<str>,
    /// Its payload and those of the rest of its batch (shared as `text` is).
    payloads: Arc<[u8]>,
    /// Where its parts are in `text` and `payloads`.
    spans: Spans,
    pub(crate) position: u64,
    pub(crate) partition: Option<u32>,
    /// Its place in the batch the host handed the module: what names it
    /// as the cause of an event it emits.
    pub(crate) index: Option<u32>,
}

/// Where one string or payload of an event is in the buffer it shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// An event's parts, borrowed: what [`Event::from_fields`] copies.
pub(crate) struct Fields<'a> {
    pub(crate) stream: &'a str,
    pub(crate) id: &'a str,
    pub(crate) event_type: &'a str,
    pub(crate) subject: Option<&'a str>,
    pub(crate) time: Option<&'a str>,
    pub(crate) correlation_id: Option<&'a str>,
    pub(crate) causation_id: Option<&'a str>,
    pub(crate) data: &'a [u8],
    pub(crate) position: u64,
    pub(crate) partition: Option<u32>,
    pub(crate) index: Option<u32>,
}

/// Where an event's parts are in the buffers it shares with its batch.
#[derive(Clone)]
pub(crate) struct Spans {
    pub(crate) stream: Span,
    pub(crate) id: Span,
    pub(crate) event_type: Span,
    pub(crate) subject: Option<Span>,
    pub(crate) time: Option<Span>,
    pub(crate) correlation_id: Option<Span>,
    pub(crate) causation_id: Option<Span>,
    pub(crate) data: Span,
}

impl Event {
    /// An event of `event_type` carrying `data` (JSON by convention), for
    /// tests. Stream, id and position are filled in by the test harness
    /// unless set with the `with_*` methods.
    pub fn new(event_type: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        let event_type = event_type.into();
        let data = data.into();
        Event::from_fields(Fields {
            stream: "",
            id: "",
            event_type: &event_type,
            subject: None,
            time: None,
            correlation_id: None,
            causation_id: None,
            data: &data,
            position: 0,
            partition: None,
            index: None,
        })
    }

    /// An event of `event_type` whose data is `value` serialized as JSON.
    pub fn json(event_type: impl Into<String>, value: &impl serde::Serialize) -> Self {
        let data = serde_json::to_vec(value).expect("a serde value serializes to JSON");
        Event::new(event_type, data)
    }

    /// An event of its own, its parts copied.
    pub(crate) fn from_fields(fields: Fields<'_>) -> Self {
        let mut text = String::new();
        let mut keep = |part: &str| {
            text.push_str(part);
            Span { start: text.len() - part.len(), end: text.len() }
        };
        let spans = Spans {
            stream: keep(fields.stream),
            id: keep(fields.id),
            event_type: keep(fields.event_type),
            subject: fields.subject.map(&mut keep),
            time: fields.time.map(&mut keep),
            correlation_id: fields.correlation_id.map(&mut keep),
            causation_id: fields.causation_id.map(&mut keep),
            data: Span { start: 0, end: fields.data.len() },
        };
        let mut event = Event::in_batch(&text.into(), &fields.data.into(), spans, fields.position);
        event.partition = fields.partition;
        event.index = fields.index;
        event
    }

    /// An event whose parts are at `spans` of buffers it shares with the
    /// rest of its batch. The spans must lie on `text`'s char boundaries.
    pub(crate) fn in_batch(text: &Arc<str>, payloads: &Arc<[u8]>, spans: Spans, position: u64) -> Self {
        Event {
            text: text.clone(),
            payloads: payloads.clone(),
            spans,
            position,
            partition: None,
            index: None,
        }
    }

    /// `value` added to the event's own text (a copy: setters are for
    /// tests), and where it is there.
    fn keep(&mut self, value: &str) -> Span {
        let mut text = String::with_capacity(self.text.len() + value.len());
        text.push_str(&self.text);
        text.push_str(value);
        self.text = text.into();
        Span { start: self.text.len() - value.len(), end: self.text.len() }
    }

    fn str(&self, span: Span) -> &str {
        &self.text[span.start..span.end]
    }

    /// Set the stream.
    pub fn with_stream(mut self, stream: impl Into<String>) -> Self {
        self.spans.stream = self.keep(&stream.into());
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
        self.spans.id = self.keep(&id.into());
        self
    }
    /// Set the subject.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.spans.subject = Some(self.keep(&subject.into()));
        self
    }
    /// Set the time (RFC 3339).
    pub fn with_time(mut self, time: impl Into<String>) -> Self {
        self.spans.time = Some(self.keep(&time.into()));
        self
    }
    /// Set the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.spans.correlation_id = Some(self.keep(&id.into()));
        self
    }
    /// Set the causation id.
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.spans.causation_id = Some(self.keep(&id.into()));
        self
    }

    /// The stream the event was appended to.
    pub fn stream(&self) -> &str {
        self.str(self.spans.stream)
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
        self.str(self.spans.id)
    }
    /// The event type, e.g. `wallet_updated`.
    pub fn event_type(&self) -> &str {
        self.str(self.spans.event_type)
    }
    /// What the event is about, if the publisher said.
    pub fn subject(&self) -> Option<&str> {
        self.spans.subject.map(|span| self.str(span))
    }
    /// When it happened (RFC 3339), if the publisher said.
    pub fn time(&self) -> Option<&str> {
        self.spans.time.map(|span| self.str(span))
    }
    /// The correlation id shared by one business operation's events.
    pub fn correlation_id(&self) -> Option<&str> {
        self.spans.correlation_id.map(|span| self.str(span))
    }
    /// The id of what caused this event.
    pub fn causation_id(&self) -> Option<&str> {
        self.spans.causation_id.map(|span| self.str(span))
    }
    /// The raw payload.
    pub fn data(&self) -> &[u8] {
        &self.payloads[self.spans.data.start..self.spans.data.end]
    }

    /// The payload parsed as JSON into `T` (which may borrow from the event). Data that does not parse is an
    /// event that can never be applied, so the error is a
    /// [`Failure::Reject`] naming the event and what is wrong.
    pub fn data_json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, Failure> {
        serde_json::from_slice(self.data()).map_err(|err| {
            Failure::Reject(format!(
                "event {} ({}): data is not a valid {}: {err}",
                self.id(),
                self.event_type(),
                short_type_name::<T>(),
            ))
        })
    }
}

/// Two events are equal when everything they tell is, wherever it is kept.
impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.told() == other.told()
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("stream", &self.stream())
            .field("position", &self.position)
            .field("id", &self.id())
            .field("event_type", &self.event_type())
            .field("subject", &self.subject())
            .field("time", &self.time())
            .field("correlation_id", &self.correlation_id())
            .field("causation_id", &self.causation_id())
            .field("data", &self.data())
            .field("partition", &self.partition)
            .field("index", &self.index)
            .finish()
    }
}

/// Everything an event tells, for comparing.
type Told<'a> = (&'a str, u64, &'a str, &'a str, [Option<&'a str>; 4], &'a [u8], Option<u32>, Option<u32>);

impl Event {
    fn told(&self) -> Told<'_> {
        (
            self.stream(),
            self.position,
            self.id(),
            self.event_type(),
            [self.subject(), self.time(), self.correlation_id(), self.causation_id()],
            self.data(),
            self.partition,
            self.index,
        )
    }
}

/// `my_crate::WalletUpdated<'_>` → `WalletUpdated`: what a reason should say.
pub(crate) fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let without_generics = full.split('<').next().unwrap_or(full);
    without_generics.rsplit("::").next().unwrap_or(without_generics)
}
