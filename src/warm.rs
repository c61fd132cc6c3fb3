//! `pullthrough warm`: asks a running pullthrough to fetch images before they are needed (a CI
//! runner about to go offline, or ahead of a rate-limit window). For each image it pulls what a
//! client would, through pullthrough: the manifest, every platform manifest of an index (or
//! those of `--platform`), and every blob; then it reports what came from the cache and what
//! had to be fetched upstream. The blobs are read and dropped; pullthrough keeps them.
//!
//! The URL may name any server (or a man in the middle of plain http), so everything read is
//! bounded and checked as a registry client would: manifests by size and digest, blobs by
//! their descriptor's size and digest, indexes by nesting depth, an image by the number of
//! manifests and blobs it names, and text from the server is made printable before it is
//! shown.

use crate::config::Secret;
use crate::metrics::Outcome;
use crate::registry::{Contents, Descriptor, Digest, Verifier, platform_matches};
use crate::upstream::MAX_MANIFEST_BYTES;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The `Accept` a modern client sends.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Most of an error body read: enough for a registry's error message.
const MAX_ERROR_BODY: usize = 4 * 1024;
/// Most of the stats answer read (a few KiB per configured upstream).
const MAX_STATS_BODY: usize = 1024 * 1024;
/// Most descriptors one manifest may list: real images have a few dozen layers and indexes a
/// few dozen platforms.
const MAX_DESCRIPTORS: usize = 10_000;
/// Most manifests and blobs one image may name in all, so a fan-out of indexes cannot grow
/// memory without end.
const MAX_ITEMS: usize = 100_000;
/// Deepest nesting of indexes (an index of indexes of ...).
const MAX_INDEX_DEPTH: usize = 4;
/// Most characters of server text shown in one message.
const MAX_SHOWN: usize = 300;
/// A manifest or the stats must arrive within this (an endless trickle would never end).
const SMALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest pause between two reads of a body (blobs may take long, but never stall this long).
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// What to warm and where.
#[derive(Debug, Clone)]
pub struct Request {
    /// The running pullthrough, e.g. `http://127.0.0.1:5000`.
    pub url: String,
    /// Images: `alpine`, `library/alpine:3.20`, `docker.io/org/app@sha256:...`.
    pub images: Vec<String>,
    /// Only this platform (`linux/arm64`) of multi-platform images; all when `None`.
    pub platform: Option<String>,
    /// Sent to `url`'s `/_pullthrough/stats` for the upstream cost, when it is guarded. The
    /// caller decides whether `url` may have it (see [`is_listener`]).
    pub admin_token: Option<Secret>,
    /// The default upstream's host (`upstream`'s): a name under it means the default upstream.
    pub default_host: Option<String>,
}

/// Progress events, for a progress bar or plain lines.
pub trait Report {
    /// A new image starts.
    fn image(&self, image: &str);
    /// The image's manifests are in: its `count` blobs take `bytes` in all.
    fn blobs(&self, count: usize, bytes: u64);
    /// One manifest or blob was fetched: its size, and whether it came from the cache.
    fn item(&self, what: &str, bytes: u64, cached: bool);
    /// The image failed (`error` is printable: the server's text in it has been cleaned).
    fn failed(&self, image: &str, error: &str);
}

/// What the warm-up cost upstream, as pullthrough's stats tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamCost {
    /// Manifest GETs pullthrough sent upstream meanwhile (Docker Hub pulls).
    ManifestGets(u64),
    /// The stats could not tell, and why.
    Unknown(&'static str),
}

impl Default for UpstreamCost {
    fn default() -> Self {
        UpstreamCost::Unknown("the stats endpoint was not read")
    }
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
    /// What it cost upstream.
    pub upstream: UpstreamCost,
    /// pullthrough's default upstream is Docker Hub (which counts manifest GETs as pulls), as
    /// its stats say.
    pub docker_hub: bool,
}

