//! What an upstream failure means to the client: the one mapping of `upstream::Error` to
//! registry errors.

use crate::error::Error;
use crate::upstream;
use std::sync::Arc;

impl From<upstream::Error> for Error {
    fn from(e: upstream::Error) -> Error {
        match e {
            upstream::Error::NotFound { .. } | upstream::Error::Denied => Error::NameUnknown,
            upstream::Error::Offline => Error::Offline(OFFLINE.to_owned()),
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
        upstream::Error::NotFound { .. } => manifest_unknown(),
        other => Error::from(other),
    }
}

/// The answer for a manifest upstream does not have (or said a moment ago it did not have).
pub(crate) fn manifest_unknown() -> Error {
    Error::ManifestUnknown("manifest unknown".into())
}

/// Maps an upstream failure for a blob request.
pub(crate) fn blob(e: upstream::Error) -> Error {
    match e {
        upstream::Error::NotFound { .. } => Error::BlobUnknown,
        other => Error::from(other),
    }
}

/// What an offline answer says when nothing names the reference (see [`offline`]).
const OFFLINE: &str = "pullthrough is offline and this is not cached";

/// `e`, when pullthrough is offline, saying what is not cached (`what`: `library/alpine:3.20`,
/// `the tags list of library/alpine`).
pub(crate) fn offline(e: Error, what: impl FnOnce() -> String) -> Error {
    match e {
        Error::Offline(_) => Error::Offline(format!(
            "pullthrough is offline and {} is not cached",
            what()
        )),
        other => other,
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
            manifest(upstream::Error::NotFound { registry: true }),
            Error::ManifestUnknown(_)
        ));
        assert!(matches!(
            blob(upstream::Error::NotFound { registry: false }),
            Error::BlobUnknown
        ));
        assert!(matches!(
            Error::from(upstream::Error::Denied),
            Error::NameUnknown
        ));
        let offline = offline(manifest(upstream::Error::Offline), || "a/b:1".to_owned());
        assert_eq!(
            offline.to_string(),
            "pullthrough is offline and a/b:1 is not cached"
        );
    }
}
