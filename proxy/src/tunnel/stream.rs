//! One flow as a byte stream: an HTTP/2 stream's send and receive halves behind `AsyncRead` and
//! `AsyncWrite`, so a flow is piped with the same tools as a TCP connection.
//!
//! - Reads release flow-control credit only as the bytes are consumed, so a slow reader slows
//!   the peer instead of growing a buffer.
//! - `shutdown` ends the send half (`END_STREAM`): a half-close, the peer still sends.
//! - Dropping a stream whose send half was not shut down resets it (`RST_STREAM CANCEL`), so the
//!   other end sees an abort, not a clean end.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::runtime::Handle;

use super::pipe::{Sink, Source};

/// Largest piece handed to HTTP/2 at once; bounds the copy made of each write.
const MAX_WRITE: usize = 64 * 1024;

#[derive(Debug)]
pub struct FlowStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    unread: Bytes,
    send_ended: bool,
    /// The runtime of the connection that carries it, when that connection has a thread of its
    /// own (a link between routers): the flow's relay runs best there.
    home: Option<Handle>,
}

impl FlowStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        FlowStream {
            send,
            recv,
            unread: Bytes::new(),
            send_ended: false,
            home: None,
        }
    }

    /// The same flow, carried by a connection that runs on `home`.
    pub(crate) fn with_home(mut self, home: Option<Handle>) -> Self {
        self.home = home;
        self
    }

    /// The runtime of the connection carrying it, if it has one of its own.
    pub fn home(&self) -> Option<&Handle> {
        self.home.as_ref()
    }
}

fn to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    let kind = match error.reason() {
        Some(Reason::CANCEL | Reason::REFUSED_STREAM | Reason::STREAM_CLOSED) => {
            io::ErrorKind::ConnectionReset
        }
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, error)
}

impl AsyncRead for FlowStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.unread = data,
                Some(Err(error)) => return Poll::Ready(Err(to_io(error))),
            }
        }
        let n = self.unread.len().min(out.remaining());
        out.put_slice(&self.unread.split_to(n));
        // Credit goes back for what was consumed, not for what arrived.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl FlowStream {
    /// Waits for send credit for up to `wanted` bytes; returns how many may be sent now, at
    /// least 1.
    fn poll_credit(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        if self.send_ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(wanted);
        loop {
            let granted = self.send.capacity();
            if granted > 0 {
                return Poll::Ready(Ok(granted.min(wanted)));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Poll::Ready(Err(to_io(error))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn end_send(&mut self) -> io::Result<()> {
        if !self.send_ended {
            self.send_ended = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Ok(())
    }
}

impl Source for FlowStream {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.unread.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.unread))));
        }
        match ready!(self.recv.poll_data(cx)) {
            None => Poll::Ready(Ok(None)),
            Some(Ok(data)) => Poll::Ready(Ok(Some(data))),
            Some(Err(error)) => Poll::Ready(Err(to_io(error))),
        }
    }

    fn consumed(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

impl Sink for FlowStream {
    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_credit(cx, chunk.len()))?;
        // Handed over as it is: no copy.
        self.send
            .send_data(chunk.split_to(n), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.end_send())
    }
}

impl AsyncWrite for FlowStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_credit(cx, buf.len().min(MAX_WRITE)))?;
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // HTTP/2 frames are written by the connection task; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.end_send())
    }
}

impl Drop for FlowStream {
    fn drop(&mut self) {
        if !self.send_ended {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}