impl Summary {
    /// One line.
    pub fn line(&self) -> String {
        let upstream = match self.upstream {
            UpstreamCost::ManifestGets(n) if self.docker_hub => {
                format!("upstream manifest GETs (Docker Hub pulls): {n}")
            }
            UpstreamCost::ManifestGets(n) => format!("upstream manifest GETs: {n}"),
            UpstreamCost::Unknown(why) => format!("upstream manifest GETs: unknown ({why})"),
        };
        format!(
            "warmed {} image(s), {} failed: manifests {} fetched upstream, {} cached; blobs {} fetched upstream ({:.1} MiB), {} cached; {upstream}",
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

/// Whether `url` reaches the listener at `listen` (serving TLS when `tls`), so that the
/// configured admin token may go there: the same scheme and port, and the listen address
/// itself, or this machine's loopback (or `localhost`) when listening on it or on every
/// address. Any other URL may be anyone's server.
pub fn is_listener(url: &str, listen: SocketAddr, tls: bool) -> bool {
    let Ok(url) = url::Url::parse(url) else {
        return false;
    };
    let scheme = if tls { "https" } else { "http" };
    if url.scheme() != scheme || url.port_or_known_default() != Some(listen.port()) {
        return false;
    }
    let on = listen.ip();
    let ip_ok = |ip: IpAddr| ip == on || (on.is_unspecified() && ip.is_loopback());
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip_ok(ip.into()),
        Some(url::Host::Ipv6(ip)) => ip_ok(ip.into()),
        Some(url::Host::Domain(host)) => {
            host.eq_ignore_ascii_case("localhost") && (on.is_loopback() || on.is_unspecified())
        }
        None => false,
    }
}

/// `text` from the server made safe for a terminal: control characters (C0 and DEL, which
/// set a title or clear the screen, and C1, which some terminals read as escapes) and the
/// bidirectional overrides that reorder what is shown become spaces; then it is cut to
/// `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    let mut shown: String = text
        .chars()
        .map(|c| {
            let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi { ' ' } else { c }
        })
        .take(max)
        .collect();
    if text.chars().nth(max).is_some() {
        shown.push('…');
    }
    shown
}

/// What went wrong with a request, in words down to its root cause (`connection refused`),
/// not reqwest's outer "error sending request" alone.
pub fn cause(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// Most characters of one failure message shown (the server's part is cut shorter).
const MAX_MESSAGE: usize = 1000;

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
    bytes: Bytes,
    cached: bool,
}

/// One repository of the pullthrough at `url`.
struct Repo<'a> {
    client: &'a reqwest::Client,
    url: &'a str,
    name: String,
}

impl Repo<'_> {
    /// The manifest `reference`, at most [`MAX_MANIFEST_BYTES`] (the limit pullthrough itself
    /// applies), checked against `digest` when fetched by digest.
    async fn manifest(&self, reference: &str, digest: Option<&Digest>) -> Result<Fetched, String> {
        let what = format!("manifest {}:{reference}", self.name);
        let request = self
            .client
            .get(format!(
                "{}/v2/{}/manifests/{reference}",
                self.url, self.name
            ))
            .header(reqwest::header::ACCEPT, ACCEPT)
            .timeout(SMALL_TIMEOUT);
        let response = send(&what, request).await?;
        let cached = is_cached(&response);
        let too_big = || format!("{what}: larger than {MAX_MANIFEST_BYTES} bytes");
        if response
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES as u64)
        {
            return Err(too_big());
        }
        let (bytes, complete) = read_prefix(response, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| format!("{what}: {}", cause(&e)))?;
        if !complete {
            return Err(too_big());
        }
        if let Some(digest) = digest
            && Digest::of(digest.algorithm(), &bytes) != *digest
        {
            return Err(format!("{what}: content does not match its digest"));
        }
        Ok(Fetched { bytes, cached })
    }

    /// Reads the blob `blob` to the end and drops it, checking its size and digest against
    /// the descriptor; returns its size and whether it came from the cache.
    async fn blob(&self, blob: &Descriptor) -> Result<(u64, bool), String> {
        let (digest, declared) = (&blob.digest, blob.size);
        let what = format!("blob {digest}");
        let request = self
            .client
            .get(format!("{}/v2/{}/blobs/{digest}", self.url, self.name));
        let mut response = send(&what, request).await?;
        let cached = is_cached(&response);
        let wrong_size = |n: u64| format!("{what}: {n} bytes, its manifest says {declared}");
        if let Some(n) = response.content_length().filter(|&n| n != declared) {
            return Err(wrong_size(n));
        }
        let mut verifier = Verifier::new(digest.algorithm());
        let mut size = 0u64;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("{what}: {}", cause(&e)))?
        {
            // Never past the declared size: an endless body ends here.
            size = u64::try_from(chunk.len())
                .ok()
                .and_then(|n| size.checked_add(n))
                .filter(|&n| n <= declared)
                .ok_or_else(|| {
                    format!("{what}: longer than the {declared} bytes its manifest says")
                })?;
            verifier.update(&chunk);
        }
        if size != declared {
            return Err(wrong_size(size));
        }
        if verifier.finish() != *digest {
            return Err(format!("{what}: content does not match its digest"));
        }
        Ok((size, cached))
    }
}

