//! Tags-list responses: upstream's JSON, a `Link` to the next page through pullthrough, and
//! `X-Cache`.

use crate::proxy::TagsPage;
use axum::http::{HeaderValue, header};
use axum::response::Response;

/// Renders a tags-list page for GET (`with_body`) or HEAD.
pub fn respond(page: TagsPage, with_body: bool) -> Response {
    let mut response = super::cached_document(
        page.body,
        "application/json",
        super::Answer::of(page.outcome),
        with_body,
    );
    // Built by pullthrough from a checked path; a value that is no header is left out.
    if let Some(link) = page.link.and_then(|l| HeaderValue::try_from(l).ok()) {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}
