//! The upstream registry client: manifest, blob and tags requests through reqwest, with the
//! 401 → token → retry dance (protocol §1), rate-limit bookkeeping, a concurrency cap, and a
//! 429 pause. Knows nothing of caching.

pub mod auth;
mod challenge;
mod direct;
mod offline;
pub mod ratelimit;
mod realm;
mod referrers;
mod token;

pub use referrers::ReferrersPage;

use crate::config::{Config, Runtime};
use crate::error::Cause;
use crate::metrics::{UpstreamKind as Kind, UpstreamMetrics};
use crate::registry::{
    ContentRange, Digest, Manifest, MediaType, Reference, RepoName, UPSTREAM_ACCEPT,
};
use auth::{Credentials, TokenCache};
use bytes::{Bytes, BytesMut};
pub use offline::Offline;
use parking_lot::{Mutex, RwLock};
use ratelimit::RateLimits;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

/// Largest manifest accepted from upstream (distribution and containers/image use 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Largest token or tags-list response read.
const MAX_SMALL_BODY: usize = 4 * 1024 * 1024;

/// Why an upstream request failed. Cheap to clone: one failure is shared by every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// 404 from upstream. `registry` says it was the registry's own answer that the content
    /// is not there: a HEAD (which has no body to say more), or a body naming
    /// `MANIFEST_UNKNOWN` or `NAME_UNKNOWN`. Only those are remembered by the negative cache;
    /// a 404 page of something in front of the registry is not.
    #[error("not found upstream")]
    NotFound {
        /// The registry said so (see above).
        registry: bool,
    },
    /// pullthrough is offline: nothing was sent.
    #[error("pullthrough is offline")]
    Offline,
    /// 401/403 after authenticating: private, nonexistent, or not ours to read.
    #[error("upstream denied access")]
    Denied,
    /// 429, or a pause after one.
    #[error("upstream rate limit reached")]
    TooManyRequests {
        /// How long upstream asked us to wait.
        retry_after: Option<Duration>,
    },
    /// Any other unexpected status.
    #[error("upstream answered HTTP {0}")]
    Status(u16),
    /// No answer in time.
    #[error("upstream timed out")]
    Timeout,
    /// Connection refused, DNS, TLS, reset: `class` says which in a few words, for clients;
    /// the source is the whole chain, for the log.
    #[error("upstream unreachable: {class}")]
    Unreachable {
        /// "connection refused", "name not resolved", "TLS handshake failed", ...
        class: &'static str,
        /// What failed, with its own sources.
        #[source]
        source: Cause,
    },
    /// Upstream answered something a registry must not (bad digest, missing headers, too big).
    #[error("upstream sent an invalid response: {0}")]
    BadResponse(String),
    /// The token realm failed or refused.
    #[error("upstream token request failed: {0}")]
    Token(String),
    /// The token realm refused the configured credentials.
    #[error("the token endpoint refused the configured credentials")]
    CredentialsRefused,
    /// A client error (4xx other than 401, 403, 404, 408 and 429) with the registry error
    /// code and message upstream sent, if any: passed on to the client with its meaning.
    #[error("upstream refused the request (HTTP {status})")]
    Rejected {
        /// The upstream status, 400 to 499.
        status: u16,
        /// The first registry error code of the body (`[A-Z_]`, at most 64 characters).
        code: Option<String>,
        /// Its message, printable and at most 256 characters.
        message: Option<String>,
    },
}

impl Error {
    /// A failed exchange: a timeout, or unreachable with its cause kept whole (a reqwest error
    /// names the URL, never credentials: none are in URLs).
    fn from_reqwest(e: reqwest::Error) -> Error {
        if e.is_timeout() {
            Error::Timeout
        } else {
            Error::Unreachable {
                class: unreachable_class(&e),
                source: Arc::new(e),
            }
        }
    }

    /// Unreachable for a reason of pullthrough's own (`class` says it to clients too).
    pub fn unreachable(class: &'static str, why: impl Into<String>) -> Error {
        Error::Unreachable {
            class,
            source: Arc::new(std::io::Error::other(why.into())),
        }
    }
}

/// What kind of failure kept a request from its server, in a client's words: the first cause
/// in the chain that says (`connection refused`, `name not resolved`, ...).
pub fn unreachable_class(e: &reqwest::Error) -> &'static str {
    if let Some(class) = class_in_chain(e) {
        class
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "body broke off"
    } else {
        "request failed"
    }
}

