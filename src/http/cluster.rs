//! Requests between replicas (`redis_url`): `GET /_pullthrough/cluster/blobs/<digest>` streams
//! a blob this replica holds or is downloading, to a replica that found this one holding its
//! cluster lock. Authenticated with `Authorization: Bearer <cluster_secret>`; it never starts a
//! download (404 when this replica has neither the blob nor a download of it). The answer says
//! in `X-Pullthrough-Private` whether the blob was fetched with credentials.

use super::blobs;
use crate::error::Error;
use crate::registry::ByteRange;
use crate::registry::Digest;
use crate::state::AppState;
use axum::extract::{Path, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// `GET /_pullthrough/cluster/blobs/{digest}`.
pub async fn blob(
    State(state): State<Arc<AppState>>,
    Path(digest): Path<String>,
    request: Request,
) -> Response {
    let Some(secret) = state.proxy.cluster_secret() else {
        return Error::NotFound("not a cluster member (no redis_url)".into()).into_response();
    };
    if super::api::authorized(&request, secret) != Some(true) {
        return Error::Unauthenticated("replicas authenticate with the cluster_secret")
            .into_response();
    }
    let digest: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return Error::DigestInvalid(format!("{e}")).into_response(),
    };
    let range = request
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(ByteRange::parse);
    match state.proxy.blob_for_peer(&digest, range).await {
        Ok(Some((body, private))) => {
            let mut response = blobs::respond(&digest, body, &state.metrics);
            response.headers_mut().insert(
                crate::cluster::PRIVATE_HEADER,
                axum::http::HeaderValue::from_static(if private { "1" } else { "0" }),
            );
            response
        }
        Ok(None) => Error::BlobUnknown.into_response(),
        Err(e) => e.into_response(),
    }
}
