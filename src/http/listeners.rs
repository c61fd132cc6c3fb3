//! Where client connections are accepted, by the `runtime` setting: one listener whose
//! connections tokio's multi-thread runtime serves (`work-stealing`), or one `SO_REUSEPORT`
//! listener per core, each with a thread and a current-thread runtime of its own serving the
//! connections it accepts (`per-core`), as nginx's workers do. The kernel spreads new
//! connections over the listeners. A current-thread runtime runs the tasks woken in the order
//! they woke, with no bound on its queue: 1,000 connections woken at once do not overflow into
//! a shared queue that is looked at only every few dozen tasks (docs/benchmarks.md).
//!
//! The workers share everything else: the application, the registry of connections (the
//! connection limit and shutdown count every worker's), the stop signal. A task one worker
//! spawned (a download other requests wait on) or an upstream connection it opened may be
//! polled from another worker, so no worker's runtime stops before the server is done: they
//! end together, when [`Workers`] is dropped.

use super::server::{Serving, accept};
use crate::config::Runtime;
use std::io;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};

/// Connections the kernel queues, per listener, before one is accepted (as tokio's `bind`).
const BACKLOG: u32 = 1024;

/// The bound listeners of a server.
#[derive(Debug)]
pub enum Listeners {
    /// One listener, served on the runtime that calls `serve`.
    Shared(TcpListener),
    /// One listener per core, all on one port, each served by a thread of its own.
    PerCore(Vec<std::net::TcpListener>),
}

impl From<TcpListener> for Listeners {
    fn from(listener: TcpListener) -> Listeners {
        Listeners::Shared(listener)
    }
}

impl Listeners {
    /// Binds `addr` as `runtime` serves it. Per core, the first listener takes the port (any
    /// free one when `addr`'s is 0) and the others join it there.
    pub async fn bind(addr: SocketAddr, runtime: Runtime) -> io::Result<Listeners> {
        match runtime {
            Runtime::WorkStealing => TcpListener::bind(addr).await.map(Listeners::Shared),
            Runtime::PerCore => {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                let first = reuse_port(addr)?;
                let addr = first.local_addr()?;
                let mut listeners = vec![first];
                for _ in 1..cores {
                    listeners.push(reuse_port(addr)?);
                }
                Ok(Listeners::PerCore(listeners))
            }
        }
    }

    /// The address bound (all per-core listeners have the same).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listeners::Shared(listener) => listener.local_addr(),
            Listeners::PerCore(listeners) => listeners
                .first()
                .ok_or_else(|| io::Error::other("no listener"))?
                .local_addr(),
        }
    }
}

/// A listener on `addr` that other `SO_REUSEPORT` sockets of this user may share, taken off
/// the current runtime to be given to a worker's.
fn reuse_port(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As std and tokio bind: a restart may reuse the port of connections still in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}

/// The per-core worker threads, running until this is dropped.
#[derive(Debug)]
pub struct Workers {
    /// Dropped, lets every worker's thread end, and its runtime with it.
    _release: watch::Sender<bool>,
}

impl Workers {
    /// Starts a worker thread per listener, accepting and serving until `shutdown` resolves;
    /// returns once every listener is closed.
    pub(super) async fn serve(
        listeners: Vec<std::net::TcpListener>,
        serving: &Serving,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<Workers> {
        // `true`: stop accepting; the sender dropped: end.
        let (stop, stopped) = watch::channel(false);
        // Each worker holds a sender until its listener is closed.
        let (closing, mut closed) = mpsc::channel::<()>(1);
        for (i, listener) in listeners.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (serving, stopped, closing) = (serving.clone(), stopped.clone(), closing.clone());
            std::thread::Builder::new()
                .name(format!("per-core-{i}"))
                .spawn(move || runtime.block_on(work(listener, serving, stopped, closing)))?;
        }
        drop(closing);
        shutdown.await;
        let _ = stop.send(true);
        while closed.recv().await.is_some() {}
        Ok(Workers { _release: stop })
    }
}

/// One worker's life, on its own runtime: accepts on `listener` until `stopped` turns true,
/// says so by dropping `closing`, then runs what is in progress until the sender of `stopped`
/// is dropped.
async fn work(
    listener: std::net::TcpListener,
    serving: Serving,
    mut stopped: watch::Receiver<bool>,
    closing: mpsc::Sender<()>,
) {
    match TcpListener::from_std(listener) {
        Ok(listener) => {
            let mut stop = stopped.clone();
            let stop = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            accept(listener, &serving, stop).await;
        }
        Err(e) => tracing::error!(error = %e, "a per-core listener failed"),
    }
    drop(closing);
    while stopped.changed().await.is_ok() {}
}
