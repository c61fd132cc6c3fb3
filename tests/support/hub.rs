//! An emulated Docker Hub, faithful to registry-protocol.md §10: `/v2/` and repositories
//! answer 401 with a Bearer challenge naming a token realm on another port; tokens expire;
//! private repositories need credentials (OAuth2 POST or GET with Basic); manifest GETs spend
//! a rate-limit budget that HEADs only report; Accept is negotiated as Hub does; blobs
//! redirect (307) to a "CDN" listener that rejects `Authorization`, supports Range and sends
//! no digest. Every request is counted; faults can be injected.

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An injectable misbehaviour.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Registry endpoints (not /token, not the CDN) answer this status.
    Status(u16),
    /// Registry endpoints wait this long first.
    Delay(Duration),
    /// Registry endpoints wait until the gate opens.
    Hold(Gate),
    /// Registry endpoints accept and never answer.
    BlackHole,
    /// Manifest GETs answer 429 with this Retry-After.
    TooMany(u64),
    /// Every request gets Hub's plain-text abuse 429.
    Abuse,
    /// The token endpoint answers 500.
    TokenDown,
    /// The CDN flips a byte in the middle of blobs.
    CorruptBlob,
    /// The CDN stops half way through blobs.
    TruncateBlob,
    /// The CDN sends each 64 KiB chunk after this pause.
    SlowBlob(Duration),
    /// Blob HEADs redirect to the CDN too, which refuses HEAD with 405.
    CdnRefusesHead,
    /// The CDN ignores `Range` and always sends the whole blob with 200.
    IgnoreRange,
}

/// What [`Fault::Hold`] waits for: held requests go on once it opens.
#[derive(Debug, Clone)]
pub struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

impl Gate {
    pub fn new() -> Gate {
        Gate(Arc::new(tokio::sync::watch::channel(false).0))
    }

    /// Lets every held request (and every later one) go on.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    /// Opens the gate after `after`, however the test goes: a request that should not have
    /// waited for it then shows as slow instead of hanging.
    pub fn open_after(&self, after: Duration) {
        let gate = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            gate.open();
        });
    }

    async fn passed(&self) {
        let _ = self.0.subscribe().wait_for(|open| *open).await;
    }
}