/// Sends `request` for `what`; a failure, or an answer other than 2xx, is a printable error
/// naming `what` and the cause.
async fn send(what: &str, request: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
    let response = request
        .send()
        .await
        .map_err(|e| format!("{what}: {}", cause(&e)))?;
    if !response.status().is_success() {
        return Err(format!("{what}: {}", status_error(response).await));
    }
    Ok(response)
}

/// The first `limit` bytes of `response`'s body, and whether that was all of it. Reading
/// stops at the limit, so an endless body costs no more than `limit` bytes of memory.
async fn read_prefix(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<(Bytes, bool), reqwest::Error> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(buf.len());
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Ok((buf.freeze(), false));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf.freeze(), true))
}

/// `HTTP <status>: <the start of the body>`, printable; the rest of the body is not read.
async fn status_error(response: reqwest::Response) -> String {
    let status = response.status().as_u16();
    let body = read_prefix(response, MAX_ERROR_BODY)
        .await
        .map(|(body, _)| body)
        .unwrap_or_default();
    let text = printable(String::from_utf8_lossy(&body).trim(), MAX_SHOWN);
    if text.trim().is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    }
}

fn is_cached(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .and_then(Outcome::parse)
        .is_some_and(Outcome::from_cache)
}

/// Manifest GETs pullthrough has sent upstream so far, from its stats, and whether its
/// default upstream is Docker Hub (which counts them as pulls); or why they are unknown.
async fn manifest_gets(
    client: &reqwest::Client,
    request: &Request,
) -> Result<(u64, bool), &'static str> {
    const UNREADABLE: &str = "the stats endpoint could not be read";
    let url = format!("{}/_pullthrough/stats", request.url.trim_end_matches('/'));
    let mut get = client.get(url).timeout(SMALL_TIMEOUT);
    if let Some(token) = &request.admin_token {
        get = get.bearer_auth(&token.0);
    }
    let response = get.send().await.map_err(|_| UNREADABLE)?;
    match response.status().as_u16() {
        200..=299 => {}
        401 | 403 if request.admin_token.is_some() => {
            return Err("the stats endpoint refused the admin token");
        }
        401 | 403 => return Err("the stats endpoint needs the admin token"),
        _ => return Err(UNREADABLE),
    }
    let (body, complete) = read_prefix(response, MAX_STATS_BODY)
        .await
        .map_err(|_| UNREADABLE)?;
    let stats: serde_json::Value = serde_json::from_slice(&body)
        .ok()
        .filter(|_| complete)
        .ok_or(UNREADABLE)?;
    // Without counters it is not pullthrough's stats; without the key, no manifest GET yet.
    let counters = stats
        .get("counters")
        .filter(|c| c.is_object())
        .ok_or(UNREADABLE)?;
    let gets = counters["upstream_requests"]["manifest_get"]
        .as_object()
        .into_iter()
        .flat_map(|by_status| by_status.values())
        .try_fold(0u64, |sum, n| sum.checked_add(n.as_u64()?))
        .ok_or(UNREADABLE)?;
    let docker_hub = stats["upstreams"][0]["host"].as_str().is_some_and(|host| {
        let host = host.split(':').next().unwrap_or(host);
        crate::config::DOCKER_HUB_NAMES.contains(&host)
    });
    Ok((gets, docker_hub))
}

/// The cost between two readings of the stats.
fn cost(before: Result<u64, &'static str>, after: Result<u64, &'static str>) -> UpstreamCost {
    match (before, after) {
        (Ok(before), Ok(after)) => after.checked_sub(before).map_or(
            UpstreamCost::Unknown("pullthrough's counters went back: did it restart?"),
            UpstreamCost::ManifestGets,
        ),
        (Err(why), _) | (_, Err(why)) => UpstreamCost::Unknown(why),
    }
}

