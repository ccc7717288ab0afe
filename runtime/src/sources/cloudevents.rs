//! The ingest format: CloudEvents 1.0 JSON (structured mode), one event per
//! line, with the `correlationid` and `causationid` extensions.
//!
//! Parsing is all-or-nothing: a file with one bad line yields an error that
//! names the line and the attribute, and no events.
//!
//! Attributes other than `data` are kept short ([`MAX_ATTRIBUTE_BYTES`]):
//! they are indexed, copied into every batch and written to logs, and the
//! CloudEvents spec asks producers to keep them short. Large values belong
//! in `data`.

use crate::sources::embedded::NewEvent;
use base64::Engine as _;
use serde_json::{Map, Value};
use std::borrow::Cow;
use thiserror::Error;

/// What is wrong with one CloudEvent.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CloudEventError {
    /// Not JSON, or not a JSON object.
    #[error("not a CloudEvent: {0}")]
    NotAnEvent(String),
    /// A required attribute is absent.
    #[error("missing required attribute `{0}`")]
    Missing(&'static str),
    /// An attribute has the wrong type or value.
    #[error("attribute `{attribute}` {problem}")]
    Invalid {
        /// The attribute's name.
        attribute: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// The longest value of any attribute but `data`/`data_base64` (`id`,
/// `source`, `type`, `subject`, `correlationid`, extensions…), in bytes.
pub const MAX_ATTRIBUTE_BYTES: usize = 1024;

/// Input that is not UTF-8, located.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "{origin}: line {line}: not UTF-8 (at byte {column} of the line); CloudEvents JSON must be \
     UTF-8: convert the input (e.g. `iconv -f LATIN1 -t UTF-8`)"
)]
pub struct NotUtf8 {
    /// Where the bytes came from (a file name, `stdin`, `request body`).
    pub origin: String,
    /// 1-based line of the first bad byte.
    pub line: usize,
    /// 1-based byte of the line where it is.
    pub column: usize,
}

/// `bytes` as text, or the line and byte where they stop being UTF-8.
pub fn utf8_text<'a>(bytes: &'a [u8], origin: &str) -> Result<&'a str, NotUtf8> {
    std::str::from_utf8(bytes).map_err(|err| {
        let before = &bytes[..err.valid_up_to()];
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        NotUtf8 {
            origin: origin.to_string(),
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            column: before.len() - line_start + 1,
        }
    })
}

/// A CloudEvent error, located.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{origin}: line {line}: {error}")]
pub struct LineError {
    /// Where the lines came from (a file name, `stdin`, `request body`).
    pub origin: String,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub error: CloudEventError,
}

/// Parse JSON Lines of CloudEvents. Blank lines are skipped; the first bad
/// line fails the whole input.
pub fn parse_lines(text: &str, origin: &str) -> Result<Vec<NewEvent>, LineError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_event(line).map_err(|error| LineError { origin: origin.to_string(), line: i + 1, error })
        })
        .collect()
}

/// Give every event without a correlation id this one (the request id of
/// the HTTP call that brought them, or a fresh id for a file append).
pub fn fill_correlation_ids(events: &mut [NewEvent], correlation_id: &str) {
    for event in events.iter_mut().filter(|e| e.correlation_id.is_none()) {
        event.correlation_id = Some(correlation_id.to_string());
    }
}

/// Parse one CloudEvent from its JSON text.
pub fn parse_event(json: &str) -> Result<NewEvent, CloudEventError> {
    parse_plain(json).unwrap_or_else(|| parse_general(json))
}

/// Parse one CloudEvent from its JSON text by way of a JSON tree.
fn parse_general(json: &str) -> Result<NewEvent, CloudEventError> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(object)) => from_object(object),
        Ok(other) => {
            Err(CloudEventError::NotAnEvent(format!("expected a JSON object, found {}", kind(&other))))
        }
        Err(err) => Err(CloudEventError::NotAnEvent(format!("invalid JSON: {err}"))),
    }
}

