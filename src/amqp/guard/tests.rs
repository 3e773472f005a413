use super::*;
use std::task::Waker;

/// A socket that returns its bytes in chunks of the given sizes, in turn.
struct Chunks {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    turn: usize,
}

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let size = self.sizes[self.turn % self.sizes.len()];
        self.turn += 1;
        let n = size.min(out.len()).min(self.data.len() - self.at);
        let at = self.at;
        out[..n].copy_from_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(n))
    }
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind, 0, 1];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    f
}

/// A header frame's payload: headers only, one entry `x-deep` nested `depth` arrays deep.
fn header_payload(depth: usize) -> Vec<u8> {
    let mut v = vec![b't', 1];
    for _ in 0..depth {
        let mut outer = vec![b'A'];
        outer.extend_from_slice(&(v.len() as u32).to_be_bytes());
        outer.extend(v);
        v = outer;
    }
    let mut table = vec![6];
    table.extend_from_slice(b"x-deep");
    table.extend(v);
    let mut p = vec![0, 60, 0, 0];
    p.extend_from_slice(&3u64.to_be_bytes());
    p.extend_from_slice(&0x2000u16.to_be_bytes());
    p.extend_from_slice(&(table.len() as u32).to_be_bytes());
    p.extend(table);
    p
}

fn read_all(data: Vec<u8>, sizes: Vec<usize>, out_size: usize) -> Vec<u8> {
    let mut guard = HeaderGuard::new(Chunks {
        data,
        at: 0,
        sizes,
        turn: 0,
    });
    let mut cx = Context::from_waker(Waker::noop());
    let mut got = Vec::new();
    let mut out = vec![0; out_size];
    loop {
        match Pin::new(&mut guard).poll_read(&mut cx, &mut out) {
            Poll::Ready(Ok(0)) => return got,
            Poll::Ready(Ok(n)) => got.extend_from_slice(&out[..n]),
            other => panic!("{other:?}"),
        }
    }
}

/// A stream of frames as RabbitMQ sends a delivery: method, header, body; and what the guard
/// should hand on for it.
fn stream(depth: usize) -> (Vec<u8>, Vec<u8>) {
    let method = frame(1, &[0, 60, 0, 60, 1, 2, 3]);
    let header = frame(FRAME_TYPE_HEADER, &header_payload(depth));
    let body = frame(3, b"abc");
    let expected_header = match headers::rewrite(&header_payload(depth)) {
        Some(new) => frame(FRAME_TYPE_HEADER, &new.payload),
        None => header.clone(),
    };
    let mut input = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..3 {
        input.extend_from_slice(&method);
        input.extend_from_slice(&header);
        input.extend_from_slice(&body);
        expected.extend_from_slice(&method);
        expected.extend_from_slice(&expected_header);
        expected.extend_from_slice(&body);
    }
    (input, expected)
}

#[test]
fn frames_within_the_limit_pass_byte_for_byte_however_they_arrive() {
    let (input, expected) = stream(3);
    assert_eq!(input, expected);
    for (sizes, out) in [
        (vec![1], 1),
        (vec![7], 3),
        (vec![5, 100, 2], 64),
        (vec![READ_CHUNK], 65536),
    ] {
        assert_eq!(read_all(input.clone(), sizes, out), expected);
    }
}

#[test]
fn a_deep_header_frame_is_rewritten_in_the_stream() {
    let (input, expected) = stream(26_100);
    assert!(expected.len() < input.len() / 100);
    for (sizes, out) in [(vec![1000], 7), (vec![3, 70_000], 4096), (vec![131_072], 8)] {
        assert_eq!(read_all(input.clone(), sizes, out), expected);
    }
}

#[test]
fn a_stream_cut_mid_frame_hands_on_what_arrived() {
    let (mut input, _) = stream(3);
    input.truncate(input.len() - 5);
    assert_eq!(read_all(input.clone(), vec![9], 16), input);
}

#[test]
fn the_servers_protocol_header_passes() {
    let input = b"AMQP\x00\x00\x09\x01".to_vec();
    assert_eq!(read_all(input.clone(), vec![3], 16), input);
}