/// Warms every image of `request`, reporting progress.
pub async fn warm(request: &Request, report: &dyn Report) -> Summary {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(READ_TIMEOUT)
        .build()
        .unwrap_or_default();
    let mut summary = Summary::default();
    let before = manifest_gets(&client, request).await;
    for image in &request.images {
        report.image(image);
        match warm_one(&client, request, image, report, &mut summary).await {
            Ok(()) => summary.images += 1,
            Err(e) => {
                summary.failed += 1;
                report.failed(image, &printable(&e, MAX_MESSAGE));
            }
        }
    }
    let after = manifest_gets(&client, request).await;
    summary.docker_hub = after.is_ok_and(|(_, hub)| hub);
    summary.upstream = cost(before.map(|(n, _)| n), after.map(|(n, _)| n));
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
    let repo = Repo {
        client,
        url: request.url.trim_end_matches('/'),
        name,
    };
    let mut walk = Walk::new(reference, request.platform.as_deref())?;
    while let Some(next) = walk.pending.pop() {
        let manifest = repo.manifest(&next.reference, next.digest.as_ref()).await?;
        report.item(
            &format!("manifest {}", next.reference),
            manifest.bytes.len() as u64,
            manifest.cached,
        );
        if manifest.cached {
            summary.manifests_cached += 1;
        } else {
            summary.manifests_fetched += 1;
        }
        walk.queue(&next, &manifest.bytes)?;
    }
    let total = walk
        .blobs
        .iter()
        .fold(0u64, |sum, b| sum.saturating_add(b.size));
    report.blobs(walk.blobs.len(), total);
    // A few blobs at a time, as clients pull layers.
    let mut fetches = futures_util::stream::iter(walk.blobs)
        .map(|blob| {
            let repo = &repo;
            async move { (repo.blob(&blob).await, blob) }
        })
        .buffer_unordered(4);
    while let Some((fetched, blob)) = fetches.next().await {
        let (size, cached) = fetched?;
        report.item(&format!("blob {}", blob.digest), size, cached);
        if cached {
            summary.blobs_cached += 1;
        } else {
            summary.blobs_fetched += 1;
            summary.bytes_fetched = summary.bytes_fetched.saturating_add(size);
        }
    }
    Ok(())
}

/// A manifest still to fetch: its reference, the digest its content must have (all but a
/// tag), and how many indexes lead to it.
struct Pending {
    reference: String,
    digest: Option<Digest>,
    depth: usize,
}

/// One image's manifests still to fetch and the blobs found so far. Each digest is taken
/// once, so a manifest or blob named twice is fetched once, and the number in all is bounded.
struct Walk<'a> {
    platform: Option<&'a str>,
    pending: Vec<Pending>,
    blobs: Vec<Descriptor>,
    manifests_seen: HashSet<Digest>,
    blobs_seen: HashSet<Digest>,
}