/// The common case parsed without building `data` as a JSON tree: an
/// object of unique keys whose attributes are strings (or null) and whose
/// `data` is JSON already written as [`serde_json::to_vec`] would write it,
/// or text. `None` sends anything else (and every malformed event, for its
/// error) to the general path, which gives the same event.
fn parse_plain(json: &str) -> Option<Result<NewEvent, CloudEventError>> {
    let Members(members) = serde_json::from_str(json).ok()?;
    let mut object = Listed(Vec::with_capacity(members.len()));
    let (mut data, mut data_base64) = (None, None);
    for (name, raw) in members {
        let raw = raw.get();
        match name.as_ref() {
            "data" => data = Some(raw),
            "data_base64" => data_base64 = Some(Value::String(string_of(raw)?.into_owned())),
            _ if raw == "null" => {}
            _ => {
                object.0.push((name, Value::String(string_of(raw)?.into_owned())));
            }
        }
    }
    let data = match data {
        None => None,
        Some(raw) if raw.starts_with('"') => Some(Data::Text(string_of(raw)?.into_owned())),
        Some("null") => Some(Data::Value(Value::Null)),
        Some(raw) if is_written_json(raw) => Some(Data::Json(raw.as_bytes().to_vec())),
        Some(_) => return None,
    };
    Some(from_attributes(object, data, data_base64))
}

/// The text of `raw`, valid JSON, if it is a string: read straight from
/// between its quotes when it has no escapes (valid JSON holds no bare
/// quote or control character there), else by the parser.
fn string_of(raw: &str) -> Option<Cow<'_, str>> {
    match raw.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')) {
        Some(text) if !text.contains('\\') => Some(Cow::Borrowed(text)),
        _ => serde_json::from_str(raw).ok(),
    }
}

/// A JSON object's members in order, values unparsed; duplicate keys are
/// refused (the general path keeps the last).
struct Members<'a>(Vec<(std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Members<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Members<'a>, M::Error> {
                let mut members: Vec<(std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue)> =
                    Vec::with_capacity(12);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if members.iter().any(|(seen, _)| *seen == key) {
                        return Err(serde::de::Error::custom("a duplicate key"));
                    }
                    members.push((key, map.next_value()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// An event's attributes (all but its data), taken out one by one as the
/// event is built from them.
trait Attributes {
    /// Attribute `name`, taken out.
    fn take(&mut self, name: &str) -> Option<Value>;
    /// The attributes not taken.
    fn rest(&self) -> impl Iterator<Item = (&str, &Value)>;
}

impl Attributes for Map<String, Value> {
    fn take(&mut self, name: &str) -> Option<Value> {
        self.remove(name)
    }
    fn rest(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.iter().map(|(name, value)| (name.as_str(), value))
    }
}

/// The attributes [`parse_plain`] read, unique, in a list: an event has a
/// handful, found by a look along it quicker than by a hash, and names
/// borrowed from the JSON text.
struct Listed<'a>(Vec<(Cow<'a, str>, Value)>);

impl<'a> Listed<'a> {
    /// Attribute `name` set to `value`, in the place of an earlier value.
    fn set(&mut self, name: Cow<'a, str>, value: Value) {
        match self.0.iter_mut().find(|(listed, _)| *listed == name) {
            Some((_, earlier)) => *earlier = value,
            None => self.0.push((name, value)),
        }
    }
}

impl Attributes for Listed<'_> {
    fn take(&mut self, name: &str) -> Option<Value> {
        let at = self.0.iter().position(|(listed, _)| listed == name)?;
        Some(self.0.swap_remove(at).1)
    }
    fn rest(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(name, value)| (name.as_ref(), value))
    }
}

