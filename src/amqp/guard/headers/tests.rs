use super::*;
use amq_protocol::frame::{parse_frame, AMQPFrame};
use lapin::types::AMQPValue;
use proptest::prelude::*;

/// A value nested `depth` arrays deep, built without recursion (5 bytes a level).
fn nested(depth: usize) -> Vec<u8> {
    let mut v = vec![b't', 1];
    for _ in 0..depth {
        let mut outer = vec![b'A'];
        outer.extend_from_slice(&(v.len() as u32).to_be_bytes());
        outer.extend_from_slice(&v);
        v = outer;
    }
    v
}

fn entry(key: &str, value: &[u8]) -> Vec<u8> {
    let mut e = vec![key.len() as u8];
    e.extend_from_slice(key.as_bytes());
    e.extend_from_slice(value);
    e
}

fn long_string(s: &str) -> Vec<u8> {
    let mut v = vec![b'S'];
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// A `basic` content header payload with a content type, the given headers table contents and
/// a delivery mode after them.
fn payload(table: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 60, 0, 0];
    p.extend_from_slice(&42u64.to_be_bytes());
    p.extend_from_slice(&(FLAG_CONTENT_TYPE | FLAG_HEADERS | 0x1000).to_be_bytes());
    p.push(16);
    p.extend_from_slice(b"application/json");
    p.extend_from_slice(&(table.len() as u32).to_be_bytes());
    p.extend_from_slice(table);
    p.push(2);
    p
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 1];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    f
}

fn parsed_headers(payload: &[u8]) -> lapin::types::FieldTable {
    let bytes = frame(payload);
    let (_, parsed) = parse_frame(bytes.as_slice()).expect("lapin's parser reads it");
    let AMQPFrame::Header(_, header) = parsed else {
        panic!("not a header frame: {parsed:?}");
    };
    assert_eq!(header.body_size, 42);
    assert_eq!(header.properties.delivery_mode(), &Some(2));
    assert_eq!(
        header
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/json")
    );
    header.properties.headers().clone().expect("headers")
}

#[test]
fn shallow_headers_pass_unchanged() {
    let mut table = entry("x-attempts", &[b'I', 0, 0, 0, 3]);
    table.extend(entry("x-reason", &long_string("invalid_request")));
    table.extend(entry("x-death", &nested(3)));
    assert_eq!(rewrite(&payload(&table)), None);
    assert_eq!(rewrite(&payload(&[])), None);
}

#[test]
fn the_limit_is_inclusive() {
    // The headers table is level 1, so MAX_DEPTH - 1 arrays inside it reach MAX_DEPTH.
    let fits = entry("x-deep", &nested(MAX_DEPTH - 1));
    assert_eq!(rewrite(&payload(&fits)), None);
    let over = entry("x-deep", &nested(MAX_DEPTH));
    let rewritten = rewrite(&payload(&over)).expect("rewritten");
    assert_eq!(rewritten.dropped, 1);
}

#[test]
fn a_value_as_deep_as_a_frame_allows_is_replaced_and_the_rest_kept() {
    let mut table = entry("x-keep", &long_string("kept"));
    table.extend(entry("x-deep", &nested(26_100)));
    table.extend(entry("x-after", &[b'I', 0, 0, 0, 7]));
    let original = payload(&table);
    let rewritten = rewrite(&original).expect("rewritten");
    assert_eq!(rewritten.dropped, 1);
    assert!(
        rewritten.payload.len() < 1_000,
        "{}",
        rewritten.payload.len()
    );
    let headers = parsed_headers(&rewritten.payload);
    let inner = headers.inner();
    assert_eq!(
        inner.get("x-keep"),
        Some(&AMQPValue::LongString("kept".into()))
    );
    assert_eq!(inner.get("x-after"), Some(&AMQPValue::LongInt(7)));
    // The arrays down to the limit are kept; the value below them is the note.
    let mut depth = 1;
    let mut v = inner.get("x-deep").expect("x-deep");
    while let AMQPValue::FieldArray(a) = v {
        depth += 1;
        v = &a.as_slice()[0];
    }
    assert_eq!(depth, MAX_DEPTH);
    let AMQPValue::LongString(s) = v else {
        panic!("x-deep's leaf: {v:?}");
    };
    let s = s.to_string();
    assert!(s.contains("deeper than 32 levels"), "{s}");
    assert!(s.ends_with(" bytes)"), "{s}");
}

#[test]
fn shallow_parts_of_a_deep_value_are_kept() {
    // A table holding an array 40 deep: the table and the arrays up to the limit stay.
    let mut inner = entry("ok", &[b't', 1]);
    inner.extend(entry("deep", &nested(40)));
    let mut table_value = vec![b'F'];
    table_value.extend_from_slice(&(inner.len() as u32).to_be_bytes());
    table_value.extend(inner);
    let rewritten = rewrite(&payload(&entry("x-t", &table_value))).expect("rewritten");
    let headers = parsed_headers(&rewritten.payload);
    let Some(AMQPValue::FieldTable(t)) = headers.inner().get("x-t") else {
        panic!("x-t: {headers:?}");
    };
    assert_eq!(t.inner().get("ok"), Some(&AMQPValue::Boolean(true)));
    let mut depth = 2;
    let mut v = t.inner().get("deep").expect("deep");
    while let AMQPValue::FieldArray(a) = v {
        depth += 1;
        v = &a.as_slice()[0];
    }
    assert_eq!(depth, MAX_DEPTH);
    assert!(matches!(v, AMQPValue::LongString(_)), "{v:?}");
}

#[test]
fn frames_it_cannot_read_are_left_to_lapin() {
    let deep = payload(&entry("x-deep", &nested(100)));
    for cut in [5, 13, 20, 40, deep.len() - 2] {
        let mut p = deep.clone();
        p.truncate(cut);
        assert_eq!(rewrite(&p), None, "cut at {cut}");
    }
    let unknown = payload(&entry("x-bad", &[b'?', 1, 2]));
    assert_eq!(rewrite(&unknown), None);
    // No headers flag: nothing to look at.
    let mut no_headers = deep.clone();
    no_headers[12] = 0x80;
    assert_eq!(rewrite(&no_headers), None);
}

proptest! {
    #[test]
    fn any_bytes_are_safe(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = rewrite(&bytes);
        let mut table = entry("x", &nested(40));
        table.extend(bytes.iter().copied());
        let _ = rewrite(&payload(&table));
    }
}
