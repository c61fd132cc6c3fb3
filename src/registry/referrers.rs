//! The referrers vocabulary (distribution-spec v1.1 §Listing Referrers, image-spec
//! `image-index.md`): the tag a subject's referrers index goes under when a registry has no
//! referrers API, the descriptors of an index as upstream wrote them, the `artifactType`
//! filter, and the index pullthrough answers with. Pure code, no I/O.

use super::{Digest, Tag};
use bytes::Bytes;
use serde_json::Value;

/// The media type of a referrers answer (an OCI image index).
pub const REFERRERS_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// The most `artifactType` values one request may filter by, and the longest one (a media
/// type is at most 255 characters, RFC 6838 §4.2).
const MAX_FILTERS: usize = 16;
const MAX_FILTER_LEN: usize = 255;

/// The referrers tag schema's tag for `subject`: `<alg>-<encoded>`, the algorithm cut to 32
/// characters and the encoded part to 64 (distribution-spec §Referrers Tag Schema).
pub fn referrers_tag(subject: &Digest) -> Option<Tag> {
    let algorithm: String = subject.algorithm().as_str().chars().take(32).collect();
    let encoded: String = subject.hex().chars().take(64).collect();
    Tag::parse(&format!("{algorithm}-{encoded}")).ok()
}

/// One descriptor of a referrers list: its fields as upstream wrote them (`mediaType`,
/// `digest`, `size`, `artifactType`, `annotations`, and any other), with the two pullthrough
/// reads parsed out.
#[derive(Debug, Clone, PartialEq)]
pub struct Referrer {
    /// The manifest's digest, the key of the union.
    pub digest: Digest,
    /// Its `artifactType`, for the filter.
    pub artifact_type: Option<String>,
    /// The descriptor object, kept whole.
    pub descriptor: Value,
}

impl Referrer {
    /// A descriptor from an index's `manifests`; `None` when it is no object with a digest
    /// pullthrough accepts (such an entry names nothing a client could fetch through it).
    pub fn from_descriptor(descriptor: Value) -> Option<Referrer> {
        let object = descriptor.as_object()?;
        let digest = object.get("digest")?.as_str()?.parse().ok()?;
        object.get("mediaType")?.as_str()?;
        let artifact_type = object
            .get("artifactType")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Some(Referrer {
            digest,
            artifact_type,
            descriptor,
        })
    }
}

/// The descriptors of an image index body (`manifests`), each kept whole; entries that are
/// not descriptors are left out. `None` when the body is no JSON object with a `manifests`
/// array.
pub fn index_descriptors(body: &[u8]) -> Option<Vec<Value>> {
    #[derive(serde::Deserialize)]
    struct Index {
        manifests: Vec<Value>,
    }
    let index: Index = serde_json::from_slice(body).ok()?;
    let mut kept: Vec<Value> = index
        .manifests
        .into_iter()
        .filter(|d| Referrer::from_descriptor(d.clone()).is_some())
        .collect();
    // Collected in place: without this the list would keep the parsed array's room, entries
    // left out included (an index of a few descriptors among a million zeros).
    kept.shrink_to_fit();
    Some(kept)
}

/// The union by digest of several lists of descriptors, the first list's entries first and
/// each digest once (its first descriptor wins).
pub fn union<'a>(lists: impl IntoIterator<Item = &'a [Value]>) -> Vec<Referrer> {
    let mut out: Vec<Referrer> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for list in lists {
        for descriptor in list {
            if let Some(r) = Referrer::from_descriptor(descriptor.clone())
                && seen.insert(r.digest.clone())
            {
                out.push(r);
            }
        }
    }
    out
}

/// The `artifactType` filter of a referrers request: empty means none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactFilter(Vec<String>);

/// Why a referrers query is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// More values than `MAX_FILTERS` (16).
    #[error("at most {MAX_FILTERS} artifactType values")]
    TooMany,
    /// A value that is no media type: empty, too long, or with control characters.
    #[error("artifactType must be a media type of 1 to {MAX_FILTER_LEN} visible characters")]
    Invalid,
}

impl ArtifactFilter {
    /// The `artifactType` values of a query string (percent-decoded; other keys, like `ns`,
    /// are ignored). Several values select referrers of any of them.
    pub fn parse(query: Option<&str>) -> Result<ArtifactFilter, FilterError> {
        let mut types = Vec::new();
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            if key != "artifactType" {
                continue;
            }
            if types.len() == MAX_FILTERS {
                return Err(FilterError::TooMany);
            }
            let visible = value.bytes().all(|b| b.is_ascii_graphic());
            if value.is_empty() || value.len() > MAX_FILTER_LEN || !visible {
                return Err(FilterError::Invalid);
            }
            types.push(value.into_owned());
        }
        Ok(ArtifactFilter(types))
    }

    /// Whether a filter was asked for (then the answer says `OCI-Filters-Applied`).
    pub fn is_active(&self) -> bool {
        !self.0.is_empty()
    }

    fn admits(&self, referrer: &Referrer) -> bool {
        self.0.is_empty()
            || referrer
                .artifact_type
                .as_ref()
                .is_some_and(|t| self.0.contains(t))
    }
}