impl PartialEq for Gate {
    fn eq(&self, other: &Gate) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[derive(Default)]
struct Repo {
    private: bool,
    tags: BTreeMap<String, String>,
    manifests: HashMap<String, (Bytes, String)>,
    blobs: HashMap<String, Bytes>,
}

struct TokenGrant {
    repos: Vec<String>,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    repos: HashMap<String, Repo>,
    tokens: HashMap<String, TokenGrant>,
    users: HashMap<String, String>,
    faults: Vec<Fault>,
    limit: u64,
    remaining: u64,
    expires_in: u64,
    counts: HashMap<String, u64>,
    token_seq: u64,
    support_post: bool,
    realm_host: Option<String>,
    /// The next this-many CDN responses break off half way.
    breaks_left: u32,
    /// The registry answers the OCI 1.1 referrers API (Docker Hub did not, until 2025).
    referrers_api: bool,
    /// Descriptors per referrers page (0: all in one).
    referrers_page: usize,
    /// Where the referrers `Link` points (None: a relative link, to this registry).
    referrers_link_base: Option<String>,
}

#[derive(Clone)]
pub struct FakeHub {
    pub url: String,
    pub token_url: String,
    pub cdn_url: String,
    inner: Arc<Mutex<Inner>>,
    in_flight: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    tasks: Arc<Vec<tokio::task::AbortHandle>>,
}

/// A built image: its manifest bytes, media type and digest, and its blobs.
#[derive(Clone, Debug)]
pub struct Image {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: String,
    pub blobs: Vec<Bytes>,
    pub children: Vec<Image>,
}

impl Image {
    /// A single-platform image: a config and `layers` deterministic layers of `layer_size`.
    pub fn single(seed: &str, media_type: &str, layer_size: usize) -> Image {
        let config = Bytes::from(format!(
            r#"{{"architecture":"amd64","os":"linux","seed":"{seed}"}}"#
        ));
        let layer = Bytes::from(pattern(seed, layer_size));
        let (cfg_type, layer_type) = if media_type.contains("oci") {
            (
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        } else {
            (
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        };
        // Hub's stored JSON escapes '/' as '\/': serving anything re-serialized changes the digest.
        let json = format!(
            "{{\n   \"schemaVersion\": 2,\n   \"mediaType\": \"{}\",\n   \"config\": {{\"mediaType\": \"{}\", \"size\": {}, \"digest\": \"{}\"}},\n   \"layers\": [{{\"mediaType\": \"{}\", \"size\": {}, \"digest\": \"{}\"}}]\n}}",
            media_type.replace('/', "\\/"),
            cfg_type,
            config.len(),
            sha256(&config),
            layer_type,
            layer.len(),
            sha256(&layer)
        );
        let bytes = Bytes::from(json);
        Image {
            digest: sha256(&bytes),
            bytes,
            media_type: media_type.to_owned(),
            blobs: vec![config, layer],
            children: vec![],
        }
    }

    /// An index or list over (arch, image) pairs.
    pub fn index(media_type: &str, children: Vec<(&str, Image)>) -> Image {
        let entries: Vec<String> = children
            .iter()
            .map(|(arch, c)| {
                format!(
                    r#"{{"mediaType":"{}","digest":"{}","size":{},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
                    c.media_type.replace('/', "\\/"),
                    c.digest,
                    c.bytes.len()
                )
            })
            .collect();
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{}]}}"#,
            media_type.replace('/', "\\/"),
            entries.join(",")
        );
        let bytes = Bytes::from(json);
        Image {
            digest: sha256(&bytes),
            bytes,
            media_type: media_type.to_owned(),
            blobs: vec![],
            children: children.into_iter().map(|(_, c)| c).collect(),
        }
    }
}

/// The empty config of OCI artifacts (image-spec `manifest.md` §Guidance for an Empty
/// Descriptor).
pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

impl Image {
    /// An OCI artifact referring to `subject`: the empty config, `artifactType`, one layer of
    /// `layer_type` holding `content`, and an annotation.
    pub fn artifact(seed: &str, artifact_type: &str, subject: &Image) -> Image {
        let config = Bytes::from_static(b"{}");
        let layer = Bytes::from(format!("{seed}: content of type {artifact_type}\n"));
        Image::artifact_with(
            artifact_type,
            (EMPTY_CONFIG, config),
            ("application/vnd.oci.image.layer.v1.tar", layer),
            Some(subject),
            &format!(
                r#"{{"org.opencontainers.image.created":"2026-12-06T00:00:00Z","seed":"{seed}"}}"#
            ),
        )
    }

    /// An OCI manifest with this config and layer (media type, bytes), `artifactType` (when
    /// not empty), a `subject` and manifest annotations (a JSON object).
    pub fn artifact_with(
        artifact_type: &str,
        (config_type, config): (&str, Bytes),
        (layer_type, layer): (&str, Bytes),
        subject: Option<&Image>,
        annotations: &str,
    ) -> Image {
        let mut json =
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json""#
                .to_owned();
        if !artifact_type.is_empty() {
            json.push_str(&format!(r#","artifactType":"{artifact_type}""#));
        }
        json.push_str(&format!(
            r#","config":{{"mediaType":"{config_type}","digest":"{}","size":{}}},"layers":[{{"mediaType":"{layer_type}","digest":"{}","size":{}}}]"#,
            sha256(&config),
            config.len(),
            sha256(&layer),
            layer.len()
        ));
        if let Some(s) = subject {
            json.push_str(&format!(
                r#","subject":{{"mediaType":"{}","digest":"{}","size":{}}}"#,
                s.media_type,
                s.digest,
                s.bytes.len()
            ));
        }
        json.push_str(&format!(r#","annotations":{annotations}}}"#));
        let bytes = Bytes::from(json);
        Image {
            digest: sha256(&bytes),
            bytes,
            media_type: "application/vnd.oci.image.manifest.v1+json".to_owned(),
            blobs: vec![config, layer],
            children: vec![],
        }
    }

    /// The descriptor a referrers list gives `self`: media type, digest, size, and the
    /// manifest's `artifactType` (else its config's media type) and annotations.
    pub fn referrer_descriptor(&self) -> serde_json::Value {
        let m: serde_json::Value = serde_json::from_slice(&self.bytes).unwrap();
        let artifact_type = m
            .get("artifactType")
            .cloned()
            .unwrap_or_else(|| m["config"]["mediaType"].clone());
        let mut d = serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
            "artifactType": artifact_type,
        });
        if let Some(a) = m.get("annotations") {
            d["annotations"] = a.clone();
        }
        d
    }

    /// The index a client of a registry without the referrers API pushes under the subject's
    /// tag (`sha256-<hex>`): the descriptors of `referrers`.
    pub fn referrers_index(referrers: &[&Image]) -> Image {
        let manifests: Vec<_> = referrers.iter().map(|r| r.referrer_descriptor()).collect();
        let bytes = Bytes::from(
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests,
            })
            .to_string(),
        );
        Image {
            digest: sha256(&bytes),
            bytes,
            media_type: "application/vnd.oci.image.index.v1+json".to_owned(),
            blobs: vec![],
            children: vec![],
        }
    }
}

