//! A producer that speaks AMQP 0-9-1 by hand, for hostile headers: a header nested as deep as a
//! frame allows is built here as bytes, never as a lapin value (which would be built, encoded
//! and dropped recursively on this process's threads, whose stacks are the default).

use std::io::{Read, Write};
use std::net::TcpStream;

/// The contents of a headers table with one entry `key` nested `depth` arrays deep (5 bytes a
/// level), built without recursion.
pub fn nested_entry(key: &str, depth: usize) -> Vec<u8> {
    let mut v = vec![b't', 1];
    for _ in 0..depth {
        let mut outer = Vec::with_capacity(v.len() + 5);
        outer.push(b'A');
        outer.extend_from_slice(&(v.len() as u32).to_be_bytes());
        outer.extend_from_slice(&v);
        v = outer;
    }
    let mut e = vec![key.len() as u8];
    e.extend_from_slice(key.as_bytes());
    e.extend(v);
    e
}

fn short(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn long(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    long(&mut f, payload);
    f.push(0xCE);
    f
}

fn method(channel: u16, class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    frame(1, channel, &p)
}

/// Read frames until a method frame (class, id) arrives; its arguments. A close from the broker
/// is a panic naming its reason.
fn expect(sock: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        sock.read_exact(&mut head)
            .expect("read a frame from RabbitMQ");
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0; size + 1];
        sock.read_exact(&mut payload)
            .expect("read a frame from RabbitMQ");
        if head[0] != 1 || size < 4 {
            continue;
        }
        let got = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        if got == (class, id) {
            return payload[4..size].to_vec();
        }
        assert!(
            !matches!(got, (10, 50) | (20, 40) | (60, 120)),
            "RabbitMQ refused: {:?}",
            String::from_utf8_lossy(&payload[4..size])
        );
    }
}

/// Publish one persistent JSON message to `exchange` with `routing_key`, the given headers table
/// contents and message id, as guest on the default vhost of `addr`, and wait for the broker's
/// confirm.
pub fn publish(
    addr: &str,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    message_id: Option<&str>,
    headers: &[u8],
) {
    let mut sock = TcpStream::connect(addr).expect("connect to RabbitMQ");
    sock.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    expect(&mut sock, 10, 10);
    let mut start_ok = vec![0, 0, 0, 0];
    short(&mut start_ok, "PLAIN");
    long(&mut start_ok, b"\0guest\0guest");
    short(&mut start_ok, "en_US");
    sock.write_all(&method(0, 10, 11, &start_ok)).unwrap();
    let tune = expect(&mut sock, 10, 30);
    let mut tune_ok = tune[..6].to_vec();
    tune_ok.extend_from_slice(&[0, 0]);
    sock.write_all(&method(0, 10, 31, &tune_ok)).unwrap();
    sock.write_all(&method(0, 10, 40, b"\x01/\x00\x00"))
        .unwrap();
    expect(&mut sock, 10, 41);
    sock.write_all(&method(1, 20, 10, b"\x00")).unwrap();
    expect(&mut sock, 20, 11);
    sock.write_all(&method(1, 85, 10, b"\x00")).unwrap();
    expect(&mut sock, 85, 11);

    let mut publish = vec![0, 0];
    short(&mut publish, exchange);
    short(&mut publish, routing_key);
    publish.push(0);
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    let flags: u16 = 0x8000 | 0x2000 | 0x1000 | if message_id.is_some() { 0x0080 } else { 0 };
    header.extend_from_slice(&flags.to_be_bytes());
    short(&mut header, "application/json");
    long(&mut header, headers);
    header.push(2);
    if let Some(id) = message_id {
        short(&mut header, id);
    }
    let mut out = method(1, 60, 40, &publish);
    out.extend(frame(2, 1, &header));
    out.extend(frame(3, 1, body));
    sock.write_all(&out).unwrap();
    expect(&mut sock, 60, 80);
    sock.write_all(&method(0, 10, 50, b"\x00\xc8\x00\x00\x00\x00\x00"))
        .unwrap();
    expect(&mut sock, 10, 51);
}
