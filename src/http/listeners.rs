//! Where client connections are accepted and served, by the `runtime` setting: one listener
//! whose connections tokio's multi-thread runtime serves (`work-stealing`), or one listener
//! whose connections are served by worker threads, one per core, each with a current-thread
//! runtime of its own (`per-core`), as nginx's workers do. A current-thread runtime runs the
//! tasks woken in the order they woke, with no bound on its queue: 1,000 connections woken at
//! once do not overflow into a shared queue that is looked at only every few dozen tasks
//! (docs/benchmarks.md).
//!
//! Per core, one worker accepts on the one listening socket: the first to start. It keeps a
//! connection while it holds no more than any other worker, and otherwise hands it to the one
//! holding the fewest, so 64 connections are served 32 and 32 by two workers, and one client
//! after another is served by the acceptor alone. Were every worker waiting on the socket, the
//! kernel would wake them all for each connection (tokio cannot ask epoll for
//! `EPOLLEXCLUSIVE`): on two cores, in one interleaved run, those wake-ups for nothing cost
//! about 40 µs of CPU per cold miss and 13-39 µs of a hit's time on a new connection
//! (docs/benchmarks.md, sixth sitting).
//! The price: a new connection waits while the acceptor runs its own connections' work (up to
//! 61 task polls between two looks at the listener, tokio's `event_interval`, or one long step
//! such as a TLS handshake or hashing a large manifest), where an idle worker would have taken
//! it; and nothing else accepts, so a server whose acceptor could not start ends with an error,
//! and one whose acceptor panics aborts, for its supervisor to restart it. The kernel's
//! `SO_REUSEPORT` hash, which a listener per worker would leave it to, splits connections
//! unevenly (40 and 24 is common), and the busier worker's clients wait longer; one listener
//! also keeps the port this process's alone.
//!
//! The workers share everything else: the application, the registry of connections (the
//! connection limit and shutdown count every worker's), the stop signal. A task one worker
//! spawned (a download other requests wait on) or an upstream connection it opened may be
//! polled from another worker, so no worker's runtime stops before the server is done: they
//! end together, when [`Workers`] is dropped.

use super::server::{Serving, accept, connection};
use crate::config::Runtime;
use parking_lot::Mutex;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// The bound listener of a server, and how its connections are served.
#[derive(Debug)]
pub enum Listeners {
    /// Served on the runtime that calls `serve`.
    Shared(TcpListener),
    /// Served by `workers` threads of their own, one per core.
    PerCore {
        /// The listener, accepted on by the first worker to start.
        listener: TcpListener,
        /// Worker threads (at least one).
        workers: usize,
    },
}

impl Listeners {
    /// Binds `addr` as `runtime` serves it, with room in the kernel for as many connections
    /// not yet accepted as it allows (`BACKLOG`). Called within a tokio runtime, which the
    /// listener is registered with.
    pub fn bind(addr: SocketAddr, runtime: Runtime) -> io::Result<Listeners> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As tokio's own `bind` does: a restarted server binds at once, past the old one's
        // connections in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(Listeners::served(socket.listen(BACKLOG)?, runtime))
    }

    /// `listener`, served as `runtime` says.
    pub fn served(listener: TcpListener, runtime: Runtime) -> Listeners {
        match runtime {
            Runtime::WorkStealing => Listeners::Shared(listener),
            Runtime::PerCore => Listeners::PerCore {
                listener,
                workers: crate::worker::count(),
            },
        }
    }

    /// The address bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listeners::Shared(listener) | Listeners::PerCore { listener, .. } => {
                listener.local_addr()
            }
        }
    }
}

/// How many connections, their handshakes done, the kernel holds until they are accepted: as
/// many as it allows (`listen(2)` cuts the number to `net.core.somaxconn`, 4,096 by default
/// since Linux 5.4), as Go's servers ask. tokio's and std's `bind` ask for 128 (nginx for 511):
/// 1,000 clients connecting at once overflowed it, and the kernel dropped the handshakes it had
/// no room for, which the clients sent again only after a second, or the first request after
/// 200 ms: the rare 100-220 ms p99 at 1,000 connections (docs/benchmarks.md, tenth sitting).
const BACKLOG: u32 = u32::MAX;

/// A connection on its way to a worker: the socket, not yet on any runtime, and its peer.
type Handed = (std::net::TcpStream, SocketAddr);

/// One worker as the others see it.
#[derive(Debug)]
struct Worker {
    /// Where connections handed to it go.
    incoming: mpsc::UnboundedSender<Handed>,
    /// Connections it serves or has been handed, not yet ended.
    open: Arc<AtomicUsize>,
}