/// The referrers tag schema's tag of `digest` (`sha256:<hex>` → `sha256-<hex>`).
pub fn referrers_tag(digest: &str) -> String {
    digest.replace(':', "-")
}

/// Deterministic bytes.
pub fn pattern(seed: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut block = Sha256::digest(seed.as_bytes()).to_vec();
    while out.len() < size {
        out.extend_from_slice(&block);
        block = Sha256::digest(&block).to_vec();
    }
    out.truncate(size);
    out
}

impl FakeHub {
    pub async fn start() -> FakeHub {
        let registry = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inner = Inner {
            limit: 100,
            remaining: 100,
            expires_in: 300,
            support_post: true,
            ..Inner::default()
        };
        let mut hub = FakeHub {
            url: format!("http://{}", registry.local_addr().unwrap()),
            token_url: format!("http://{}/token", token.local_addr().unwrap()),
            cdn_url: format!("http://{}", cdn.local_addr().unwrap()),
            inner: Arc::new(Mutex::new(inner)),
            in_flight: Arc::default(),
            peak: Arc::default(),
            tasks: Arc::new(vec![]),
        };
        let r = Router::new()
            .fallback(registry_handler)
            .with_state(hub.clone());
        let t = Router::new()
            .fallback(token_handler)
            .with_state(hub.clone());
        let c = Router::new().fallback(cdn_handler).with_state(hub.clone());
        let tasks = vec![
            tokio::spawn(async move { axum::serve(registry, r).await.unwrap() }).abort_handle(),
            tokio::spawn(async move { axum::serve(token, t).await.unwrap() }).abort_handle(),
            tokio::spawn(async move { axum::serve(cdn, c).await.unwrap() }).abort_handle(),
        ];
        hub.tasks = Arc::new(tasks);
        hub
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap())
    }

    /// Pushes an image (and its children and blobs) and points `tag` at it.
    /// This hub as an `[[upstreams]]` entry standing for `host`.
    pub fn as_upstream(&self, host: &str) -> pullthrough::config::UpstreamConfig {
        pullthrough::config::UpstreamConfig::new(host, self.url.parse().unwrap())
    }

    pub fn push(&self, repo: &str, tag: &str, image: &Image) {
        self.push_untagged(repo, image);
        self.with(|i| {
            i.repos
                .entry(repo.into())
                .or_default()
                .tags
                .insert(tag.into(), image.digest.clone())
        });
    }

    pub fn push_untagged(&self, repo: &str, image: &Image) {
        self.with(|i| {
            let r = i.repos.entry(repo.into()).or_default();
            r.manifests.insert(
                image.digest.clone(),
                (image.bytes.clone(), image.media_type.clone()),
            );
            for b in &image.blobs {
                r.blobs.insert(sha256(b), b.clone());
            }
        });
        for c in &image.children {
            self.push_untagged(repo, c);
        }
    }

    pub fn push_blob(&self, repo: &str, blob: Bytes) -> String {
        let d = sha256(&blob);
        self.with(|i| {
            i.repos
                .entry(repo.into())
                .or_default()
                .blobs
                .insert(d.clone(), blob)
        });
        d
    }

    pub fn delete_tag(&self, repo: &str, tag: &str) {
        self.with(|i| i.repos.get_mut(repo).map(|r| r.tags.remove(tag)));
    }

    pub fn make_private(&self, repo: &str) {
        self.with(|i| i.repos.entry(repo.into()).or_default().private = true);
    }

    pub fn add_user(&self, user: &str, password: &str) {
        self.with(|i| i.users.insert(user.into(), password.into()));
    }

    pub fn set_token_lifetime(&self, secs: u64) {
        self.with(|i| i.expires_in = secs);
    }

    /// Names the token realm by this host instead of 127.0.0.1 (e.g. "localhost", a
    /// different host as far as credential forwarding is concerned).
    pub fn set_realm_host(&self, host: &str) {
        self.with(|i| i.realm_host = Some(host.to_owned()));
    }

    /// The next `n` CDN responses break off half way through their body.
    pub fn break_next_streams(&self, n: u32) {
        self.with(|i| i.breaks_left = n);
    }

    /// Every token issued so far stops working.
    pub fn revoke_tokens(&self) {
        self.with(|i| i.tokens.clear());
    }

    pub fn set_oauth_post(&self, supported: bool) {
        self.with(|i| i.support_post = supported);
    }

    pub fn set_budget(&self, limit: u64, remaining: u64) {
        self.with(|i| {
            i.limit = limit;
            i.remaining = remaining;
        });
    }

    /// A new rate-limit window: the budget is full again.
    pub fn reset_window(&self) {
        self.with(|i| i.remaining = i.limit);
    }

    /// Turns the OCI 1.1 referrers API on or off (off: 404, as Docker Hub and distribution
    /// 2.8 answer), with `page` descriptors per page (0: one page).
    pub fn set_referrers_api(&self, on: bool, page: usize) {
        self.with(|i| {
            i.referrers_api = on;
            i.referrers_page = page;
        });
    }

    /// Makes the referrers API's `Link` point at `base` (another origin) instead of itself.
    pub fn set_referrers_link_base(&self, base: &str) {
        self.with(|i| i.referrers_link_base = Some(base.to_owned()));
    }

    pub fn fault(&self, fault: Fault) {
        self.with(|i| i.faults.push(fault));
    }

    pub fn clear_faults(&self) {
        self.with(|i| i.faults.clear());
    }

    fn faults(&self) -> Vec<Fault> {
        self.with(|i| i.faults.clone())
    }

    /// Requests counted under `key`: `token`, `manifest_get`, `manifest_head`, `blob_get`,
    /// `blob_head`, `cdn_get`, `tags`, `referrers`, `ping`, or `GET <path>` / `HEAD <path>`.
    pub fn count(&self, key: &str) -> u64 {
        self.with(|i| i.counts.get(key).copied().unwrap_or(0))
    }

    /// Every registry and token request made so far, but `/v2/` pings: pullthrough pings each
    /// upstream once at startup, whatever its clients do (`count("ping")` counts them).
    pub fn total(&self) -> u64 {
        [
            "token",
            "manifest_get",
            "manifest_head",
            "blob_get",
            "blob_head",
            "tags",
            "referrers",
            "other",
        ]
        .iter()
        .map(|k| self.count(k))
        .sum()
    }

    pub fn peak_in_flight(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    fn bump(&self, key: &str) {
        self.with(|i| *i.counts.entry(key.into()).or_default() += 1);
    }

    fn challenge(&self, scope: Option<&str>, error: Option<&str>) -> String {
        let realm = match self.with(|i| i.realm_host.clone()) {
            Some(host) => self.token_url.replace("127.0.0.1", &host),
            None => self.token_url.clone(),
        };
        let mut c = format!(r#"Bearer realm="{realm}",service="registry.docker.io""#);
        if let Some(s) = scope {
            c.push_str(&format!(r#",scope="{s}""#));
        }
        if let Some(e) = error {
            c.push_str(&format!(r#",error="{e}""#));
        }
        c
    }

    /// The repos a bearer token grants, or why not.
    fn authorize(&self, headers: &HeaderMap, repo: &str) -> Result<(), Option<&'static str>> {
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return Err(None);
        };
        self.with(|i| match i.tokens.get(token) {
            None => Err(Some("invalid_token")),
            Some(g) if g.expires < Instant::now() => Err(Some("invalid_token")),
            Some(g) if g.repos.iter().any(|r| r == repo) => Ok(()),
            Some(_) => Err(Some("insufficient_scope")),
        })
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if Arc::strong_count(&self.tasks) == 1 {
            for t in self.tasks.iter() {
                t.abort();
            }
        }
    }
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"{message}","detail":null}}]}}"#);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

