//! Tags-list responses: upstream's JSON, a `Link` to the next page through pullthrough, and
//! `X-Cache`.

use crate::proxy::TagsPage;
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;

/// Renders a tags-list page for GET (`with_body`) or HEAD.
pub fn respond(page: TagsPage, with_body: bool) -> Response {
    let length = HeaderValue::from(page.body.len());
    let body = if with_body {
        Body::from(page.body)
    } else {
        Body::empty()
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let x_cache = super::x_cache(page.outcome);
    headers.insert(super::X_CACHE, x_cache);
    headers.insert(header::CONTENT_LENGTH, length);
    // Built by pullthrough from a checked path; a value that is no header is left out.
    if let Some(link) = page.link.and_then(|l| HeaderValue::try_from(l).ok()) {
        headers.insert(header::LINK, link);
    }
    response
        .extensions_mut()
        .insert(super::Answer::of(page.outcome));
    response
}