/// Which worker serves a connection worker `me` accepted: `me` while it holds no more than any
/// other, otherwise the one holding the fewest (the first after `me` among equals).
fn choose(workers: &[Worker], me: usize) -> Option<&Worker> {
    let counts = workers.iter().map(|w| w.open.load(Ordering::Relaxed));
    fewest(counts, me).and_then(|i| workers.get(i))
}

/// The index of the smallest of `counts`, the first found searching from `start` (wrapping
/// around); `None` when there are none.
fn fewest(counts: impl ExactSizeIterator<Item = usize>, start: usize) -> Option<usize> {
    let n = counts.len();
    // How far after `start` index `i` comes, wrapping around (`n` is not 0 once any count is).
    let turn = move |i: usize| (i + n - start % n) % n;
    counts
        .enumerate()
        .min_by_key(|&(i, count)| (count, turn(i)))
        .map(|(i, _)| i)
}

/// The per-core worker threads, running until this is dropped.
#[derive(Debug)]
pub struct Workers {
    /// Dropped, lets every worker's thread end, and its runtime with it.
    _release: watch::Sender<bool>,
}

impl Workers {
    /// Starts `workers` threads, the first to run accepting on `listener` until `shutdown`
    /// resolves; returns once it has stopped accepting and every worker has taken the
    /// connections handed to it. An error when none could accept: the process then ends rather
    /// than hold a port that takes no connection.
    pub(super) async fn serve(
        listener: TcpListener,
        workers: usize,
        serving: &Serving,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<Workers> {
        // Taken by the first worker to run: the one that accepts, and says whether it could.
        let (accepting, mut started) = oneshot::channel();
        let acceptor = Arc::new(Mutex::new(Some(Acceptor {
            listener: listener.into_std()?,
            accepting,
        })));
        // `true`: stop accepting; the sender dropped: end.
        let (release, released) = watch::channel(false);
        // Each worker holds a sender until its queue of handed connections is closed and empty.
        let (taken, mut all_taken) = mpsc::channel::<()>(1);
        // Everything a worker needs, made before any starts: a failure here starts none.
        let mut all = Vec::new();
        let mut own = Vec::new();
        for _ in 0..workers.max(1) {
            let (incoming, queue) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            own.push((runtime, Arc::clone(&acceptor), queue));
            all.push(Worker {
                incoming,
                open: Arc::new(AtomicUsize::new(0)),
            });
        }
        let all = Arc::new(all);
        for (me, (runtime, acceptor, queue)) in own.into_iter().enumerate() {
            let (serving, released, taken, all) = (
                serving.clone(),
                released.clone(),
                taken.clone(),
                all.clone(),
            );
            // A connection handed to a worker that could not start is served by the worker
            // that accepted it (`work`).
            let spawned = std::thread::Builder::new()
                .name(format!("per-core-{me}"))
                .spawn(move || {
                    crate::worker::enter(me);
                    runtime.block_on(work(me, acceptor, all, queue, serving, released, taken));
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, worker = me, "a per-core worker thread could not start");
            }
        }
        drop((taken, all, acceptor));
        // The acceptor answers, or every worker is gone without taking the listener.
        tokio::pin!(shutdown);
        tokio::select! {
            answer = &mut started => {
                match answer {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(io::Error::other(
                        "no per-core worker thread started to accept connections",
                    )),
                }
                shutdown.await;
            }
            () = &mut shutdown => {}
        }
        let _ = release.send(true);
        // A worker stuck in a handler would hold this forever; the drain's grace bounds it.
        let all_stopped = async { while all_taken.recv().await.is_some() {} };
        if tokio::time::timeout(serving.grace(), all_stopped)
            .await
            .is_err()
        {
            tracing::warn!(
                "the per-core workers did not stop accepting and take their connections within the grace period"
            );
        }
        Ok(Workers { _release: release })
    }
}

/// One worker's life, on its own runtime: if it is the first to start (it takes the `acceptor`),
/// accepts on it until `released` turns true, serving each connection itself or handing it to the
/// worker holding the fewest; serves those handed to it until the acceptor has stopped
/// accepting; says so by dropping `taken`, then runs what is in progress until the sender of
/// `released` is dropped.
async fn work(
    me: usize,
    acceptor: Arc<Mutex<Option<Acceptor>>>,
    all: Arc<Vec<Worker>>,
    mut queue: mpsc::UnboundedReceiver<Handed>,
    serving: Serving,
    mut released: watch::Receiver<bool>,
    taken: mpsc::Sender<()>,
) {
    let Some(open) = all.get(me).map(|w| w.open.clone()) else {
        return;
    };
    // A worker whose thread could not start never takes it: the next one does.
    let mine = acceptor.lock().take();
    let accepting = async {
        let Some(Acceptor {
            listener,
            accepting,
        }) = mine
        else {
            return drop(all);
        };
        match TcpListener::from_std(listener) {
            Ok(listener) => {
                let _ = accepting.send(Ok(()));
                let _alone = Alone;
                let mut stop = released.clone();
                let stop = async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                };
                accept(listener, &serving, stop, |stream, peer| {
                    let Some(worker) = choose(&all, me) else {
                        return;
                    };
                    if Arc::ptr_eq(&worker.open, &open) {
                        serve(stream, peer, Held::new(&open), &serving);
                        return;
                    }
                    // Off this runtime, to be put on the other's.
                    let stream = match stream.into_std() {
                        Ok(stream) => stream,
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, "could not hand a connection over");
                            return;
                        }
                    };
                    worker.open.fetch_add(1, Ordering::Relaxed);
                    if let Err(mpsc::error::SendError((stream, peer))) =
                        worker.incoming.send((stream, peer))
                    {
                        // That worker is gone: serve it here.
                        worker.open.fetch_sub(1, Ordering::Relaxed);
                        take(stream, peer, Held::new(&open), &serving);
                    }
                })
                .await;
            }
            Err(e) => {
                tracing::error!(error = %e, "a per-core worker cannot accept on the listener");
                let _ = accepting.send(Err(e));
            }
        }
        // Its senders gone from every worker, each queue closes once empty.
        drop(all);
    };
    let receiving = async {
        while let Some((stream, peer)) = queue.recv().await {
            // Counted when it was handed over.
            take(stream, peer, Held(open.clone()), &serving);
        }
    };
    tokio::join!(accepting, receiving);
    drop(taken);
    while released.changed().await.is_ok() {}
}

