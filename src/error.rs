//! Why a request failed, in registry terms. Rendered once, by `http::error`, as the
//! distribution-spec error envelope; nothing here knows about HTTP frameworks.

use crate::upstream;
use std::time::Duration;

/// A request failure, named by the registry error it becomes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Bad repository name in the URL.
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    /// Bad tag in the URL.
    #[error("invalid tag: {0}")]
    TagInvalid(String),
    /// Bad digest in the URL.
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    /// `n` of a tags list is not a number.
    #[error("invalid number of results requested")]
    PaginationInvalid,
    /// A path that is not part of the pull API.
    #[error("unknown endpoint: {0}")]
    NotFound(String),
    /// A method pullthrough does not serve (it is a read-only mirror).
    #[error("pullthrough is a read-only mirror; {0} is not supported")]
    Unsupported(String),
    /// The manifest does not exist, or the client cannot take its media type.
    #[error("{0}")]
    ManifestUnknown(String),
    /// The blob does not exist.
    #[error("blob unknown to registry")]
    BlobUnknown,
    /// The client must authenticate (access control): 401 with a Basic challenge.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The client may not pull this repository (access control).
    #[error("requested access to the resource is denied")]
    AccessDenied,
    /// A registry host (`?ns=` or path prefix) this pullthrough does not mirror.
    #[error("registry {0} is not mirrored here (not a configured upstream)")]
    UpstreamUnknown(String),
    /// The repository does not exist or upstream refused access to it.
    #[error("repository name not known to registry")]
    NameUnknown,
    /// An unsatisfiable `Range`.
    #[error("requested range not satisfiable")]
    RangeInvalid {
        /// The blob's size, for `Content-Range: bytes */<size>`.
        size: u64,
    },
    /// Upstream rate limit, with how long to wait.
    #[error("upstream rate limit reached")]
    TooManyRequests {
        /// Seconds to put in `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// Too many failed logins from the client's address (access control's brake).
    #[error("too many failed logins from {address}, retry in {} s", retry_after.as_secs().max(1))]
    LoginsBraked {
        /// The address (an IPv6 client's network, `2001:db8::/64`).
        address: String,
        /// When the brake's window ends.
        retry_after: Duration,
    },
    /// Upstream did not answer within the deadline.
    #[error("upstream did not answer in time")]
    GatewayTimeout,
    /// Upstream refused the request as a client error: passed on with its status and code.
    #[error("{}", message.as_deref().unwrap_or("upstream refused the request"))]
    UpstreamRejected {
        /// Upstream's status, 400 to 499.
        status: u16,
        /// Upstream's registry error code, if it sent one.
        code: Option<String>,
        /// Upstream's message, if it sent one.
        message: Option<String>,
    },
    /// Upstream failed or misbehaved.
    #[error("upstream registry failed")]
    Upstream(upstream::Error),
    /// Local storage failed.
    #[error("local storage failed")]
    Storage(String),
}

impl Error {
    /// Maps an upstream failure for a manifest request.
    pub fn manifest(e: upstream::Error) -> Error {
        match e {
            upstream::Error::NotFound => Error::ManifestUnknown("manifest unknown".into()),
            other => Error::from(other),
        }
    }

    /// Upstream answered something a registry must not.
    pub fn upstream_invalid(why: impl Into<String>) -> Error {
        Error::Upstream(upstream::Error::BadResponse(why.into()))
    }

    /// Maps an upstream failure for a blob request.
    pub fn blob(e: upstream::Error) -> Error {
        match e {
            upstream::Error::NotFound => Error::BlobUnknown,
            other => Error::from(other),
        }
    }
}

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
            other => Error::Upstream(other),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Storage(e.to_string())
    }
}