struct FlightGuard(Arc<AtomicU64>);
impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn registry_handler(State(hub): State<FakeHub>, request: Request) -> Response {
    let now = hub.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    hub.peak.fetch_max(now, Ordering::SeqCst);
    let _guard = FlightGuard(hub.in_flight.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    hub.bump(&format!("{method} {path}"));
    for fault in hub.faults() {
        match fault {
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Hold(gate) => gate.passed().await,
            Fault::BlackHole => std::future::pending::<()>().await,
            Fault::Abuse => {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [
                        (header::CONTENT_TYPE, "text/plain"),
                        (header::RETRY_AFTER, "60"),
                    ],
                    "Too Many Requests (HAP429).",
                )
                    .into_response();
            }
            _ => {}
        }
    }
    let mut response = route(&hub, &method, &path, &query, request.headers()).await;
    response.headers_mut().insert(
        "docker-distribution-api-version",
        "registry/2.0".parse().unwrap(),
    );
    response
}

async fn route(
    hub: &FakeHub,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
) -> Response {
    if path == "/v2/" || path == "/v2" {
        hub.bump("ping");
        let mut r = json_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authentication required",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            hub.challenge(None, None).parse().unwrap(),
        );
        return r;
    }
    let tail = path.strip_prefix("/v2/").unwrap_or_default();
    let (repo, kind, reference) = if let Some(repo) = tail.strip_suffix("/tags/list") {
        (repo.to_owned(), "tags", String::new())
    } else if let Some((repo, r)) = tail.rsplit_once("/manifests/") {
        (repo.to_owned(), "manifest", r.to_owned())
    } else if let Some((repo, r)) = tail.rsplit_once("/blobs/") {
        (repo.to_owned(), "blob", r.to_owned())
    } else if let Some((repo, r)) = tail
        .rsplit_once("/referrers/")
        .filter(|_| hub.with(|i| i.referrers_api))
    {
        (repo.to_owned(), "referrers", r.to_owned())
    } else {
        hub.bump("other");
        return json_error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found");
    };
    let counter = match (kind, method == Method::HEAD) {
        ("manifest", false) => "manifest_get",
        ("manifest", true) => "manifest_head",
        ("blob", false) => "blob_get",
        ("blob", true) => "blob_head",
        ("referrers", _) => "referrers",
        _ => "tags",
    };
    hub.bump(counter);
    for fault in hub.faults() {
        match fault {
            Fault::Status(s) => {
                return json_error(
                    StatusCode::from_u16(s).unwrap(),
                    "UNAVAILABLE",
                    "injected fault",
                );
            }
            Fault::TooMany(secs) if counter == "manifest_get" => {
                let mut r = json_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    "You have reached your unauthenticated pull rate limit. https://www.docker.com/increase-rate-limit",
                );
                r.headers_mut().insert(header::RETRY_AFTER, secs.into());
                return r;
            }
            _ => {}
        }
    }
    let scope = format!("repository:{repo}:pull");
    if let Err(error) = hub.authorize(headers, &repo) {
        let mut r = if error == Some("insufficient_scope") {
            let body = format!(
                r#"{{"errors":[{{"code":"DENIED","message":"requested access to the resource is denied"}},{{"code":"UNAUTHORIZED","message":"authentication required","detail":[{{"Action":"pull","Class":"","Name":"{repo}","Type":"repository"}}]}}]}}"#
            );
            (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        } else {
            json_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authentication required",
            )
        };
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            hub.challenge(Some(&scope), error).parse().unwrap(),
        );
        return r;
    }
    match kind {
        "manifest" => manifest(hub, method, &repo, &reference, headers),
        "blob" => blob(
            hub,
            method,
            &repo,
            &reference,
            hub.faults().contains(&Fault::CdnRefusesHead),
        ),
        "referrers" => referrers(hub, &repo, &reference, query),
        _ => tags(hub, &repo, query),
    }
}

