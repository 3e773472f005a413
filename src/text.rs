//! Text helpers shared by every layer: bounded strings for headers and logs, error chains on
//! one line, hex and SHA-256 digests. Pure functions; this module imports nothing of the crate.

use sha2::{Digest, Sha256};

/// Longest message kept in a header, an audit detail or an error text (bytes).
pub const MAX_MESSAGE: usize = 500;

/// `s` cut to [`MAX_MESSAGE`] bytes at a character boundary, with `…` when cut. AMQP headers
/// travel with every copy of a message, so what goes into them is kept short.
pub fn truncate(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// An error and its sources on one line ("error sending request: connection refused").
pub fn describe_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// SHA-256 of `bytes` as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_char_boundaries() {
        let long = "é".repeat(400);
        let cut = truncate(&long);
        assert!(cut.ends_with('…'));
        assert!(cut.len() <= MAX_MESSAGE + '…'.len_utf8());
        assert_eq!(truncate("short"), "short");
    }

    #[test]
    fn digests_are_hex() {
        assert_eq!(hex(&[0x00, 0xab]), "00ab");
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