impl<'a> Walk<'a> {
    /// A walk from the manifest `reference`, keeping the children of `platform` if given.
    fn new(reference: String, platform: Option<&'a str>) -> Result<Walk<'a>, String> {
        let digest = reference.parse::<Digest>().ok();
        let mut walk = Walk {
            platform,
            pending: Vec::new(),
            blobs: Vec::new(),
            manifests_seen: HashSet::new(),
            blobs_seen: HashSet::new(),
        };
        if let Some(digest) = &digest {
            walk.first(digest, false)?;
        }
        walk.pending.push(Pending {
            reference,
            digest,
            depth: 0,
        });
        Ok(walk)
    }

    /// Whether `digest` (a blob's when `blob`) is new; an error once the image names too many.
    fn first(&mut self, digest: &Digest, blob: bool) -> Result<bool, String> {
        if self
            .manifests_seen
            .len()
            .saturating_add(self.blobs_seen.len())
            >= MAX_ITEMS
        {
            return Err(format!(
                "the image names more than {MAX_ITEMS} manifests and blobs"
            ));
        }
        let seen = if blob {
            &mut self.blobs_seen
        } else {
            &mut self.manifests_seen
        };
        Ok(seen.insert(digest.clone()))
    }

    /// Queues what the manifest `at` (whose content is `bytes`) names and was not seen yet.
    fn queue(&mut self, at: &Pending, bytes: &[u8]) -> Result<(), String> {
        if at.digest.is_none() {
            // A tag's content, so that an index naming it is not fetched again.
            self.first(&Digest::sha256(bytes), false)?;
        }
        match contents(bytes, &at.reference)? {
            Contents::Index(children) => {
                if at.depth >= MAX_INDEX_DEPTH {
                    return Err(format!(
                        "manifest {}: indexes nested more than {MAX_INDEX_DEPTH} deep",
                        at.reference
                    ));
                }
                for child in children {
                    if self.wanted(&child) && self.first(&child.digest, false)? {
                        self.pending.push(Pending {
                            reference: child.digest.to_string(),
                            digest: Some(child.digest),
                            depth: at.depth + 1,
                        });
                    }
                }
            }
            Contents::Image(descriptors) => {
                for blob in descriptors {
                    if self.first(&blob.digest, true)? {
                        self.blobs.push(blob);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether an index's `child` is of the platform asked for.
    fn wanted(&self, child: &Descriptor) -> bool {
        match (self.platform, &child.platform) {
            (None, _) => true,
            (Some(want), Some(have)) => platform_matches(have, want),
            (Some(_), None) => false,
        }
    }
}

/// What the manifest `reference` names, at most [`MAX_DESCRIPTORS`] descriptors.
fn contents(bytes: &[u8], reference: &str) -> Result<Contents, String> {
    let contents = Contents::parse(bytes)
        .ok_or_else(|| format!("manifest {reference} is neither an index nor an image"))?;
    let (Contents::Index(descriptors) | Contents::Image(descriptors)) = &contents;
    if descriptors.len() > MAX_DESCRIPTORS {
        return Err(format!(
            "manifest {reference} lists {} descriptors, more than the {MAX_DESCRIPTORS} allowed",
            descriptors.len()
        ));
    }
    Ok(contents)
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

    #[test]
    fn makes_server_text_printable() {
        let hostile = "a\u{1b}]0;title\u{7}\u{1b}[2Jb\u{7f}c\u{9b}31md\r\ne\u{202e}f\tg";
        let shown = printable(hostile, 100);
        assert_eq!(shown, "a ]0;title  [2Jb c 31md  e f g");
        assert!(!shown.chars().any(char::is_control));
        assert_eq!(printable(&"é".repeat(10), 4), "éééé…");
        assert_eq!(printable("abcd", 4), "abcd");
    }

    #[test]
    fn recognises_the_configured_listener() {
        let any: SocketAddr = "0.0.0.0:5000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let lan: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        for (url, listen, tls, ok) in [
            ("http://127.0.0.1:5000", any, false, true),
            ("http://localhost:5000/", any, false, true),
            (
                "http://[::1]:5000",
                "[::]:5000".parse().unwrap(),
                false,
                true,
            ),
            ("http://127.0.0.1:5000", local, false, true),
            ("http://LOCALHOST:5000", local, false, true),
            ("http://10.1.2.3:5000", lan, false, true),
            ("https://127.0.0.1:5000", local, true, true),
            // Another scheme, port or host is another server.
            ("https://127.0.0.1:5000", local, false, false),
            ("http://127.0.0.1:5000", local, true, false),
            ("http://127.0.0.1:5001", local, false, false),
            ("http://127.0.0.1", local, false, false),
            ("http://127.0.0.1:5000", lan, false, false),
            ("http://localhost:5000", lan, false, false),
            ("http://evil.example:5000", any, false, false),
            ("http://localhost.evil.example:5000", any, false, false),
            ("http://127.0.0.1:5000@evil.example:5000", any, false, false),
            ("not a url", any, false, false),
        ] {
            assert_eq!(is_listener(url, listen, tls), ok, "{url} on {listen}");
        }
    }

    #[test]
    fn reports_the_upstream_cost_or_why_it_is_unknown() {
        assert_eq!(cost(Ok(3), Ok(5)), UpstreamCost::ManifestGets(2));
        assert!(matches!(cost(Ok(5), Ok(3)), UpstreamCost::Unknown(_)));
        let why = "the stats endpoint needs the admin token";
        assert_eq!(cost(Err(why), Err(why)), UpstreamCost::Unknown(why));
        let summary = Summary {
            upstream: UpstreamCost::Unknown(why),
            ..Summary::default()
        };
        assert!(summary.line().ends_with(
            "; upstream manifest GETs: unknown (the stats endpoint needs the admin token)"
        ));
        // "Docker Hub pulls" only where Docker Hub is the upstream.
        let mut summary = Summary {
            upstream: UpstreamCost::ManifestGets(5),
            ..Summary::default()
        };
        assert!(summary.line().ends_with("; upstream manifest GETs: 5"));
        summary.docker_hub = true;
        assert!(
            summary
                .line()
                .ends_with("; upstream manifest GETs (Docker Hub pulls): 5")
        );
    }
}