/// Whether `raw` (valid JSON) is byte for byte what parsing it into a
/// [`Value`] and writing it back gives: no whitespace, no escapes, no
/// number but a plain integer, no duplicate keys in an object.
fn is_written_json(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    // The containers open around the current place: an object's keys so
    // far (the tree keeps only the last of a duplicate), or `None` for an
    // array.
    let mut open: Vec<Option<Vec<&[u8]>>> = Vec::new();
    let mut expect_key = false;
    let (mut in_string, mut string_start, mut digits) = (false, 0, 0);
    for (i, &byte) in bytes.iter().enumerate() {
        if in_string {
            match byte {
                b'"' => {
                    in_string = false;
                    if std::mem::take(&mut expect_key) {
                        let key = &bytes[string_start..i];
                        let Some(Some(keys)) = open.last_mut() else { return false };
                        if keys.contains(&key) {
                            return false;
                        }
                        keys.push(key);
                    }
                }
                // Escapes and control characters may be written otherwise.
                b'\\' | 0..=0x1f => return false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'0'..=b'9' => {
                digits += 1;
                // `-0` is written `0`; a long number may not fit 64 bits.
                if digits > 18 || (digits == 1 && byte == b'0' && i > 0 && bytes[i - 1] == b'-') {
                    return false;
                }
                continue;
            }
            b'"' => (in_string, string_start) = (true, i + 1),
            b'{' => {
                open.push(Some(Vec::new()));
                expect_key = true;
            }
            b'[' => open.push(None),
            b'}' | b']' => {
                open.pop();
                expect_key = false;
            }
            b',' => expect_key = matches!(open.last(), Some(Some(_))),
            // A fraction, an exponent (right after a digit; `true` and
            // `false` hold an `e` too) or whitespace.
            b'.' | b' ' | b'\t' | b'\n' | b'\r' => return false,
            b'e' | b'E' if digits > 0 => return false,
            _ => {}
        }
        digits = 0;
    }
    true
}

/// The `data` of a structured-mode event, as given.
enum Data {
    /// A JSON value: kept as JSON text.
    Value(Value),
    /// JSON text already as the general path writes it.
    Json(Vec<u8>),
    /// A JSON string.
    Text(String),
}

/// Parse one CloudEvent from a JSON object.
pub fn from_object(mut object: Map<String, Value>) -> Result<NewEvent, CloudEventError> {
    let data = object.remove("data").map(|value| match value {
        Value::String(text) => Data::Text(text),
        value => Data::Value(value),
    });
    let data_base64 = object.remove("data_base64");
    from_attributes(object, data, data_base64)
}

/// An event of `object`'s attributes (all but the data), `data` and
/// `data_base64`.
fn from_attributes(
    mut object: impl Attributes,
    data: Option<Data>,
    data_base64: Option<Value>,
) -> Result<NewEvent, CloudEventError> {
    let specversion = required(&mut object, "specversion")?;
    if specversion != "1.0" {
        return Err(invalid("specversion", format!("must be \"1.0\", found {specversion:?}")));
    }
    let id = required(&mut object, "id")?;
    let source = required(&mut object, "source")?;
    let event_type = required(&mut object, "type")?;
    let subject = optional(&mut object, "subject")?;
    let time = optional(&mut object, "time")?;
    if let Some(time) = &time {
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
            .map_err(|err| invalid("time", format!("is not an RFC 3339 timestamp ({err})")))?;
    }
    let datacontenttype = optional(&mut object, "datacontenttype")?;
    let correlation_id = optional(&mut object, "correlationid")?;
    let causation_id = optional(&mut object, "causationid")?;
    let short = [
        ("id", Some(&id)),
        ("source", Some(&source)),
        ("type", Some(&event_type)),
        ("subject", subject.as_ref()),
        ("time", time.as_ref()),
        ("datacontenttype", datacontenttype.as_ref()),
        ("correlationid", correlation_id.as_ref()),
        ("causationid", causation_id.as_ref()),
    ];
    for (attribute, value) in short {
        check_length(attribute, value.map_or(0, String::len))?;
    }
    // Other extensions are not kept, but are held to the same rule.
    for (attribute, value) in object.rest().filter(|(k, _)| !matches!(*k, "data" | "data_base64")) {
        let bytes = match value {
            Value::String(text) => text.len(),
            other => serde_json::to_string(other).map_or(0, |text| text.len()),
        };
        check_length(attribute, bytes)?;
    }
    let data = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(invalid("data_base64", "cannot be given together with `data`".into()));
        }
        (None, Some(Value::String(encoded))) => base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .map_err(|err| invalid("data_base64", format!("is not valid base64 ({err})")))?,
        (None, Some(other)) => {
            return Err(invalid("data_base64", format!("must be a string, found {}", kind(&other))));
        }
        (Some(Data::Text(text)), None) if !is_json(datacontenttype.as_deref()) => text.into_bytes(),
        (Some(Data::Text(text)), None) => serde_json::to_vec(&text).expect("a string serializes"),
        (Some(Data::Value(value)), None) => serde_json::to_vec(&value).expect("a JSON value serializes"),
        (Some(Data::Json(bytes)), None) => bytes,
        (None, None) => Vec::new(),
    };
    Ok(NewEvent {
        id,
        source,
        event_type,
        subject,
        time,
        datacontenttype,
        correlation_id,
        causation_id,
        data,
    })
}

