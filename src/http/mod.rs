//! The HTTP boundary: routing, parsing, rendering. Handlers parse the request into registry
//! types, make one call into the core, and render. No caching decisions here.

mod api;
mod blobs;
mod cluster;
mod error;
pub mod listeners;
mod manifests;
mod observe;
mod ops;
pub mod path;
mod referrers;
pub mod server;
mod status;
mod tags;
pub mod tls;

use crate::error::Error;
use crate::metrics::{Outcome, Routed};
use crate::proxy::{ManifestRequest, TagsQuery};
use crate::registry::ByteRange;
use crate::registry::{Accept, ArtifactFilter};
use crate::state::AppState;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use path::RegistryPath;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::ServiceExt;

/// The header that says how an answer was obtained.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The one rendering of a cache outcome: its `X-Cache` value. Responses also carry the
/// [`Outcome`] itself as an extension, for the metrics (no parsing the header back).
pub fn x_cache(outcome: Outcome) -> HeaderValue {
    HeaderValue::from_static(outcome.as_str())
}

/// A JSON document pullthrough answers from its cache (a tags-list page, a referrers index):
/// the body for GET (`with_body`) or its length alone for HEAD, its media type, `X-Cache`, and
/// the [`Answer`] for the metrics.
fn cached_document(
    body: bytes::Bytes,
    media_type: &'static str,
    answer: Answer,
    with_body: bool,
) -> Response {
    let length = HeaderValue::from(body.len());
    let mut response = Response::new(if with_body {
        axum::body::Body::from(body)
    } else {
        axum::body::Body::empty()
    });
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    headers.insert(header::CONTENT_LENGTH, length);
    if let Some(outcome) = answer.outcome {
        headers.insert(X_CACHE, x_cache(outcome));
    }
    response.extensions_mut().insert(answer);
    response
}

/// How a request was answered, attached to its response for the metrics and the access log
/// (one extension, so one allocation).
#[derive(Debug, Clone, Copy, Default)]
pub struct Answer {
    /// The cache outcome, for answers with content.
    pub outcome: Option<Outcome>,
    /// Time spent waiting for upstream.
    pub upstream_wait: Option<Duration>,
    /// The upstream the request was routed to.
    pub routed: Option<Routed>,
}

impl Answer {
    /// An answer with `outcome`.
    pub fn of(outcome: Outcome) -> Answer {
        Answer {
            outcome: Some(outcome),
            ..Answer::default()
        }
    }
}

/// The complete router. The server sends it every request but registry requests, which
/// [`Front`] takes past it to `dispatch` (its fallback): a route added here under `/v2/`
/// must be excepted in `is_registry` too.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2/", axum::routing::any(api_version))
        .route("/v2", axum::routing::any(api_version))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(ops::readyz))
        .route("/metrics", axum::routing::get(ops::metrics))
        .route("/", axum::routing::get(status::page))
        .route(
            "/_pullthrough/cluster/blobs/{digest}",
            axum::routing::get(cluster::blob),
        )
        .nest("/_pullthrough", api::router(Arc::clone(&state)))
        // Registry requests are the fallback, not a `/v2/{*path}` route: a route would copy the
        // path into parameters (several allocations per request) that nothing reads.
        .fallback(registry_or_not_found)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            observe::observe,
        ))
        .with_state(state)
}

/// What answers every request: a registry request goes straight to `dispatch` under
/// `observe::observe`'s work, as the router would send it (to its fallback, under the same
/// layer), and anything else through the router. Skipped: the router's path matching, its
/// boxed services, futures and per-request extensions, about a sixth of a cache hit's
/// instructions (docs/benchmarks.md, tenth sitting).
#[derive(Debug, Clone)]
pub struct Front {
    router: Router,
    state: Arc<AppState>,
}

impl Front {
    /// `router`, built by [`router`] on `state`.
    pub fn new(router: Router, state: Arc<AppState>) -> Front {
        Front { router, state }
    }

