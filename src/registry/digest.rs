//! Content digests (`algorithm:encoded`, OCI image-spec `descriptor.md` §Digests) and a
//! streaming verifier used for manifests and blobs alike.

use sha2::{Digest as _, Sha256, Sha512};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A hash algorithm pullthrough can verify. Digests with other algorithms are rejected at the
/// edge: content we cannot verify is content we must not cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `sha256`, required of every implementation.
    Sha256,
    /// `sha512`, optional in the spec.
    Sha512,
}

impl Algorithm {
    /// The name used in a digest string.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest such as `sha256:<64 lower-case hex>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    algorithm: Algorithm,
    /// Shared, so cloning a digest (every cache hit does) never allocates.
    hex: Arc<str>,
}

/// Why a string is not a digest pullthrough accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Not of the form `algorithm:encoded`.
    #[error("digest must have the form algorithm:hex")]
    Malformed,
    /// A well-formed digest whose algorithm we cannot verify.
    #[error("unsupported digest algorithm {0:?} (sha256 and sha512 are supported)")]
    UnsupportedAlgorithm(String),
    /// The encoded part has the wrong length or characters for its algorithm.
    #[error("{0} digest must be {1} lower-case hex characters")]
    BadEncoding(&'static str, usize),
}

impl Digest {
    /// The digest algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lower-case hex encoding, without the algorithm prefix.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Digest of `bytes` with `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut verifier = Verifier::new(algorithm);
        verifier.update(bytes);
        verifier.finish()
    }

    /// SHA-256 digest of `bytes`.
    pub fn sha256(bytes: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, bytes)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s.split_once(':').ok_or(DigestError::Malformed)?;
        let alg_ok = !alg.is_empty()
            && alg.split(['+', '.', '_', '-']).all(|c| {
                !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        let hex_ok = !hex.is_empty()
            && hex
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b));
        if !alg_ok || !hex_ok {
            return Err(DigestError::Malformed);
        }
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(DigestError::UnsupportedAlgorithm(other.to_owned())),
        };
        let lower_hex = hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if hex.len() != algorithm.hex_len() || !lower_hex {
            return Err(DigestError::BadEncoding(
                algorithm.as_str(),
                algorithm.hex_len(),
            ));
        }
        Ok(Digest {
            algorithm,
            hex: hex.into(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental hasher: feed bytes as they stream past, then compare with what was asked for.
#[derive(Debug, Clone)]
pub enum Verifier {
    /// Hashing with SHA-256.
    Sha256(Sha256),
    /// Hashing with SHA-512.
    Sha512(Sha512),
}

impl Verifier {
    /// A fresh hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Verifier::Sha256(Sha256::new()),
            Algorithm::Sha512 => Verifier::Sha512(Sha512::new()),
        }
    }

    /// Adds bytes to the hash.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Verifier::Sha256(h) => h.update(bytes),
            Verifier::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Verifier::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Verifier::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest {
            algorithm,
            hex: hex.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_digests() {
        let cases: &[(&str, Result<(), DigestError>)] = &[
            (&format!("sha256:{HEX}"), Ok(())),
            (&format!("sha512:{}", "a".repeat(128)), Ok(())),
            ("sha256:xyz", Err(DigestError::BadEncoding("sha256", 64))),
            (
                &format!("sha256:{}", HEX.to_uppercase()),
                Err(DigestError::BadEncoding("sha256", 64)),
            ),
            (
                &format!("sha256:{}", &HEX[..63]),
                Err(DigestError::BadEncoding("sha256", 64)),
            ),
            ("sha256", Err(DigestError::Malformed)),
            (":abc", Err(DigestError::Malformed)),
            ("sha256:", Err(DigestError::Malformed)),
            ("SHA256:abc", Err(DigestError::Malformed)),
            ("sha256:a/b", Err(DigestError::Malformed)),
            (
                "md5:abcdef",
                Err(DigestError::UnsupportedAlgorithm("md5".into())),
            ),
            (
                "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
                Err(DigestError::UnsupportedAlgorithm("sha256+b64u".into())),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Digest>().map(|_| ()), *want, "{input}");
        }
    }

    #[test]
    fn hashes_and_displays() {
        let d = Digest::sha256(b"");
        assert_eq!(d.to_string(), format!("sha256:{HEX}"));
        assert_eq!(d, format!("sha256:{HEX}").parse().unwrap());
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(b"hello ");
        v.update(b"world");
        assert_eq!(v.finish(), Digest::sha256(b"hello world"));
    }
}
