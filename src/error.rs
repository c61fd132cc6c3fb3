//! Why a request failed, in registry terms. Rendered once, by `http::error`, as the
//! distribution-spec error envelope; nothing here knows about HTTP frameworks. A leaf: the
//! mapping of upstream failures to these errors lives in `proxy`.

use std::sync::Arc;
use std::time::Duration;

/// A failure kept whole, with its own sources, and cheap to share among the waiters of one
/// fetch.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

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
    /// A query parameter the endpoint cannot take (a referrers `artifactType` that is no
    /// media type).
    #[error("invalid query: {0}")]
    QueryInvalid(String),
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
    /// pullthrough is offline and what was asked is not cached: the message names it.
    #[error("{0}")]
    Offline(String),
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
    /// Upstream failed or misbehaved: the message names the cause class ("upstream
    /// unreachable: connection refused"), the source keeps the whole chain for the log.
    #[error("upstream registry failed: {0}")]
    Upstream(#[source] Cause),
    /// Local storage failed.
    #[error("local storage failed")]
    Storage(#[source] Arc<std::io::Error>),
    /// A background task (a download, a blocking write) ended without an answer.
    #[error("a background task failed")]
    Task(#[source] Arc<tokio::task::JoinError>),
}

impl Error {
    /// Local storage failed for a reason of pullthrough's own.
    pub fn storage(why: &str) -> Error {
        Error::Storage(Arc::new(std::io::Error::other(why.to_owned())))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Storage(Arc::new(e))
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Error {
        Error::Task(Arc::new(e))
    }
}

/// Shows an error and its sources in words, `outer: inner: innermost`, for the log (a source
/// whose words its parent already says is left out).
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut said = self.0.to_string();
        f.write_str(&said)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            if !said.contains(&text) {
                write!(f, ": {text}")?;
            }
            said = text;
            next = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_says_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = Error::Upstream(Arc::new(Error::Storage(Arc::new(io))));
        assert_eq!(
            Chain(&e).to_string(),
            "upstream registry failed: local storage failed: connection refused"
        );
    }
}