/// The referrers API: the descriptors of the repository's manifests whose `subject` is
/// `digest`, in digest order, `page` of them per answer with a `Link` to the next.
fn referrers(hub: &FakeHub, repo: &str, digest: &str, query: &str) -> Response {
    let (manifests, page, link_base) = hub.with(|i| {
        let all: Vec<(Bytes, String)> = i
            .repos
            .get(repo)
            .map(|r| r.manifests.values().cloned().collect())
            .unwrap_or_default();
        (all, i.referrers_page, i.referrers_link_base.clone())
    });
    let mut found: Vec<serde_json::Value> = manifests
        .into_iter()
        .filter_map(|(bytes, media_type)| {
            let m: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            (m["subject"]["digest"] == digest).then(|| {
                Image {
                    digest: sha256(&bytes),
                    bytes,
                    media_type,
                    blobs: vec![],
                    children: vec![],
                }
                .referrer_descriptor()
            })
        })
        .collect();
    found.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let start: usize = params.get("page").and_then(|p| p.parse().ok()).unwrap_or(0);
    let size = if page == 0 { found.len().max(1) } else { page };
    let slice: Vec<_> = found
        .iter()
        .skip(start * size)
        .take(size)
        .cloned()
        .collect();
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": slice,
    })
    .to_string();
    let mut r = (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/vnd.oci.image.index.v1+json",
        )],
        body,
    )
        .into_response();
    if (start + 1) * size < found.len() {
        let link = format!(
            "<{}/v2/{repo}/referrers/{digest}?page={}>; rel=\"next\"",
            link_base.unwrap_or_default(),
            start + 1
        );
        r.headers_mut().insert(header::LINK, link.parse().unwrap());
    }
    r
}

