//! Blob responses: streamed bodies with `Content-Length`, `Docker-Content-Digest`,
//! `Accept-Ranges`, 206 + `Content-Range` for a single range, and `X-Cache`.

use crate::blobs::BlobBody;
use crate::metrics::{Metrics, Outcome};
use crate::proxy::BlobHead;
use crate::registry::Digest;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::sync::Arc;

/// `body` with the headers every blob answer has, and `status`.
fn base(digest: &Digest, source: Outcome, status: StatusCode, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let octets = HeaderValue::from_static("application/octet-stream");
    headers.insert(header::CONTENT_TYPE, octets);
    // A digest is `<alg>:<hex>`: always a valid header value.
    if let Ok(value) = HeaderValue::try_from(digest.to_string()) {
        headers.insert("docker-content-digest", value);
    }
    if let Ok(value) = HeaderValue::try_from(format!("\"{digest}\"")) {
        headers.insert(header::ETAG, value);
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let forever = HeaderValue::from_static("max-age=31536000, immutable");
    headers.insert(header::CACHE_CONTROL, forever);
    headers.insert(super::X_CACHE, super::x_cache(source));
    response.extensions_mut().insert(super::Answer::of(source));
    response
}

/// A GET answer; the bytes sent are counted as they go.
pub fn respond(digest: &Digest, body: BlobBody, metrics: &Arc<Metrics>) -> Response {
    let stream = Body::from_stream(counted(body.stream, body.source, metrics));
    let status = match (body.range, body.size) {
        (Some(_), Some(_)) => StatusCode::PARTIAL_CONTENT,
        _ => StatusCode::OK,
    };
    let mut response = base(digest, body.source, status, stream);
    let headers = response.headers_mut();
    match (body.range, body.size) {
        (Some((start, end)), Some(size)) => {
            if let Ok(value) = HeaderValue::try_from(format!("bytes {start}-{end}/{size}")) {
                headers.insert(header::CONTENT_RANGE, value);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
        }
        (_, Some(size)) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        (_, None) => {}
    }
    response
}

/// A HEAD answer.
pub fn respond_head(digest: &Digest, head: BlobHead) -> Response {
    let mut response = base(digest, head.source, StatusCode::OK, Body::empty());
    let length = HeaderValue::from(head.size);
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, length);
    response
}

/// `stream` with every chunk counted as served from the store or while fetching.
fn counted(
    stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    source: Outcome,
    metrics: &Arc<Metrics>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let metrics = Arc::clone(metrics);
    stream.map(move |chunk| {
        if let Ok(bytes) = &chunk {
            metrics.served(source, bytes.len() as u64);
        }
        chunk
    })
}
