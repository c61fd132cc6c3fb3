//! Blob responses: streamed bodies with `Content-Length`, `Docker-Content-Digest`,
//! `Accept-Ranges`, 206 + `Content-Range` for a single range, and `X-Cache`.

use crate::blobs::BlobBody;
use crate::metrics::{Metrics, Outcome};
use crate::proxy::BlobHead;
use crate::registry::Digest;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::sync::Arc;

fn base(digest: &Digest, source: Outcome) -> axum::http::response::Builder {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "max-age=31536000, immutable")
        .header(super::X_CACHE, super::x_cache(source))
        .extension(super::Answer::of(source))
}

/// A GET answer; the bytes sent are counted as they go.
pub fn respond(digest: &Digest, body: BlobBody, metrics: &Arc<Metrics>) -> Response {
    let mut builder = base(digest, body.source);
    builder = match (body.range, body.size) {
        (Some((start, end)), Some(size)) => builder
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))
            .header(header::CONTENT_LENGTH, end - start + 1),
        (_, Some(size)) => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, size),
        (_, None) => builder.status(StatusCode::OK),
    };
    builder
        .body(Body::from_stream(counted(
            body.stream,
            body.source,
            metrics,
        )))
        .expect("static response parts")
}

/// A HEAD answer.
pub fn respond_head(digest: &Digest, head: BlobHead) -> Response {
    base(digest, head.source)
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, head.size)
        .body(Body::empty())
        .expect("static response parts")
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