fn rate_headers(r: &mut Response, limit: u64, remaining: u64) {
    let h = r.headers_mut();
    h.insert(
        "ratelimit-limit",
        format!("{limit};w=21600").parse().unwrap(),
    );
    h.insert(
        "ratelimit-remaining",
        format!("{remaining};w=21600").parse().unwrap(),
    );
    h.insert("docker-ratelimit-source", "192.0.2.1".parse().unwrap());
}

fn manifest(
    hub: &FakeHub,
    method: &Method,
    repo: &str,
    reference: &str,
    headers: &HeaderMap,
) -> Response {
    let accept: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.split(';').next().unwrap().trim().to_owned())
        .collect();
    let found = hub.with(|i| {
        let r = i.repos.get(repo)?;
        let digest = if reference.contains(':') {
            reference.to_owned()
        } else {
            r.tags.get(reference)?.clone()
        };
        let (bytes, mt) = r.manifests.get(&digest)?.clone();
        Some((bytes, mt, digest, r.manifests.clone()))
    });
    let Some((mut bytes, mut mt, mut digest, all)) = found else {
        return json_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
        );
    };
    let accepts = |t: &str| accept.iter().any(|a| a == t || a == "*/*");
    if !accept.is_empty() && !accepts(&mt) {
        if mt == "application/vnd.oci.image.index.v1+json" {
            return json_error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "OCI index found, but accept header does not support OCI indexes",
            );
        }
        if mt == "application/vnd.oci.image.manifest.v1+json" {
            return json_error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "OCI manifest found, but accept header does not support OCI manifests",
            );
        }
        if mt == "application/vnd.docker.distribution.manifest.list.v2+json"
            && !reference.contains(':')
        {
            let list: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let child = list["manifests"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["platform"]["architecture"] == "amd64")
                .unwrap();
            digest = child["digest"].as_str().unwrap().to_owned();
            (bytes, mt) = all[&digest].clone();
        }
    }
    let (limit, remaining) = hub.with(|i| (i.limit, i.remaining));
    if *method == Method::GET {
        if remaining == 0 {
            let mut r = json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                "You have reached your unauthenticated pull rate limit. https://www.docker.com/increase-rate-limit",
            );
            rate_headers(&mut r, limit, 0);
            return r;
        }
        hub.with(|i| i.remaining -= 1);
    }
    let remaining = hub.with(|i| i.remaining);
    let len = bytes.len();
    let body = if *method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    let mut r = Response::builder()
        .header(header::CONTENT_TYPE, mt)
        .header(header::CONTENT_LENGTH, len)
        .header("docker-content-digest", &digest)
        .header(header::ETAG, format!("\"{digest}\""))
        .body(body)
        .unwrap();
    rate_headers(&mut r, limit, remaining);
    r
}

