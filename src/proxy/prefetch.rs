//! Prefetch when a tag moves (`prefetch_on_move`): once a revalidation has found a tag at a new
//! digest, what clients pulled under the old one is fetched at the new one in the background:
//! for an index, the new manifests of the platforms whose manifests were cached under the old
//! index, then their configs and layers not cached yet; for a plain image, its new blobs. The
//! first pull after an upstream release is then all hits.
//!
//! It goes through the same single-flight fetches as client requests (a client asking for the
//! same manifest or blob meanwhile joins it), under the upstream's concurrency cap, and asks
//! nothing while the rate-limit budget is below `ratelimit_reserve`.

use super::Proxy;
use crate::error::Error;
use crate::registry::{ByteRange, Contents, Descriptor, Digest, RepoName, Tag};
use futures_util::{StreamExt, TryStreamExt};
use std::sync::Arc;
use tracing::Instrument;

/// Most platform manifests one move prefetches.
const MAX_PLATFORMS: usize = 16;
/// Most platform entries of an index looked up in the cache.
const MAX_LOOKUPS: usize = 64;
/// Most blobs of one image prefetched (a manifest may name any number).
const MAX_BLOBS: usize = 256;
/// Blobs one prefetch downloads at once, as a client pulls layers.
const BLOBS_AT_ONCE: usize = 2;
/// Blobs all prefetches of one upstream download at once.
pub(super) const PREFETCH_PLACES: usize = 4;

/// What one prefetch fetched from upstream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Fetched {
    manifests: u64,
    blobs: u64,
    bytes: u64,
    /// It stopped early: the rate-limit budget went below the reserve.
    held: bool,
}

impl Proxy {
    /// Starts the prefetch for `tag`, moved from `from` to `to`, behind the answer that found
    /// the move (when `prefetch_on_move` is on).
    pub(super) fn prefetch_moved(
        self: &Arc<Self>,
        name: &RepoName,
        tag: &Tag,
        from: &Digest,
        to: &Digest,
    ) {
        if !self.prefetch_on_move {
            return;
        }
        let (this, name, tag) = (Arc::clone(self), name.clone(), tag.clone());
        let (from, to) = (from.clone(), to.clone());
        let task = async move {
            let mut fetched = Fetched::default();
            let outcome = this.prefetch(&name, &from, &to, &mut fetched).await;
            this.upstream
                .metrics
                .prefetched(fetched.manifests, fetched.blobs);
            match outcome {
                Err(e) => {
                    tracing::warn!(repo = %name, %tag, to = %to, manifests = fetched.manifests, blobs = fetched.blobs, error = %crate::error::Chain(&e), "prefetch after the tag moved failed")
                }
                Ok(()) if fetched.held => {
                    tracing::warn!(repo = %name, %tag, to = %to, manifests = fetched.manifests, blobs = fetched.blobs, "prefetch after the tag moved stopped: the rate-limit budget is below the reserve")
                }
                Ok(()) if fetched != Fetched::default() => {
                    tracing::info!(repo = %name, %tag, to = %to, manifests = fetched.manifests, blobs = fetched.blobs, bytes = fetched.bytes, "prefetched what the moved tag now names")
                }
                Ok(()) => {
                    tracing::debug!(repo = %name, %tag, to = %to, "nothing to prefetch after the tag moved")
                }
            }
        };
        tokio::spawn(Box::pin(task).in_current_span());
    }

