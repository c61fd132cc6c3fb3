//! What a manifest refers to (image-spec `manifest.md`, `image-index.md`): an index or list
//! names platform manifests; an image manifest names its config and layers. Read for the cache
//! API and warm-up, never to re-serialize anything.

use super::Digest;
use serde::{Deserialize, Serialize};

/// A descriptor in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Descriptor {
    /// Content digest.
    pub digest: Digest,
    /// Declared media type.
    pub media_type: Option<String>,
    /// Declared size in bytes.
    pub size: u64,
    /// `os/architecture[/variant]`, for an index entry that names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// What a manifest refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// An index or manifest list: its platform manifests.
    Index(Vec<Descriptor>),
    /// An image manifest: its config, then its layers.
    Image(Vec<Descriptor>),
}

#[derive(Deserialize)]
struct Raw {
    manifests: Option<Vec<RawDescriptor>>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    digest: String,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    size: Option<u64>,
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl RawDescriptor {
    fn into_descriptor(self) -> Option<Descriptor> {
        Some(Descriptor {
            digest: self.digest.parse().ok()?,
            media_type: self.media_type,
            size: self.size.unwrap_or(0),
            platform: self.platform.map(|p| match p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            }),
        })
    }
}

impl Contents {
    /// Parses a manifest's bytes; `None` for anything that is neither an index nor an image
    /// manifest (or names a malformed digest).
    pub fn parse(bytes: &[u8]) -> Option<Contents> {
        let raw: Raw = serde_json::from_slice(bytes).ok()?;
        if let Some(manifests) = raw.manifests {
            return manifests
                .into_iter()
                .map(RawDescriptor::into_descriptor)
                .collect::<Option<Vec<_>>>()
                .map(Contents::Index);
        }
        let config = raw.config?.into_descriptor()?;
        let layers = raw
            .layers
            .unwrap_or_default()
            .into_iter()
            .map(RawDescriptor::into_descriptor)
            .collect::<Option<Vec<_>>>()?;
        Some(Contents::Image(
            std::iter::once(config).chain(layers).collect(),
        ))
    }
}

/// Whether `platform` (`os/arch[/variant]`) is what `wanted` asks for: the same, or `wanted`
/// without a variant.
pub fn platform_matches(platform: &str, wanted: &str) -> bool {
    platform == wanted || platform.starts_with(&format!("{wanted}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_indexes_and_images() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = format!(
            r#"{{"manifests":[{{"digest":"{}","size":5,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},{{"digest":"{}","size":7}}]}}"#,
            d('a'),
            d('b')
        );
        let Some(Contents::Index(children)) = Contents::parse(index.as_bytes()) else {
            panic!("not an index");
        };
        assert_eq!(children[0].platform.as_deref(), Some("linux/arm64/v8"));
        assert_eq!(children[1].size, 7);
        let image = format!(
            r#"{{"config":{{"digest":"{}","size":1}},"layers":[{{"digest":"{}","size":2}}]}}"#,
            d('c'),
            d('e')
        );
        let Some(Contents::Image(blobs)) = Contents::parse(image.as_bytes()) else {
            panic!("not an image");
        };
        assert_eq!(blobs.len(), 2);
        assert!(Contents::parse(b"{}").is_none());
        assert!(Contents::parse(br#"{"manifests":[{"digest":"x"}]}"#).is_none());
        assert!(platform_matches("linux/arm64/v8", "linux/arm64"));
        assert!(!platform_matches("linux/arm", "linux/arm64"));
    }
}