/// The first cause in `e`'s chain that says why a request failed, in a client's words.
fn class_in_chain(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use std::io::ErrorKind;
    let mut next = Some(e);
    while let Some(cause) = next {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => return Some("connection refused"),
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe => {
                    return Some("connection reset");
                }
                ErrorKind::TimedOut => return Some("connection timed out"),
                ErrorKind::UnexpectedEof => return Some("connection closed"),
                _ => {}
            }
        }
        if cause.downcast_ref::<rustls::Error>().is_some() {
            return Some("TLS handshake failed");
        }
        let text = cause.to_string();
        if text.contains("dns error") || text.contains("failed to lookup address") {
            return Some("name not resolved");
        }
        if text.contains("certificate") || text.contains("tls handshake") {
            return Some("TLS handshake failed");
        }
        next = cause.source();
    }
    None
}

/// Whether `e` is a timeout somewhere in its chain, as reqwest's `is_timeout` judges one.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(cause) = next {
        let io = cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        let hyper = cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if io || hyper {
            return true;
        }
        next = cause.source();
    }
    false
}

/// What a HEAD (or the headers of a GET) said about some content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// `Docker-Content-Digest`.
    pub digest: Option<Digest>,
    /// `Content-Type`, parameters stripped.
    pub media_type: Option<MediaType>,
    /// `Content-Length` (the header, not reqwest's body hint).
    pub size: Option<u64>,
}

impl Head {
    fn from_headers(headers: &HeaderMap) -> Head {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Head {
            digest: text("docker-content-digest").and_then(|d| d.trim().parse().ok()),
            media_type: text("content-type").map(MediaType::from_content_type),
            size: text("content-length").and_then(|v| v.trim().parse().ok()),
        }
    }
}

/// What the upstream's `/v2/` answered.
#[derive(Debug, Clone, Copy)]
struct Ping {
    /// The challenge named Docker Hub's token service.
    docker_hub: bool,
}

/// Host names of Docker Hub's registry API.
const DOCKER_HUB_HOSTS: &[&str] = &[
    "registry-1.docker.io",
    "index.docker.io",
    "registry.hub.docker.com",
    "docker.io",
];

/// A client for one upstream registry and one credential.
#[derive(Debug)]
pub struct Upstream {
    base: Url,
    /// The clients requests go out on.
    clients: Clients,
    credentials: Option<Credentials>,
    tokens: TokenCache,
    /// Realm and service of the last Bearer challenge, so later requests carry a token
    /// without a 401 round trip first.
    bearer: RwLock<Option<(String, String)>>,
    /// Upstream asked for Basic auth.
    basic: AtomicBool,
    /// Realms that answered the OAuth2 POST with 404/405: use GET there.
    post_unsupported: Mutex<HashSet<String>>,
    warned_realm: AtomicBool,
    /// When the last "credentials refused" error was logged (seconds on `started`'s clock).
    refused_logged_at: AtomicU64,
    /// When this client was built.
    started: Instant,
    /// Client for token requests: follows no redirect (a realm is checked before it is asked,
    /// a redirect target could not be), and connects a realm host only to the addresses its
    /// check allowed.
    token_http: reqwest::Client,
    /// The addresses of checked realm hosts, which `token_http` resolves them to.
    realm_pins: Arc<realm::PinnedResolver>,
    permits: Arc<Semaphore>,
    /// `upstream_max_concurrency`.
    cap: usize,
    /// Blob downloads hold their permit for minutes: they may take at most three quarters of
    /// `upstream_max_concurrency`, so manifest and token traffic always has room.
    blob_permits: Arc<Semaphore>,
    request_timeout: Duration,
    /// What the first `GET /v2/` taught us; retried until it succeeds once.
    ping: tokio::sync::OnceCell<Ping>,
    /// While on, nothing is sent (checked before every request and redirect).
    offline: Arc<Offline>,
    /// Rate-limit state for this upstream's credential.
    pub limits: RateLimits,
    /// Where requests are counted.
    pub metrics: UpstreamMetrics,
}

