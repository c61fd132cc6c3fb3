//! The label values counters are kept by: what a request was for, how it was answered, which
//! method and status it had, and why an answer was stale. Each is a [`Key`] with a slot of its
//! own, so counting one is an array access.

use super::keyed::Key;
use serde::Serialize;

/// How an answer was obtained, sent to clients as `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Served from cache, within freshness.
    Hit,
    /// Fetched from upstream (or joined a fetch under way).
    Miss,
    /// Upstream confirmed (or changed) an expired tag before the answer.
    Revalidated,
    /// Served from cache past freshness (revalidating, upstream failing, or budget held).
    Stale,
}

impl Outcome {
    pub(super) const ALL: [Outcome; 4] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Revalidated,
        Outcome::Stale,
    ];

    /// The `X-Cache` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Revalidated => "REVALIDATED",
            Outcome::Stale => "STALE",
        }
    }

    /// Parses an `X-Cache` value.
    pub fn parse(value: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == value)
    }

    /// The metrics label.
    pub(super) fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
        }
    }

    /// Whether upstream was not asked for the content (a pull saved).
    pub fn from_cache(self) -> bool {
        matches!(self, Outcome::Hit | Outcome::Stale)
    }
}

/// What a client request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// `/v2/<name>/manifests/<reference>`.
    Manifest,
    /// `/v2/<name>/blobs/<digest>`.
    Blob,
    /// `/v2/<name>/tags/list`.
    Tags,
    /// `/v2/<name>/referrers/<digest>`.
    Referrers,
    /// Anything else (`/v2/`, the cache API, health, metrics, the status page).
    Other,
}

impl RequestKind {
    pub(super) const ALL: [RequestKind; 5] = [
        RequestKind::Manifest,
        RequestKind::Blob,
        RequestKind::Tags,
        RequestKind::Referrers,
        RequestKind::Other,
    ];

    /// Classifies a request path.
    pub fn of_path(path: &str) -> RequestKind {
        match path.strip_prefix("/v2/") {
            Some(tail) if tail.contains("/manifests/") => RequestKind::Manifest,
            Some(tail) if tail.contains("/blobs/") => RequestKind::Blob,
            Some(tail) if tail.ends_with("/tags/list") => RequestKind::Tags,
            Some(tail) if tail.rsplit('/').nth(1) == Some("referrers") => RequestKind::Referrers,
            _ => RequestKind::Other,
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            RequestKind::Manifest => "manifest",
            RequestKind::Blob => "blob",
            RequestKind::Tags => "tags",
            RequestKind::Referrers => "referrers",
            RequestKind::Other => "other",
        }
    }
}

/// What an upstream request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKind {
    /// A manifest GET (what Docker Hub counts as a pull).
    ManifestGet,
    /// A manifest HEAD (free on Docker Hub).
    ManifestHead,
    /// A blob GET.
    BlobGet,
    /// A blob HEAD.
    BlobHead,
    /// A tags-list GET.
    Tags,
    /// A referrers API GET (a page).
    Referrers,
    /// A token request.
    Token,
    /// The `/v2/` ping.
    Ping,
}

impl UpstreamKind {
    /// The name used in metrics labels and on the status page.
    pub fn as_str(self) -> &'static str {
        self.label()
    }

    pub(super) const ALL: [UpstreamKind; 8] = [
        UpstreamKind::ManifestGet,
        UpstreamKind::ManifestHead,
        UpstreamKind::BlobGet,
        UpstreamKind::BlobHead,
        UpstreamKind::Tags,
        UpstreamKind::Referrers,
        UpstreamKind::Token,
        UpstreamKind::Ping,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            UpstreamKind::ManifestGet => "manifest_get",
            UpstreamKind::ManifestHead => "manifest_head",
            UpstreamKind::BlobGet => "blob_get",
            UpstreamKind::BlobHead => "blob_head",
            UpstreamKind::Tags => "tags",
            UpstreamKind::Referrers => "referrers",
            UpstreamKind::Token => "token",
            UpstreamKind::Ping => "ping",
        }
    }
}

/// Why a stale answer was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleCause {
    /// A revalidation was under way.
    Revalidating,
    /// Upstream failed or was too slow.
    UpstreamError,
    /// The rate-limit budget was below the reserve.
    Budget,
    /// pullthrough is offline: upstream is not asked.
    Offline,
}

impl StaleCause {
    pub(super) const ALL: [StaleCause; 4] = [
        StaleCause::Revalidating,
        StaleCause::UpstreamError,
        StaleCause::Budget,
        StaleCause::Offline,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            StaleCause::Revalidating => "revalidating",
            StaleCause::UpstreamError => "upstream_error",
            StaleCause::Budget => "budget",
            StaleCause::Offline => "offline",
        }
    }
}

