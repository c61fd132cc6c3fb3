//! Manifest responses: exact bytes, `Content-Type`, `Docker-Content-Digest`, a real
//! `Content-Length` on HEAD too, `ETag` with 304 on `If-None-Match`, and `X-Cache`.

use super::UpstreamWait;
use crate::proxy::{ManifestBody, Served};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// A header value from a string we built (digests and media types are visible ASCII).
fn value(text: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(text)).unwrap_or(HeaderValue::from_static("invalid"))
}

/// Renders a served manifest for GET (`with_body`) or HEAD. Built field by field: this is the
/// cache-hit path the benchmark measures.
pub fn respond(served: Served, request_headers: &HeaderMap, with_body: bool) -> Response {
    let (digest, media_type, size) = match &served.body {
        ManifestBody::Full(m) => (&m.digest, &m.media_type, m.bytes.len() as u64),
        ManifestBody::Described {
            digest,
            media_type,
            size,
        } => (digest, media_type, *size),
    };
    let digest = digest.to_string();
    let not_modified = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|v| v == digest || v == "*");
    let body = match (&served.body, with_body && !not_modified) {
        (ManifestBody::Full(m), true) => Body::from(m.bytes.clone()),
        _ => Body::empty(),
    };
    let mut response = Response::new(body);
    if let Some(wait) = served.upstream_wait {
        response.extensions_mut().insert(UpstreamWait(wait));
    }
    response.extensions_mut().insert(served.status);
    let headers = response.headers_mut();
    headers.insert(header::ETAG, value(format!("\"{digest}\"")));
    headers.insert(DOCKER_CONTENT_DIGEST, value(digest));
    headers.insert(super::X_CACHE, super::x_cache(served.status));
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return response;
    }
    headers.insert(header::CONTENT_TYPE, value(media_type.to_string()));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    response
}