    async fn prefetch(
        self: &Arc<Self>,
        name: &RepoName,
        from: &Digest,
        to: &Digest,
        fetched: &mut Fetched,
    ) -> Result<(), Error> {
        let Some(old) = self.manifests.get(from).await else {
            return Ok(());
        };
        let new = match self.manifests.get(to).await {
            Some(new) => new,
            None => {
                if self.below_reserve(fetched) {
                    return Ok(());
                }
                fetched.manifests += 1;
                self.fetch_digest(name, to).await?
            }
        };
        let images = match (Contents::parse(&old.bytes), Contents::parse(&new.bytes)) {
            (Some(Contents::Index(old)), Some(Contents::Index(new))) => {
                self.platforms_pulled(&old, new, MAX_PLATFORMS).await
            }
            // A tag that was an index and is now one image: its blobs, if anything was pulled.
            (Some(Contents::Index(old)), Some(Contents::Image(_))) => {
                let any = old
                    .iter()
                    .filter(|d| d.platform.is_some())
                    .cloned()
                    .collect();
                if self.platforms_pulled(&old, any, 1).await.is_empty() {
                    Vec::new()
                } else {
                    vec![to.clone()]
                }
            }
            (Some(Contents::Image(_)), Some(Contents::Image(_))) => vec![to.clone()],
            // An image that became an index: which platform the old one was is in its config,
            // not its manifest; nothing is guessed.
            _ => Vec::new(),
        };
        for image in images {
            let manifest = match self.manifests.get(&image).await {
                // Cached for another repository only: whether this one may see it is for
                // upstream to say when a client asks; nothing is prefetched through it.
                Some(_) if !self.manifests.granted(name, &image) => continue,
                Some(manifest) => manifest,
                None => {
                    if self.below_reserve(fetched) {
                        return Ok(());
                    }
                    fetched.manifests += 1;
                    self.fetch_digest(name, &image).await?
                }
            };
            if let Some(Contents::Image(blobs)) = Contents::parse(&manifest.bytes) {
                self.prefetch_blobs(name, blobs, fetched).await?;
            }
        }
        Ok(())
    }

    /// The entries of `new` (at most `most`) for the platforms whose manifests under `old` are
    /// cached. Only old entries of a platform `new` names are looked up, and only the first
    /// [`MAX_LOOKUPS`] of `new` (a lookup may reach the disk or the bucket; both indexes came
    /// from upstream, of any length).
    async fn platforms_pulled(
        &self,
        old: &[Descriptor],
        new: Vec<Descriptor>,
        most: usize,
    ) -> Vec<Digest> {
        let mut picked = Vec::new();
        for entry in new.into_iter().take(MAX_LOOKUPS) {
            if picked.len() == most {
                break;
            }
            let Some(platform) = &entry.platform else {
                continue;
            };
            let Some(before) = old.iter().find(|d| d.platform.as_ref() == Some(platform)) else {
                continue;
            };
            if self.manifests.has_manifest(&before.digest).await {
                picked.push(entry.digest);
            }
        }
        picked
    }

    /// Downloads the blobs not stored yet, a few at a time, each to its end (verified and
    /// stored); joins a download already under way.
    async fn prefetch_blobs(
        self: &Arc<Self>,
        name: &RepoName,
        blobs: Vec<Descriptor>,
        fetched: &mut Fetched,
    ) -> Result<(), Error> {
        let missing: Vec<Descriptor> = blobs
            .into_iter()
            .filter(|b| b.size > 0 && !self.blobs.contains(&b.digest))
            .take(MAX_BLOBS)
            .collect();
        let mut downloads = futures_util::stream::iter(missing)
            .map(|blob| async move {
                self.download_to_end(name, &blob.digest)
                    .await
                    .map(|fetched| fetched.then_some(blob.size))
            })
            .buffer_unordered(BLOBS_AT_ONCE);
        while let Some(done) = downloads.next().await {
            if let Some(size) = done? {
                fetched.blobs += 1;
                fetched.bytes = fetched.bytes.saturating_add(size);
            }
        }
        Ok(())
    }

    /// Fetches a blob and waits until it is stored: a follower's last byte comes only once the
    /// whole blob has verified, so asking for it (and nothing more) waits for the end. `false`
    /// when nothing was fetched (a download for another repository this one may not join, or
    /// the blob stored meanwhile).
    async fn download_to_end(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<bool, Error> {
        // Prefetches of every moved tag share a few places, beside clients' downloads.
        let _turn = self.prefetch_places.acquire().await;
        // As a client's request: a download started for another repository is joined only
        // where access from this one is known.
        let shared_ok = self.manifests.granted(name, digest);
        let joined = self
            .fetch_blob(name, digest, Some(ByteRange::Suffix(1)), shared_ok)
            .await?;
        let super::blob_fetch::Joined::Body(body) = joined else {
            return Ok(false);
        };
        // Stored meanwhile (a client's download ended after this looked): nothing fetched.
        if body.source == crate::metrics::Outcome::Hit {
            return Ok(false);
        }
        body.stream
            .try_for_each(|_| async { Ok(()) })
            .await
            // The download failed: the follower's stream says why.
            .map_err(|e| Error::Upstream(Arc::new(e)))?;
        Ok(true)
    }

    /// Whether the budget is below the reserve (then nothing more is fetched).
    fn below_reserve(&self, fetched: &mut Fetched) -> bool {
        fetched.held = self.upstream.limits.below_reserve(self.reserve);
        fetched.held
    }
}
