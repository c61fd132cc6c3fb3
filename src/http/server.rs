//! The accept loop and client connections, with the limits a public-facing server needs:
//! a request head must arrive within `client_header_timeout` (hyper's header timer, which also
//! runs while a kept-alive connection waits for its next request), a connection on which no
//! byte moves for `client_idle_timeout` is closed after its response in progress, and above
//! `max_client_connections` (or when the process runs out of file descriptors) the quietest
//! connections are closed so that new clients are still answered. On shutdown every connection
//! finishes its response in progress, for up to `shutdown_grace`.

use crate::config::Config;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower::ServiceExt;

/// The connection limits, from [`Config`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `client_header_timeout`.
    pub header_timeout: Duration,
    /// `client_idle_timeout`.
    pub idle_timeout: Duration,
    /// `max_client_connections`.
    pub max_connections: usize,
    /// `shutdown_grace`.
    pub grace: Duration,
}

impl Limits {
    /// The limits a configuration sets.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            header_timeout: config.client_header_timeout,
            idle_timeout: config.client_idle_timeout,
            max_connections: config.max_client_connections,
            grace: config.shutdown_grace,
        }
    }
}

/// The server's state, as its connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Serving.
    No,
    /// Finish the response in progress, then close.
    AfterResponse,
    /// Close now (the grace period is over).
    Now,
}

/// What the server knows of one open connection.
#[derive(Debug)]
struct Entry {
    /// Milliseconds (on the registry's clock) of the last byte read or written.
    activity: Arc<AtomicU64>,
    /// Asks the connection to close after its response in progress.
    close: Arc<Notify>,
    /// Already asked to close: not counted against the limit, not picked again.
    closing: Arc<AtomicBool>,
}

/// Open connections, for the limit and for shutdown.
#[derive(Debug)]
struct Registry {
    started: Instant,
    open: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    /// Woken each time a connection ends (shutdown waits on it).
    ended: Notify,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Asks the `n` quietest connections that are not closing yet to close.
    fn shed(&self, n: usize) {
        let open = self.open.lock();
        let mut quiet: Vec<(&u64, &Entry)> = open
            .iter()
            .filter(|(_, e)| !e.closing.load(Ordering::Relaxed))
            .collect();
        quiet.sort_by_key(|(_, e)| e.activity.load(Ordering::Relaxed));
        for (_, entry) in quiet.into_iter().take(n) {
            entry.closing.store(true, Ordering::Relaxed);
            entry.close.notify_one();
        }
    }

    /// Connections not yet asked to close.
    fn live(&self) -> usize {
        self.open
            .lock()
            .values()
            .filter(|e| !e.closing.load(Ordering::Relaxed))
            .count()
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets responses in progress finish
/// for up to `limits.grace`.
pub async fn serve(
    app: Router,
    listener: TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let registry = Arc::new(Registry {
        started: Instant::now(),
        open: Mutex::default(),
        next_id: AtomicU64::new(0),
        ended: Notify::new(),
    });
    let (stopping, stop) = watch::channel(Stop::No);
    tokio::pin!(shutdown);
    let mut warned_fds: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors: make room by closing the quietest connections.
                if matches!(
                    rustix::io::Errno::from_io_error(&e),
                    Some(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)
                ) {
                    if warned_fds.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                        warned_fds = Some(Instant::now());
                        tracing::warn!(error = %e, "out of file descriptors; closing quiet client connections");
                    }
                    registry.shed(8);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if registry.live() >= limits.max_connections {
            registry.shed(1);
        }
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            app.clone(),
            builder.clone(),
            Arc::clone(&registry),
            stop.clone(),
            limits.idle_timeout,
        ));
    }
    drop(listener);
    let _ = stopping.send(Stop::AfterResponse);
    let drained = tokio::time::timeout(limits.grace, async {
        loop {
            let ended = registry.ended.notified();
            if registry.open.lock().is_empty() {
                return;
            }
            ended.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown grace period over; dropping open connections");
        let _ = stopping.send(Stop::Now);
    }
    Ok(())
}

/// Serves one connection until it ends, is idle too long, is shed, or the server stops.
async fn connection(
    stream: TcpStream,
    app: Router,
    builder: auto::Builder<TokioExecutor>,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<Stop>,
    idle_timeout: Duration,
) {
    let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
    let activity = Arc::new(AtomicU64::new(registry.now_ms()));
    let close = Arc::new(Notify::new());
    let closing = Arc::new(AtomicBool::new(false));
    registry.open.lock().insert(
        id,
        Entry {
            activity: Arc::clone(&activity),
            close: Arc::clone(&close),
            closing: Arc::clone(&closing),
        },
    );
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: Arc::clone(&activity),
        registry: Arc::clone(&registry),
    });
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        app.clone().oneshot(request.map(axum::body::Body::new))
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let idle_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let tick = (idle_timeout / 4).max(Duration::from_millis(50));
    // When the connection was asked to close; it is dropped if it is still quiet an idle
    // timeout later (a client that stopped reading its response).
    let mut closing_since: Option<u64> = None;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            () = close.notified(), if closing_since.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing_since = Some(registry.now_ms());
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() == Stop::Now {
                    break;
                }
                if closing_since.is_none() {
                    conn.as_mut().graceful_shutdown();
                }
                closing_since = Some(u64::MAX);
            }
            () = tokio::time::sleep(tick) => {
                let now = registry.now_ms();
                let quiet_for = now.saturating_sub(activity.load(Ordering::Relaxed));
                match closing_since {
                    None if quiet_for >= idle_ms => {
                        closing.store(true, Ordering::Relaxed);
                        conn.as_mut().graceful_shutdown();
                        closing_since = Some(now);
                    }
                    Some(since) if since != u64::MAX && quiet_for >= idle_ms
                        && now.saturating_sub(since) >= idle_ms => break,
                    _ => {}
                }
            }
        }
    }
    registry.open.lock().remove(&id);
    registry.ended.notify_waiters();
}

/// A TCP stream that records when a byte last moved.
struct Tracked {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
    registry: Arc<Registry>,
}

impl Tracked {
    fn touch(&self) {
        self.activity
            .store(self.registry.now_ms(), Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