/// A binary-mode CloudEvent, as the HTTP and NATS protocol bindings carry
/// one: its attributes in `ce-` headers (names in any case), the data's
/// type in `Content-Type`, and `body` as the data. With `percent_encoded`
/// (HTTP), header values are percent-decoded as that binding asks.
pub fn from_binary<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    body: &[u8],
    percent_encoded: bool,
) -> Result<NewEvent, CloudEventError> {
    let mut object = Listed(Vec::new());
    for (name, value) in headers {
        let name = match name.bytes().any(|b| b.is_ascii_uppercase()) {
            true => Cow::Owned(name.to_ascii_lowercase()),
            false => Cow::Borrowed(name),
        };
        let attribute = match name.strip_prefix("ce-") {
            Some("data" | "data_base64") => continue,
            Some(attribute) => Cow::Owned(attribute.to_string()),
            None if name == "content-type" => Cow::Borrowed("datacontenttype"),
            None => continue,
        };
        let value = match percent_encoded {
            true => {
                percent_decode(value).map_err(|reason| invalid(name.trim_start_matches("ce-"), reason))?
            }
            false => value.to_string(),
        };
        object.set(attribute, value.into());
    }
    let mut event = from_attributes(object, None, None)?;
    event.data = body.to_vec();
    Ok(event)
}

/// `%XX` sequences decoded, the result UTF-8.
fn percent_decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(byte) = byte else {
                return Err(format!("has a `%` not followed by two hex digits in {value:?}"));
            };
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("is not UTF-8 once percent-decoded: {value:?}"))
}

/// `event` as a CloudEvents JSON object (structured mode), which
/// [`parse_event`] reads back as the same event: `data` as JSON when the
/// content type is JSON and the bytes are JSON as this module writes it, as
/// text for a text type, else `data_base64`.
pub fn to_json(event: &NewEvent) -> Value {
    let mut object = Map::new();
    object.insert("specversion".into(), "1.0".into());
    object.insert("id".into(), event.id.clone().into());
    object.insert("source".into(), event.source.clone().into());
    object.insert("type".into(), event.event_type.clone().into());
    let optional = [
        ("subject", &event.subject),
        ("time", &event.time),
        ("datacontenttype", &event.datacontenttype),
        ("correlationid", &event.correlation_id),
        ("causationid", &event.causation_id),
    ];
    for (attribute, value) in optional {
        if let Some(value) = value {
            object.insert(attribute.into(), value.clone().into());
        }
    }
    if !event.data.is_empty() {
        let json = is_json(event.datacontenttype.as_deref());
        let as_json = json
            .then(|| serde_json::from_slice::<Value>(&event.data).ok())
            .flatten()
            .filter(|value| serde_json::to_vec(value).is_ok_and(|bytes| bytes == event.data));
        match (as_json, std::str::from_utf8(&event.data)) {
            (Some(value), _) => {
                object.insert("data".into(), value);
            }
            (None, Ok(text)) if !json => {
                object.insert("data".into(), text.into());
            }
            _ => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(&event.data);
                object.insert("data_base64".into(), encoded.into());
            }
        }
    }
    Value::Object(object)
}