/// The listener, and where the worker that takes it says whether it can accept on it.
struct Acceptor {
    listener: std::net::TcpListener,
    accepting: oneshot::Sender<io::Result<()>>,
}

/// Held while the one accepting worker accepts: if that worker panics, nothing would take
/// connections again, so the process ends (a supervisor restarts it) rather than keep a port
/// that answers nobody.
struct Alone;

impl Drop for Alone {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the per-core worker accepting connections panicked; exiting");
            std::process::abort();
        }
    }
}

/// Serves a connection handed over from another runtime on this worker's.
fn take(stream: std::net::TcpStream, peer: SocketAddr, held: Held, serving: &Serving) {
    match TcpStream::from_std(stream) {
        Ok(stream) => serve(stream, peer, held, serving),
        Err(e) => tracing::warn!(error = %e, %peer, "a worker could not take a connection"),
    }
}

/// Serves a connection on this worker's runtime; `held` counts it until it ends.
fn serve(stream: TcpStream, peer: SocketAddr, held: Held, serving: &Serving) {
    let serving = serving.clone();
    tokio::spawn(async move {
        connection(stream, peer, serving).await;
        drop(held);
    });
}

/// One of a worker's open connections: counted until dropped.
struct Held(Arc<AtomicUsize>);

impl Held {
    /// Counts one more in `open`.
    fn new(open: &Arc<AtomicUsize>) -> Held {
        open.fetch_add(1, Ordering::Relaxed);
        Held(open.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::{Listeners, fewest};
    use crate::config::Runtime;
    use std::time::Duration;

    /// A burst of clients larger than std's and tokio's backlog of 128 all complete their
    /// handshakes while nothing accepts: none waits for a SYN sent again a second later.
    /// Limited by the machine's `net.core.somaxconn`, read here.
    #[test]
    fn a_burst_of_connections_waits_in_the_kernel_until_accepted() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _inside = runtime.enter();
        let listeners = Listeners::bind(([127, 0, 0, 1], 0).into(), Runtime::WorkStealing).unwrap();
        let addr = listeners.local_addr().unwrap();
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(4096);
        // Well within the 1,024 descriptors a test process may be given, beside the other
        // tests running in it; the queue holds one more than the backlog.
        let burst = somaxconn.min(300);
        if burst <= 129 {
            eprintln!("skipped: net.core.somaxconn {somaxconn} is too small to tell");
            return;
        }
        let mut held = Vec::with_capacity(burst);
        for i in 0..burst {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(stream) => held.push(stream),
                Err(e) => panic!("connection {i} of {burst} not taken by the kernel: {e}"),
            }
        }
        drop(listeners);
    }

    #[test]
    fn the_fewest_wins_and_ties_go_to_the_first_from_the_start() {
        assert_eq!(fewest([3, 1, 2].into_iter(), 0), Some(1));
        assert_eq!(fewest([3, 1, 1].into_iter(), 0), Some(1));
        assert_eq!(fewest([3, 1, 1].into_iter(), 2), Some(2));
        assert_eq!(fewest([0, 0].into_iter(), 1), Some(1));
        assert_eq!(fewest([0, 0].into_iter(), 2), Some(0));
        assert_eq!(fewest([5].into_iter(), 7), Some(0));
        assert_eq!(fewest([].into_iter(), 0), None);
    }
}
