//! Reading a batch the host packed into one buffer (the contract's `packed`
//! interface): one copy into the guest for the whole batch, where the
//! world's `handle` costs an allocation in the guest for each string of
//! each event.

use crate::Event;

/// The events of a packed batch, in order, each with its place in it; `Err`
/// says where the buffer stops making sense (a host that breaks the layout).
pub(crate) fn unpack(batch: &[u8]) -> Result<Vec<Event>, String> {
    let mut reader = Reader { bytes: batch, at: 0 };
    let count = reader.u32()?;
    // Each event takes at least 25 bytes: a count past what the buffer can
    // hold is a broken buffer, not an allocation to attempt.
    if count as usize > batch.len() / 25 {
        return Err(format!("{count} events cannot fit in {} bytes", batch.len()));
    }
    let mut events = Vec::with_capacity(count as usize);
    for index in 0..count {
        let position = reader.u64()?;
        let flags = reader.take(1)?[0];
        let partition = if flags & 16 != 0 { Some(reader.u32()?) } else { None };
        let stream = reader.string()?;
        let id = reader.string()?;
        let event_type = reader.string()?;
        let mut optional = [None, None, None, None];
        for (bit, field) in optional.iter_mut().enumerate() {
            if flags & (1 << bit) != 0 {
                *field = Some(reader.string()?);
            }
        }
        let [subject, time, correlation_id, causation_id] = optional;
        let data = reader.bytes()?.to_vec();
        events.push(Event {
            stream,
            position,
            id,
            event_type,
            subject,
            time,
            correlation_id,
            causation_id,
            data,
            partition,
            index: Some(index),
        });
    }
    if reader.at != batch.len() {
        return Err(format!("{} bytes left after {count} events", batch.len() - reader.at));
    }
    Ok(events)
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

    fn string(&mut self) -> Result<String, String> {
        let at = self.at;
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|err| format!("the string at byte {at} is not UTF-8: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::unpack;

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s);
    }

    /// Two events as the contract lays them out: the first with every
    /// optional field, the second with none.
    fn batch() -> Vec<u8> {
        let mut out = 2u32.to_le_bytes().to_vec();
        out.extend_from_slice(&7u64.to_le_bytes());
        out.push(1 | 2 | 4 | 8 | 16);
        out.extend_from_slice(&3u32.to_le_bytes());
        for s in ["wallets", "e-7", "wallet_updated", "user-1", "2026-12-03T12:00:00Z", "corr", "cause"] {
            string(&mut out, s.as_bytes());
        }
        string(&mut out, br#"{"user_id":"user-1"}"#);
        out.extend_from_slice(&8u64.to_le_bytes());
        out.push(0);
        for s in ["wallets", "e-8", "kyc_verified", ""] {
            string(&mut out, s.as_bytes());
        }
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
        assert_eq!((first.correlation_id(), first.causation_id()), (Some("corr"), Some("cause")));
        assert_eq!((first.partition(), first.index), (Some(3), Some(0)));
        assert_eq!(first.data(), br#"{"user_id":"user-1"}"#);
        assert_eq!((second.position(), second.id(), second.event_type()), (8, "e-8", "kyc_verified"));
        assert_eq!((second.subject(), second.time(), second.partition()), (None, None, None));
        assert_eq!((second.correlation_id(), second.causation_id(), second.index), (None, None, Some(1)));
        assert_eq!(second.data(), b"");
        assert!(unpack(&0u32.to_le_bytes()).unwrap().is_empty());
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
    }
}
