//! The registry vocabulary: repository names, references, digests and manifest media
//! types, referrers, byte ranges, parsed once at the edge and trusted everywhere else. Pure
//! code, no I/O.

mod contents;
mod digest;
mod manifest;
mod name;
mod range;
mod reference;
mod referrers;

pub use contents::{Contents, Descriptor, platform_matches};
pub use digest::{Algorithm, Digest, DigestError, Verifier};
pub use manifest::{
    Accept, HeaderTexts, Manifest, MediaType, Negotiation, UPSTREAM_ACCEPT, platform_child,
};
pub use name::{NameError, RepoName};
pub use range::{ByteRange, ContentRange};
pub use reference::{Reference, ReferenceError, Tag, TagError};
pub use referrers::{
    ArtifactFilter, EMPTY_INDEX, FilterError, REFERRERS_MEDIA_TYPE, Referrer, index_descriptors,
    referrers_tag, render as render_referrers, union as union_referrers,
};
