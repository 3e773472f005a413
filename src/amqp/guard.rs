//! The deep-header defence: every byte RabbitMQ sends this process passes through
//! [`HeaderGuard`] before lapin parses it, and a content header frame whose `headers` nest
//! deeper than [`headers::MAX_DEPTH`] is rewritten on the way ([`headers::rewrite`]).
//!
//! Why here. Producers are not trusted, and a field table may nest as deep as a frame allows
//! (26,100 levels in RabbitMQ's 128 KiB frame). lapin parses, and Rust drops, such a value
//! recursively, about 1.5 KB of stack a level: a 2 MiB thread stack overflows at ~1,300
//! levels and the process aborts, on every restart, since the message is redelivered. Bounding
//! the depth in front of the parser keeps every thread at its default stack.
//!
//! How. lapin takes its transport from a runtime kit ([`GuardedTokio`]: tokio, whose TCP
//! streams come wrapped) and, for `amqp://` and `amqps://` alike, from [`connect`]'s closure,
//! which opens the connection as lapin would (TLS included) and wraps the result. The guard
//! only reads frame boundaries: method and body frames pass through as they are, header
//! frames are checked without a copy unless they are too deep.

pub mod headers;

use async_rs::traits::{Executor, Reactor, RuntimeKit};
use async_rs::util::Task;
use async_rs::{Runtime, Tokio};
use futures_io::{AsyncRead, AsyncWrite};
use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, TLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Header frames larger than this are passed on unchecked (RabbitMQ's `frame_max` is 128 KiB
/// by default and lapin accepts what the server offers; a frame this large is not RabbitMQ's).
const MAX_CHECKED_FRAME: usize = 16 << 20;
/// What one read from the socket asks for.
const READ_CHUNK: usize = 64 * 1024;
/// A frame's type, channel and size, before its payload.
const FRAME_HEADER: usize = 7;
const FRAME_TYPE_HEADER: u8 = 2;

/// Open a lapin connection whose incoming frames pass through [`HeaderGuard`].
pub async fn connect(uri: AMQPUri, props: ConnectionProperties) -> lapin::Result<Connection> {
    let kit = Tokio::current();
    let runtime = Runtime::new(GuardedTokio(kit.clone()));
    let plain = Runtime::new(kit);
    Connection::connector(
        uri,
        runtime,
        async move |uri, _| {
            let stream = uri
                .connect_with_config_async(TLSConfig::default(), &plain)
                .await?;
            Ok(AsyncTcpStream::Plain(HeaderGuard::new(stream)))
        },
        props,
    )
    .await
}

/// tokio, with TCP streams wrapped in [`HeaderGuard`] (lapin's transport type comes from its
/// runtime kit).
#[derive(Clone, Debug)]
pub struct GuardedTokio(Tokio);

type Inner = AsyncTcpStream<<Tokio as Reactor>::TcpStream>;

impl RuntimeKit for GuardedTokio {}

impl Executor for GuardedTokio {
    type Task<T: Send + 'static> = <Tokio as Executor>::Task<T>;

    fn block_on<T, F: Future<Output = T>>(&self, f: F) -> T {
        self.0.block_on(f)
    }

    fn spawn<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.0.spawn(f)
    }

    fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.0.spawn_blocking(f)
    }
}

impl Reactor for GuardedTokio {
    type TcpStream = HeaderGuard<Inner>;
    type Sleep = <Tokio as Reactor>::Sleep;

    // `AsFd + AsRawFd` is what async-rs's (unexported) `AsSysFd` is on unix.
    fn register<H: io::Read + io::Write + AsFd + AsRawFd + Send + 'static>(
        &self,
        socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        self.0.register(socket)
    }

    fn sleep(&self, dur: std::time::Duration) -> Self::Sleep {
        self.0.sleep(dur)
    }

    fn interval(
        &self,
        dur: std::time::Duration,
    ) -> impl futures_util::Stream<Item = std::time::Instant> + Send + 'static {
        self.0.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: std::net::SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        let connect = self.0.tcp_connect_addr(addr);
        async move { Ok(HeaderGuard::new(AsyncTcpStream::Plain(connect.await?))) }
    }
}

