//! Manifests as exact bytes, their media types, and local `Accept` negotiation
//! (protocol §3; distribution `registry/handlers/manifests.go` `GetManifest`).

use super::Digest;
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;

/// The `Accept` list pullthrough always sends upstream: every modern manifest type, so Docker Hub
/// never down-converts to schema 1 and one cached answer serves every client (protocol §3.2).
pub const UPSTREAM_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// A manifest media type, kept as upstream spelled it (parameters stripped).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MediaType(Arc<str>);

impl MediaType {
    /// Docker manifest list.
    pub const DOCKER_LIST: &'static str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image manifest, schema 2.
    pub const DOCKER_MANIFEST: &'static str =
        "application/vnd.docker.distribution.manifest.v2+json";
    /// OCI image index.
    pub const OCI_INDEX: &'static str = "application/vnd.oci.image.index.v1+json";
    /// OCI image manifest.
    pub const OCI_MANIFEST: &'static str = "application/vnd.oci.image.manifest.v1+json";
    /// Docker image manifest, schema 1, unsigned.
    pub const DOCKER_SCHEMA1: &'static str = "application/vnd.docker.distribution.manifest.v1+json";
    /// Docker image manifest, schema 1, signed.
    pub const DOCKER_SCHEMA1_SIGNED: &'static str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";

    /// Every type a manifest is stored and served as: the four pullthrough asks for, and
    /// schema 1, which a registry holding nothing newer sends whatever the `Accept` list says.
    const MANIFEST_TYPES: [&'static str; 6] = [
        Self::OCI_INDEX,
        Self::DOCKER_LIST,
        Self::OCI_MANIFEST,
        Self::DOCKER_MANIFEST,
        Self::DOCKER_SCHEMA1,
        Self::DOCKER_SCHEMA1_SIGNED,
    ];

    /// From a `Content-Type` value: parameters dropped, lower-cased (dist-spec: clients
    /// ignore parameters).
    pub fn from_content_type(value: &str) -> MediaType {
        let essence = value.split(';').next().unwrap_or_default().trim();
        MediaType(essence.to_ascii_lowercase().into())
    }

    /// The media type text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn is(&self, other: &str) -> bool {
        &*self.0 == other
    }

    /// Whether this is a manifest or index type (anything else, `text/html` say, is not a
    /// manifest whatever its bytes).
    pub fn is_manifest(&self) -> bool {
        Self::MANIFEST_TYPES.contains(&&*self.0)
    }

    /// The type of a manifest answer: its `Content-Type` when that is a manifest type. An
    /// absent one or generic `application/json` (registry 2.0 for schema 1, some OCI stores)
    /// falls back to the body, as distribution's client does for schema 1; any other type is
    /// `None`: not a manifest.
    pub fn of_manifest_answer(content_type: Option<&MediaType>, body: &[u8]) -> Option<MediaType> {
        match content_type {
            Some(t) if t.is_manifest() => Some(t.clone()),
            Some(t) if !t.is("application/json") && !t.is("") => None,
            _ => Self::of_manifest_body(body),
        }
    }

    /// The manifest type a body names in `mediaType`, or else shows by its shape: schema 1
    /// (`schemaVersion` 1, signed when it has `signatures`), an OCI index (`manifests`) or an
    /// OCI manifest (`config`). A body with both is ambiguous (containerd refuses it too), and
    /// one that is not a JSON object of these kinds is `None`.
    fn of_manifest_body(body: &[u8]) -> Option<MediaType> {
        use serde::de::IgnoredAny;
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Shape {
            schema_version: Option<u64>,
            media_type: Option<String>,
            manifests: Option<IgnoredAny>,
            config: Option<IgnoredAny>,
            signatures: Option<IgnoredAny>,
        }
        let shape: Shape = serde_json::from_slice(body).ok()?;
        let found = match (shape.media_type, shape.schema_version) {
            (Some(named), _) => {
                return Some(MediaType::from_content_type(&named)).filter(MediaType::is_manifest);
            }
            (None, Some(1)) if shape.signatures.is_some() => Self::DOCKER_SCHEMA1_SIGNED,
            (None, Some(1)) => Self::DOCKER_SCHEMA1,
            (None, Some(2)) => match (shape.manifests, shape.config) {
                (Some(_), None) => Self::OCI_INDEX,
                (None, Some(_)) => Self::OCI_MANIFEST,
                _ => return None,
            },
            _ => return None,
        };
        Some(MediaType(found.into()))
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for MediaType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for MediaType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(MediaType::from_content_type(&String::deserialize(d)?))
    }
}

/// A manifest exactly as upstream sent it. Never re-serialized: the digest is over these bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The raw bytes.
    pub bytes: Bytes,
    /// The media type upstream declared.
    pub media_type: MediaType,
    /// The digest of `bytes`.
    pub digest: Digest,
    /// The header texts it is served with, made once: a cache hit copies none.
    pub texts: HeaderTexts,
}

