//! The depth limit itself: a content header frame's `headers` table, checked before lapin
//! parses it, and rewritten when some value nests deeper than [`MAX_DEPTH`].
//!
//! AMQP field tables and arrays carry their length in bytes, so a value too deep to keep is
//! skipped in one step, never descended into: this code recurses at most [`MAX_DEPTH`]
//! levels whatever the frame holds. A frame it cannot read (truncated, an unknown type) is
//! left as it is, for lapin to refuse as it would have.

/// How many levels of tables and arrays a message's headers may nest (the `headers` table
/// itself is level 1). RabbitMQ's own headers use 4 (`x-death`: table, array, table, array).
pub const MAX_DEPTH: usize = 32;

/// The `headers` property's bit in the first property-flags word (AMQP 0-9-1 `basic`:
/// content-type, content-encoding, headers, ...).
const FLAG_CONTENT_TYPE: u16 = 0x8000;
const FLAG_CONTENT_ENCODING: u16 = 0x4000;
const FLAG_HEADERS: u16 = 0x2000;

/// A rewritten content header payload and how many values were replaced.
#[derive(Debug, PartialEq, Eq)]
pub struct Rewritten {
    pub payload: Vec<u8>,
    pub dropped: usize,
}

/// `Some` with a new payload when the frame's headers nest deeper than [`MAX_DEPTH`]; `None`
/// when it can go to lapin unchanged (the usual case, decided without copying).
pub fn rewrite(payload: &[u8]) -> Option<Rewritten> {
    let (start, end) = headers_span(payload)?;
    let table = payload.get(start + 4..end)?;
    if !too_deep(table, 1)? {
        return None;
    }
    let mut out = Vec::with_capacity(payload.len().min(64 * 1024));
    out.extend_from_slice(&payload[..start]);
    let mut dropped = 0;
    write_container(&mut out, table, 1, true, &mut dropped)?;
    out.extend_from_slice(&payload[end..]);
    Some(Rewritten {
        payload: out,
        dropped,
    })
}

/// Where the `headers` table lies in a content header payload: its length prefix's offset and
/// the end of its bytes.
fn headers_span(payload: &[u8]) -> Option<(usize, usize)> {
    // class-id (2), weight (2), body size (8), then property flags.
    let flags = u16::from_be_bytes([*payload.get(12)?, *payload.get(13)?]);
    if flags & FLAG_HEADERS == 0 {
        return None;
    }
    let mut at = 14;
    let mut word = flags;
    while word & 1 == 1 {
        word = u16::from_be_bytes([*payload.get(at)?, *payload.get(at + 1)?]);
        at += 2;
    }
    for flag in [FLAG_CONTENT_TYPE, FLAG_CONTENT_ENCODING] {
        if flags & flag != 0 {
            at += 1 + usize::from(*payload.get(at)?);
        }
    }
    let len = long_len(payload, at)?;
    let end = at.checked_add(4)?.checked_add(len)?;
    (end <= payload.len()).then_some((at, end))
}

fn long_len(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    usize::try_from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok()
}

/// One field value's type and its bytes after the type octet.
struct Value<'a> {
    kind: u8,
    body: &'a [u8],
}

impl Value<'_> {
    fn is_container(&self) -> bool {
        matches!(self.kind, b'A' | b'F')
    }
}

/// The value starting at `at` (its type octet), and where the next one starts.
fn value_at(bytes: &[u8], at: usize) -> Option<(Value<'_>, usize)> {
    let kind = *bytes.get(at)?;
    let start = at + 1;
    let len = match kind {
        b'V' => 0,
        b't' | b'b' | b'B' => 1,
        b's' | b'u' | b'U' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'l' | b'L' | b'd' | b'T' => 8,
        b'S' | b'x' | b'A' | b'F' => 4 + long_len(bytes, start)?,
        _ => return None,
    };
    let end = start.checked_add(len)?;
    let body = bytes.get(start..end)?;
    Some((Value { kind, body }, end))
}

/// The entries of a table (`key` then value) or an array (values), as (key bytes with their
/// length octet, value).
fn entries(bytes: &[u8], table: bool) -> impl Iterator<Item = Option<(&[u8], Value<'_>)>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        let key_start = at;
        if table {
            let key_len = usize::from(*bytes.get(at)?);
            at += 1 + key_len;
        }
        let key = bytes.get(key_start..at);
        let parsed = key.zip(value_at(bytes, at));
        match parsed {
            Some((key, (value, next))) => {
                at = next;
                Some(Some((key, value)))
            }
            None => {
                at = bytes.len();
                Some(None)
            }
        }
    })
}

/// Whether a container's contents (at `depth`) hold a container deeper than [`MAX_DEPTH`];
/// `None` when the bytes are not a well-formed container.
fn too_deep(contents: &[u8], depth: usize) -> Option<bool> {
    too_deep_in(contents, depth, true)
}

fn too_deep_in(contents: &[u8], depth: usize, table: bool) -> Option<bool> {
    for entry in entries(contents, table) {
        let (_, value) = entry?;
        if value.is_container()
            && (depth >= MAX_DEPTH || too_deep_in(&value.body[4..], depth + 1, value.kind == b'F')?)
        {
            return Some(true);
        }
    }
    Some(false)
}

/// Write a container (length prefix and contents) at `depth`, each value nested too deep
/// replaced by a long string saying so.
fn write_container(
    out: &mut Vec<u8>,
    contents: &[u8],
    depth: usize,
    table: bool,
    dropped: &mut usize,
) -> Option<()> {
    let len_at = out.len();
    out.extend_from_slice(&[0; 4]);
    for entry in entries(contents, table) {
        let (key, value) = entry?;
        out.extend_from_slice(key);
        if !value.is_container() {
            out.push(value.kind);
            out.extend_from_slice(value.body);
        } else if depth >= MAX_DEPTH {
            *dropped += 1;
            let note = format!(
                "(session-worker: a value nested deeper than {MAX_DEPTH} levels was dropped, {} bytes)",
                value.body.len()
            );
            out.push(b'S');
            out.extend_from_slice(&u32::try_from(note.len()).ok()?.to_be_bytes());
            out.extend_from_slice(note.as_bytes());
        } else {
            out.push(value.kind);
            write_container(
                out,
                &value.body[4..],
                depth + 1,
                value.kind == b'F',
                dropped,
            )?;
        }
    }
    let len = u32::try_from(out.len() - len_at - 4).ok()?;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    Some(())
}

#[cfg(test)]
mod tests;
