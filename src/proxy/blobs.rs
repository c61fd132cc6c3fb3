//! Cache-or-fetch for blobs: the store first (for another repository only where access is
//! known), else one shared download. HEAD never becomes an upstream GET.

use super::Proxy;
use super::blob_fetch::Joined;
use super::failure;
use crate::blobs::BlobBody;
use crate::error::Error;
use crate::metrics::Outcome;
use crate::registry::ByteRange;
use crate::registry::{Digest, RepoName};
use std::sync::Arc;

/// What a blob HEAD learned.
#[derive(Debug, Clone, Copy)]
pub struct BlobHead {
    /// Size in bytes.
    pub size: u64,
    /// Hit or miss.
    pub source: Outcome,
}

impl Proxy {
    /// The rule for serving a stored blob for `name`: one fetched with credentials only where
    /// upstream shows it (an upstream HEAD, once per repository).
    pub(super) async fn may_share_stored(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<(), Error> {
        let private = self.restricted || self.blobs.is_private(digest);
        self.may_share(name, digest, private, || {
            Box::pin(self.upstream.head_blob(name, digest))
        })
        .await
        .map_err(failure::blob)
    }

    /// GET of a blob, possibly a single range.
    pub async fn blob(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobBody, Error> {
        Box::pin(self.serve_blob(name, digest, range))
            .await
            .map_err(|e| failure::offline(e, || format!("blob {name}@{digest}")))
    }

    /// HEAD of a blob: the store, a download under way, or an upstream HEAD.
    pub async fn blob_head(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobHead, Error> {
        self.describe_blob(name, digest)
            .await
            .map_err(|e| failure::offline(e, || format!("blob {name}@{digest}")))
    }

    async fn serve_blob(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobBody, Error> {
        if self.blobs.verified_size(digest).await.is_some() {
            self.may_share_stored(name, digest).await?;
            if let Some(body) = self.blobs.open_stored(digest, range).await? {
                return Ok(body);
            }
        }
        // A download started for another repository is joined under the same rule as a
        // stored blob: only where access from `name` is known or confirmed by upstream.
        let shared_ok = self.manifests.granted(name, digest);
        let joined = self.fetch_blob(name, digest, range, shared_ok).await?;
        let body = match joined {
            Joined::Body(body) => body,
            // A download started with credentials for another upstream or repository: this
            // repository's upstream must show the blob first.
            Joined::OtherRepository => {
                self.may_share(name, digest, true, || {
                    Box::pin(self.upstream.head_blob(name, digest))
                })
                .await
                .map_err(failure::blob)?;
                match self.fetch_blob(name, digest, range, true).await? {
                    Joined::Body(body) => body,
                    Joined::OtherRepository => return Err(Error::BlobUnknown),
                }
            }
        };
        // Upstream served `digest` from `name` (this request's download, or one it may join);
        // not so for the stored blob a download left since the first look (a hit, as above).
        if body.source != Outcome::Hit {
            self.manifests.grant(name, digest);
        }
        Ok(body)
    }

    async fn describe_blob(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobHead, Error> {
        if let Some(size) = self.blobs.verified_size(digest).await {
            self.may_share_stored(name, digest).await?;
            return Ok(BlobHead {
                size,
                source: Outcome::Hit,
            });
        }
        if let Some(size) = self.blobs.downloading_size(digest)
            && self.manifests.granted(name, digest)
        {
            return Ok(BlobHead {
                size,
                source: Outcome::Miss,
            });
        }
        let head = self
            .upstream
            .head_blob(name, digest)
            .await
            .map_err(failure::blob)?;
        if head.digest.as_ref().is_some_and(|d| d != digest) {
            return Err(failure::invalid(
                "blob HEAD digest differs from the one asked for",
            ));
        }
        self.manifests.grant(name, digest);
        let size = head
            .size
            .ok_or_else(|| failure::invalid("blob HEAD without Content-Length"))?;
        Ok(BlobHead {
            size,
            source: Outcome::Miss,
        })
    }
}