fn blob(
    hub: &FakeHub,
    method: &Method,
    repo: &str,
    digest: &str,
    redirect_heads: bool,
) -> Response {
    let Some(blob) = hub.with(|i| i.repos.get(repo).and_then(|r| r.blobs.get(digest).cloned()))
    else {
        return json_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "blob unknown to registry",
        );
    };
    if *method == Method::HEAD && !redirect_heads {
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, blob.len())
            .header("docker-content-digest", digest)
            .body(Body::empty())
            .unwrap();
    }
    let location = format!(
        "{}/registry-v2/{}/{}/data?verify=1",
        hub.cdn_url, repo, digest
    );
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(header::LOCATION, location)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .unwrap()
}

fn tags(hub: &FakeHub, repo: &str, query: &str) -> Response {
    let Some(all) = hub.with(|i| {
        i.repos
            .get(repo)
            .map(|r| r.tags.keys().cloned().collect::<Vec<_>>())
    }) else {
        return json_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known to registry",
        );
    };
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let n: usize = params.get("n").and_then(|n| n.parse().ok()).unwrap_or(100);
    let after: Vec<&String> = all
        .iter()
        .filter(|t| params.get("last").is_none_or(|l| t.as_str() > l.as_str()))
        .collect();
    let page: Vec<&String> = after.iter().take(n).copied().collect();
    let body = serde_json::json!({ "name": repo, "tags": page }).to_string();
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    if after.len() > n && n > 0 {
        let link = format!(
            "</v2/{repo}/tags/list?last={}&n={n}>; rel=\"next\"",
            page.last().unwrap()
        );
        r.headers_mut().insert(header::LINK, link.parse().unwrap());
    }
    r
}