impl Manifest {
    /// A manifest of `bytes`, whose digest the caller verified.
    pub fn new(bytes: Bytes, media_type: MediaType, digest: Digest) -> Manifest {
        let texts = HeaderTexts::new(&digest, &media_type, bytes.len() as u64);
        Manifest {
            bytes,
            media_type,
            digest,
            texts,
        }
    }
}

/// The text of a manifest's `Docker-Content-Digest`, `ETag` and `Content-Type` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTexts {
    /// `sha256:<hex>`.
    pub digest: Bytes,
    /// `"sha256:<hex>"`.
    pub etag: Bytes,
    /// The media type.
    pub media_type: Bytes,
    /// The manifest's size in bytes, as `Content-Length` text.
    pub length: Bytes,
}

impl HeaderTexts {
    /// The texts for a manifest of `digest`, `media_type` and `size`.
    pub fn new(digest: &Digest, media_type: &MediaType, size: u64) -> HeaderTexts {
        let digest = digest.to_string();
        HeaderTexts {
            etag: Bytes::from(format!("\"{digest}\"")),
            digest: Bytes::from(digest),
            media_type: Bytes::copy_from_slice(media_type.as_str().as_bytes()),
            length: Bytes::from(size.to_string()),
        }
    }
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("digest", &self.digest)
            .field("media_type", &self.media_type)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// The media types a client accepts: every `Accept` line merged and split on commas, with
/// parameters (q-values) ignored, as distribution does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accept<'a> {
    /// Borrowed from the request: parsing allocates nothing but this list.
    /// Inline up to 8 types (docker, containerd and skopeo send 4 to 7): no allocation.
    types: smallvec::SmallVec<[&'a str; 8]>,
    /// No `Accept` header at all: the client gets what upstream gave.
    absent: bool,
}

/// The outcome of negotiating a stored manifest against a client's `Accept`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiation {
    /// Serve the stored manifest.
    Serve,
    /// Serve the linux/amd64 child of a Docker manifest list instead (protocol §3.3).
    PlatformChild,
    /// The client cannot take the stored type: 404 `MANIFEST_UNKNOWN` with this message.
    Unacceptable(&'static str),
}

impl<'a> Accept<'a> {
    /// Parses every `Accept` header line.
    pub fn parse(lines: impl IntoIterator<Item = &'a str>) -> Accept<'a> {
        let mut types = smallvec::SmallVec::new();
        let mut absent = true;
        for line in lines {
            absent = false;
            for item in line.split(',') {
                let essence = item.split(';').next().unwrap_or_default().trim();
                if !essence.is_empty() {
                    types.push(essence);
                }
            }
        }
        Accept { types, absent }
    }

    fn accepts(&self, media_type: &str) -> bool {
        self.absent
            || self
                .types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(media_type) || *t == "*/*")
    }

