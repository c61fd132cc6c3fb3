//! The upstream operations behind manifest requests, each single-flight per key and run as its
//! own task: GET by tag, HEAD by tag, GET by digest, and tag revalidation.

use super::failure;
use super::{Proxy, TagKey, plausible};
use crate::clock::now_ms;
use crate::cluster::{Claim, Lock};
use crate::error::Error;
use crate::manifests::{Freshness, Missing, TagEntry};
use crate::metrics::StaleCause;
use crate::registry::{Digest, Manifest, Reference, RepoName};
use crate::upstream;
use std::sync::Arc;

/// The longest a replica waits for another one's fetch of the same tag or manifest.
const HOLDER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What coordinating a fetch with the other replicas decided.
pub(super) enum Turn {
    /// Fetch here, holding the cluster lock when there is a cluster.
    Go(Option<Lock>),
    /// Another replica fetched meanwhile: read its result from object storage (or, if it left
    /// none, fetch here without the lock).
    Waited,
    /// Another replica (its `advertise_url`) holds the lock now.
    Held(String),
}

impl Proxy {
    /// GET by tag (single-flight): stores the manifest and the tag entry.
    pub(super) fn fetch_tag(
        self: &Arc<Self>,
        key: TagKey,
    ) -> impl Future<Output = Result<TagEntry, Error>> + use<> {
        let (this, stored) = (Arc::clone(self), |key: &TagKey| self.fresh_tag(key));
        self.tag_gets
            .join_unless(&key, stored, move |key| async move {
                // Again inside the flight: a 404 remembered just after this request looked.
                let missing = Missing::Tag(key.1.clone());
                if this.remembered_missing(&key.0, &missing) {
                    return Err(failure::manifest_unknown());
                }
                let _lock = match this.coordinate_tag(&key).await {
                    Ok(entry) => return Ok(entry),
                    Err(lock) => lock,
                };
                let (name, tag) = key;
                let manifest = match this
                    .upstream
                    .get_manifest(&name, &Reference::Tag(tag.clone()))
                    .await
                {
                    Ok(manifest) => manifest,
                    Err(e) => return Err(this.manifest_failed(&name, &missing, e)),
                };
                let entry = TagEntry::new(
                    &manifest.digest,
                    &manifest.media_type,
                    manifest.bytes.len() as u64,
                );
                this.manifests.put(manifest).await;
                this.manifests.set_tag(&name, &tag, entry.clone()).await;
                Ok(entry)
            })
    }

    /// HEAD by tag for a client HEAD on an unknown tag (single-flight); falls back to a GET
    /// only if upstream's HEAD lacks the digest or length.
    pub(super) fn head_tag(
        self: &Arc<Self>,
        key: TagKey,
    ) -> impl Future<Output = Result<TagEntry, Error>> + use<> {
        let (this, stored) = (Arc::clone(self), |key: &TagKey| self.fresh_tag(key));
        self.tag_heads
            .join_unless(&key, stored, move |key| async move {
                let missing = Missing::Tag(key.1.clone());
                if this.remembered_missing(&key.0, &missing) {
                    return Err(failure::manifest_unknown());
                }
                let _lock = match this.coordinate_tag(&key).await {
                    Ok(entry) => return Ok(entry),
                    Err(lock) => lock,
                };
                let (name, tag) = key;
                let head = match this
                    .upstream
                    .head_manifest(&name, &Reference::Tag(tag.clone()))
                    .await
                {
                    Ok(head) => head,
                    Err(e) => return Err(this.manifest_failed(&name, &missing, e)),
                };
                match (head.digest, head.media_type, head.size) {
                    (Some(digest), Some(media_type), Some(size)) if plausible(size) => {
                        let entry = TagEntry::new(&digest, &media_type, size);
                        this.manifests.set_tag(&name, &tag, entry.clone()).await;
                        Ok(entry)
                    }
                    _ => this.fetch_tag((name, tag)).await,
                }
            })
    }

    /// Before fetching a tag unknown here: another replica's entry from object storage if
    /// there is a usable one, else (in a cluster) the tag's cluster lock, taken or waited for,
    /// then the entry read again (the holder's, or one stored just before the claim). `Err`
    /// carries the lock to hold while fetching.
    async fn coordinate_tag(self: &Arc<Self>, key: &TagKey) -> Result<TagEntry, Option<Lock>> {
        if let Some(entry) = self.shared_tag(key).await {
            return Ok(entry);
        }
        let turn = self.coordinate(self.tag_lock(key)).await;
        if !matches!(turn, Turn::Go(None))
            && let Some(entry) = self.shared_tag(key).await
        {
            return Ok(entry);
        }
        Err(turn.lock())
    }