async fn token_handler(State(hub): State<FakeHub>, request: Request) -> Response {
    hub.bump("token");
    if hub.faults().contains(&Fault::TokenDown) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response();
    }
    let method = request.method().clone();
    let basic = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let query = request.uri().query().unwrap_or_default().to_owned();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap();
    type Pairs = Vec<(String, String)>;
    let (params, user): (Pairs, Option<(String, String)>) = if method == Method::POST {
        if !hub.with(|i| i.support_post) {
            return (StatusCode::NOT_FOUND, "404 page not found").into_response();
        }
        hub.bump("token_post");
        let p: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
        let get = |k: &str| p.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        if get("grant_type").as_deref() != Some("password") || get("client_id").is_none() {
            return (StatusCode::BAD_REQUEST, "bad grant").into_response();
        }
        let user = get("username").zip(get("password"));
        let scopes = get("scope")
            .unwrap_or_default()
            .split(' ')
            .map(|s| ("scope".to_owned(), s.to_owned()))
            .collect();
        (scopes, user)
    } else {
        use base64::Engine as _;
        let user = basic.and_then(|b| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b.strip_prefix("Basic ")?)
                .ok()?;
            let s = String::from_utf8(raw).ok()?;
            let (u, p) = s.split_once(':')?;
            Some((u.to_owned(), p.to_owned()))
        });
        (
            url::form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect(),
            user,
        )
    };
    if user.is_some() {
        hub.bump("token_with_credentials");
    }
    let authed = match &user {
        Some((u, p)) => {
            if hub.with(|i| i.users.get(u) != Some(p)) {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"details":"incorrect username or password"}"#,
                )
                    .into_response();
            }
            true
        }
        None => false,
    };
    let repos: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, v)| {
            v.strip_prefix("repository:")?
                .strip_suffix(":pull")
                .map(str::to_owned)
        })
        .filter(|r| hub.with(|i| i.repos.get(r).is_some_and(|repo| !repo.private || authed)))
        .collect();
    let (token, expires_in) = hub.with(|i| {
        i.token_seq += 1;
        let token = format!("tok{}", i.token_seq);
        i.tokens.insert(
            token.clone(),
            TokenGrant {
                repos,
                expires: Instant::now() + Duration::from_secs(i.expires_in),
            },
        );
        (token, i.expires_in)
    });
    let body = serde_json::json!({ "token": token, "access_token": token, "expires_in": expires_in, "issued_at": "2026-11-26T00:00:00Z" }).to_string();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn cdn_handler(State(hub): State<FakeHub>, request: Request) -> Response {
    hub.bump("cdn_get");
    if request.method() == Method::HEAD && hub.faults().contains(&Fault::CdnRefusesHead) {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    if request.headers().contains_key(header::AUTHORIZATION) {
        return (StatusCode::BAD_REQUEST, "Authorization header not allowed").into_response();
    }
    let path = request.uri().path().to_owned();
    let Some((repo, digest)) = path
        .strip_prefix("/registry-v2/")
        .and_then(|p| p.strip_suffix("/data"))
        .and_then(|p| p.rsplit_once('/'))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(blob) = hub.with(|i| i.repos.get(repo).and_then(|r| r.blobs.get(digest).cloned()))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let faults = hub.faults();
    let mut data = blob.to_vec();
    if faults.contains(&Fault::CorruptBlob) {
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
    }
    let total = data.len();
    let range = request
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .filter(|_| !faults.contains(&Fault::IgnoreRange));
    let (status, start, end) = match range {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap();
            let start: usize = a.parse().unwrap_or(0);
            let end: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse::<usize>().unwrap().min(total - 1)
            };
            if start >= total {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{total}"))],
                )
                    .into_response();
            }
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
        None => (StatusCode::OK, 0, total - 1),
    };
    let slice = Bytes::from(data).slice(start..=end);
    let len = slice.len();
    let break_now = hub.with(|i| {
        let hit = i.breaks_left > 0;
        i.breaks_left = i.breaks_left.saturating_sub(1);
        hit
    });
    let truncate = faults.contains(&Fault::TruncateBlob) || break_now;
    let slow = faults.iter().find_map(|f| {
        if let Fault::SlowBlob(d) = f {
            Some(*d)
        } else {
            None
        }
    });
    let stream = async_stream(slice, truncate, slow);
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, "\"d41d8cd98f00b204e9800998ecf8427e\"")
        .header(header::CONTENT_LENGTH, len);
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{total}"),
        );
    }
    builder.body(stream).unwrap()
}

fn async_stream(data: Bytes, truncate: bool, slow: Option<Duration>) -> Body {
    let chunk = 64 * 1024;
    let stop_at = if truncate { data.len() / 2 } else { data.len() };
    let stream = futures_util::stream::unfold(0usize, move |offset| {
        let data = data.clone();
        async move {
            if offset >= stop_at {
                if truncate && offset < data.len() {
                    return Some((Err(std::io::Error::other("truncated")), data.len()));
                }
                return None;
            }
            if let Some(d) = slow {
                tokio::time::sleep(d).await;
            }
            let end = (offset + chunk).min(stop_at);
            Some((Ok::<_, std::io::Error>(data.slice(offset..end)), end))
        }
    });
    Body::from_stream(stream)
}
