//! Operating endpoints: `/readyz` (the data directory takes files; upstream is not asked, since
//! cached content is served without it) and `/metrics` (Prometheus text format).

use crate::metrics::render_prometheus;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// `GET /readyz`: 200 when ready, 503 with the reason otherwise.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let readiness = state.readiness().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

/// `GET /metrics`; with `admin_token` set it needs the token too (Prometheus sends it with
/// `authorization: {credentials: ...}` in the scrape config).
pub async fn metrics(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
) -> Response {
    if let Some(token) = &state.admin_token
        && super::api::authorized(&request, token) != Some(true)
    {
        return super::api::unauthorized("/metrics needs Authorization: Bearer <admin_token>");
    }
    let text = render_prometheus(Arc::clone(&state.metrics), state.gauges());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
