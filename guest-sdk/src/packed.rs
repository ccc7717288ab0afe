//! Reading a batch the host packed into one buffer (the contract's `packed`
//! interface): one copy into the guest for the whole batch, where the
//! world's `handle` costs an allocation in the guest for each string of
//! each event.

use crate::Event;
use crate::event::{Span, Spans};
use std::sync::Arc;

/// The events of a packed batch, in order, each with its place in it; `Err`
/// says where the buffer stops making sense (a host that breaks the layout).
///
/// The batch's strings are one UTF-8 text and its payloads one buffer, each
/// copied once and shared by the events, which keep only where their parts
/// are: two allocations a batch, where the world's `handle` makes one per
/// string and payload of every event.
pub(crate) fn unpack(batch: &[u8]) -> Result<Vec<Event>, String> {
    let mut reader = Reader { bytes: batch, at: 0 };
    let count = reader.u32()?;
    let text = reader.bytes()?;
    let text = std::str::from_utf8(text).map_err(|err| format!("the text is not UTF-8: {err}"))?;
    let payloads = reader.bytes()?;
    // Each event takes at least 25 bytes of records: a count past what the
    // rest can hold is a broken buffer, not an allocation to attempt.
    if count as usize > (batch.len() - reader.at) / 25 {
        return Err(format!("{count} events cannot fit in {} bytes", batch.len() - reader.at));
    }
    let (shared_text, shared_payloads): (Arc<str>, Arc<[u8]>) = (text.into(), payloads.into());
    let (mut in_text, mut in_payloads) = (Cursor::new(text.len()), Cursor::new(payloads.len()));
    let mut events = Vec::with_capacity(count as usize);
    for index in 0..count {
        let position = reader.u64()?;
        let flags = reader.take(1)?[0];
        let partition = if flags & 16 != 0 { Some(reader.u32()?) } else { None };
        let mut string = |reader: &mut Reader<'_>| -> Result<Span, String> {
            let span = in_text.next(reader.u32()?)?;
            match text.is_char_boundary(span.start) && text.is_char_boundary(span.end) {
                true => Ok(span),
                false => Err(format!("bytes {}..{} of the text split a character", span.start, span.end)),
            }
        };
        let (stream, id, event_type) = (string(&mut reader)?, string(&mut reader)?, string(&mut reader)?);
        let mut optional = [None; 4];
        for (bit, field) in optional.iter_mut().enumerate() {
            if flags & (1 << bit) != 0 {
                *field = Some(string(&mut reader)?);
            }
        }
        let [subject, time, correlation_id, causation_id] = optional;
        let data = in_payloads.next(reader.u32()?)?;
        let spans = Spans { stream, id, event_type, subject, time, correlation_id, causation_id, data };
        let mut event = Event::in_batch(&shared_text, &shared_payloads, spans, position);
        event.partition = partition;
        event.index = Some(index);
        events.push(event);
    }
    if reader.at != batch.len() {
        return Err(format!("{} bytes left after {count} events", batch.len() - reader.at));
    }
    if in_text.at != text.len() || in_payloads.at != payloads.len() {
        return Err(format!("{count} events leave text or payloads unread"));
    }
    Ok(events)
}

/// Hands out the consecutive parts of the text or the payloads.
struct Cursor {
    at: usize,
    len: usize,
}

impl Cursor {
    fn new(len: usize) -> Self {
        Cursor { at: 0, len }
    }

    fn next(&mut self, n: u32) -> Result<Span, String> {
        let start = self.at;
        let end = start.checked_add(n as usize).filter(|&end| end <= self.len);
        let Some(end) = end else { return Err(format!("{n} bytes wanted at byte {start} of {}", self.len)) };
        self.at = end;
        Ok(Span { start, end })
    }
}

