//! The other replicas, reached by internal requests authenticated with the cluster secret:
//! a replica that finds another holding a blob's lock streams the blob from it.

use super::Cluster;
use crate::config::{Config, Secret};
use crate::registry::Digest;
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;

/// Tells a replica that streams a blob from another whether it was fetched with credentials.
pub const PRIVATE_HEADER: &str = "x-pullthrough-private";

/// The other replicas: Redis, the secret of internal requests, and a client for them.
#[derive(Debug)]
pub struct Peers {
    /// Locks, shared limits and purges.
    pub cluster: Arc<Cluster>,
    /// What internal requests authenticate with (`cluster_secret`).
    pub secret: Secret,
    client: reqwest::Client,
}

impl Peers {
    /// This replica's peers, as `config` describes them (`redis_url` set). Replicas serving TLS
    /// trust the certificates they serve with (the same on every replica, or signed by a CA in
    /// the same file), besides the system's.
    pub fn new(config: &Config, cluster: Arc<Cluster>) -> anyhow::Result<Peers> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .read_timeout(Duration::from_secs(30))
            .no_proxy();
        if let Some(cert) = &config.tls_cert {
            let pem = std::fs::read(cert).with_context(|| {
                format!("invalid value for key \"tls_cert\": {}", cert.display())
            })?;
            for root in reqwest::Certificate::from_pem_bundle(&pem)? {
                builder = builder.add_root_certificate(root);
            }
        }
        Ok(Peers {
            cluster,
            secret: config.cluster_secret.clone().unwrap_or_default(),
            client: builder.build()?,
        })
    }

    /// The blob from the replica `owner`, which downloads or holds it, from byte `from` (the
    /// whole blob when `None`): its successful answer, and whether the blob was fetched with
    /// credentials (unsaid counts as yes).
    pub async fn blob(
        &self,
        owner: &str,
        digest: &Digest,
        from: Option<u64>,
    ) -> Result<(reqwest::Response, bool), String> {
        let url = format!(
            "{}/_pullthrough/cluster/blobs/{digest}",
            owner.trim_end_matches('/')
        );
        let mut request = self.client.get(url).bearer_auth(&self.secret.0);
        if let Some(from) = from {
            request = request.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        let private = response
            .headers()
            .get(PRIVATE_HEADER)
            .is_none_or(|v| v.as_bytes() != b"0");
        Ok((response, private))
    }
}
