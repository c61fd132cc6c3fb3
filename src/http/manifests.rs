//! Manifest responses: exact bytes, `Content-Type`, `Docker-Content-Digest`, a real
//! `Content-Length` on HEAD too, `ETag` with 304 on `If-None-Match`, and `X-Cache`.

use super::UpstreamWait;
use crate::proxy::{ManifestBody, Served};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

/// Renders a served manifest for GET (`with_body`) or HEAD.
pub fn respond(served: Served, request_headers: &HeaderMap, with_body: bool) -> Response {
    let (digest, media_type, size) = match &served.body {
        ManifestBody::Full(m) => (
            m.digest.to_string(),
            m.media_type.to_string(),
            m.bytes.len() as u64,
        ),
        ManifestBody::Described {
            digest,
            media_type,
            size,
        } => (digest.to_string(), media_type.to_string(), *size),
    };
    let etag = format!("\"{digest}\"");
    let not_modified = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|v| v == digest || v == "*");
    let mut builder = Response::builder()
        .header("docker-content-digest", &digest)
        .header(header::ETAG, &etag)
        .header("x-cache", served.status.as_str());
    if let Some(wait) = served.upstream_wait {
        builder = builder.extension(UpstreamWait(wait));
    }
    if not_modified {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("static response parts");
    }
    builder = builder
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_str(&media_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream")),
        )
        .header(header::CONTENT_LENGTH, size);
    let body = match (&served.body, with_body) {
        (ManifestBody::Full(m), true) => Body::from(m.bytes.clone()),
        _ => Body::empty(),
    };
    builder.body(body).expect("static response parts")
}
