//! Blob responses: streamed bodies with `Content-Length`, `Docker-Content-Digest`,
//! `Accept-Ranges`, 206 + `Content-Range` for a single range, and `X-Cache`.

use crate::blobs::{BlobBody, Source};
use crate::proxy::BlobHead;
use crate::registry::Digest;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;

fn base(digest: &Digest, source: Source) -> axum::http::response::Builder {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "max-age=31536000, immutable")
        .header(
            "x-cache",
            if source == Source::Hit { "HIT" } else { "MISS" },
        )
}

/// A GET answer.
pub fn respond(digest: &Digest, body: BlobBody) -> Response {
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
        .body(Body::from_stream(body.stream))
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
