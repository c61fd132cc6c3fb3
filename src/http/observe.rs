//! Every request is observed once, here: it gets an id (`x-request-id` taken from the client
//! when it is sane, else generated; echoed back), every log event of the request carries it
//! (a span), it is counted and timed in the metrics by kind, method, status and cache outcome,
//! and it ends in one access-log line (`logging::AccessLine`). The API version header is added
//! to every response.

use super::{Answer, millis};
use crate::logging::AccessLine;
use crate::metrics::{Outcome, RequestKind};
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// The request id header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The API version header every response carries.
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// A new request id: a random UUID, as 32 hex digits (formatted on the stack).
fn new_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Simple::LENGTH];
    let text = uuid::Uuid::new_v4().simple().encode_lower(&mut text);
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("-"))
}

/// A client's request id is kept when it is 1 to 128 visible ASCII characters.
fn client_id(value: &HeaderValue) -> Option<HeaderValue> {
    let bytes = value.as_bytes();
    let sane = !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic);
    sane.then(|| value.clone())
}

/// The middleware: id, span, metrics, access log.
pub async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    observed(state, request, |request| next.run(request)).await
}

/// `request` answered by `answer`, observed as [`observe`] does: the middleware's work, for
/// the registry requests that skip the router (`super::Front`).
pub async fn observed<F>(
    state: Arc<AppState>,
    request: Request,
    answer: impl FnOnce(Request) -> F,
) -> Response
where
    F: Future<Output = Response>,
{
    let started = Instant::now();
    let id = request
        .headers()
        .get(X_REQUEST_ID)
        .and_then(client_id)
        .unwrap_or_else(new_id);
    let kind = RequestKind::of_path(request.uri().path());
    let method = request.method().clone();
    // Health probes and metric scrapes come every few seconds: logged at debug only.
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let level_on = if probe {
        tracing::enabled!(tracing::Level::DEBUG)
    } else {
        AccessLine::enabled()
    };
    // Copy the path only when someone will see the event (benchmarks run at RUST_LOG=warn).
    let path = level_on.then(|| logged_path(request.uri()));
    let span = tracing::info_span!("request", request_id = id.to_str().unwrap_or("-"));
    let mut response = answer(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    response
        .headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    let answer = response
        .extensions()
        .get::<Answer>()
        .copied()
        .unwrap_or_default();
    let (outcome, status) = (answer.outcome, response.status().as_u16());
    state.metrics.request(
        kind,
        method.as_str(),
        status,
        outcome,
        answer.routed,
        elapsed,
    );
    if let Some(path) = path {
        if probe {
            span.in_scope(|| {
                tracing::debug!(%method, path, status, elapsed_ms = millis(elapsed), "request");
            });
        } else {
            let line = AccessLine {
                request_id: id.to_str().unwrap_or("-"),
                method: method.as_str(),
                path: &path,
                status,
                upstream: answer.routed.and_then(|r| state.metrics.host(r)),
                cache: outcome.map_or("-", Outcome::as_str),
                upstream_ms: answer.upstream_wait.map(millis),
                elapsed_ms: millis(elapsed),
            };
            line.log(&span);
        }
    }
    response.headers_mut().insert(X_REQUEST_ID, id);
    response
}

/// The path and query as the access log shows them: the values of query keys that may carry
/// a secret (`token`, `password`, `secret`, `key`, `auth`, `signature`, `credential`) are
/// replaced by `<redacted>`.
fn logged_path(uri: &axum::http::Uri) -> String {
    let Some(query) = uri.query() else {
        return uri.path().to_owned();
    };
    const SECRET: [&str; 7] = [
        "token",
        "password",
        "secret",
        "key",
        "auth",
        "signature",
        "credential",
    ];
    let mut shown = String::with_capacity(uri.path().len() + 1 + query.len());
    shown.push_str(uri.path());
    for (i, pair) in query.split('&').enumerate() {
        shown.push(if i == 0 { '?' } else { '&' });
        let key = pair.split('=').next().unwrap_or_default();
        let lower = key.to_ascii_lowercase();
        if pair.contains('=') && SECRET.iter().any(|s| lower.contains(s)) {
            shown.push_str(key);
            shown.push_str("=<redacted>");
        } else {
            shown.push_str(pair);
        }
    }
    shown
}
