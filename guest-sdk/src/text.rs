//! Comparing texts where `memcmp` is slow: wasm has no vectorized one,
//! and the SDK compares a statement's text on every SQL call.

/// Whether `a` and `b` are the same bytes, compared eight at a time: wasm
/// has no vectorized `memcmp`, and statement texts are a few hundred
/// bytes.
pub(crate) fn same_text(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (words_a, words_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails = words_a.remainder() == words_b.remainder();
    tails
        && words_a.zip(words_b).all(|(x, y)| {
            u64::from_le_bytes(x.try_into().expect("8 bytes"))
                == u64::from_le_bytes(y.try_into().expect("8 bytes"))
        })
}

#[cfg(test)]
mod tests {
    use super::same_text;

    #[test]
    fn texts_are_the_same_only_when_every_byte_is() {
        let statement =
            "INSERT INTO counts (key, n) VALUES (?1, 1) ON CONFLICT (key) DO UPDATE SET n = n + 1";
        assert!(same_text(statement.as_bytes(), statement.to_string().as_bytes()));
        assert!(same_text(b"", b""));
        // A byte off in a whole word, in the tail past the last word, or a
        // text one byte longer.
        let mut word = statement.as_bytes().to_vec();
        word[3] ^= 1;
        assert!(!same_text(statement.as_bytes(), &word));
        let mut tail = statement.as_bytes().to_vec();
        *tail.last_mut().unwrap() ^= 1;
        assert!(!statement.len().is_multiple_of(8), "the statement has a tail");
        assert!(!same_text(statement.as_bytes(), &tail));
        assert!(!same_text(statement.as_bytes(), format!("{statement} ").as_bytes()));
    }
}