impl Upstream {
    /// Builds the client, which sends nothing while `offline` is on. Fails only on an
    /// unreadable password file or a TLS set-up problem.
    pub fn new(
        config: &Config,
        metrics: UpstreamMetrics,
        offline: Arc<Offline>,
    ) -> anyhow::Result<Upstream> {
        let password = config.password()?;
        let credentials = match (&config.upstream_username, password) {
            (Some(username), Some(password)) => Some(Credentials {
                username: username.clone(),
                password,
            }),
            _ => None,
        };
        let settings = ClientSettings {
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
            offline: Arc::clone(&offline),
            tls: tls_config()?,
            proxied: proxied(&config.upstream),
        };
        let realm_pins = Arc::new(realm::PinnedResolver::default());
        let token_http = settings
            .builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::clone(&realm_pins))
            .build()?;
        let workers = match config.runtime {
            Runtime::PerCore => crate::worker::count(),
            Runtime::WorkStealing => 0,
        };
        let clients = Clients {
            shared: settings.pair()?,
            per_worker: (0..workers).map(|_| OnceLock::new()).collect(),
            settings,
        };
        Ok(Upstream {
            base: config.upstream.clone(),
            clients,
            credentials,
            tokens: TokenCache::default(),
            bearer: RwLock::new(None),
            basic: AtomicBool::new(false),
            post_unsupported: Mutex::new(HashSet::new()),
            warned_realm: AtomicBool::new(false),
            refused_logged_at: AtomicU64::new(0),
            started: Instant::now(),
            token_http,
            realm_pins,
            permits: Arc::new(Semaphore::new(config.upstream_max_concurrency)),
            cap: config.upstream_max_concurrency,
            blob_permits: Arc::new(Semaphore::new(
                (config.upstream_max_concurrency - config.upstream_max_concurrency / 4).max(1),
            )),
            request_timeout: config.request_timeout,
            ping: tokio::sync::OnceCell::new(),
            offline,
            limits: RateLimits::new(config.max_upstream_pause),
            metrics,
        })
    }

    /// Refuses while offline: called before anything is sent.
    fn check_online(&self) -> Result<(), Error> {
        if self.offline.is_on() {
            return Err(Error::Offline);
        }
        Ok(())
    }

    /// Whether pullthrough is offline now (then every upstream request fails at once).
    pub fn offline(&self) -> bool {
        self.offline.is_on()
    }

    /// The upstream's URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// Upstream exchanges in flight now.
    pub fn in_flight(&self) -> u64 {
        (self.cap - self.permits.available_permits()) as u64
    }

    /// True when a credential is configured (then cached content is shared across
    /// repositories only after upstream confirms access).
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// GETs a manifest with the full Accept list and verifies its digest.
    pub async fn get_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
    ) -> Result<Manifest, Error> {
        let path = format!("/v2/{name}/manifests/{reference}");
        let exchange = self
            .send(Method::GET, name, &path, None, Kind::ManifestGet)
            .await?;
        let head = Head::from_headers(exchange.response.headers());
        let bytes = read_limited(exchange.response, MAX_MANIFEST_BYTES).await?;
        let media_type = MediaType::of_manifest_answer(head.media_type.as_ref(), &bytes)
            .ok_or_else(|| not_a_manifest(head.media_type.as_ref()))?;
        let algorithm = match (reference, &head.digest) {
            (Reference::Digest(d), _) | (_, Some(d)) => d.algorithm(),
            _ => crate::registry::Algorithm::Sha256,
        };
        let digest = Digest::of(algorithm, &bytes);
        if let Reference::Digest(want) = reference
            && *want != digest
        {
            return Err(Error::BadResponse(format!(
                "manifest digest {digest} does not match the requested {want}"
            )));
        }
        if let Some(claimed) = &head.digest
            && *claimed != digest
        {
            return Err(Error::BadResponse(format!(
                "Docker-Content-Digest {claimed} does not match the manifest's {digest}"
            )));
        }
        Ok(Manifest::new(bytes, media_type, digest))
    }

    /// HEADs a manifest; never a GET, so it costs no Docker Hub pull. A `Content-Type` that
    /// is not a manifest type is left out: callers then GET the manifest, which settles it.
    pub async fn head_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
    ) -> Result<Head, Error> {
        let path = format!("/v2/{name}/manifests/{reference}");
        let exchange = self
            .send(Method::HEAD, name, &path, None, Kind::ManifestHead)
            .await?;
        let mut head = Head::from_headers(exchange.response.headers());
        head.media_type = head.media_type.filter(MediaType::is_manifest);
        Ok(head)
    }

    /// GETs a blob, following redirects (reqwest drops `Authorization` when the host changes,
    /// as the CDN requires). The caller streams and verifies the body; the exchange keeps its
    /// place under `upstream_max_concurrency` until it is dropped.
    pub async fn get_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        range: Option<&str>,
    ) -> Result<Exchange, Error> {
        let path = format!("/v2/{name}/blobs/{digest}");
        self.send(Method::GET, name, &path, range, Kind::BlobGet)
            .await
    }

    /// HEADs a blob. Where that gives no size (a CDN that refuses HEAD after the redirect, or
    /// omits `Content-Length`), asks for its first byte instead: `Content-Range` carries the
    /// size, and blob GETs are not pulls.
    pub async fn head_blob(&self, name: &RepoName, digest: &Digest) -> Result<Head, Error> {
        let path = format!("/v2/{name}/blobs/{digest}");
        let head = match self
            .send(Method::HEAD, name, &path, None, Kind::BlobHead)
            .await
        {
            Ok(exchange) => Head::from_headers(exchange.response.headers()),
            Err(Error::Status(_) | Error::Rejected { .. }) => Head::default(),
            Err(e) => return Err(e),
        };
        if head.size.is_some() {
            return Ok(head);
        }
        let exchange = self
            .send(Method::GET, name, &path, Some("bytes=0-0"), Kind::BlobGet)
            .await?;
        let response = &exchange.response;
        let size = match response.status() {
            StatusCode::PARTIAL_CONTENT => response
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(ContentRange::parse)
                .and_then(|r| r.total),
            _ => Head::from_headers(response.headers()).size,
        };
        Ok(Head { size, ..head })
    }

    /// GETs a tags list page; returns the body and upstream's `Link` header.
    pub async fn tags_list(
        &self,
        name: &RepoName,
        query: &str,
    ) -> Result<(Bytes, Option<String>), Error> {
        let path = if query.is_empty() {
            format!("/v2/{name}/tags/list")
        } else {
            format!("/v2/{name}/tags/list?{query}")
        };
        let exchange = self
            .send(Method::GET, name, &path, None, Kind::Tags)
            .await?;
        let link = exchange
            .response
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((read_limited(exchange.response, MAX_SMALL_BODY).await?, link))
    }

    async fn send(
        &self,
        method: Method,
        name: &RepoName,
        path: &str,
        range: Option<&str>,
        kind: Kind,
    ) -> Result<Exchange, Error> {
        self.check_online()?;
        if let Some(left) = self.limits.paused_for(matches!(kind, Kind::ManifestGet)) {
            return Err(Error::TooManyRequests {
                retry_after: Some(left),
            });
        }
        let closed = |_| Error::unreachable("shutting down", "the upstream client is closed");
        let blob_permit = match kind {
            Kind::BlobGet => Some(
                Arc::clone(&self.blob_permits)
                    .acquire_owned()
                    .await
                    .map_err(closed)?,
            ),
            _ => None,
        };
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(closed)?;
        let url = self
            .base
            .join(path)
            .map_err(|e| Error::BadResponse(e.to_string()))?;
        let default_scope = format!("repository:{name}:pull");
        let mut auth = self.preemptive_auth(&default_scope).await?;
        for attempt in 0..2 {
            // Switched offline while this request waited for its place or its token.
            self.check_online()?;
            let started = Instant::now();
            let sent = self
                .exchange(
                    method.clone(),
                    &url,
                    range,
                    kind,
                    auth.as_ref().map(|a| &a.0),
                )
                .await;
            let response = match sent {
                Ok(response) => response,
                // A redirect refused because pullthrough went offline meanwhile: the first
                // hop was sent, so it counts, but as no failure of upstream's.
                Err(_) if self.offline.is_on() => {
                    self.metrics.upstream(kind, None, started.elapsed());
                    return Err(Error::Offline);
                }
                Err(e) => {
                    self.metrics.upstream(kind, None, started.elapsed());
                    let detail = crate::error::Chain(&e).to_string();
                    self.metrics.upstream_failed(kind, None, detail);
                    return Err(e);
                }
            };
            let status = response.status().as_u16();
            self.metrics.upstream(kind, Some(status), started.elapsed());
            if status >= 500 || status == 429 {
                self.metrics.upstream_failed(
                    kind,
                    Some(status),
                    format!("upstream answered HTTP {status}"),
                );
            }
            tracing::debug!(%method, path, status, elapsed_ms = started.elapsed().as_millis() as u64, "upstream request");
            self.limits.observe(response.headers());
            if response.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                let response = self.check_status(response, kind).await?;
                return Ok(Exchange {
                    response,
                    _permits: (permit, blob_permit),
                });
            }
            auth = self
                .answer_challenge(
                    response.headers(),
                    &default_scope,
                    auth.and_then(|(_, key)| key),
                )
                .await?;
            if auth.is_none() {
                return Err(Error::Denied);
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Sends one request on this thread's client for `kind` and returns the answer once its
    /// headers are in: blobs through reqwest (redirects to the CDN followed, no overall deadline),
    /// anything else through the direct client unless a proxy applies, with `request_timeout`
    /// as its deadline, body included.
    async fn exchange(
        &self,
        method: Method,
        url: &Url,
        range: Option<&str>,
        kind: Kind,
        authorization: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, Error> {
        let mut headers = HeaderMap::new();
        match kind {
            Kind::ManifestGet | Kind::ManifestHead => {
                headers.insert(header::ACCEPT, HeaderValue::from_static(UPSTREAM_ACCEPT));
            }
            Kind::Referrers => {
                headers.insert(
                    header::ACCEPT,
                    HeaderValue::from_static(crate::registry::REFERRERS_MEDIA_TYPE),
                );
            }
            _ => {}
        }
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, value.clone());
        }
        let clients = self.clients.here();
        let blob = matches!(kind, Kind::BlobGet | Kind::BlobHead);
        // Only blob requests carry a range today; one that did otherwise goes through reqwest,
        // which sends it, rather than losing it.
        if let (Some(direct), false) = (&clients.direct, blob || range.is_some()) {
            return direct
                .send(method, url, headers, self.request_timeout)
                .await;
        }
        let client = if blob { &clients.http } else { &clients.api };
        let mut request = client.request(method, url.clone()).headers(headers);
        if kind != Kind::BlobGet {
            request = request.timeout(self.request_timeout);
        }
        if let Some(range) = range {
            request = request.header(header::RANGE, range);
        }
        request.send().await.map_err(Error::from_reqwest)
    }

    async fn check_status(
        &self,
        response: reqwest::Response,
        kind: Kind,
    ) -> Result<reqwest::Response, Error> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        Err(match status {
            // Only blob requests follow redirects; any other 3xx arrives here.
            s if s.is_redirection() && !matches!(kind, Kind::BlobGet | Kind::BlobHead) => {
                let what = match kind {
                    Kind::Tags => "tags list",
                    Kind::Referrers => "referrers",
                    _ => "manifest",
                };
                Error::BadResponse(format!(
                    "upstream redirected a {what} request (HTTP {}); not followed",
                    s.as_u16()
                ))
            }
            StatusCode::NOT_FOUND => Error::NotFound {
                registry: matches!(kind, Kind::ManifestHead | Kind::BlobHead)
                    || registry_404(response).await,
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Denied,
            StatusCode::REQUEST_TIMEOUT => Error::Status(status.as_u16()),
            s if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => {
                rejected(status.as_u16(), response).await
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = self
                    .limits
                    .clamp(ratelimit::retry_after(response.headers()));
                let abuse = response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|ct| ct.starts_with("text/"));
                self.limits.pause(retry_after, abuse);
                tracing::warn!(
                    retry_after_secs = retry_after.map(|d| d.as_secs()),
                    abuse,
                    "upstream rate limit hit"
                );
                Error::TooManyRequests { retry_after }
            }
            other => Error::Status(other.as_u16()),
        })
    }
}

