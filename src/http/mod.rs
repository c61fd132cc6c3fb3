//! The HTTP boundary: routing, parsing, rendering. Handlers parse the request into registry
//! types, make one call into the core, and render. No caching decisions here.

mod blobs;
mod error;
mod manifests;
pub mod path;
pub mod server;
mod tags;

use crate::blobs::ByteRange;
use crate::error::Error;
use crate::proxy::{ManifestRequest, TagsQuery};
use crate::registry::Accept;
use crate::state::AppState;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use path::RegistryPath;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time a request spent waiting for upstream, attached to responses for the access log.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamWait(pub Duration);

/// The complete router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2/", axum::routing::any(api_version))
        .route("/v2", axum::routing::any(api_version))
        .route("/v2/{*path}", axum::routing::any(dispatch))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .fallback(|uri: Uri| async move { Error::NotFound(uri.path().to_owned()) })
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

/// `GET /v2/`: 200 `{}` tells clients this is a registry that needs no auth (protocol §1.2).
async fn api_version(method: Method) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return Error::Unsupported(method.to_string()).into_response();
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

/// Every registry request gets its response headers within the upstream deadline, however its
/// parts (learning the upstream's kind, fetching) add up; bodies stream on afterwards.
async fn dispatch(State(state): State<Arc<AppState>>, request: Request) -> Result<Response, Error> {
    let deadline = state.deadline;
    tokio::time::timeout(deadline, pull(state, request))
        .await
        .unwrap_or(Err(Error::GatewayTimeout))
}

async fn pull(state: Arc<AppState>, request: Request) -> Result<Response, Error> {
    let (method, uri, headers) = (request.method(), request.uri(), request.headers());
    if method != Method::GET && method != Method::HEAD {
        return Err(Error::Unsupported(method.to_string()));
    }
    let tail = uri.path().strip_prefix("/v2/").unwrap_or_default();
    // Validate before anything can reach upstream; learn Hub-ness only for names that need it.
    let mut target = RegistryPath::parse(tail, false)?;
    let tags_query = match target {
        RegistryPath::TagsList { .. } => TagsQuery::parse(uri.query())?,
        _ => TagsQuery::default(),
    };
    if !target.name().as_str().contains('/') && state.docker_hub().await? {
        target = RegistryPath::parse(tail, true)?;
    }
    state.check_namespace(uri.query())?;
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
            let served = state.proxy.manifest(&request).await?;
            Ok(manifests::respond(served, headers, with_body))
        }
        RegistryPath::Blob { name, digest } => {
            if with_body {
                let range = headers
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(ByteRange::parse);
                let body = state.proxy.blob(&name, &digest, range).await?;
                Ok(blobs::respond(&digest, body))
            } else {
                let head = state.proxy.blob_head(&name, &digest).await?;
                Ok(blobs::respond_head(&digest, head))
            }
        }
        RegistryPath::TagsList { name } => {
            let page = state.proxy.tags_list(&name, tags_query).await?;
            Ok(tags::respond(page, with_body))
        }
    }
}

/// One event per request, and the API version header on every response.
async fn access_log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Skip copying the request line when nobody will see the event (benchmarks, RUST_LOG=warn).
    let line = tracing::enabled!(tracing::Level::INFO)
        .then(|| (request.method().clone(), request.uri().path().to_owned()));
    let mut response = next.run(request).await;
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    let Some((method, path)) = line else {
        return response;
    };
    let cache = response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let upstream_ms = response
        .extensions()
        .get::<UpstreamWait>()
        .map(|w| millis(w.0));
    tracing::info!(
        %method,
        path,
        status = response.status().as_u16(),
        cache,
        upstream_ms,
        elapsed_ms = millis(started.elapsed()),
        "request"
    );
    response
}

/// Milliseconds with microsecond precision, printed without float noise (`0.068`, not
/// `0.06760100000000001`): whole microseconds divided once.
fn millis(d: Duration) -> f64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX) as f64 / 1000.0
}
