//! Cache-or-fetch for blobs: the store first (for another repository only where access is
//! known), else one shared download. HEAD never becomes an upstream GET.

use super::Proxy;
use crate::blobs::{BlobBody, ByteRange, Source};
use crate::error::Error;
use crate::registry::{Digest, RepoName};
use std::sync::Arc;

/// What a blob HEAD learned.
#[derive(Debug, Clone, Copy)]
pub struct BlobHead {
    /// Size in bytes.
    pub size: u64,
    /// Hit or miss.
    pub source: Source,
}

impl Proxy {
    /// GET of a blob, possibly a single range.
    pub async fn blob(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobBody, Error> {
        if self.blobs.contains(digest).await
            && self.may_share_blob(name, digest).await?
            && let Some(body) = self.blobs.open_stored(digest, range).await?
        {
            return Ok(body);
        }
        let fetch = self.blobs.fetch(&self.upstream, name, digest, range);
        let body = tokio::time::timeout(self.deadline, fetch)
            .await
            .map_err(|_| Error::GatewayTimeout)??;
        self.manifests.grant(name, digest);
        Ok(body)
    }

    /// HEAD of a blob: the store, a download under way, or an upstream HEAD.
    pub async fn blob_head(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobHead, Error> {
        if let Some(size) = self.blobs.stored_size(digest)
            && self.blobs.contains(digest).await
            && self.may_share_blob(name, digest).await?
        {
            return Ok(BlobHead {
                size,
                source: Source::Hit,
            });
        }
        if let Some(size) = self.blobs.downloading_size(digest)
            && self.manifests.granted(name, digest)
        {
            return Ok(BlobHead {
                size,
                source: Source::Miss,
            });
        }
        let head = tokio::time::timeout(self.deadline, self.upstream.head_blob(name, digest))
            .await
            .map_err(|_| Error::GatewayTimeout)?
            .map_err(Error::blob)?;
        if head.digest.as_ref().is_some_and(|d| d != digest) {
            return Err(Error::Upstream(crate::upstream::Error::BadResponse(
                "blob HEAD digest differs from the one asked for".into(),
            )));
        }
        self.manifests.grant(name, digest);
        match head.size {
            Some(size) => Ok(BlobHead {
                size,
                source: Source::Miss,
            }),
            None => Err(Error::Upstream(crate::upstream::Error::BadResponse(
                "blob HEAD without Content-Length".into(),
            ))),
        }
    }

    /// A stored blob is shared with another repository of the same upstream freely when no
    /// credentials are configured (all of it is public); otherwise only after an upstream blob
    /// HEAD shows this repository may read it.
    async fn may_share_blob(&self, name: &RepoName, digest: &Digest) -> Result<bool, Error> {
        if !self.upstream.has_credentials() || self.manifests.granted(name, digest) {
            return Ok(true);
        }
        match tokio::time::timeout(self.deadline, self.upstream.head_blob(name, digest)).await {
            Ok(Ok(_)) => {
                self.manifests.grant(name, digest);
                Ok(true)
            }
            Ok(Err(e)) => Err(Error::blob(e)),
            Err(_) => Err(Error::GatewayTimeout),
        }
    }
}