/// Reads a packed batch front to back.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!("{n} bytes wanted at byte {} of {}", self.at, self.bytes.len()));
        };
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::unpack;

    fn u32(out: &mut Vec<u8>, n: usize) {
        out.extend_from_slice(&(n as u32).to_le_bytes());
    }

    /// Two events as the contract lays them out: the first with every
    /// optional field, the second with none.
    fn batch() -> Vec<u8> {
        let first = ["wallets", "e-7", "wallet_updated", "user-1", "2026-12-03T12:00:00Z", "corr", "cause ✓"];
        let second = ["wallets", "e-8", "kyc_verified"];
        let data = br#"{"user_id":"user-1"}"#;
        let text: String = first.iter().chain(&second).copied().collect();
        let mut out = Vec::new();
        u32(&mut out, 2);
        u32(&mut out, text.len());
        out.extend_from_slice(text.as_bytes());
        u32(&mut out, data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(&7u64.to_le_bytes());
        out.push(1 | 2 | 4 | 8 | 16);
        u32(&mut out, 3);
        for s in first {
            u32(&mut out, s.len());
        }
        u32(&mut out, data.len());
        out.extend_from_slice(&8u64.to_le_bytes());
        out.push(0);
        for s in second {
            u32(&mut out, s.len());
        }
        u32(&mut out, 0);
        out
    }

    #[test]
    fn a_packed_batch_reads_as_the_events_the_host_packed() {
        let events = unpack(&batch()).unwrap();
        assert_eq!(events.len(), 2);
        let (first, second) = (&events[0], &events[1]);
        assert_eq!((first.position(), first.stream(), first.id()), (7, "wallets", "e-7"));
        assert_eq!(first.event_type(), "wallet_updated");
        assert_eq!(first.subject(), Some("user-1"));
        assert_eq!(first.time(), Some("2026-12-03T12:00:00Z"));
        assert_eq!((first.correlation_id(), first.causation_id()), (Some("corr"), Some("cause ✓")));
        assert_eq!((first.partition(), first.index), (Some(3), Some(0)));
        assert_eq!(first.data(), br#"{"user_id":"user-1"}"#);
        assert_eq!((second.position(), second.id(), second.event_type()), (8, "e-8", "kyc_verified"));
        assert_eq!((second.subject(), second.time(), second.partition()), (None, None, None));
        assert_eq!((second.correlation_id(), second.causation_id(), second.index), (None, None, Some(1)));
        assert_eq!(second.data(), b"");
        assert!(unpack(&[0; 12]).unwrap().is_empty());
    }

    #[test]
    fn a_broken_buffer_is_an_error_saying_where() {
        let whole = batch();
        let cut = unpack(&whole[..whole.len() - 1]).unwrap_err();
        assert!(cut.contains("wanted at byte"), "{cut}");
        let mut extra = whole.clone();
        extra.push(0);
        assert_eq!(unpack(&extra).unwrap_err(), "1 bytes left after 2 events");
        let mut huge = whole.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&huge).unwrap_err().starts_with("4294967295 events cannot fit"));
        let mut bad = whole;
        let at = bad.windows(7).position(|w| w == b"wallets").unwrap();
        bad[at] = 0xff;
        assert!(unpack(&bad).unwrap_err().contains("is not UTF-8"));

        // The first event's causation id, its seventh string, one byte
        // short: it ends inside the `✓`.
        let text_len = u32::from_le_bytes(batch()[4..8].try_into().unwrap()) as usize;
        let records = 8 + text_len + 4 + br#"{"user_id":"user-1"}"#.len();
        let causation = records + 8 + 1 + 4 + 6 * 4;
        let mut split = batch();
        split[causation..causation + 4].copy_from_slice(&8u32.to_le_bytes());
        assert!(unpack(&split).unwrap_err().contains("split a character"), "{:?}", unpack(&split));
        // Lengths past the end of the text.
        let mut past = batch();
        past[causation..causation + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(unpack(&past).unwrap_err().starts_with("1000 bytes wanted at byte"));
    }
}
