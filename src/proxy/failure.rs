//! What an upstream failure means to the client: the one mapping of `upstream::Error` to
//! registry errors.

use crate::error::Error;
use crate::upstream;
use std::sync::Arc;

impl From<upstream::Error> for Error {
    fn from(e: upstream::Error) -> Error {
        match e {
            upstream::Error::NotFound | upstream::Error::Denied => Error::NameUnknown,
            upstream::Error::TooManyRequests { retry_after } => {
                Error::TooManyRequests { retry_after }
            }
            upstream::Error::Timeout => Error::GatewayTimeout,
            upstream::Error::Rejected {
                status,
                code,
                message,
            } => Error::UpstreamRejected {
                status,
                code,
                message,
            },
            other => Error::Upstream(Arc::new(other)),
        }
    }
}

/// Maps an upstream failure for a manifest request.
pub(crate) fn manifest(e: upstream::Error) -> Error {
    match e {
        upstream::Error::NotFound => Error::ManifestUnknown("manifest unknown".into()),
        other => Error::from(other),
    }
}

/// Maps an upstream failure for a blob request.
pub(crate) fn blob(e: upstream::Error) -> Error {
    match e {
        upstream::Error::NotFound => Error::BlobUnknown,
        other => Error::from(other),
    }
}

/// Upstream answered something a registry must not.
pub(crate) fn invalid(why: impl Into<String>) -> Error {
    Error::Upstream(Arc::new(upstream::Error::BadResponse(why.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_names_its_class_to_the_client() {
        let e = Error::from(upstream::Error::unreachable(
            "connection refused",
            "at 127.0.0.1:1",
        ));
        assert_eq!(
            e.to_string(),
            "upstream registry failed: upstream unreachable: connection refused"
        );
        assert_eq!(
            crate::error::Chain(&e).to_string(),
            "upstream registry failed: upstream unreachable: connection refused: at 127.0.0.1:1"
        );
    }

    #[test]
    fn not_found_means_what_was_asked_for() {
        assert!(matches!(
            manifest(upstream::Error::NotFound),
            Error::ManifestUnknown(_)
        ));
        assert!(matches!(
            blob(upstream::Error::NotFound),
            Error::BlobUnknown
        ));
        assert!(matches!(
            Error::from(upstream::Error::Denied),
            Error::NameUnknown
        ));
    }
}