/// The referrers answer: an image index of the descriptors `filter` admits, built by
/// pullthrough (the descriptors themselves are upstream's).
pub fn render(referrers: &[Referrer], filter: &ArtifactFilter) -> Bytes {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Index<'a> {
        schema_version: u8,
        media_type: &'static str,
        manifests: Vec<&'a Value>,
    }
    let index = Index {
        schema_version: 2,
        media_type: REFERRERS_MEDIA_TYPE,
        manifests: referrers
            .iter()
            .filter(|r| filter.admits(r))
            .map(|r| &r.descriptor)
            .collect(),
    };
    // Serializing values parsed from JSON cannot fail; an empty index if it ever did.
    serde_json::to_vec(&index)
        .map_or_else(|_| Bytes::from_static(EMPTY_INDEX.as_bytes()), Bytes::from)
}

/// The answer when nothing refers to the subject.
pub const EMPTY_INDEX: &str =
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn digest(seed: &str) -> Digest {
        Digest::sha256(seed.as_bytes())
    }

    fn descriptor(seed: &str, artifact_type: &str) -> Value {
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(seed).to_string(),
            "size": 123,
            "artifactType": artifact_type,
            "annotations": { "org.opencontainers.image.created": "2026-01-01T00:00:00Z" },
        })
    }

    #[test]
    fn the_tag_schema_names_the_subject() {
        let d = digest("subject");
        assert_eq!(
            referrers_tag(&d).unwrap().as_str(),
            format!("sha256-{}", d.hex())
        );
        let long: Digest = format!("sha512:{}", "a".repeat(128)).parse().unwrap();
        assert_eq!(
            referrers_tag(&long).unwrap().as_str(),
            format!("sha512-{}", "a".repeat(64))
        );
    }

    #[test]
    fn union_keeps_each_digest_once_and_every_field() {
        let a = vec![descriptor("a", "application/spdx+json"), json!({"bad": 1})];
        let b = vec![
            descriptor("a", "other"),
            descriptor("b", "application/vnd.dev.cosign.artifact.sig.v1+json"),
        ];
        let all = union([a.as_slice(), b.as_slice()]);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].descriptor, a[0], "the first list's descriptor wins");
        assert_eq!(all[1].descriptor, b[1]);
        let body = render(&all, &ArtifactFilter::default());
        let index: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["mediaType"], REFERRERS_MEDIA_TYPE);
        assert_eq!(index["manifests"], json!([a[0], b[1]]));
    }

    #[test]
    fn filters_by_artifact_type() {
        let all = union([vec![
            descriptor("a", "application/spdx+json"),
            descriptor("b", "application/vnd.dev.cosign.artifact.sig.v1+json"),
            json!({"mediaType": "x", "digest": digest("c").to_string(), "size": 1}),
        ]
        .as_slice()]);
        let filter =
            ArtifactFilter::parse(Some("artifactType=application%2Fspdx%2Bjson&ns=x")).unwrap();
        assert!(filter.is_active());
        let index: Value = serde_json::from_slice(&render(&all, &filter)).unwrap();
        assert_eq!(index["manifests"], json!([all[0].descriptor]));
        let none = ArtifactFilter::parse(Some("artifactType=text%2Fplain")).unwrap();
        assert_eq!(
            &render(&all, &none)[..],
            EMPTY_INDEX.as_bytes(),
            "nothing matches: the empty index"
        );
        assert_eq!(render(&[], &ArtifactFilter::default()), EMPTY_INDEX);
    }

    #[test]
    fn refuses_filters_that_are_no_media_types() {
        assert!(!ArtifactFilter::parse(None).unwrap().is_active());
        assert!(
            !ArtifactFilter::parse(Some("ns=ghcr.io"))
                .unwrap()
                .is_active()
        );
        assert_eq!(
            ArtifactFilter::parse(Some("artifactType=")),
            Err(FilterError::Invalid)
        );
        assert_eq!(
            ArtifactFilter::parse(Some("artifactType=a%0Ab")),
            Err(FilterError::Invalid)
        );
        let long = format!("artifactType={}", "a".repeat(256));
        assert_eq!(
            ArtifactFilter::parse(Some(&long)),
            Err(FilterError::Invalid)
        );
        let many = vec!["artifactType=a"; 17].join("&");
        assert_eq!(
            ArtifactFilter::parse(Some(&many)),
            Err(FilterError::TooMany)
        );
    }

    #[test]
    fn index_descriptors_keep_only_descriptors() {
        let body = json!({
            "schemaVersion": 2,
            "manifests": [descriptor("a", "t"), {"digest": "sha256:nothex"}, 7],
        })
        .to_string();
        assert_eq!(
            index_descriptors(body.as_bytes()).unwrap(),
            vec![descriptor("a", "t")]
        );
        assert!(index_descriptors(b"{}").is_none());
        assert!(index_descriptors(b"not json").is_none());
    }
}
