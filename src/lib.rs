//! Pull-through caching proxy for container registries.
//!
//! Layers, each importing only those below it (docs/architecture.md says more):
//!
//! ```text
//! main.rs, lib.rs   wiring: settings, logging, listener, signals
//! state/, warm      AppState built once from Config (routing, authorization); `warm`
//! http/             the edge: router, server, TLS, status page, cache API, error envelope
//! access            client access control
//! proxy/            cache-or-fetch: the only module that knows stores, upstream and cluster
//! cluster/          replicas: Redis locks, shared limits, purges, the bucket, peers
//! upstream/         the registry client: tokens, challenges, realm checks, rate limits
//! manifests/ blobs/ the stores: memory and the data directory
//! registry/ clock error logging metrics/ config/ disk objects resting flight   the foundation
//! ```
//! Nothing below `http` imports axum; `error`, `clock` and `logging` import nothing of the crate.

pub mod access;
pub mod blobs;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod disk;
pub mod error;
pub mod flight;
pub mod http;
pub mod logging;
pub mod manifests;
pub mod metrics;
pub mod objects;
pub mod proxy;
pub mod registry;
pub mod resting;
pub mod state;
pub mod upstream;
pub mod warm;
pub mod worker;

use std::sync::Arc;
use tokio::net::TcpListener;

pub use config::Config;

/// Serves on `listener` as `config.runtime` says until `shutdown` resolves, then lets in-flight
/// responses finish for up to `shutdown_grace`. Tests pass a port-0 listener and their own
/// trigger.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = http::listeners::Listeners::served(listener, config.runtime);
    serve(app(&config)?, listener, &config, shutdown).await
}

/// How long shutdown waits for cache writes still under way.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves a built application (see [`app`]) on `listeners` with the connection limits (and the
/// TLS certificate, if any) of `config` until `shutdown` resolves, then waits (briefly) for
/// cache writes still under way.
pub async fn serve(
    app: App,
    listeners: http::listeners::Listeners,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    check_upstreams(&app.state);
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(http::tls::acceptor(cert, key)?.0),
        _ => None,
    };
    // Per-core workers keep running until the cache writes they may hold are done.
    let _workers = http::server::serve(
        app.front(),
        listeners,
        http::server::Limits::from_config(config),
        tls,
        shutdown,
    )
    .await?;
    if tokio::time::timeout(FLUSH_TIMEOUT, app.state.flushed())
        .await
        .is_err()
    {
        tracing::warn!("cache writes still under way at exit; they are fetched again when missed");
    }
    Ok(())
}

/// Asks every upstream's `/v2/` once, at startup, and logs whether it answered, so a first run
/// says at once whether its upstream is reachable. Nothing waits for it: readiness does not
/// depend on upstream. It is the one ping each upstream costs anyway (learning how it
/// authenticates), done early; one that failed is asked again at the next miss. Offline, none.
fn check_upstreams(state: &state::AppState) {
    // Offline, nothing is asked: the ping waits for the first miss after going online.
    if state.offline.is_on() {
        tracing::warn!(
            "offline: no upstream is asked; cached content is served, the rest answers 503 (PUT /_pullthrough/offline switches back)"
        );
        return;
    }
    for proxy in state.proxies() {
        let proxy = Arc::clone(proxy);
        tokio::spawn(async move {
            match proxy.upstream.check().await {
                Ok(()) => tracing::info!(host = %proxy.name(), "upstream answered"),
                Err(e) => tracing::warn!(
                    host = %proxy.name(),
                    url = %proxy.upstream.base(),
                    error = %error::Chain(&e),
                    "upstream did not answer; cached content is still served"
                ),
            }
        });
    }
}

/// The complete router and the state it serves.
#[derive(Debug, Clone)]
pub struct App {
    /// Every route, for `oneshot` (a request to a route that reads the client's address needs
    /// an `axum::extract::ConnectInfo` extension); [`serve`] answers with [`App::front`].
    pub router: axum::Router,
    state: Arc<state::AppState>,
    /// The data directory's lock, held while the application serves.
    _lock: Arc<disk::DirLock>,
}

impl App {
    /// What the server answers requests with: the router, with registry requests taken
    /// straight to their handler ([`http::Front`]).
    pub fn front(&self) -> http::Front {
        http::Front::new(self.router.clone(), Arc::clone(&self.state))
    }
}

/// Builds the application from `config`.
pub fn app(config: &Config) -> anyhow::Result<App> {
    // Taken before anything in the directory is touched: a second instance would delete the
    // first one's temp files.
    let lock = disk::Layout::lock(&config.data_dir)
        .map_err(|e| anyhow::anyhow!("invalid value for key \"data_dir\": {e}"))?;
    let state = Arc::new(state::AppState::new(config)?);
    Ok(App {
        router: http::router(Arc::clone(&state)),
        state,
        _lock: Arc::new(lock),
    })
}