/// A transport that hands lapin the broker's bytes frame by frame, each content header frame
/// checked (and, if too deep, rewritten) first. Writes pass through untouched.
pub struct HeaderGuard<S> {
    inner: S,
    /// Bytes read from the socket; `buf[start..end]` not yet handed on.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes of the current frame still to hand on as they are.
    pass: usize,
    /// A rewritten header frame being handed on, and how much of it is.
    rewritten: Vec<u8>,
    rewritten_at: usize,
}

/// What the next frame in the buffer asks for.
enum Next {
    /// Hand on this many bytes as they are.
    Pass(usize),
    /// The frame was rewritten into `rewritten`.
    Rewritten,
    /// The buffer must hold this many bytes before deciding.
    Need(usize),
}

impl<S> HeaderGuard<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            pass: 0,
            rewritten: Vec::new(),
            rewritten_at: 0,
        }
    }

    fn next(&mut self) -> Next {
        let avail = &self.buf[self.start..self.end];
        if avail.starts_with(b"AMQP") {
            // The server's protocol header (8 bytes): it refuses our version and closes.
            return Next::Pass(8);
        }
        if avail.len() < FRAME_HEADER {
            return Next::Need(FRAME_HEADER);
        }
        let size = u32::from_be_bytes([avail[3], avail[4], avail[5], avail[6]]) as usize;
        let total = FRAME_HEADER + size + 1;
        if avail[0] != FRAME_TYPE_HEADER || total > MAX_CHECKED_FRAME {
            return Next::Pass(total);
        }
        if avail.len() < total {
            return Next::Need(total);
        }
        let Some(new) = headers::rewrite(&avail[FRAME_HEADER..FRAME_HEADER + size]) else {
            return Next::Pass(total);
        };
        crate::metrics::metrics()
            .header_values_dropped
            .inc_by(new.dropped as u64);
        tracing::warn!(
            dropped = new.dropped,
            max_depth = headers::MAX_DEPTH,
            "a message's AMQP headers nested deeper than the limit: the too-deep values were replaced by a note"
        );
        self.rewritten.clear();
        self.rewritten.extend_from_slice(&avail[..3]);
        self.rewritten
            .extend_from_slice(&(new.payload.len() as u32).to_be_bytes());
        self.rewritten.extend_from_slice(&new.payload);
        self.rewritten.push(avail[total - 1]);
        self.rewritten_at = 0;
        self.start += total;
        Next::Rewritten
    }

    /// Make room for at least `need` unread bytes and one more read.
    fn make_room(&mut self, need: usize) {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        let wanted = need.max(self.end - self.start + READ_CHUNK / 4);
        if self.buf.len() - self.start < wanted {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.buf.len() < wanted {
            self.buf.resize(wanted.max(READ_CHUNK), 0);
        }
    }
}

fn copy_out(from: &[u8], out: &mut [u8]) -> usize {
    let n = from.len().min(out.len());
    out[..n].copy_from_slice(&from[..n]);
    n
}

impl<S: AsyncRead + Unpin> AsyncRead for HeaderGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            if this.rewritten_at < this.rewritten.len() {
                let n = copy_out(&this.rewritten[this.rewritten_at..], out);
                this.rewritten_at += n;
                return Poll::Ready(Ok(n));
            }
            if this.pass > 0 && this.end > this.start {
                let avail = (this.end - this.start).min(this.pass);
                let n = copy_out(&this.buf[this.start..this.start + avail], out);
                this.start += n;
                this.pass -= n;
                return Poll::Ready(Ok(n));
            }
            let mut need = 0;
            if this.pass == 0 {
                match this.next() {
                    Next::Pass(n) => {
                        this.pass = n;
                        continue;
                    }
                    Next::Rewritten => continue,
                    Next::Need(n) => need = n,
                }
            }
            this.make_room(need);
            let end = this.end;
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.buf[end..]) {
                Poll::Ready(Ok(0)) if this.end > this.start => {
                    // The peer closed mid-frame: hand on what there is, lapin reports it.
                    this.pass = this.end - this.start;
                }
                Poll::Ready(Ok(n)) if n > 0 => this.end += n,
                other => return other,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeaderGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests;
