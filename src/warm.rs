//! `pullthrough warm`: asks a running pullthrough to fetch images before they are needed (a CI
//! runner about to go offline, or ahead of a rate-limit window). For each image it pulls what a
//! client would, through pullthrough: the manifest, every platform manifest of an index (or
//! those of `--platform`), and every blob; then it reports what came from the cache and what
//! had to be fetched upstream. The blobs are read and dropped; pullthrough keeps them.

use crate::metrics::Outcome;
use crate::registry::{Contents, Descriptor, Digest, platform_matches};
use futures_util::StreamExt;
use std::time::Duration;

/// The `Accept` a modern client sends.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// What to warm and where.
#[derive(Debug, Clone)]
pub struct Request {
    /// The running pullthrough, e.g. `http://127.0.0.1:5000`.
    pub url: String,
    /// Images: `alpine`, `library/alpine:3.20`, `docker.io/org/app@sha256:...`.
    pub images: Vec<String>,
    /// Only this platform (`linux/arm64`) of multi-platform images; all when `None`.
    pub platform: Option<String>,
    /// For the upstream cost reported from `/_pullthrough/stats`, when it is guarded.
    pub admin_token: Option<String>,
    /// The default upstream's host (`upstream`'s): a name under it means the default upstream.
    pub default_host: Option<String>,
}

/// Progress events, for a progress bar or plain lines.
pub trait Report {
    /// A new image starts.
    fn image(&self, image: &str);
    /// One manifest or blob was fetched: its size, and whether it came from the cache.
    fn item(&self, what: &str, bytes: u64, cached: bool);
    /// The image failed.
    fn failed(&self, image: &str, error: &str);
}

/// What a warm-up did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Images warmed.
    pub images: usize,
    /// Images that failed.
    pub failed: usize,
    /// Manifests served from the cache.
    pub manifests_cached: usize,
    /// Manifests pullthrough fetched upstream.
    pub manifests_fetched: usize,
    /// Blobs served from the cache.
    pub blobs_cached: usize,
    /// Blobs pullthrough fetched upstream.
    pub blobs_fetched: usize,
    /// Bytes of the blobs fetched upstream.
    pub bytes_fetched: u64,
    /// Manifest GETs pullthrough sent upstream meanwhile (Docker Hub pulls), when the stats
    /// endpoint could be read.
    pub upstream_manifest_gets: Option<u64>,
}

impl Summary {
    /// One line.
    pub fn line(&self) -> String {
        let upstream = self.upstream_manifest_gets.map_or(String::new(), |n| {
            format!("; upstream manifest GETs (Docker Hub pulls): {n}")
        });
        format!(
            "warmed {} image(s), {} failed: manifests {} fetched upstream, {} cached; blobs {} fetched upstream ({:.1} MiB), {} cached{upstream}",
            self.images,
            self.failed,
            self.manifests_fetched,
            self.manifests_cached,
            self.blobs_fetched,
            self.bytes_fetched as f64 / (1024.0 * 1024.0),
            self.blobs_cached,
        )
    }
}

/// Splits `[registry/]name[:tag|@digest]` into a name pullthrough serves and a reference.
fn split(image: &str, default_host: Option<&str>) -> (String, String) {
    let (rest, reference) = match image.split_once('@') {
        Some((rest, digest)) => (rest, digest.to_owned()),
        None => match image.rsplit_once(':') {
            Some((rest, tag)) if !tag.contains('/') => (rest, tag.to_owned()),
            _ => (image, "latest".to_owned()),
        },
    };
    // A first component with a dot or a port, or `localhost`, names a registry. Docker Hub's
    // names and this machine mean the default upstream: dropped. Any other stays as the
    // `/v2/<host>/` prefix that picks that `[[upstreams]]` entry (404 if none is configured),
    // so `ghcr.io/org/app` is never warmed from Docker Hub.
    let name = match rest.split_once('/') {
        Some((first, name))
            if first == "localhost"
                || first.starts_with("localhost:")
                || Some(first) == default_host
                || crate::config::DOCKER_HUB_NAMES.contains(&first) =>
        {
            name
        }
        _ => rest,
    };
    (name.to_owned(), reference)
}

struct Fetched {
    bytes: bytes::Bytes,
    cached: bool,
}

async fn get_manifest(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    reference: &str,
) -> Result<Fetched, String> {
    let response = client
        .get(format!("{url}/v2/{name}/manifests/{reference}"))
        .header(reqwest::header::ACCEPT, ACCEPT)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let cached = is_cached(&response);
    let bytes = response.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!(
            "manifest {name}:{reference}: HTTP {}: {}",
            status.as_u16(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).trim()
        ));
    }
    Ok(Fetched { bytes, cached })
}

fn is_cached(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .and_then(Outcome::parse)
        .is_some_and(Outcome::from_cache)
}

