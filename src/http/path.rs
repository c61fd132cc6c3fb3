//! The `/v2/` tail → what is asked for. Repository names contain '/', so the tail is parsed
//! from the right (protocol §4.3): `<name>/manifests/<ref>`, `<name>/blobs/<digest>`,
//! `<name>/tags/list`, `<name>/referrers/<digest>`.

use crate::error::Error;
use crate::registry::{Digest, Reference, RepoName};
use crate::registry::{DigestError, ReferenceError};

/// A parsed registry API path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryPath {
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        /// Repository.
        name: RepoName,
        /// Tag or digest.
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob {
        /// Repository.
        name: RepoName,
        /// Blob digest.
        digest: Digest,
    },
    /// `/v2/<name>/tags/list`
    TagsList {
        /// Repository.
        name: RepoName,
    },
    /// `/v2/<name>/referrers/<digest>` (OCI distribution-spec v1.1)
    Referrers {
        /// Repository.
        name: RepoName,
        /// The subject's digest.
        digest: Digest,
    },
}

impl RegistryPath {
    /// The repository the path is about.
    pub fn name(&self) -> &RepoName {
        match self {
            RegistryPath::Manifest { name, .. }
            | RegistryPath::Blob { name, .. }
            | RegistryPath::TagsList { name }
            | RegistryPath::Referrers { name, .. } => name,
        }
    }

    /// Parses the part after `/v2/`, raw (not percent-decoded: '%' is never valid here).
    pub fn parse(tail: &str, docker_hub: bool) -> Result<RegistryPath, Error> {
        // From the right: <name>/<keyword>/<last>; the name is whatever precedes.
        let mut parts = tail.rsplitn(3, '/');
        let (last, keyword, rest) = (parts.next().unwrap_or_default(), parts.next(), parts.next());
        let name = || {
            let raw = rest.unwrap_or_default();
            RepoName::parse(raw, docker_hub).map_err(|e| Error::NameInvalid(e.to_string()))
        };
        match (keyword, rest.is_some()) {
            (Some("tags"), true) if last == "list" => Ok(RegistryPath::TagsList { name: name()? }),
            (Some("manifests"), true) => {
                let name = name()?;
                // A malformed digest is 400 DIGEST_INVALID; a reference that is no valid tag
                // names no manifest: 404 MANIFEST_UNKNOWN, as the OCI conformance suite expects.
                let reference = Reference::parse(last).map_err(|e| match e {
                    ReferenceError::Digest(d) => Error::DigestInvalid(d.to_string()),
                    ReferenceError::Tag(t) => Error::ManifestUnknown(t.to_string()),
                })?;
                Ok(RegistryPath::Manifest { name, reference })
            }
            (Some("blobs"), true) if last != "uploads" => {
                let name = name()?;
                let digest = last
                    .parse()
                    .map_err(|e: DigestError| Error::DigestInvalid(e.to_string()))?;
                Ok(RegistryPath::Blob { name, digest })
            }
            (Some("referrers"), true) => {
                let name = name()?;
                let digest = last
                    .parse()
                    .map_err(|e: DigestError| Error::DigestInvalid(e.to_string()))?;
                Ok(RegistryPath::Referrers { name, digest })
            }
            _ if tail.split('/').any(|s| s == "uploads") => {
                Err(Error::Unsupported("pushing".into()))
            }
            _ => Err(Error::NotFound(format!("/v2/{tail}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tail: &str) -> Result<String, String> {
        RegistryPath::parse(tail, true)
            .map(|p| match p {
                RegistryPath::Manifest { name, reference } => {
                    format!("manifest {name} {reference}")
                }
                RegistryPath::Blob { name, digest } => format!("blob {name} {digest}"),
                RegistryPath::TagsList { name } => format!("tags {name}"),
                RegistryPath::Referrers { name, digest } => format!("referrers {name} {digest}"),
            })
            .map_err(|e| match e {
                Error::NameInvalid(_) => "NAME_INVALID".into(),
                Error::TagInvalid(_) => "TAG_INVALID".into(),
                Error::DigestInvalid(_) => "DIGEST_INVALID".into(),
                Error::NotFound(_) => "NOT_FOUND".into(),
                Error::ManifestUnknown(_) => "MANIFEST_UNKNOWN".into(),
                Error::Unsupported(_) => "UNSUPPORTED".into(),
                other => format!("{other:?}"),
            })
    }

    #[test]
    fn parses_tails() {
        let d = format!("sha256:{}", "a".repeat(64));
        let long_tag = "t".repeat(200);
        let cases: Vec<(String, Result<String, String>)> = vec![
            (
                "library/alpine/manifests/3.20".into(),
                Ok("manifest library/alpine 3.20".into()),
            ),
            (
                "alpine/manifests/latest".into(),
                Ok("manifest library/alpine latest".into()),
            ),
            ("a/b/c/manifests/v1".into(), Ok("manifest a/b/c v1".into())),
            (
                format!("a/b/manifests/{d}"),
                Ok(format!("manifest a/b {d}")),
            ),
            (
                format!("library/alpine/blobs/{d}"),
                Ok(format!("blob library/alpine {d}")),
            ),
            (
                "library/alpine/tags/list".into(),
                Ok("tags library/alpine".into()),
            ),
            (
                "manifests/x/manifests/y".into(),
                Ok("manifest manifests/x y".into()),
            ),
            (
                format!("library/alpine/referrers/{d}"),
                Ok(format!("referrers library/alpine {d}")),
            ),
            (
                "library/alpine/referrers/sha256:xyz".into(),
                Err("DIGEST_INVALID".into()),
            ),
            (
                "library/alpine/referrers/latest".into(),
                Err("DIGEST_INVALID".into()),
            ),
            ("../etc/manifests/latest".into(), Err("NAME_INVALID".into())),
            (
                "Library/alpine/manifests/latest".into(),
                Err("NAME_INVALID".into()),
            ),
            (
                "library%2falpine/manifests/latest".into(),
                Err("NAME_INVALID".into()),
            ),
            ("/manifests/latest".into(), Err("NAME_INVALID".into())),
            (
                format!("library/alpine/manifests/{long_tag}"),
                Err("MANIFEST_UNKNOWN".into()),
            ),
            (
                "library/alpine/manifests/.INVALID_MANIFEST_NAME".into(),
                Err("MANIFEST_UNKNOWN".into()),
            ),
            (
                "library/alpine/manifests/sha256:xyz".into(),
                Err("DIGEST_INVALID".into()),
            ),
            (
                "library/alpine/blobs/latest".into(),
                Err("DIGEST_INVALID".into()),
            ),
            (
                "library/alpine/blobs/uploads/".into(),
                Err("UNSUPPORTED".into()),
            ),
            ("library/alpine".into(), Err("NOT_FOUND".into())),
            ("_catalog".into(), Err("NOT_FOUND".into())),
        ];
        for (tail, want) in cases {
            assert_eq!(parse(&tail), want, "{tail}");
        }
    }
}