/// An upstream response, holding its place under `upstream_max_concurrency` until dropped, so
/// the cap covers the whole exchange and not just the wait for headers.
#[derive(Debug)]
pub struct Exchange {
    /// The response.
    pub response: reqwest::Response,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

impl Exchange {
    /// The body as it arrives. The exchange's concurrency places are held until the stream is
    /// dropped: a body being read counts against `upstream_max_concurrency`.
    pub fn into_body(
        self,
    ) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + use<> {
        use futures_util::StreamExt;
        let Exchange { response, _permits } = self;
        response.bytes_stream().map(move |chunk| {
            let _held = &_permits;
            chunk
        })
    }
}

/// Whether a system proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, less `NO_PROXY`) applies to
/// `upstream`, judged as reqwest's clients judge it (the same matcher reads the same variables).
fn proxied(upstream: &Url) -> bool {
    let Ok(uri) = hyper::Uri::try_from(upstream.as_str()) else {
        return true;
    };
    let proxied = hyper_util::client::proxy::matcher::Matcher::from_system()
        .intercept(&uri)
        .is_some();
    if proxied {
        tracing::info!(upstream = %upstream, "upstream requests go through the system proxy (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY)");
    }
    proxied
}

/// A manifest answer that is no manifest: never stored, never served.
fn not_a_manifest(content_type: Option<&MediaType>) -> Error {
    Error::BadResponse(match content_type {
        Some(t) => format!("manifest answer with Content-Type {t}: not a manifest type"),
        None => "manifest answer without Content-Type, and its body is no manifest".into(),
    })
}

/// The clients one thread's requests to the registry go out on.
#[derive(Debug, Clone)]
struct ClientPair {
    /// For blobs: follows redirects (to the CDN), up to reqwest's limit of 10.
    http: reqwest::Client,
    /// For the ping, manifests, tags and referrers lists: follows no redirect. A registry
    /// answers these itself; a redirect could only aim pullthrough at an address the upstream
    /// chose, and what came back would be stored and served as the manifest.
    api: reqwest::Client,
    /// For manifests, tags and referrers lists in `api`'s place, where no proxy applies to the
    /// upstream (see [`direct`]); it follows no redirect either.
    direct: Option<direct::Direct>,
}

/// What a [`ClientPair`] is made from.
#[derive(Debug)]
struct ClientSettings {
    connect_timeout: Duration,
    request_timeout: Duration,
    offline: Arc<Offline>,
    /// Shared by every client (see [`tls_config`]).
    tls: rustls::ClientConfig,
    /// A system proxy applies to the upstream: API requests go through reqwest, which honours
    /// it, instead of [`direct::Direct`].
    proxied: bool,
}

impl ClientSettings {
    /// What every upstream client shares; each sets its own redirect policy, and the blob
    /// client, whose downloads have no overall deadline, a read timeout. Every other request
    /// carries `request_timeout` as its whole deadline, body included.
    fn builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .referer(false)
            .user_agent(direct::USER_AGENT)
            .tls_backend_preconfigured(self.tls.clone())
    }