/// Reads a blob to the end; returns its size and whether it came from the cache.
async fn get_blob(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    digest: &Digest,
) -> Result<(u64, bool), String> {
    let response = client
        .get(format!("{url}/v2/{name}/blobs/{digest}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!(
            "blob {digest}: HTTP {}",
            response.status().as_u16()
        ));
    }
    let cached = is_cached(&response);
    let mut stream = response.bytes_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        size += chunk.map_err(|e| format!("blob {digest}: {e}"))?.len() as u64;
    }
    Ok((size, cached))
}

async fn upstream_manifest_gets(client: &reqwest::Client, request: &Request) -> Option<u64> {
    let mut get = client.get(format!("{}/_pullthrough/stats", request.url));
    if let Some(token) = &request.admin_token {
        get = get.bearer_auth(token);
    }
    let body = get.send().await.ok()?.bytes().await.ok()?;
    let stats: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let gets = &stats["counters"]["upstream_requests"]["manifest_get"];
    // No key yet: no manifest GET so far.
    Some(gets.as_object().map_or(0, |by_status| {
        by_status
            .values()
            .filter_map(serde_json::Value::as_u64)
            .sum()
    }))
}

/// Warms every image of `request`, reporting progress.
pub async fn warm(request: &Request, report: &dyn Report) -> Summary {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let mut summary = Summary::default();
    let before = upstream_manifest_gets(&client, request).await;
    for image in &request.images {
        report.image(image);
        match warm_one(&client, request, image, report, &mut summary).await {
            Ok(()) => summary.images += 1,
            Err(e) => {
                summary.failed += 1;
                report.failed(image, &e);
            }
        }
    }
    let after = upstream_manifest_gets(&client, request).await;
    summary.upstream_manifest_gets = before.zip(after).map(|(b, a)| a.saturating_sub(b));
    summary
}

async fn warm_one(
    client: &reqwest::Client,
    request: &Request,
    image: &str,
    report: &dyn Report,
    summary: &mut Summary,
) -> Result<(), String> {
    let (name, reference) = split(image, request.default_host.as_deref());
    let url = request.url.trim_end_matches('/');
    let mut pending = vec![reference];
    let mut blobs: Vec<Descriptor> = Vec::new();
    while let Some(reference) = pending.pop() {
        let manifest = get_manifest(client, url, &name, &reference).await?;
        report.item(
            &format!("manifest {reference}"),
            manifest.bytes.len() as u64,
            manifest.cached,
        );
        if manifest.cached {
            summary.manifests_cached += 1;
        } else {
            summary.manifests_fetched += 1;
        }
        match Contents::parse(&manifest.bytes) {
            Some(Contents::Index(children)) => {
                for child in children {
                    let wanted = match (&request.platform, &child.platform) {
                        (None, _) => true,
                        (Some(want), Some(have)) => platform_matches(have, want),
                        (Some(_), None) => false,
                    };
                    if wanted {
                        pending.push(child.digest.to_string());
                    }
                }
            }
            Some(Contents::Image(descriptors)) => {
                for d in descriptors {
                    if !blobs.iter().any(|b| b.digest == d.digest) {
                        blobs.push(d);
                    }
                }
            }
            None => {
                return Err(format!(
                    "manifest {reference} is neither an index nor an image"
                ));
            }
        }
    }
    // A few blobs at a time, as clients pull layers.
    let mut fetches = futures_util::stream::iter(blobs)
        .map(|blob| {
            let name = name.clone();
            async move { (get_blob(client, url, &name, &blob.digest).await, blob) }
        })
        .buffer_unordered(4);
    while let Some((fetched, blob)) = fetches.next().await {
        let (size, cached) = fetched?;
        report.item(&format!("blob {}", blob.digest), size, cached);
        if cached {
            summary.blobs_cached += 1;
        } else {
            summary.blobs_fetched += 1;
            summary.bytes_fetched += size;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_references() {
        let d = format!("sha256:{}", "a".repeat(64));
        let cases = [
            ("alpine", "alpine", "latest"),
            ("alpine:3.20", "alpine", "3.20"),
            ("docker.io/library/alpine:3", "library/alpine", "3"),
            ("localhost:5000/team/app:v1", "team/app", "v1"),
            ("localhost/team/app", "team/app", "latest"),
            ("org/app", "org/app", "latest"),
        ];
        for (image, name, reference) in cases {
            assert_eq!(
                split(image, None),
                (name.to_owned(), reference.to_owned()),
                "{image}"
            );
        }
        assert_eq!(
            split(&format!("ghcr.io/o/a@{d}"), None),
            ("ghcr.io/o/a".to_owned(), d.clone())
        );
        // The default upstream's own host means the default upstream.
        assert_eq!(
            split("registry.corp:5000/team/app:1", Some("registry.corp:5000")),
            ("team/app".to_owned(), "1".to_owned())
        );
    }
}
