//! Referrers responses (distribution-spec v1.1 §Listing Referrers): the image index with its
//! media type, `OCI-Filters-Applied: artifactType` when pullthrough filtered it, and `X-Cache`.
//! The merged list is one answer: no `Link`.

use super::Answer;
use crate::proxy::ReferrersAnswer;
use crate::registry::REFERRERS_MEDIA_TYPE;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::Response;

const FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

/// Renders a referrers answer for GET (`with_body`) or HEAD.
pub fn respond(answer: ReferrersAnswer, with_body: bool) -> Response {
    let length = HeaderValue::from(answer.body.len());
    let body = if with_body {
        Body::from(answer.body)
    } else {
        Body::empty()
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(REFERRERS_MEDIA_TYPE),
    );
    headers.insert(header::CONTENT_LENGTH, length);
    headers.insert(super::X_CACHE, super::x_cache(answer.outcome));
    if answer.filtered {
        headers.insert(FILTERS_APPLIED, HeaderValue::from_static("artifactType"));
    }
    response.extensions_mut().insert(Answer {
        outcome: Some(answer.outcome),
        upstream_wait: answer.upstream_wait,
        routed: None,
    });
    response
}
