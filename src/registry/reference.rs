//! Manifest references: a tag or a digest (distribution-spec §Pulling manifests).

use super::{Digest, DigestError};
use std::fmt;
use std::sync::Arc;

/// A validated tag, `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Arc<str>);

/// Why a string is not a tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tag must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
pub struct TagError;

impl Tag {
    /// Parses a tag.
    pub fn parse(s: &str) -> Result<Tag, TagError> {
        let bytes = s.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
        let rest_ok = bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b));
        if first_ok && rest_ok && bytes.len() <= 128 {
            Ok(Tag(s.into()))
        } else {
            Err(TagError)
        }
    }

    /// The tag text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A tag, resolved through the tag index.
    Tag(Tag),
    /// A digest, content-addressed.
    Digest(Digest),
}

/// Why a reference is invalid, in the terms of the registry error it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Contains ':' but is not a digest we accept.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// Not a valid tag.
    #[error(transparent)]
    Tag(#[from] TagError),
}

impl Reference {
    /// Parses a reference. Tags cannot contain ':', so a ':' means a digest
    /// (distribution `manifestDispatcher`).
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(Tag::parse(s)?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let t128 = "a".repeat(128);
        let t129 = "a".repeat(129);
        let t200 = "b".repeat(200);
        let cases: &[(&str, Option<bool>)] = &[
            ("latest", Some(false)),
            ("3.20", Some(false)),
            ("_under", Some(false)),
            ("v1.0-rc_1", Some(false)),
            (&t128, Some(false)),
            (&digest, Some(true)),
            (&t129, None),
            (&t200, None),
            ("", None),
            (".hidden", None),
            ("-dash", None),
            ("a/b", None),
            ("sha256:xyz", None),
            ("a b", None),
        ];
        for (input, want) in cases {
            let got = Reference::parse(input)
                .ok()
                .map(|r| matches!(r, Reference::Digest(_)));
            assert_eq!(got, *want, "{input}");
        }
    }
}