    /// The response to `request` from the client at `peer`. Boxed: the future holds the whole
    /// request's state machine, which hyper would otherwise copy each time it moves it
    /// (kilobytes, per request). Built by combinators, not in an `async` block: a block that
    /// awaits the observer's future would copy all of it into its own state once more.
    pub fn answer(
        &self,
        mut request: Request,
        peer: std::net::SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = Response> + Send>> {
        use futures_util::FutureExt as _;
        if is_registry(request.uri().path()) {
            let head = request.method() == Method::HEAD;
            let (peer, state) = (Some(client_ip(peer)), Arc::clone(&self.state));
            let observed = observe::observed(Arc::clone(&self.state), request, move |request| {
                dispatch(state, request, peer)
            });
            return Box::pin(observed.map(move |response| as_routed(response, head)));
        }
        // The client's address, for the handlers that read it (loopback-only purges): an
        // extension, which registry requests are spared (an allocation or two each).
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        Box::pin(
            self.router
                .clone()
                .oneshot(request)
                .map(|answered| match answered {
                    Ok(response) => response,
                    Err(never) => match never {},
                }),
        )
    }
}

/// What the router does to every answer before it is sent (axum's `RouteFuture`), done to
/// those that skip it: a `Content-Length` from a body of known length, unless one is set, and
/// the body dropped from an answer to HEAD.
fn as_routed(mut response: Response, head: bool) -> Response {
    use axum::body::HttpBody;
    if !response.headers().contains_key(header::CONTENT_LENGTH)
        && let Some(length) = response.body().size_hint().exact()
    {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    if head {
        *response.body_mut() = axum::body::Body::empty();
    }
    response
}

/// Whether the router sends a request for `path` to `dispatch`: `/v2/` followed by
/// something, since no route but the fallback takes those.
fn is_registry(path: &str) -> bool {
    path.len() > "/v2/".len() && path.starts_with("/v2/")
}

/// `GET /v2/`: 200 `{}` tells clients this is a registry that needs no auth (protocol §1.2);
/// an `ns` naming a registry not mirrored here is 404, so containerd moves on.
async fn api_version(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (method, uri) = (request.method(), request.uri());
    if method != Method::GET && method != Method::HEAD {
        return Error::Unsupported(method.to_string()).into_response();
    }
    if let Err(e) = state.route("", uri.query()).await {
        return e.into_response();
    }
    if let Err(e) = state
        .check_login(authorization(&request), peer_ip(&request))
        .await
    {
        return e.into_response();
    }
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        "{}",
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
    response
}

/// `/v2/<anything>` is a registry request; anything else no route took is 404.
async fn registry_or_not_found(State(state): State<Arc<AppState>>, request: Request) -> Response {
    if is_registry(request.uri().path()) {
        let peer = peer_ip(&request);
        dispatch(state, request, peer).await
    } else {
        Error::NotFound(request.uri().path().to_owned()).into_response()
    }
}

/// Every registry request gets its response headers within the upstream deadline, however its
/// parts (learning the upstream's kind, fetching) add up; bodies stream on afterwards. `peer`
/// is the client's address.
async fn dispatch(
    state: Arc<AppState>,
    request: Request,
    peer: Option<std::net::IpAddr>,
) -> Response {
    let deadline = state.deadline;
    // Where the request was routed, known even when the deadline cuts it short (a 504 is
    // counted under its upstream too).
    let routed = AtomicUsize::new(usize::MAX);
    // The body is never read: a registry request is a GET or a HEAD (anything else is refused).
    let (parts, _body) = request.into_parts();
    let mut response = tokio::time::timeout(deadline, pull(&state, &parts, peer, &routed))
        .await
        .unwrap_or(Err(Error::GatewayTimeout))
        .unwrap_or_else(IntoResponse::into_response);
    let routed = match routed.load(Ordering::Relaxed) {
        usize::MAX => None,
        index => Some(Routed(index)),
    };
    match response.extensions_mut().get_mut::<Answer>() {
        Some(answer) => answer.routed = routed,
        None => {
            response.extensions_mut().insert(Answer {
                routed,
                ..Answer::default()
            });
        }
    }
    response
}

/// Serves a registry request from the client at `peer`, routed to its upstream (whose index
/// goes to `routed` once known). One function, borrowing the request `dispatch` holds: each
/// `async fn` between them would keep a copy of the request and copy the rest's state in.
async fn pull(
    state: &AppState,
    request: &axum::http::request::Parts,
    peer: Option<std::net::IpAddr>,
    routed: &AtomicUsize,
) -> Result<Response, Error> {
    let (method, uri, headers) = (&request.method, &request.uri, &request.headers);
    if method != Method::GET && method != Method::HEAD {
        return Err(Error::Unsupported(method.to_string()));
    }
    let tail = uri.path().strip_prefix("/v2/").unwrap_or_default();
    let (proxy, tail, default) = state.route(tail, uri.query()).await?;
    routed.store(proxy.upstream.metrics.index(), Ordering::Relaxed);
    // Validate before anything can reach upstream; learn Hub-ness only for names that need it.
    let mut target = RegistryPath::parse(tail, false)?;
    let tags_query = match target {
        RegistryPath::TagsList { .. } => TagsQuery::parse(uri.query())?,
        _ => TagsQuery::default(),
    };
    let filter = match target {
        RegistryPath::Referrers { .. } => {
            ArtifactFilter::parse(uri.query()).map_err(|e| Error::QueryInvalid(e.to_string()))?
        }
        _ => ArtifactFilter::default(),
    };
    if default && !target.name().as_str().contains('/') && state.docker_hub().await? {
        target = RegistryPath::parse(tail, true)?;
    }
    state
        .authorize(
            authorization_in(headers),
            peer,
            &proxy,
            target.name().as_str(),
        )
        .await?;
    let with_body = method == Method::GET;
    match target {
        RegistryPath::Manifest { name, reference } => {
            let accept = Accept::parse(
                headers
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let request = ManifestRequest {
                name,
                reference,
                accept,
                want_body: with_body,
            };
            let served = proxy.manifest(&request).await?;
            Ok(manifests::respond(served, headers, with_body))
        }
        RegistryPath::Blob { name, digest } => {
            if with_body {
                let range = headers
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(ByteRange::parse);
                let body = Box::pin(proxy.blob(&name, &digest, range)).await?;
                Ok(blobs::respond(&digest, body, &state.metrics))
            } else {
                let head = Box::pin(proxy.blob_head(&name, &digest)).await?;
                Ok(blobs::respond_head(&digest, head))
            }
        }
        RegistryPath::Referrers { name, digest } => {
            let answer = Box::pin(proxy.referrers(&name, &digest, &filter)).await?;
            Ok(referrers::respond(answer, with_body))
        }
        RegistryPath::TagsList { name } => {
            let mut page = Box::pin(proxy.tags_list(&name, tags_query)).await?;
            // The next page is reached the way this one was: by host prefix, or with `ns`.
            let prefix = format!("/v2/{}/", proxy.name());
            if !default && uri.path().starts_with(&prefix) {
                page.link = page
                    .link
                    .map(|l| l.replacen("</v2/", &format!("<{prefix}"), 1));
            } else if !default {
                let ns = format!("ns={}", proxy.name());
                page.link = page.link.map(|l| match l.split_once('>') {
                    Some((target, rest)) if target.contains('?') => {
                        format!("{target}&{ns}>{rest}")
                    }
                    Some((target, rest)) => format!("{target}?{ns}>{rest}"),
                    None => l,
                });
            }
            Ok(tags::respond(page, with_body))
        }
    }
}

/// The `Authorization` header, as text.
pub(crate) fn authorization(request: &Request) -> Option<&str> {
    authorization_in(request.headers())
}

/// The `Authorization` header among `headers`, as text.
fn authorization_in(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// The client's address.
pub(crate) fn peer_ip(request: &Request) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| client_ip(c.0))
}

/// The address of the client at `peer` as access rules see it: an IPv4 client on a dual-stack
/// listener (`::ffff:a.b.c.d`) as IPv4.
fn client_ip(peer: std::net::SocketAddr) -> std::net::IpAddr {
    peer.ip().to_canonical()
}

/// Milliseconds with microsecond precision, printed without float noise (`0.068`, not
/// `0.06760100000000001`): whole microseconds divided once.
pub(crate) fn millis(d: Duration) -> f64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX) as f64 / 1000.0
}