    /// The tag's entry while it is fresh: one a flight stored since the caller looked.
    fn fresh_tag(&self, (name, tag): &TagKey) -> Option<TagEntry> {
        let entry = self.manifests.tag(name, tag)?;
        (self.freshness(tag, entry.validated_at) == Freshness::Fresh).then_some(entry)
    }

    /// In a cluster: takes the lock `key`, or waits until its holder released it.
    async fn coordinate(&self, key: String) -> Turn {
        match self.claim_turn(&key).await {
            Turn::Held(_) => {
                // A live holder renews its lock and a dead one's expires within LOCK_TTL:
                // waiting for the release is bounded by HOLDER_WAIT.
                if let Some(cluster) = self.replicas.cluster() {
                    cluster.released(&key, HOLDER_WAIT).await;
                }
                Turn::Waited
            }
            turn => turn,
        }
    }

    /// In a cluster: takes the lock `key`, or says who holds it.
    pub(super) async fn claim_turn(&self, key: &str) -> Turn {
        let Some(cluster) = self.replicas.cluster() else {
            return Turn::Go(None);
        };
        match cluster.claim(key).await {
            Claim::Owned(lock) => Turn::Go(Some(lock)),
            Claim::Held(owner) => Turn::Held(owner),
            Claim::Alone => Turn::Go(None),
        }
    }

    fn tag_lock(&self, (name, tag): &TagKey) -> String {
        format!("pullthrough:lock:tag:{}:{name}:{tag}", self.upstream_name)
    }

    /// A tag unknown here, from the entry another replica stored in object storage: served as
    /// it is while fresh or stale (a stale one is revalidated behind the answer). `None` when
    /// object storage has none, or only an expired one (which upstream must confirm first), or
    /// there is no object storage.
    async fn shared_tag(self: &Arc<Self>, key: &TagKey) -> Option<TagEntry> {
        let (name, tag) = key;
        let shared = self.manifests.shared_tag(name, tag).await?;
        if self.freshness(tag, shared.entry.validated_at) == Freshness::Expired {
            return None;
        }
        let read = shared.entry.clone();
        // Purged or fetched here while it was read: what memory has now stands, judged the same.
        let entry = if self.manifests.adopt_tag(name, tag, shared) {
            read
        } else {
            self.manifests.tag(name, tag)?
        };
        match self.freshness(tag, entry.validated_at) {
            Freshness::Expired => return None,
            Freshness::Stale if !self.offline() => drop(self.revalidate(key.clone())),
            Freshness::Stale | Freshness::Fresh => {}
        }
        Some(entry)
    }

