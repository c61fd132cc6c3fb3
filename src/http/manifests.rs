//! Manifest responses: exact bytes, `Content-Type`, `Docker-Content-Digest`, a real
//! `Content-Length` on HEAD too, `ETag` with 304 on `If-None-Match`, and `X-Cache`.

use super::Answer;
use crate::proxy::{ManifestBody, Served};
use crate::registry::HeaderTexts;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// Headers a manifest response carries, with room for those the middleware adds: the map is
/// allocated once, never grown.
const HEADERS: usize = 12;

/// A header value from text we made (digests and media types are visible ASCII); a shared
/// `Bytes` becomes a header value without a copy.
fn value(text: &Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(text.clone()).unwrap_or(HeaderValue::from_static("invalid"))
}

/// Renders a served manifest for GET (`with_body`) or HEAD. Built field by field: this is the
/// cache-hit path the benchmark measures.
pub fn respond(served: Served, request_headers: &HeaderMap, with_body: bool) -> Response {
    let made;
    let texts = match &served.body {
        ManifestBody::Full(m) => &m.texts,
        ManifestBody::Described {
            digest,
            media_type,
            size,
        } => {
            made = HeaderTexts::new(digest, media_type, *size);
            &made
        }
    };
    let digest = &texts.digest[..];
    let not_modified = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|v| {
            let v = v.trim_ascii();
            let v = v.strip_prefix(b"W/").unwrap_or(v);
            v.strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v)
        })
        .any(|v| v == digest || v == b"*");
    let body = match (&served.body, with_body && !not_modified) {
        (ManifestBody::Full(m), true) => Body::from(m.bytes.clone()),
        _ => Body::empty(),
    };
    let mut response = Response::new(body);
    response.extensions_mut().insert(Answer {
        outcome: Some(served.status),
        upstream_wait: served.upstream_wait,
        routed: None,
    });
    let headers = response.headers_mut();
    *headers = HeaderMap::with_capacity(HEADERS);
    headers.insert(header::ETAG, value(&texts.etag));
    headers.insert(DOCKER_CONTENT_DIGEST, value(&texts.digest));
    headers.insert(super::X_CACHE, super::x_cache(served.status));
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return response;
    }
    headers.insert(header::CONTENT_TYPE, value(&texts.media_type));
    headers.insert(header::CONTENT_LENGTH, value(&texts.length));
    response
}
