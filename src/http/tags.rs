//! Tags-list responses: upstream's JSON, a `Link` to the next page through pullthrough, and
//! `X-Cache`.

use crate::proxy::TagsPage;
use axum::body::Body;
use axum::http::header;
use axum::response::Response;

/// Renders a tags-list page for GET (`with_body`) or HEAD.
pub fn respond(page: TagsPage, with_body: bool) -> Response {
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(super::X_CACHE, super::x_cache(page.outcome))
        .extension(super::Answer::of(page.outcome))
        .header(header::CONTENT_LENGTH, page.body.len());
    if let Some(link) = &page.link {
        response = response.header(header::LINK, link);
    }
    let body = if with_body {
        Body::from(page.body)
    } else {
        Body::empty()
    };
    response.body(body).expect("static response parts")
}
