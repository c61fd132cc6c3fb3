//! The accept loop and client connections, with the limits a public-facing server needs. Each
//! connection has a watchdog that sees when a byte last moved, how many responses are in
//! progress (from the request head until the body's bytes are written or dropped), and whether
//! a write is waiting for the client to read:
//! - with no response in progress, a request head must complete within
//!   `client_header_timeout` of the connection's start or its previous response (any protocol,
//!   HTTP/2 included), and a connection quiet for `client_idle_timeout` is closed;
//! - with a response in progress, a client that has not read for `client_idle_timeout` is cut
//!   off, while a response waiting on the server (upstream, a download) is never timed out here;
//!   on HTTP/2 this holds per stream: a stream whose bytes wait for a flow-control window the
//!   client never opens closes the connection after `client_idle_timeout`, even while the
//!   client keeps the connection busy with other streams or pings;
//! - an HTTP/2 connection has at most [`MAX_STREAMS`] streams, so the blob files and buffered
//!   bytes one connection can hold are bounded;
//! - above `max_client_connections`, or when the process runs out of file descriptors, the
//!   quietest connections are closed (after their response in progress) so that new clients
//!   are still answered.
//!
//! On shutdown every connection finishes its response in progress, for up to `shutdown_grace`.

use super::Front;
use super::listeners::{Listeners, Workers};
use crate::config::Config;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

/// Streams one HTTP/2 connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS; hyper's
/// default is 200). Each blob stream holds its file open and up to a few read chunks in memory,
/// so this bounds what one connection pins (100 files, a few tens of MiB, for at most
/// `client_idle_timeout` when they stall). RFC 9113 recommends no fewer than 100; a client that
/// wants more in parallel opens another connection (Go's transport does).
pub const MAX_STREAMS: u32 = 100;

/// Bytes HTTP/2 queues per stream beyond the chunk being sent (hyper's default is 400 KiB):
/// one blob read chunk, so a fast stream's next chunk is read while the previous one is still
/// being sent, and a stream holds at most two chunks queued plus the one hyper waits to send.
const STREAM_SEND_BUFFER: usize = crate::blobs::CHUNK;

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

/// What a connection's watchdog sees; times are milliseconds on the registry's clock.
#[derive(Debug)]
struct Activity {
    /// The last byte read or written.
    last_byte: AtomicU64,
    /// The connection's start, or the end of its last response.
    last_boundary: AtomicU64,
    /// Responses in progress.
    in_flight: AtomicUsize,
    /// A write is waiting for the client to read.
    write_blocked: AtomicBool,
    /// The HTTP/2 responses in progress (dead entries are pruned as new ones come): a stream
    /// waiting for flow-control window does not show on the socket, so each is watched.
    streams: Mutex<Vec<Weak<InFlight>>>,
}

impl Activity {
    /// Whether an HTTP/2 response has had bytes waiting to be sent, with none of them sent,
    /// for `idle_ms` or more.
    fn stream_stalled(&self, now: u64, idle_ms: u64) -> bool {
        let mut streams = self.streams.lock();
        streams.retain(|s| s.strong_count() > 0);
        streams.iter().filter_map(Weak::upgrade).any(|s| {
            s.unsent.load(Ordering::Relaxed) > 0
                && now.saturating_sub(s.moved.load(Ordering::Relaxed)) >= idle_ms
        })
    }
}