/// Whether a `datacontenttype` means the `data` attribute holds JSON (as it
/// does when the type is absent).
fn is_json(content_type: Option<&str>) -> bool {
    match content_type {
        None => true,
        Some(t) => {
            let essence = t.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            essence == "application/json" || essence.ends_with("+json") || essence == "text/json"
        }
    }
}

fn required(object: &mut impl Attributes, name: &'static str) -> Result<String, CloudEventError> {
    match object.take(name) {
        None | Some(Value::Null) => Err(CloudEventError::Missing(name)),
        Some(Value::String(s)) if s.is_empty() => Err(invalid(name, "must not be empty".into())),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid(name, format!("must be a string, found {}", kind(&other)))),
    }
}

fn optional(object: &mut impl Attributes, name: &'static str) -> Result<Option<String>, CloudEventError> {
    match object.take(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(name, format!("must be a string, found {}", kind(&other)))),
    }
}

fn check_length(attribute: &str, bytes: usize) -> Result<(), CloudEventError> {
    if bytes > MAX_ATTRIBUTE_BYTES {
        return Err(invalid(
            attribute,
            format!(
                "is {bytes} bytes, over the limit of {MAX_ATTRIBUTE_BYTES} bytes for an attribute; \
                 keep attributes short and put large values in `data`"
            ),
        ));
    }
    Ok(())
}

