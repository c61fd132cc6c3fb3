//! Referrers responses (distribution-spec v1.1 §Listing Referrers): the image index with its
//! media type, `OCI-Filters-Applied: artifactType` when pullthrough filtered it, and `X-Cache`.
//! The merged list is one answer: no `Link`.

use super::Answer;
use crate::proxy::ReferrersAnswer;
use crate::registry::REFERRERS_MEDIA_TYPE;
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;

const FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

/// Renders a referrers answer for GET (`with_body`) or HEAD.
pub fn respond(answer: ReferrersAnswer, with_body: bool) -> Response {
    let outcome = Answer {
        outcome: Some(answer.outcome),
        upstream_wait: answer.upstream_wait,
        routed: None,
    };
    let mut response =
        super::cached_document(answer.body, REFERRERS_MEDIA_TYPE, outcome, with_body);
    if answer.filtered {
        response
            .headers_mut()
            .insert(FILTERS_APPLIED, HeaderValue::from_static("artifactType"));
    }
    response
}
