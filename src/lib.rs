//! Pull-through caching proxy for container registries.
//!
//! ```text
//! http ──► proxy ──► manifests / blobs   (local cache: memory + data dir)
//!              └───► upstream ──► auth   (remote registry, tokens, rate limits)
//! ```
//! `registry` holds the spec vocabulary shared by all of them; `config` and `error` are
//! leaves. Nothing below `http` imports axum.

pub mod blobs;
pub mod config;
pub mod disk;
pub mod error;
pub mod flight;
pub mod http;
pub mod manifests;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod state;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub use config::Config;

/// How long in-flight responses (a blob stream can take minutes) may finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves until `shutdown` resolves, then lets in-flight responses finish for up to 30 s.
/// Tests pass a port-0 listener and their own trigger.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve(app(&config)?, listener, shutdown).await
}

/// Serves a built router (see [`app`]) until `shutdown` resolves, with the same grace period.
pub async fn serve(
    app: axum::Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stopping.send(());
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    let grace = async move {
        if stopped.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = server => served?,
        () = grace => tracing::warn!("shutdown grace period over; dropping open connections"),
    }
    Ok(())
}

/// The complete router with its state, ready for `serve` or `oneshot`.
pub fn app(config: &Config) -> anyhow::Result<axum::Router> {
    let state = state::AppState::new(config)?;
    Ok(http::router(Arc::new(state)))
}