    /// New clients, with a connection pool of their own.
    fn pair(&self) -> reqwest::Result<ClientPair> {
        // Blob requests follow redirects (to the CDN) up to reqwest's limit of 10, and none
        // once offline mode is on.
        let redirects = {
            let offline = Arc::clone(&self.offline);
            reqwest::redirect::Policy::custom(move |attempt| {
                if offline.is_on() {
                    attempt.error(Error::Offline)
                } else if attempt.previous().len() >= 10 {
                    attempt.error("too many redirects")
                } else {
                    attempt.follow()
                }
            })
        };
        Ok(ClientPair {
            http: self
                .builder()
                .read_timeout(self.request_timeout)
                .redirect(redirects)
                .build()?,
            // A read timeout of `request_timeout` could only repeat its requests' own deadline
            // (two more timers per request, each waking the worker's event loop once).
            api: self
                .builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            direct: (!self.proxied).then(|| direct::Direct::new(self.connect_timeout, &self.tls)),
        })
    }
}

/// The clients of one upstream: a pair per per-core worker, made on its first request, and a
/// shared pair for every other thread. A pooled connection is driven by a task on the runtime
/// that opened it; with one pool for all, a worker's request would go through another
/// runtime's thread and its answer come back the same way (two thread wake-ups per request;
/// docs/benchmarks.md, fourth sitting). With a pool per worker, a worker's upstream
/// connections run on its own runtime, as its client connections do.
#[derive(Debug)]
struct Clients {
    shared: ClientPair,
    /// One per per-core worker (none under `work-stealing`).
    per_worker: Box<[OnceLock<ClientPair>]>,
    settings: ClientSettings,
}