    /// distribution's rule: OCI types the client does not accept are 404; a Docker list
    /// requested by tag by a client that takes schema 2 but not lists yields its linux/amd64
    /// child; everything else is served as stored.
    pub fn negotiate(&self, stored: &MediaType, by_tag: bool) -> Negotiation {
        if self.accepts(stored.as_str()) {
            return Negotiation::Serve;
        }
        if stored.is(MediaType::OCI_MANIFEST) {
            Negotiation::Unacceptable(
                "OCI manifest found, but accept header does not support OCI manifests",
            )
        } else if stored.is(MediaType::OCI_INDEX) {
            Negotiation::Unacceptable(
                "OCI index found, but accept header does not support OCI indexes",
            )
        } else if stored.is(MediaType::DOCKER_LIST) && by_tag {
            if self.accepts(MediaType::DOCKER_MANIFEST) {
                Negotiation::PlatformChild
            } else {
                Negotiation::Unacceptable(
                    "manifest list found, but accept header supports neither lists nor schema 2 manifests",
                )
            }
        } else {
            Negotiation::Serve
        }
    }
}

/// The digest of the linux/amd64 entry of a manifest list, if it has one.
pub fn platform_child(list: &[u8]) -> Option<Digest> {
    #[derive(serde::Deserialize)]
    struct List {
        manifests: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        digest: String,
        platform: Option<Platform>,
    }
    #[derive(serde::Deserialize)]
    struct Platform {
        architecture: String,
        os: String,
    }
    let list: List = serde_json::from_slice(list).ok()?;
    list.manifests
        .into_iter()
        .find(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .and_then(|e| e.digest.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mt(s: &str) -> MediaType {
        MediaType::from_content_type(s)
    }

    #[test]
    fn parses_accept_lines() {
        let a = Accept::parse([
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json; q=0.5, application/vnd.oci.image.index.v1+json",
        ]);
        assert!(a.accepts(MediaType::OCI_MANIFEST));
        assert!(a.accepts(MediaType::DOCKER_MANIFEST));
        assert!(a.accepts(MediaType::OCI_INDEX));
        assert!(!a.accepts(MediaType::DOCKER_LIST));
        assert!(Accept::parse([]).accepts(MediaType::DOCKER_LIST));
        assert!(Accept::parse(["text/html, */*"]).accepts(MediaType::DOCKER_LIST));
        assert!(!Accept::parse([""]).accepts(MediaType::DOCKER_LIST));
    }

    #[test]
    fn negotiates_like_distribution() {
        let schema2_only = Accept::parse([MediaType::DOCKER_MANIFEST]);
        let full = Accept::parse([UPSTREAM_ACCEPT]);
        let cases = [
            (&full, MediaType::OCI_INDEX, true, Negotiation::Serve),
            (
                &schema2_only,
                MediaType::OCI_INDEX,
                true,
                Negotiation::Unacceptable(
                    "OCI index found, but accept header does not support OCI indexes",
                ),
            ),
            (
                &schema2_only,
                MediaType::OCI_MANIFEST,
                false,
                Negotiation::Unacceptable(
                    "OCI manifest found, but accept header does not support OCI manifests",
                ),
            ),
            (
                &schema2_only,
                MediaType::DOCKER_LIST,
                true,
                Negotiation::PlatformChild,
            ),
            (
                &schema2_only,
                MediaType::DOCKER_LIST,
                false,
                Negotiation::Serve,
            ),
            (
                &Accept::parse(["application/json"]),
                MediaType::DOCKER_MANIFEST,
                true,
                Negotiation::Serve,
            ),
            (
                &Accept::parse(["application/json"]),
                MediaType::DOCKER_LIST,
                true,
                Negotiation::Unacceptable(
                    "manifest list found, but accept header supports neither lists nor schema 2 manifests",
                ),
            ),
        ];
        for (accept, stored, by_tag, want) in cases {
            assert_eq!(
                accept.negotiate(&mt(stored), by_tag),
                want,
                "{accept:?} {stored}"
            );
        }
    }

    #[test]
    fn only_manifest_answers_get_a_manifest_type() {
        let oci = r#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        let named = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let cases: [(Option<&str>, &str, Option<&str>); 14] = [
            (
                Some(MediaType::DOCKER_MANIFEST),
                "not even json",
                Some(MediaType::DOCKER_MANIFEST),
            ),
            (
                Some("application/vnd.oci.image.index.v1+json; charset=utf-8"),
                "{}",
                Some(MediaType::OCI_INDEX),
            ),
            (
                Some(MediaType::DOCKER_SCHEMA1_SIGNED),
                "{}",
                Some(MediaType::DOCKER_SCHEMA1_SIGNED),
            ),
            (Some("text/plain"), named, None),
            (Some("text/html"), oci, None),
            (Some("application/octet-stream"), oci, None),
            (None, named, Some(MediaType::OCI_INDEX)),
            (Some("application/json"), oci, Some(MediaType::OCI_MANIFEST)),
            (
                Some(""),
                r#"{"schemaVersion":2,"manifests":[]}"#,
                Some(MediaType::OCI_INDEX),
            ),
            (
                Some("application/json; charset=utf-8"),
                r#"{"schemaVersion":1,"fsLayers":[],"signatures":[]}"#,
                Some(MediaType::DOCKER_SCHEMA1_SIGNED),
            ),
            (
                None,
                r#"{"schemaVersion":1,"fsLayers":[]}"#,
                Some(MediaType::DOCKER_SCHEMA1),
            ),
            (None, r#"{"schemaVersion":2,"mediaType":"text/html"}"#, None),
            (
                None,
                r#"{"schemaVersion":2,"config":{},"manifests":[]}"#,
                None,
            ),
            (None, "root:x:0:0:root:/root:/bin/bash", None),
        ];
        for (content_type, body, want) in cases {
            let got = MediaType::of_manifest_answer(content_type.map(mt).as_ref(), body.as_bytes());
            assert_eq!(
                got.as_ref().map(MediaType::as_str),
                want,
                "{content_type:?} {body}"
            );
        }
    }

    #[test]
    fn strips_content_type_parameters() {
        assert_eq!(
            mt("Application/JSON; charset=utf-8").as_str(),
            "application/json"
        );
    }

    #[test]
    fn finds_amd64_child() {
        let d1 = format!("sha256:{}", "1".repeat(64));
        let d2 = format!("sha256:{}", "2".repeat(64));
        let list = format!(
            r#"{{"manifests":[{{"digest":"{d1}","platform":{{"architecture":"arm64","os":"linux"}}}},{{"digest":"{d2}","platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        assert_eq!(
            platform_child(list.as_bytes()).map(|d| d.to_string()),
            Some(d2)
        );
        assert_eq!(platform_child(b"{}"), None);
    }
}