fn invalid(attribute: &str, problem: String) -> CloudEventError {
    CloudEventError::Invalid { attribute: attribute.to_string(), problem }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"specversion":"1.0","id":"e1","source":"api","type":"t","data":{"a":1}}"#;

    #[test]
    fn the_plain_path_gives_what_the_general_path_gives_and_takes_the_common_events() {
        let head = r#""specversion":"1.0","id":"e1","source":"api","type":"t""#;
        let common = [
            format!(
                r#"{{{head},"data":{{"user_id":"u1","wallet_address":"0xab","n":12,"ok":true,"tags":["a",{{}}],"none":null}}}}"#
            ),
            format!(
                r#"{{{head},"subject":"s","correlationid":"c","data":"text","datacontenttype":"text/plain"}}"#
            ),
            format!(r#"{{{head},"data":"a JSON string"}}"#),
            format!(r#"{{{head},"data":null}}"#),
            format!(r#"{{{head},"data":-12,"subject":null}}"#),
            format!(r#"{{{head},"data":{{"note":"café ✓"}}}}"#),
            format!(r#"{{{head},"data_base64":"aGk="}}"#),
            format!(r#"{{{head}}}"#),
            format!(r#"{{{head},"data":{{"a":{{}},"b":[{{"a":1}},{{"a":2}}]}}}}"#),
            // Escaped text in attributes and data is unescaped either way.
            r#"{"specversion":"1.0","id":"e\"1\\","source":"api\/x","type":"t\u00e9","subject":"","data":"a\nb"}"#
                .to_string(),
            format!(r#"{{{head},"subject":"caf\u00e9 ✓","data_base64":"aGk\u003d"}}"#),
        ];
        for line in &common {
            let plain = parse_plain(line).unwrap_or_else(|| panic!("the plain path takes {line}"));
            assert_eq!(plain, parse_general(line), "{line}");
        }
        // Data the tree would write otherwise goes the general way.
        let other = [
            format!(r#"{{{head},"data":{{"a": 1}}}}"#),
            format!(r#"{{{head},"data":{{"a":1.50}}}}"#),
            format!(r#"{{{head},"data":{{"a":1e3}}}}"#),
            format!(r#"{{{head},"data":{{"a":-0}}}}"#),
            format!(r#"{{{head},"data":{{"a":12345678901234567890123}}}}"#),
            format!(r#"{{{head},"data":{{"a":"\u00e9\/"}}}}"#),
            format!(r#"{{{head},"data":{{"a":1,"a":2}}}}"#),
            format!(r#"{{{head},"data":[{{"a":1,"b":{{"a":2}},"a":3}}]}}"#),
            format!(r#"{{{head},"data":true,"id":"twice"}}"#),
            format!(r#"{{{head},"seq":5}}"#),
        ];
        for line in &other {
            assert!(parse_plain(line).is_none(), "the general path takes {line}");
            assert_eq!(parse_event(line), parse_general(line), "{line}");
        }
        // A malformed event gives the same error either way.
        let malformed = [
            format!(r#"{{{head},"data":1,"data_base64":"aGk="}}"#),
            format!(r#"{{{head},"data_base64":null}}"#),
            r#"{"specversion":"1.0","id":7,"source":"api","type":"t"}"#.to_string(),
            r#"{"specversion":"1.0","source":"api","type":"t"}"#.to_string(),
            r#"[1,2]"#.to_string(),
            r#"{"specversion":"1.0""#.to_string(),
            r#"{"specversion":"0.3","id":"e1","source":"api","type":"t"}"#.to_string(),
            format!(r#"{{{head},"time":"yesterday","data":{{}}}}"#),
            format!(r#"{{{head},"one":"{long}","two":"{long}"}}"#, long = "x".repeat(2000)),
            format!(r#"{{"one":"{long}",{head},"data":{{}},"two":"{long}"}}"#, long = "x".repeat(2000)),
            format!(r#"{{"data":{{}},"one":"{long}","subject":"{long}",{head}}}"#, long = "x".repeat(2000)),
        ];
        for line in &malformed {
            assert!(parse_general(line).is_err(), "{line}");
            assert_eq!(parse_event(line), parse_general(line), "{line}");
        }
    }

    #[test]
    fn a_binary_event_takes_its_attributes_from_ce_headers_in_any_case() {
        let headers = [
            ("CE-SpecVersion", "1.0"),
            ("ce-id", "first"),
            ("ce-source", "api"),
            ("Ce-Type", "t"),
            ("ce-id", "e%201"),
            ("ce-data", "not the data"),
            ("Content-Type", "application/json"),
            ("authorization", "100%"),
        ];
        let event = from_binary(headers, br#"{"a":1}"#, true).unwrap();
        assert_eq!(event.id, "e 1", "the last of a repeated header, percent-decoded");
        assert_eq!((event.source.as_str(), event.event_type.as_str()), ("api", "t"));
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(event.data, br#"{"a":1}"#, "the body is the data, never a header");

        let head = [("ce-specversion", "1.0"), ("ce-id", "e1"), ("ce-source", "api"), ("ce-type", "t")];
        let bad = |extra: (&'static str, &str)| from_binary(head.into_iter().chain([extra]), b"", true);
        assert_eq!(
            bad(("ce-subject", "%zz")),
            Err(invalid("subject", "has a `%` not followed by two hex digits in \"%zz\"".into()))
        );
        let long = "x".repeat(MAX_ATTRIBUTE_BYTES + 1);
        assert!(
            matches!(bad(("CE-Region", &long)), Err(CloudEventError::Invalid { attribute, .. }) if attribute == "region")
        );
        assert_eq!(
            from_binary(head.into_iter().skip(1), b"", false),
            Err(CloudEventError::Missing("specversion"))
        );
    }

    #[test]
    fn a_minimal_event_parses_with_json_data() {
        let event = parse_event(GOOD).unwrap();
        assert_eq!(event.id, "e1");
        assert_eq!(event.event_type, "t");
        assert_eq!(event.data, br#"{"a":1}"#);
        assert_eq!(event.correlation_id, None);
    }

    #[test]
    fn extensions_and_optional_attributes_are_kept() {
        let event = parse_event(
            r#"{"specversion":"1.0","id":"e1","source":"api","type":"t","subject":"u1",
                "time":"2026-01-01T00:00:00Z","correlationid":"c1","causationid":"k1"}"#,
        )
        .unwrap();
        assert_eq!(event.subject.as_deref(), Some("u1"));
        assert_eq!(event.correlation_id.as_deref(), Some("c1"));
        assert_eq!(event.causation_id.as_deref(), Some("k1"));
        assert!(event.data.is_empty());
    }

    #[test]
    fn base64_and_text_data_are_stored_as_bytes() {
        let b64 =
            parse_event(r#"{"specversion":"1.0","id":"e1","source":"s","type":"t","data_base64":"aGk="}"#)
                .unwrap();
        assert_eq!(b64.data, b"hi");
        let text = parse_event(
            r#"{"specversion":"1.0","id":"e1","source":"s","type":"t","datacontenttype":"text/plain","data":"hi"}"#,
        )
        .unwrap();
        assert_eq!(text.data, b"hi");
    }

    #[test]
    fn an_event_written_as_json_reads_back_the_same() {
        let lines = [
            GOOD,
            r#"{"specversion":"1.0","id":"e2","source":"s","type":"t","subject":"u1","time":"2026-01-01T00:00:00Z","correlationid":"c1","causationid":"k1","data":"a string"}"#,
            r#"{"specversion":"1.0","id":"e3","source":"s","type":"t","datacontenttype":"text/plain","data":"{not json"}"#,
            r#"{"specversion":"1.0","id":"e4","source":"s","type":"t","datacontenttype":"text/plain","data":"\"quoted\""}"#,
            r#"{"specversion":"1.0","id":"e5","source":"s","type":"t","data_base64":"/wA="}"#,
            r#"{"specversion":"1.0","id":"e6","source":"s","type":"t","datacontenttype":"application/octet-stream","data_base64":"/wA="}"#,
            r#"{"specversion":"1.0","id":"e7","source":"s","type":"t"}"#,
        ];
        for line in lines {
            let event = parse_event(line).unwrap();
            let written = to_json(&event);
            assert_eq!(written, serde_json::from_str::<Value>(line).unwrap(), "{line}");
            assert_eq!(parse_event(&written.to_string()).unwrap(), event, "{line}");
        }
    }

    #[test]
    fn each_bad_attribute_is_named() {
        let cases = [
            (r#"{"id":"e1","source":"s","type":"t"}"#, "missing required attribute `specversion`"),
            (
                r#"{"specversion":"0.3","id":"e1","source":"s","type":"t"}"#,
                "attribute `specversion` must be \"1.0\"",
            ),
            (r#"{"specversion":"1.0","source":"s","type":"t"}"#, "missing required attribute `id`"),
            (r#"{"specversion":"1.0","id":"e1","type":"t"}"#, "missing required attribute `source`"),
            (r#"{"specversion":"1.0","id":"e1","source":"s"}"#, "missing required attribute `type`"),
            (
                r#"{"specversion":"1.0","id":7,"source":"s","type":"t"}"#,
                "attribute `id` must be a string, found a number",
            ),
            (r#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#, "attribute `id` must not be empty"),
            (
                r#"{"specversion":"1.0","id":"e","source":"s","type":"t","time":"yesterday"}"#,
                "attribute `time` is not an RFC 3339",
            ),
            (
                r#"{"specversion":"1.0","id":"e","source":"s","type":"t","data_base64":"!!"}"#,
                "attribute `data_base64` is not valid base64",
            ),
            (
                r#"{"specversion":"1.0","id":"e","source":"s","type":"t","data":1,"data_base64":"aGk="}"#,
                "cannot be given together",
            ),
            (
                r#"{"specversion":"1.0","id":"e","source":"s","type":"t","correlationid":5}"#,
                "attribute `correlationid` must be a string",
            ),
            (r#"[1,2]"#, "expected a JSON object, found an array"),
            (r#"{"specversion":"1.0","#, "invalid JSON"),
        ];
        for (line, expected) in cases {
            let err = parse_event(line).unwrap_err().to_string();
            assert!(err.contains(expected), "{line}: {err:?} should contain {expected:?}");
        }
    }

    #[test]
    fn long_attributes_are_refused_naming_the_attribute_and_the_limit() {
        let long = "x".repeat(MAX_ATTRIBUTE_BYTES + 1);
        let fits = "x".repeat(MAX_ATTRIBUTE_BYTES);
        let event = |attribute: &str, value: &str| {
            let mut object = serde_json::json!({"specversion": "1.0", "id": "e", "source": "s", "type": "t"});
            object[attribute] = Value::String(value.to_string());
            object.to_string()
        };
        for attribute in ["id", "source", "type", "subject", "correlationid", "causationid", "myextension"] {
            let err = parse_event(&event(attribute, &long)).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "attribute `{attribute}` is 1025 bytes, over the limit of 1024 bytes for an \
                     attribute; keep attributes short and put large values in `data`"
                )
            );
            assert!(parse_event(&event(attribute, &fits)).is_ok(), "{attribute} at the limit");
        }
        // `data` is not an attribute in this sense: its size is the body's.
        let big_data =
            serde_json::json!({"specversion": "1.0", "id": "e", "source": "s", "type": "t", "data": long});
        assert!(parse_event(&big_data.to_string()).is_ok());
        let input = format!("{GOOD}\n{}\n", event("id", &long));
        assert_eq!(parse_lines(&input, "big.jsonl").unwrap_err().line, 2);
    }

    #[test]
    fn events_written_as_json_read_back_the_same() {
        let base = parse_event(
            r#"{"specversion":"1.0","id":"e1","source":"api","type":"t","subject":"u1","time":"2026-01-01T00:00:00Z",
                "correlationid":"c1","causationid":"k1","data":{"a":[1,2.5,"x"]}}"#,
        )
        .unwrap();
        let with = |datacontenttype: Option<&str>, data: &[u8]| NewEvent {
            datacontenttype: datacontenttype.map(str::to_string),
            data: data.to_vec(),
            ..base.clone()
        };
        for event in [
            base.clone(),
            with(None, b""),
            with(None, b"{ \"spaced\": true }"),
            with(Some("application/json"), b"[1,2]"),
            with(Some("text/plain"), b"caf\xc3\xa9"),
            with(Some("application/octet-stream"), b"\x00\xff"),
            with(None, b"\xff"),
        ] {
            let json = to_json(&event).to_string();
            assert_eq!(parse_event(&json).unwrap(), event, "{json}");
        }
    }

    #[test]
    fn text_that_is_not_utf8_is_located() {
        let bytes = b"{\"a\":1}\n{\"b\":\"caf\xe9\"}\n";
        let err = utf8_text(bytes, "events.jsonl").unwrap_err();
        assert_eq!((err.line, err.column), (2, 10));
        assert!(err.to_string().starts_with("events.jsonl: line 2: not UTF-8 (at byte 10 of the line)"));
        assert_eq!(utf8_text(b"ok\n", "x").unwrap(), "ok\n");
    }

    #[test]
    fn one_bad_line_fails_the_whole_input_naming_the_line() {
        let input = format!("{GOOD}\n\n{}\n", r#"{"specversion":"1.0","id":"e2","source":"s"}"#);
        let err = parse_lines(&input, "events.jsonl").unwrap_err();
        assert_eq!(err.line, 3);
        assert_eq!(err.to_string(), "events.jsonl: line 3: missing required attribute `type`");
    }
}
