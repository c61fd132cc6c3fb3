//! `AppState`: every shared handle, built once from `Config` at startup.

use crate::blobs::{BlobStore, DiskLimits};
use crate::config::Config;
use crate::disk::Layout;
use crate::error::Error;
use crate::manifests::ManifestCache;
use crate::proxy::Proxy;
use crate::upstream::Upstream;
use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// The file under the data directory that remembers what the upstream is.
const UPSTREAM_STATE: &str = "upstream.json";

/// What the upstream was found to be, remembered across restarts.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct UpstreamState {
    /// The upstream URL it was learned for.
    upstream: url::Url,
    /// Whether one-component names mean `library/<name>` there.
    docker_hub: bool,
}

/// Shared state of a running pullthrough.
#[derive(Debug)]
pub struct AppState {
    /// Cache-or-fetch for everything served; holds the upstream client.
    pub proxy: Arc<Proxy>,
    /// `ns` values accepted (empty: all).
    namespaces: Vec<String>,
    /// Whether the upstream is Docker Hub: 0 not known yet, 1 no, 2 yes.
    docker_hub: AtomicU8,
    layout: Layout,
    upstream_url: url::Url,
    /// `upstream_deadline`: the longest any request waits for its response headers.
    pub deadline: std::time::Duration,
}

impl AppState {
    /// Opens the data directory and builds every component.
    pub fn new(config: &Config) -> anyhow::Result<AppState> {
        let layout =
            Layout::open(&config.data_dir).context("invalid value for key \"data_dir\"")?;
        let upstream = Arc::new(Upstream::new(config)?);
        let manifests = Arc::new(ManifestCache::open(
            layout.clone(),
            config.manifest_cache_bytes.as_u64(),
        )?);
        let limits = DiskLimits {
            max: config.cache_max_disk.as_u64(),
            high: config.cache_high_watermark,
            low: config.cache_low_watermark,
            min_free: config.cache_min_free_disk.as_u64(),
            scrub_rate: config.scrub_rate.as_u64(),
            scrub_interval: config.scrub_interval,
            verify_on_serve: config.verify_on_serve,
        };
        let blobs = BlobStore::open(layout.clone(), limits)?;
        blobs.warn_if_short_of_space();
        blobs.spawn_maintenance();
        spawn_summary(Arc::downgrade(&upstream));
        let proxy = Arc::new(Proxy::new(config, Arc::clone(&upstream), manifests, blobs)?);
        let known = layout
            .read_state(UPSTREAM_STATE)
            .and_then(|raw| serde_json::from_slice::<UpstreamState>(&raw).ok())
            .filter(|s| s.upstream == config.upstream)
            .map_or(0, |s| if s.docker_hub { 2 } else { 1 });
        Ok(AppState {
            proxy,
            namespaces: config.namespaces.clone(),
            docker_hub: AtomicU8::new(known),
            layout,
            upstream_url: config.upstream.clone(),
            deadline: config.upstream_deadline,
        })
    }

    /// Whether one-component names mean `library/<name>`: known from the upstream's host name,
    /// else learned from its first challenge and remembered in the data directory. Never a
    /// guess: while it cannot be learned, the request fails (and the caller's deadline bounds
    /// the wait), so a name never depends on how fast the upstream answered.
    pub async fn docker_hub(&self) -> Result<bool, Error> {
        match self.docker_hub.load(Ordering::Relaxed) {
            1 => return Ok(false),
            2 => return Ok(true),
            _ => {}
        }
        let docker_hub = self.proxy.upstream.is_docker_hub().await?;
        if self
            .docker_hub
            .swap(1 + u8::from(docker_hub), Ordering::Relaxed)
            == 0
        {
            let state = UpstreamState {
                upstream: self.upstream_url.clone(),
                docker_hub,
            };
            let (layout, path) = (self.layout.clone(), self.layout.root().join(UPSTREAM_STATE));
            tokio::task::spawn_blocking(move || {
                let written = serde_json::to_vec(&state)
                    .map_err(std::io::Error::other)
                    .and_then(|json| layout.write_atomic(&path, &[&json], false));
                if let Err(e) = written {
                    tracing::warn!(error = %e, "could not remember what the upstream is");
                }
            });
        }
        Ok(docker_hub)
    }

    /// containerd names the registry it wants in `?ns=`. With `namespaces` configured, a
    /// request meant for another registry gets 404, so containerd falls back to its next host
    /// instead of receiving our upstream's content under a foreign name.
    pub fn check_namespace(&self, query: Option<&str>) -> Result<(), Error> {
        let Some(query) = query else { return Ok(()) };
        if self.namespaces.is_empty() {
            return Ok(());
        }
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if key == "ns"
                && !self
                    .namespaces
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(&value))
            {
                return Err(Error::NameUnknown);
            }
        }
        Ok(())
    }
}

/// Logs the upstream counters and rate-limit state once a minute, at debug level.
fn spawn_summary(upstream: std::sync::Weak<Upstream>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(upstream) = upstream.upgrade() else {
                return;
            };
            let counters: Vec<String> = upstream
                .counters
                .snapshot()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let limit = upstream.limits.snapshot();
            tracing::debug!(counters = %counters.join(" "), ratelimit_limit = limit.limit, ratelimit_remaining = limit.remaining, ratelimit_source = limit.source.as_deref(), "upstream summary");
        }
    });
}