/// Client request methods counted separately; any other is counted as `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Method {
    /// `GET`.
    Get,
    /// `HEAD`.
    Head,
    /// Any other.
    Other,
}

impl Method {
    pub(super) const ALL: [Method; 3] = [Method::Get, Method::Head, Method::Other];

    /// Classifies a request method.
    pub(super) fn of(method: &str) -> Method {
        match method {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            _ => Method::Other,
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Other => "other",
        }
    }
}

/// Client response statuses counted separately; any other is counted as `other`.
const STATUSES: [u16; 14] = [
    200, 206, 304, 400, 401, 403, 404, 405, 416, 429, 500, 502, 503, 504,
];

/// A client response status as counted: one of [`STATUSES`] (its position there), or any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Status(usize);

impl Status {
    /// Every status counted, `other` last.
    pub(super) const ALL: [Status; STATUSES.len() + 1] = {
        let mut all = [Status(0); STATUSES.len() + 1];
        let mut i = 0;
        while i < all.len() {
            all[i] = Status(i);
            i += 1;
        }
        all
    };

    /// Classifies a response status.
    pub(super) fn of(status: u16) -> Status {
        Status(
            STATUSES
                .iter()
                .position(|s| *s == status)
                .unwrap_or(STATUSES.len()),
        )
    }

    pub(super) fn label(self) -> String {
        STATUSES
            .get(self.0)
            .map_or("other".to_owned(), u16::to_string)
    }
}

/// An upstream status as labelled: `error` when upstream did not answer (counted as 0).
pub(super) fn upstream_status(status: u16) -> String {
    if status == 0 {
        "error".to_owned()
    } else {
        status.to_string()
    }
}

/// The slots of a cache outcome as counted: each outcome, then none (no cache involved).
impl Key for Option<Outcome> {
    const VALUES: &'static [Self] = &[
        Some(Outcome::Hit),
        Some(Outcome::Miss),
        Some(Outcome::Revalidated),
        Some(Outcome::Stale),
        None,
    ];

    fn slot(self) -> usize {
        self.map_or(Outcome::ALL.len(), |o| o as usize)
    }
}

/// Fieldless enums listed in declaration order: a value's slot is its discriminant.
macro_rules! enum_keys {
    ($($t:ty),*) => {$(
        impl Key for $t {
            const VALUES: &'static [Self] = &<$t>::ALL;

            fn slot(self) -> usize {
                self as usize
            }
        }
    )*};
}

enum_keys!(Outcome, RequestKind, UpstreamKind, StaleCause, Method);

impl Key for Status {
    const VALUES: &'static [Self] = &Status::ALL;

    fn slot(self) -> usize {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::super::keyed::slots_agree;
    use super::*;

    #[test]
    fn every_label_value_has_its_own_slot() {
        assert!(slots_agree::<Outcome>());
        assert!(slots_agree::<Option<Outcome>>());
        assert!(slots_agree::<RequestKind>());
        assert!(slots_agree::<UpstreamKind>());
        assert!(slots_agree::<StaleCause>());
        assert!(slots_agree::<Method>());
        assert!(slots_agree::<Status>());
    }

    #[test]
    fn methods_and_statuses_not_listed_count_as_other() {
        let methods = [
            ("GET", "GET"),
            ("HEAD", "HEAD"),
            ("POST", "other"),
            ("get", "other"),
        ];
        for (method, label) in methods {
            assert_eq!(Method::of(method).label(), label, "{method}");
        }
        let statuses = [(200, "200"), (504, "504"), (418, "other"), (0, "other")];
        for (status, label) in statuses {
            assert_eq!(Status::of(status).label(), label, "{status}");
        }
    }

    #[test]
    fn requests_are_classified_by_path() {
        let cases = [
            ("/v2/library/alpine/manifests/3.20", RequestKind::Manifest),
            ("/v2/library/alpine/blobs/sha256:ab", RequestKind::Blob),
            ("/v2/library/alpine/tags/list", RequestKind::Tags),
            (
                "/v2/library/alpine/referrers/sha256:ab",
                RequestKind::Referrers,
            ),
            ("/v2/referrers/x/manifests/y", RequestKind::Manifest),
            ("/v2/", RequestKind::Other),
            ("/metrics", RequestKind::Other),
        ];
        for (path, kind) in cases {
            assert_eq!(RequestKind::of_path(path), kind, "{path}");
        }
    }
}
