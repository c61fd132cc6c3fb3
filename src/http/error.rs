//! Renders [`Error`] as the registry error envelope (distribution-spec §Error Codes), with the
//! status chosen by blame: client mistakes 4xx, upstream trouble 502/504, our own 500.

use crate::error::Error;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

impl Error {
    /// HTTP status and registry error code.
    pub fn status_and_code(&self) -> (StatusCode, &str) {
        match self {
            Error::UpstreamRejected { status, code, .. } => (
                StatusCode::from_u16(*status)
                    .ok()
                    .filter(StatusCode::is_client_error)
                    .unwrap_or(StatusCode::BAD_REQUEST),
                code.as_deref().unwrap_or("UNKNOWN"),
            ),
            Error::NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            Error::TagInvalid(_) => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            Error::DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            Error::PaginationInvalid => (StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID"),
            Error::QueryInvalid(_) => (StatusCode::BAD_REQUEST, "UNSUPPORTED"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            Error::Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            Error::ManifestUnknown(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            Error::BlobUnknown => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            Error::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            Error::AccessDenied => (StatusCode::FORBIDDEN, "DENIED"),
            Error::NameUnknown | Error::UpstreamUnknown(_) => {
                (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
            }
            Error::RangeInvalid { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
            Error::TooManyRequests { .. } | Error::LoginsBraked { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS")
            }
            Error::GatewayTimeout => (StatusCode::GATEWAY_TIMEOUT, "UNAVAILABLE"),
            Error::Offline(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            Error::Upstream(_) => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
            Error::Storage(_) | Error::Task(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let code = code.to_owned();
        if let Error::Offline(_) = &self {
            // Chosen, not a failure: the access log's 503 says enough for each request.
            tracing::debug!(error = %self, "not cached, and offline");
        } else if status.is_server_error() {
            // The one place request failures are logged; we are inside the request span.
            tracing::warn!(error = %crate::error::Chain(&self), "request failed");
        }
        let message = self.to_string();
        let body =
            serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            Error::TooManyRequests { retry_after } => {
                let secs = retry_after.map(|d| d.as_secs().max(1)).unwrap_or(60);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            // Whole seconds rounded up by the brake, never 0.
            Error::LoginsBraked { retry_after, .. } => {
                let secs = retry_after.as_secs().max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Error::RangeInvalid { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            Error::Unsupported(_) => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            Error::Unauthenticated(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"pullthrough\""),
                );
            }
            _ => {}
        }
        response
    }
}