impl Clients {
    /// The pair for the calling thread.
    fn here(&self) -> &ClientPair {
        let Some((_, slot)) = crate::worker::own(&self.per_worker) else {
            return &self.shared;
        };
        slot.get_or_init(|| {
            // The same settings made the shared pair at startup, so this does not fail in
            // practice; if it does, this worker shares that pair.
            self.settings.pair().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot make a worker's upstream client; it shares the main one");
                self.shared.clone()
            })
        })
    }
}

/// The TLS configuration of every upstream client, as reqwest makes its own (the system's root
/// certificates through rustls-platform-verifier, TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`),
/// made once per process: reqwest would read and parse the system's certificates for each
/// client it builds (6 ms and 120 KiB each here), and with a pair per per-core worker and
/// upstream there are many. Clones share the verifier and the session cache.
fn tls_config() -> anyhow::Result<rustls::ClientConfig> {
    static MADE: OnceLock<rustls::ClientConfig> = OnceLock::new();
    if let Some(tls) = MADE.get() {
        return Ok(tls.clone());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(Arc::clone(&provider)).map_err(|e| {
        anyhow::anyhow!("cannot load the system's CA certificates for TLS to the upstream: {e}")
    })?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(MADE.get_or_init(|| tls).clone())
}

/// A 4xx answer as [`Error::Rejected`], with the registry error code and message of its body
/// (distribution-spec §Error Codes) when it has them.
async fn rejected(status: u16, response: reqwest::Response) -> Error {
    let body = tokio::time::timeout(Duration::from_secs(2), read_limited(response, 64 * 1024))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (code, message) = registry_error(&body);
    Error::Rejected {
        status,
        code,
        message,
    }
}

/// Whether a 404's body is a registry's own error saying the content is not there
/// (distribution-spec §Error Codes: `MANIFEST_UNKNOWN`, `NAME_UNKNOWN`).
async fn registry_404(response: reqwest::Response) -> bool {
    let body = tokio::time::timeout(Duration::from_secs(2), read_limited(response, 64 * 1024))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    matches!(
        registry_error(&body).0.as_deref(),
        Some("MANIFEST_UNKNOWN" | "NAME_UNKNOWN")
    )
}

/// The first code and message of a registry error body, sanitised for passing on.
pub fn registry_error(body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    let Some(first) = serde_json::from_slice::<Body>(body)
        .ok()
        .and_then(|b| b.errors.into_iter().next())
    else {
        return (None, None);
    };
    let code = first.code.filter(|c| {
        !c.is_empty() && c.len() <= 64 && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
    });
    let message = first.message.map(|m| {
        m.chars()
            .filter(|c| !c.is_control())
            .take(256)
            .collect::<String>()
    });
    (code, message.filter(|m| !m.is_empty()))
}

/// Reads a whole body, refusing more than `limit` bytes.
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Bytes, Error> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(Error::from_reqwest)? {
        if buf.len() + chunk.len() > limit {
            return Err(Error::BadResponse(format!(
                "response larger than {limit} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(runtime: Runtime) -> Upstream {
        let config = Config {
            runtime,
            ..Config::default()
        };
        Upstream::new(
            &config,
            crate::metrics::Metrics::new(vec![]).for_upstream(0),
            Arc::new(Offline::new(false)),
        )
        .unwrap()
    }

    #[test]
    fn a_per_core_worker_has_clients_of_its_own_and_other_threads_share_one_pair() {
        let upstream = upstream(Runtime::PerCore);
        let clients = &upstream.clients;
        assert!(std::ptr::eq(clients.here(), &clients.shared));
        std::thread::scope(|s| {
            s.spawn(|| {
                crate::worker::enter(0);
                let own = clients.here();
                assert!(!std::ptr::eq(own, &clients.shared));
                assert!(std::ptr::eq(own, clients.here()), "made once");
            });
        });
        // A worker index beyond the workers counted shares the main pair.
        std::thread::scope(|s| {
            s.spawn(|| {
                crate::worker::enter(usize::MAX);
                assert!(std::ptr::eq(clients.here(), &clients.shared));
            });
        });
    }

    #[test]
    fn upstream_tls_offers_h2_then_http1_with_sni_as_reqwest_would() {
        let tls = tls_config().unwrap();
        assert_eq!(tls.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(tls.enable_sni);
    }

    #[test]
    fn under_work_stealing_every_thread_shares_one_pair() {
        let upstream = upstream(Runtime::WorkStealing);
        let clients = &upstream.clients;
        std::thread::scope(|s| {
            s.spawn(|| {
                crate::worker::enter(0);
                assert!(std::ptr::eq(clients.here(), &clients.shared));
            });
        });
    }
}