/// What the server knows of one open connection.
#[derive(Debug)]
struct Entry {
    activity: Arc<Activity>,
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
    /// When connections were last shed for want of file descriptors (ms on this clock, plus
    /// one; 0: never).
    last_shed: AtomicU64,
    /// When that was last logged (the same).
    last_fd_warning: AtomicU64,
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
        // Connections without a response in progress first, then the longest quiet: the `n`
        // first after a partial sort (linear, where a full sort of every open connection would
        // be paid at each accept at the cap).
        if n < quiet.len() {
            quiet.select_nth_unstable_by_key(n, |(_, e)| {
                (
                    e.activity.in_flight.load(Ordering::Relaxed) > 0,
                    e.activity.last_byte.load(Ordering::Relaxed),
                )
            });
        }
        for (_, entry) in quiet.into_iter().take(n) {
            entry.closing.store(true, Ordering::Relaxed);
            entry.close.notify_one();
        }
    }

    /// Out of file descriptors (`error`): closes the 8 quietest connections to make room, at
    /// most once per 10 ms and warning at most once per 10 s however often the accept loop
    /// fails on the same pending connection.
    fn out_of_descriptors(&self, error: &io::Error) {
        let now = self.now_ms();
        if !claim(&self.last_shed, now, 10) {
            return;
        }
        if claim(&self.last_fd_warning, now, 10_000) {
            tracing::warn!(error = %error, "out of file descriptors; closing quiet client connections");
        }
        self.shed(8);
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

/// Whether it is `every` ms or more since `last` (ms plus one; 0: never) and this caller is the
/// one to set it to `now`.
fn claim(last: &AtomicU64, now: u64, every: u64) -> bool {
    let was = last.load(Ordering::Relaxed);
    let now = now.saturating_add(1);
    (was == 0 || now.saturating_sub(was) >= every)
        && last
            .compare_exchange(was, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Serves `app` on `listeners` until `shutdown` resolves, then lets responses in progress
/// finish for up to `limits.grace`. Per core, connections are served by worker threads that run
/// until the returned [`Workers`] is dropped: tasks they spawned (a download other requests
/// wait on) may still be finishing, so the caller keeps it while it waits for them.
pub async fn serve(
    app: Front,
    listeners: Listeners,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<Option<Workers>> {
    let (serving, stopping) = Serving::new(app, limits, tls);
    let workers = match listeners {
        Listeners::Shared(listener) => {
            accept(listener, &serving, shutdown, |stream, peer| {
                tokio::spawn(connection(stream, peer, serving.clone()));
            })
            .await;
            None
        }
        Listeners::PerCore { listener, workers } => {
            Some(Workers::serve(listener, workers, &serving, shutdown).await?)
        }
    };
    stopping.drain(limits.grace).await;
    Ok(workers)
}

/// Accepts connections on `listener` until `shutdown` resolves, giving each to `place` (which
/// has it served), then closes the listener.
pub(super) async fn accept(
    listener: TcpListener,
    serving: &Serving,
    shutdown: impl Future<Output = ()>,
    mut place: impl FnMut(TcpStream, std::net::SocketAddr),
) {
    tokio::pin!(shutdown);
    let registry = &serving.registry;
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                use rustix::io::Errno;
                match Errno::from_io_error(&e) {
                    // The one connection's failure, passed on by accept(2) (its manual says
                    // to retry these): the next one is taken at once.
                    Some(
                        Errno::CONNABORTED
                        | Errno::PROTO
                        | Errno::PERM
                        | Errno::NETDOWN
                        | Errno::NETUNREACH
                        | Errno::HOSTDOWN
                        | Errno::HOSTUNREACH
                        | Errno::NOPROTOOPT
                        | Errno::OPNOTSUPP,
                    ) => {
                        tracing::debug!(error = %e, "a connection failed before it was accepted");
                    }
                    // Out of something (or broken): wait for it to come back.
                    errno => {
                        if matches!(errno, Some(Errno::MFILE | Errno::NFILE)) {
                            registry.out_of_descriptors(&e);
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                continue;
            }
        };
        if registry.live() >= serving.limits.max_connections {
            registry.shed(1);
        }
        // Responses are written whole.
        let _ = stream.set_nodelay(true);
        place(stream, peer);
    }
}

/// What every connection shares: the router, the protocol settings, TLS, the registry of
/// connections, the server's state and the limits.
#[derive(Clone)]
pub(super) struct Serving {
    app: Front,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    registry: Arc<Registry>,
    stop: watch::Receiver<Stop>,
    limits: Limits,
}

impl Serving {
    /// How long responses in progress may take to finish on shutdown.
    pub(super) fn grace(&self) -> Duration {
        self.limits.grace
    }

    /// What the connections of one server share, and what stops them.
    fn new(app: Front, limits: Limits, tls: Option<TlsAcceptor>) -> (Serving, Stopping) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The watchdog enforces the header timeout for every protocol; hyper's own would arm a
        // timer (an allocation) for every HTTP/1 request.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .max_send_buf_size(STREAM_SEND_BUFFER);
        let registry = Arc::new(Registry {
            started: Instant::now(),
            open: Mutex::default(),
            next_id: AtomicU64::new(0),
            ended: Notify::new(),
            last_shed: AtomicU64::new(0),
            last_fd_warning: AtomicU64::new(0),
        });
        let (stopping, stop) = watch::channel(Stop::No);
        let serving = Serving {
            app,
            builder,
            tls,
            registry: Arc::clone(&registry),
            stop,
            limits,
        };
        (serving, Stopping { registry, stopping })
    }
}

/// Stops a server's connections, once no listener accepts new ones.
struct Stopping {
    registry: Arc<Registry>,
    stopping: watch::Sender<Stop>,
}

impl Stopping {
    /// Asks every connection to close after its response in progress, waits up to `grace`
    /// for them to, then closes those left.
    async fn drain(self, grace: Duration) {
        let _ = self.stopping.send(Stop::AfterResponse);
        let registry = &self.registry;
        let drained = tokio::time::timeout(grace, async {
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
            let _ = self.stopping.send(Stop::Now);
        }
    }
}

/// Serves one connection until it ends, times out, is shed, or the server stops.
pub(super) async fn connection(stream: TcpStream, peer: std::net::SocketAddr, serving: Serving) {
    let Serving {
        app,
        builder,
        tls,
        registry,
        stop,
        limits,
    } = serving;
    let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
    let now = registry.now_ms();
    let activity = Arc::new(Activity {
        last_byte: AtomicU64::new(now),
        last_boundary: AtomicU64::new(now),
        in_flight: AtomicUsize::new(0),
        write_blocked: AtomicBool::new(false),
        streams: Mutex::default(),
    });
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
    let tracked = Tracked {
        inner: stream,
        activity: Arc::clone(&activity),
        registry: Arc::clone(&registry),
    };
    let conn = Conn {
        app,
        builder,
        registry: Arc::clone(&registry),
        activity,
        close,
        stop,
        limits,
        peer,
    };
    match tls {
        None => conn.drive(tracked).await,
        // The handshake is part of the request head: bounded by the header timeout.
        Some(acceptor) => {
            match tokio::time::timeout(limits.header_timeout, acceptor.accept(tracked)).await {
                Ok(Ok(stream)) => conn.drive(stream).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
    }
    registry.open.lock().remove(&id);
    registry.ended.notify_waiters();
}

/// One accepted connection's parts, for [`Conn::drive`] over plain TCP or TLS.
struct Conn {
    app: Front,
    builder: auto::Builder<TokioExecutor>,
    registry: Arc<Registry>,
    activity: Arc<Activity>,
    close: Arc<Notify>,
    stop: watch::Receiver<Stop>,
    limits: Limits,
    peer: std::net::SocketAddr,
}

impl Conn {
    /// Serves requests on `io` until the connection ends, times out, is shed or the server
    /// stops.
    async fn drive<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            app,
            builder,
            registry,
            activity,
            close,
            mut stop,
            limits,
            peer,
        } = self;
        let io = TokioIo::new(io);
        let (watched, clock) = (Arc::clone(&activity), Arc::clone(&registry));
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let http2 = request.version() == hyper::Version::HTTP_2;
            let in_flight = InFlight::start(Arc::clone(&watched), Arc::clone(&clock), http2);
            let response = app.answer(request.map(axum::body::Body::new), peer);
            async move {
                let response = response.await;
                Ok::<_, std::convert::Infallible>(response.map(|body| Watched { body, in_flight }))
            }
        });
        let conn = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (header_ms, idle_ms) = (ms(limits.header_timeout), ms(limits.idle_timeout));
        let tick =
            (limits.header_timeout.min(limits.idle_timeout) / 4).max(Duration::from_millis(50));
        let mut asked_to_close = false;
        loop {
            tokio::select! {
                _ = conn.as_mut() => break,
                () = close.notified(), if !asked_to_close => {
                    if activity.in_flight.load(Ordering::Relaxed) == 0 {
                        break;
                    }
                    conn.as_mut().graceful_shutdown();
                    asked_to_close = true;
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() == Stop::Now {
                        break;
                    }
                    if activity.in_flight.load(Ordering::Relaxed) == 0 {
                        break;
                    }
                    if !asked_to_close {
                        conn.as_mut().graceful_shutdown();
                        asked_to_close = true;
                    }
                }
                () = tokio::time::sleep(tick) => {
                    let now = registry.now_ms();
                    let quiet = now.saturating_sub(activity.last_byte.load(Ordering::Relaxed));
                    let waiting = now.saturating_sub(activity.last_boundary.load(Ordering::Relaxed));
                    let idle = activity.in_flight.load(Ordering::Relaxed) == 0;
                    // No response to finish: a missing request head, an idle keep-alive connection,
                    // or one asked to close, is dropped at once.
                    if idle && (waiting >= header_ms || quiet >= idle_ms || asked_to_close) {
                        break;
                    }
                    // A client that stopped reading its response.
                    if !idle && activity.write_blocked.load(Ordering::Relaxed) && quiet >= idle_ms {
                        break;
                    }
                    // An HTTP/2 client that gives a stream no window.
                    if !idle && activity.stream_stalled(now, idle_ms) {
                        tracing::debug!(%peer, "an HTTP/2 stream sent nothing for client_idle_timeout; closing the connection");
                        break;
                    }
                }
            }
        }
    }
}

/// One response in progress on a connection, from its request head until its body is done and
/// every chunk it handed to hyper is written or dropped: shared by the body and its chunks.
struct InFlight {
    activity: Arc<Activity>,
    registry: Arc<Registry>,
    /// Bytes handed to hyper and not yet written.
    unsent: AtomicUsize,
    /// When a chunk was last handed to hyper or bytes of one last written (registry clock).
    moved: AtomicU64,
}

impl InFlight {
    /// Starts a response; an HTTP/2 one is registered for the stalled-stream check.
    fn start(activity: Arc<Activity>, registry: Arc<Registry>, http2: bool) -> Arc<InFlight> {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let in_flight = Arc::new(InFlight {
            moved: AtomicU64::new(registry.now_ms()),
            unsent: AtomicUsize::new(0),
            activity,
            registry,
        });
        if http2 {
            let mut streams = in_flight.activity.streams.lock();
            streams.retain(|s| s.strong_count() > 0);
            streams.push(Arc::downgrade(&in_flight));
        }
        in_flight
    }

    /// `n` bytes handed to hyper.
    fn handed(&self, n: usize) {
        self.unsent.fetch_add(n, Ordering::Relaxed);
        self.touch();
    }

    /// `n` bytes written (or dropped, with `touch` false).
    fn sent(&self, n: usize, touch: bool) {
        self.unsent.fetch_sub(n, Ordering::Relaxed);
        if touch {
            self.touch();
        }
    }

    fn touch(&self) {
        self.moved.store(self.registry.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.activity.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.activity
                .last_boundary
                .store(self.registry.now_ms(), Ordering::Relaxed);
        }
    }
}

/// A response body whose chunks keep its [`InFlight`] (and report their progress) until they
/// are written. Given to hyper as is: its `Arc` takes the place of the box `axum::body::Body`
/// would add, so a response costs no extra allocation.
struct Watched {
    body: axum::body::Body,
    in_flight: Arc<InFlight>,
}

impl http_body::Body for Watched {
    type Data = Chunk;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        polled.map(|frame| {
            frame.map(|frame| {
                frame.map(|frame| {
                    frame.map_data(|bytes| {
                        self.in_flight.handed(bytes.len());
                        Chunk {
                            bytes,
                            in_flight: Arc::clone(&self.in_flight),
                        }
                    })
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Bytes of a response handed to hyper, which reports what is written of them.
struct Chunk {
    bytes: bytes::Bytes,
    in_flight: Arc<InFlight>,
}

impl bytes::Buf for Chunk {
    fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn chunk(&self) -> &[u8] {
        &self.bytes
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        self.bytes.chunks_vectored(dst)
    }

    fn advance(&mut self, cnt: usize) {
        self.bytes.advance(cnt);
        self.in_flight.sent(cnt, true);
    }

    // Without this, `Buf`'s default would copy what `Bytes` hands out without a copy.
    fn copy_to_bytes(&mut self, len: usize) -> bytes::Bytes {
        let out = self.bytes.copy_to_bytes(len);
        self.in_flight.sent(len, true);
        out
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // Bytes never written (the stream was reset, the connection closed) wait no more.
        self.in_flight.sent(self.bytes.len(), false);
    }
}

/// A TCP stream that records when a byte last moved and whether a write waits for the client.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
    registry: Arc<Registry>,
}

impl Tracked {
    fn touch(&self) {
        self.activity
            .last_byte
            .store(self.registry.now_ms(), Ordering::Relaxed);
    }

    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        let blocked = polled.is_pending();
        self.activity
            .write_blocked
            .store(blocked, Ordering::Relaxed);
        if matches!(polled, Poll::Ready(Ok(n)) if *n > 0) {
            self.touch();
        }
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
        self.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
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
