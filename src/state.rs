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

/// Shared state of a running pullthrough.
#[derive(Debug)]
pub struct AppState {
    /// Cache-or-fetch for everything served; holds the upstream client.
    pub proxy: Arc<Proxy>,
    /// `ns` values accepted (empty: all).
    namespaces: Vec<String>,
    /// How long request parsing may wait to learn whether the upstream is Docker Hub.
    probe_deadline: std::time::Duration,
    /// `upstream_deadline`: the longest any request waits for its response headers.
    pub deadline: std::time::Duration,
}

impl AppState {
    /// Opens the data directory and builds every component.
    pub fn new(config: &Config) -> anyhow::Result<AppState> {
        let layout = Layout::open(&config.data_dir).with_context(|| {
            format!(
                "invalid value for key \"data_dir\": cannot use {}",
                config.data_dir.display()
            )
        })?;
        let upstream = Arc::new(Upstream::new(config)?);
        let manifests = Arc::new(ManifestCache::open(
            layout.clone(),
            config.manifest_cache_bytes.as_u64(),
        )?);
        let limits = DiskLimits {
            max: config.cache_max_disk.as_u64(),
            high: config.cache_high_watermark,
            low: config.cache_low_watermark,
        };
        let blobs = BlobStore::open(layout.clone(), limits)?;
        blobs.spawn_maintenance();
        spawn_summary(Arc::downgrade(&upstream));
        let proxy = Arc::new(Proxy::new(config, Arc::clone(&upstream), manifests, blobs)?);
        Ok(AppState {
            proxy,
            namespaces: config.namespaces.clone(),
            probe_deadline: (config.upstream_deadline / 2).min(std::time::Duration::from_secs(2)),
            deadline: config.upstream_deadline,
        })
    }

    /// Whether one-component names mean `library/<name>`. Learned
    /// from the upstream's host or first challenge; "no" if upstream cannot be asked in time.
    pub async fn docker_hub(&self) -> bool {
        tokio::time::timeout(self.probe_deadline, self.proxy.upstream.is_docker_hub())
            .await
            .unwrap_or(false)
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