    /// GET by digest (single-flight per repository and digest).
    pub(super) fn fetch_digest(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> impl Future<Output = Result<Arc<Manifest>, Error>> + use<> {
        let this = Arc::clone(self);
        let key = (name.clone(), digest.clone());
        // Fetched for this repository by a flight that ended since the caller looked.
        let stored = |(name, digest): &(RepoName, Digest)| {
            let granted = self.manifests.granted(name, digest);
            granted.then(|| self.manifests.in_memory(digest)).flatten()
        };
        self.digest_gets
            .join_unless(&key, stored, move |key| async move {
                let (name, digest) = key;
                let missing = Missing::Manifest(digest.clone());
                if this.remembered_missing(&name, &missing) {
                    return Err(failure::manifest_unknown());
                }
                // In a cluster one replica fetches it; the others take it from object storage
                // (where access cannot depend on credentials or access rules: else they fetch it
                // themselves, so upstream answers for this repository).
                let turn = if this.upstream.has_credentials() || this.restricted {
                    Turn::Go(None)
                } else {
                    let key = format!("pullthrough:lock:manifest:{}:{digest}", this.upstream_name);
                    this.coordinate(key).await
                };
                if !matches!(turn, Turn::Go(None))
                    && let Some(m) = this.manifests.get(&digest).await
                {
                    return Ok(m);
                }
                let _lock = turn.lock();
                let manifest = match this
                    .upstream
                    .get_manifest(&name, &Reference::Digest(digest.clone()))
                    .await
                {
                    Ok(manifest) => manifest,
                    Err(e) => return Err(this.manifest_failed(&name, &missing, e)),
                };
                this.manifests.grant(&name, &digest);
                Ok(this.manifests.put(manifest).await)
            })
    }

    /// Revalidates a tag with one upstream HEAD (single-flight per tag). An unchanged digest
    /// refreshes the entry; a moved one is taken (its manifest fetched first if the old one
    /// was cached), unless the rate-limit budget is below the reserve.
    pub(super) fn revalidate(
        self: &Arc<Self>,
        key: TagKey,
    ) -> impl Future<Output = Result<TagEntry, Error>> + use<> {
        let (this, stored) = (Arc::clone(self), |key: &TagKey| self.fresh_tag(key));
        self.tag_heads
            .join_unless(&key, stored, move |key| async move {
                let outcome = this.revalidate_now(&key).await;
                if outcome.is_err() {
                    this.backoff.insert(key, ());
                }
                outcome
            })
    }

    /// Takes another replica's entry of the tag when it was validated after `entry`: returned
    /// when fresh, else made `entry` (still to be revalidated).
    async fn newer_shared(&self, (name, tag): &TagKey, entry: &mut TagEntry) -> Option<TagEntry> {
        let shared = self.manifests.shared_tag(name, tag).await?;
        if shared.entry.validated_at <= entry.validated_at {
            return None;
        }
        let newer = shared.entry.clone();
        // Purged or changed here while it was read: then this revalidation goes on.
        if !self.manifests.adopt_tag(name, tag, shared) {
            return None;
        }
        let fresh = self.freshness(tag, newer.validated_at) == Freshness::Fresh;
        *entry = newer;
        fresh.then(|| entry.clone())
    }

    async fn revalidate_now(self: &Arc<Self>, key: &TagKey) -> Result<TagEntry, Error> {
        let (name, tag) = key;
        let Some(mut entry) = self.manifests.tag(name, tag) else {
            return self.fetch_tag(key.clone()).await;
        };
        // Another replica may have validated it since: then that answer stands, with no HEAD.
        // In a cluster one replica revalidates; the others wait for its answer and read it
        // (as does the holder, in case one came just before its claim).
        if let Some(fresh) = self.newer_shared(key, &mut entry).await {
            return Ok(fresh);
        }
        let turn = self.coordinate(self.tag_lock(key)).await;
        if !matches!(turn, Turn::Go(None))
            && let Some(fresh) = self.newer_shared(key, &mut entry).await
        {
            return Ok(fresh);
        }
        let _lock = turn.lock();
        let head = match self
            .upstream
            .head_manifest(name, &Reference::Tag(tag.clone()))
            .await
        {
            Ok(head) => head,
            Err(e @ (upstream::Error::NotFound { .. } | upstream::Error::Denied)) => {
                tracing::info!(repo = %name, %tag, "tag is gone upstream; forgetting it");
                self.manifests.remove_tag(name, tag).await;
                return Err(self.manifest_failed(name, &Missing::Tag(tag.clone()), e));
            }
            Err(e) => {
                tracing::warn!(repo = %name, %tag, error = %crate::error::Chain(&e), "tag revalidation failed");
                return Err(failure::manifest(e));
            }
        };
        let Some(new_digest) = head.digest.clone() else {
            return self.fetch_tag(key.clone()).await;
        };
        if new_digest == entry.digest {
            entry.validated_at = now_ms();
            entry.held_back = None;
            self.manifests.set_tag(name, tag, entry.clone()).await;
            return Ok(entry);
        }
        if self.upstream.limits.below_reserve(self.reserve) {
            if self.held_logged.get(key).is_none() {
                self.held_logged.insert(key.clone(), ());
                tracing::warn!(repo = %name, %tag, cached = %entry.digest, upstream = %new_digest, "tag moved upstream but the rate-limit budget is below the reserve; serving the cached digest");
            }
            self.upstream.metrics.stale(StaleCause::Budget);
            entry.validated_at = now_ms();
            entry.held_back = Some(new_digest.clone());
            self.manifests.set_tag(name, tag, entry.clone()).await;
            return Ok(entry);
        }
        let had_bytes = self.manifests.has_manifest(&entry.digest).await;
        let new_entry = match (head.media_type, head.size) {
            (Some(media_type), Some(size)) if !had_bytes && plausible(size) => {
                TagEntry::new(&new_digest, &media_type, size)
            }
            _ => {
                let manifest = self.fetch_digest(name, &new_digest).await?;
                TagEntry::new(
                    &manifest.digest,
                    &manifest.media_type,
                    manifest.bytes.len() as u64,
                )
            }
        };
        tracing::info!(repo = %name, %tag, from = %entry.digest, to = %new_entry.digest, "tag moved upstream");
        self.manifests.set_tag(name, tag, new_entry.clone()).await;
        if had_bytes {
            self.prefetch_moved(name, tag, &entry.digest, &new_entry.digest);
        }
        Ok(new_entry)
    }
}

impl Turn {
    /// The lock to hold while fetching, if any.
    fn lock(self) -> Option<Lock> {
        match self {
            Turn::Go(lock) => lock,
            Turn::Waited | Turn::Held(_) => None,
        }
    }
}
