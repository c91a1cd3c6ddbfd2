//! The HTTP connections the server holds, and which one to let go when a
//! new client arrives and every slot is taken.
//!
//! A server that stops accepting at its connection limit lets whoever holds
//! the slots (1,000 clients dripping a byte every few seconds) lock everyone
//! else out. This server always accepts; at the limit it closes the
//! connection that has made the least recent progress among those that are
//! idle between requests, still sending a request, or being sent a
//! response. A connection whose request is being worked on (a commit, a
//! long poll) is never shed: its slowness is the server's, not the client's.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// What a connection is doing; decides whether it may be shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Waiting for (or reading) a request's headers: a new connection, or
    /// an idle keep-alive one.
    Idle = 0,
    /// The handler is reading the request's body.
    ReadingBody = 1,
    /// The handler is working on the request: never shed.
    Working = 2,
    /// The response is being sent.
    Responding = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::ReadingBody,
            2 => Phase::Working,
            3 => Phase::Responding,
            _ => Phase::Idle,
        }
    }
}

/// One connection's shared record: its phase, when bytes last moved, and
/// the signal that sheds it.
#[derive(Debug)]
pub struct Conn {
    epoch: Instant,
    /// Milliseconds since `epoch` when bytes last moved either way.
    last_progress_ms: AtomicU64,
    phase: AtomicU8,
    shed: AtomicBool,
    shed_signal: Notify,
}

impl Conn {
    fn new(epoch: Instant) -> Conn {
        let conn = Conn {
            epoch,
            last_progress_ms: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Idle as u8),
            shed: AtomicBool::new(false),
            shed_signal: Notify::new(),
        };
        conn.progressed();
        conn
    }

    pub fn progressed(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_progress_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// Resolves once this connection has been chosen to make room.
    pub async fn shed(&self) {
        self.shed_signal.notified().await
    }
}

/// Every open connection, by id.
pub struct ConnTable {
    epoch: Instant,
    max: usize,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Connections closed to make room, for `/metrics`.
    pub shed_total: AtomicU64,
}

/// What [`ConnTable::admit`] decided about a new connection.
pub enum Admission {
    /// Serve it; `Conn` is its record, `u64` its id for [`ConnTable::remove`].
    Serve(u64, Arc<Conn>),
    /// Every slot is held by a request being worked on: refuse the newcomer.
    Full,
}

impl ConnTable {
    pub fn new(max: usize) -> ConnTable {
        ConnTable {
            epoch: Instant::now(),
            max: max.max(1),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            shed_total: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // The map holds no invariant a panic could break half-way.
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new connection. At the limit, first sheds the connection
    /// that has waited longest for its client (idle, sending its request, or
    /// being sent a response), so the newcomer is served.
    pub fn admit(&self) -> Admission {
        let mut conns = self.lock();
        let staying = conns
            .values()
            .filter(|c| !c.shed.load(Ordering::Relaxed))
            .count();
        if staying >= self.max {
            let victim = conns
                .values()
                .filter(|c| !c.shed.load(Ordering::Relaxed) && c.phase() != Phase::Working)
                // Idle and half-sent requests go before responses in
                // flight; within each, the least recent progress first.
                .min_by_key(|c| {
                    (
                        c.phase() == Phase::Responding,
                        c.last_progress_ms.load(Ordering::Relaxed),
                    )
                });
            match victim {
                Some(v) => {
                    v.shed.store(true, Ordering::Relaxed);
                    v.shed_signal.notify_one();
                    self.shed_total.fetch_add(1, Ordering::Relaxed);
                }
                None => return Admission::Full,
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(self.epoch));
        conns.insert(id, conn.clone());
        Admission::Serve(id, conn)
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A stream that records on its [`Conn`] each time bytes move.
pub struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, conn: Arc<Conn>) -> Tracked<S> {
        Tracked { inner, conn }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.progressed();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.progressed();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.progressed();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(t: &ConnTable) -> Arc<Conn> {
        match t.admit() {
            Admission::Serve(_, c) => c,
            Admission::Full => panic!("refused"),
        }
    }

    #[test]
    fn at_the_limit_the_least_recently_active_idle_connection_is_shed() {
        let t = ConnTable::new(3);
        let a = serve(&t);
        let b = serve(&t);
        let c = serve(&t);
        a.last_progress_ms.store(50, Ordering::Relaxed);
        b.last_progress_ms.store(10, Ordering::Relaxed);
        c.last_progress_ms.store(30, Ordering::Relaxed);
        let d = serve(&t);
        d.last_progress_ms.store(100, Ordering::Relaxed);
        assert!(b.shed.load(Ordering::Relaxed));
        assert!(!a.shed.load(Ordering::Relaxed) && !c.shed.load(Ordering::Relaxed));
        // The shed one is on its way out: the next newcomer sheds another.
        let _e = serve(&t);
        assert!(c.shed.load(Ordering::Relaxed));
    }

    #[test]
    fn requests_being_worked_on_are_never_shed_and_responses_go_last() {
        let t = ConnTable::new(2);
        let a = serve(&t);
        let b = serve(&t);
        a.set_phase(Phase::Working);
        a.last_progress_ms.store(0, Ordering::Relaxed);
        b.set_phase(Phase::Responding);
        b.last_progress_ms.store(5, Ordering::Relaxed);
        let c = serve(&t);
        assert!(b.shed.load(Ordering::Relaxed), "a response beats nothing");
        assert!(!a.shed.load(Ordering::Relaxed));
        c.set_phase(Phase::Working);
        assert!(matches!(t.admit(), Admission::Full));
    }
}
