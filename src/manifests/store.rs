//! The cache itself: manifests by digest, exact bytes, in memory (bounded by bytes) and on disk,
//! and in object storage when replicas share one; the tag index ([`super::tags`]) lives in the
//! same value. Every file write is ordered by an intent journal ([`super::intents`]).

use super::intents::{Intents, Reading, remove_in_order};
use super::tags::{TagEntry, TagUsage};
use crate::disk::{Layout, Writes};
use crate::objects::ObjectStorage;
use crate::registry::{Digest, Manifest, MediaType, RepoName, Tag};
use moka::sync::Cache;
use std::path::PathBuf;
use std::sync::Arc;

/// Manifests by digest and tags by name, in memory and on disk.
#[derive(Debug)]
pub struct ManifestCache {
    by_digest: Cache<Digest, Arc<Manifest>>,
    /// The tag index (see `tags.rs`).
    pub(super) tags: Cache<(RepoName, Tag), TagEntry>,
    /// (repository, digest) pairs upstream has shown us, for sharing content across
    /// repositories only where access is known.
    pub(super) access: Cache<(RepoName, Digest), ()>,
    pub(super) layout: Layout,
    /// Hits and last access of each tag (memory only).
    pub(super) usage: Cache<(RepoName, Tag), Arc<TagUsage>>,
    /// The order of manifest file changes (by digest) and of tag file changes.
    manifest_order: Arc<Intents<Digest>>,
    pub(super) tag_order: Arc<Intents<(RepoName, Tag)>>,
    /// Referrers lists by repository and subject (see `referrers.rs`), and their file order.
    pub(super) referrers: Cache<(RepoName, Digest), Arc<super::Referrers>>,
    pub(super) referrers_order: Arc<Intents<(RepoName, Digest)>>,
    /// Disk writes not finished yet.
    pending: Arc<Writes>,
    /// Object storage shared with other replicas, and this cache's place in it.
    pub(super) shared: Option<(Arc<ObjectStorage>, String)>,
    /// Replicas coordinate through Redis: object storage writes are awaited.
    coordinated: bool,
    /// Upstream 404s remembered for `negative_ttl` (nothing, unless [`Self::remembering`]).
    pub negative: super::Negative,
}

/// The largest manifest or tag entry read back from object storage.
pub(super) const MAX_SHARED_OBJECT: u64 = 4 * 1024 * 1024;

impl ManifestCache {
    /// Opens the cache and loads the tag index from disk.
    pub fn open(layout: Layout, memory_bytes: u64) -> std::io::Result<ManifestCache> {
        let by_digest = Cache::builder()
            .max_capacity(memory_bytes)
            .weigher(|_: &Digest, m: &Arc<Manifest>| {
                u32::try_from(m.bytes.len() + 256).unwrap_or(u32::MAX)
            })
            .build();
        let cache = ManifestCache {
            by_digest,
            tags: Cache::builder().max_capacity(1_000_000).build(),
            access: Cache::new(1_000_000),
            layout,
            manifest_order: Arc::default(),
            tag_order: Arc::default(),
            referrers: super::referrers::memory(),
            referrers_order: Arc::default(),
            pending: Arc::default(),
            usage: Cache::builder().max_capacity(1_000_000).build(),
            shared: None,
            coordinated: false,
            negative: super::Negative::default(),
        };
        cache.load_tags()?;
        Ok(cache)
    }

    /// Shares manifests and tag entries through object storage, under `prefix` there (`""`
    /// for the default upstream, `upstreams/<host>/` for the others).
    pub fn shared(
        mut self,
        objects: Arc<ObjectStorage>,
        prefix: String,
        coordinated: bool,
    ) -> ManifestCache {
        self.shared = Some((objects, prefix));
        self.coordinated = coordinated;
        self
    }

    /// Remembers upstream 404s in `negative` (this upstream's part of the shared cache).
    pub fn remembering(mut self, negative: super::Negative) -> ManifestCache {
        self.negative = negative;
        self
    }

    fn manifest_object(prefix: &str, digest: &Digest) -> String {
        format!(
            "{prefix}manifests/{}/{}",
            digest.algorithm().as_str(),
            digest.hex()
        )
    }

    /// Runs an object storage write: awaited in a cluster (the replicas waiting on this one's
    /// lock read it next), else behind the caller, counted until done.
    pub(super) async fn share(&self, request: impl Future<Output = ()> + Send + 'static) {
        if self.coordinated {
            return request.await;
        }
        let writing = self.pending.start();
        tokio::spawn(async move {
            request.await;
            drop(writing);
        });
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.layout
            .root()
            .join("manifests")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// A manifest by digest if it is in memory (no disk read).
    pub fn in_memory(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        self.by_digest.get(digest)
    }

    /// A manifest by digest, from memory or disk (read and hashed off the async workers). A
    /// file whose bytes do not hash to its name is deleted, never served. One a purge removes
    /// while it is read is answered to this caller, not kept.
    pub async fn get(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        if let Some(m) = self.by_digest.get(digest) {
            return Some(m);
        }
        let path = self.manifest_path(digest);
        let wanted = digest.clone();
        let reading = self.manifest_order.reading(digest);
        let loaded = tokio::task::spawn_blocking(move || {
            let raw = std::fs::read(&path).ok()?;
            let decoded = decode_manifest(&raw, &wanted);
            if decoded.is_none() {
                tracing::warn!(digest = %wanted, "deleting a stored manifest that does not match its digest");
                let _ = std::fs::remove_file(&path);
            }
            decoded
        })
        .await
        .ok()
        .flatten();
        let m = match loaded {
            Some(loaded) => Arc::new(loaded),
            None => return self.get_shared(digest, reading).await,
        };
        // Kept in memory unless a purge removed it while it was read.
        reading.adopt(|| self.by_digest.insert(digest.clone(), Arc::clone(&m)));
        Some(m)
    }

    /// A manifest another replica stored in object storage, verified, then kept here too
    /// (unless it was purged here while it was read).
    async fn get_shared(&self, digest: &Digest, reading: Reading<Digest>) -> Option<Arc<Manifest>> {
        let (objects, prefix) = self.shared.as_ref()?;
        let key = Self::manifest_object(prefix, digest);
        let raw = objects.get_bytes(&key, MAX_SHARED_OBJECT).await?;
        let Some(manifest) = decode_manifest(&raw, digest) else {
            tracing::warn!(%digest, "a manifest in object storage does not match its digest; deleting it");
            objects.delete(&key).await;
            return None;
        };
        Some(self.store(manifest, Some(reading)))
    }

    /// Stores a verified manifest in memory and, durably, on disk (and in object storage: in a
    /// cluster before returning, so the replicas waiting for it find it).
    pub async fn put(&self, manifest: Manifest) -> Arc<Manifest> {
        let m = self.store(manifest, None);
        if let Some((objects, prefix)) = &self.shared {
            let (objects, key, stored) = (
                Arc::clone(objects),
                Self::manifest_object(prefix, &m.digest),
                Arc::clone(&m),
            );
            self.share(async move {
                let mut object = format!("{}\n", stored.media_type).into_bytes();
                object.extend_from_slice(&stored.bytes);
                objects.put_bytes(&key, object.into()).await;
            })
            .await;
        }
        m
    }

    /// Keeps a verified manifest in memory and writes it behind the caller; one `read` from
    /// elsewhere is kept only if it was not purged here meanwhile.
    fn store(&self, manifest: Manifest, read: Option<Reading<Digest>>) -> Arc<Manifest> {
        let m = Arc::new(manifest);
        // Verified bytes, whole: served from memory at once, made durable (fsynced) behind the
        // response, never partial on disk (written beside and renamed).
        let digest = m.digest.clone();
        let insert = || {
            self.by_digest.insert(digest.clone(), Arc::clone(&m));
        };
        let write = match read {
            None => self.manifest_order.write(&digest, insert),
            Some(read) => match read.write(insert) {
                Some(write) => write,
                None => return m,
            },
        };
        let path = self.manifest_path(&digest);
        let (layout, stored) = (self.layout.clone(), Arc::clone(&m));
        self.in_background("manifest", digest.to_string(), move || {
            // A digest's file never changes: one already there is not written again (the
            // write ends as it is dropped).
            if path.is_file() {
                return Ok(());
            }
            let header = format!("{}\n", stored.media_type);
            let file = layout.prepare(&[header.as_bytes(), &stored.bytes], true)?;
            write.land(|| Layout::put_in_place(file, &path))
        });
        m
    }

    /// Runs a disk write off the async workers without the caller waiting, counted until done
    /// ([`Writes::behind`]); a failure is logged.
    pub(super) fn in_background(
        &self,
        what: &'static str,
        which: String,
        write: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) {
        self.pending.behind(move || {
            if let Err(e) = write() {
                tracing::error!(error = %e, what, which, "could not store on disk");
            }
        });
    }

    /// Waits until every disk write started so far has finished (for shutdown and tests).
    pub async fn flushed(&self) {
        self.pending.idle().await;
    }

    /// Whether a manifest's bytes are in memory.
    pub fn has_manifest_in_memory(&self, digest: &Digest) -> bool {
        self.by_digest.contains_key(digest)
    }

    /// Whether a manifest's bytes are cached (memory, disk or object storage), off the async
    /// workers.
    pub async fn has_manifest(&self, digest: &Digest) -> bool {
        if self.by_digest.contains_key(digest) {
            return true;
        }
        let path = self.manifest_path(digest);
        if tokio::task::spawn_blocking(move || path.is_file())
            .await
            .unwrap_or(false)
        {
            return true;
        }
        match &self.shared {
            Some((objects, prefix)) => objects
                .exists(&Self::manifest_object(prefix, digest))
                .await
                .unwrap_or(false),
            None => false,
        }
    }

    /// Forgets a manifest's bytes (memory, disk and object storage). Clients that already have
    /// them keep them.
    pub async fn remove_manifest(&self, digest: &Digest) {
        if let Some((objects, prefix)) = &self.shared {
            objects.delete(&Self::manifest_object(prefix, digest)).await;
        }
        self.forget_manifest(digest).await;
    }

    /// Forgets a manifest's bytes here (memory and disk) and not in object storage: for a
    /// purge another replica made (see `forget_tag`).
    pub async fn forget_manifest(&self, digest: &Digest) {
        remove_in_order(
            Arc::clone(&self.manifest_order),
            self.by_digest.clone(),
            digest.clone(),
            self.manifest_path(digest),
        )
        .await;
    }

    /// Manifests in memory, their bytes, and tags in the index.
    pub fn sizes(&self) -> (u64, u64, u64) {
        self.by_digest.run_pending_tasks();
        self.tags.run_pending_tasks();
        (
            self.by_digest.entry_count(),
            self.by_digest.weighted_size(),
            self.tags.entry_count(),
        )
    }
}

fn decode_manifest(raw: &[u8], digest: &Digest) -> Option<Manifest> {
    let split = raw.iter().position(|b| *b == b'\n')?;
    let media_type = MediaType::from_content_type(std::str::from_utf8(&raw[..split]).ok()?);
    let bytes = bytes::Bytes::copy_from_slice(&raw[split + 1..]);
    (Digest::of(digest.algorithm(), &bytes) == *digest)
        .then(|| Manifest::new(bytes, media_type, digest.clone()))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[tokio::test]
    async fn persists_manifests_and_tags() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = bytes::Bytes::from_static(
            br#"{"mediaType":"application\/vnd.oci.image.index.v1+json"}"#,
        );
        let digest = Digest::sha256(&bytes);
        let media_type = MediaType::from_content_type(MediaType::OCI_INDEX);
        let name = RepoName::parse("library/alpine", true).unwrap();
        let tag = Tag::parse("3.20").unwrap();
        {
            let cache = ManifestCache::open(Layout::open(dir.path()).unwrap(), 1 << 20).unwrap();
            cache
                .put(Manifest::new(
                    bytes.clone(),
                    media_type.clone(),
                    digest.clone(),
                ))
                .await;
            cache
                .set_tag(
                    &name,
                    &tag,
                    TagEntry::new(&digest, &media_type, bytes.len() as u64),
                )
                .await;
            cache.flushed().await;
        }
        let cache = ManifestCache::open(Layout::open(dir.path()).unwrap(), 1 << 20).unwrap();
        assert_eq!(cache.tag(&name, &tag).unwrap().digest, digest);
        let m = cache.get(&digest).await.unwrap();
        assert_eq!((m.bytes.clone(), m.media_type.clone()), (bytes, media_type));
        assert!(cache.granted(&name, &digest));

        // A corrupted file is deleted, not served.
        let other = Digest::sha256(b"x");
        let path = dir.path().join("manifests/sha256").join(other.hex());
        std::fs::write(&path, b"application/json\ny").unwrap();
        assert!(cache.get(&other).await.is_none());
        assert!(!path.exists());
    }

    /// A manifest of about `size` bytes, different for each `i`.
    pub(in crate::manifests) fn padded(i: usize, size: usize) -> Manifest {
        let mut text = format!("{{\"n\":{i},\"pad\":\"");
        while text.len() < size {
            text.push('x');
        }
        text.push_str("\"}");
        let bytes = bytes::Bytes::from(text);
        let digest = Digest::sha256(&bytes);
        Manifest::new(
            bytes,
            MediaType::from_content_type(MediaType::OCI_INDEX),
            digest,
        )
    }

    /// Written behind the response, whether or not memory kept it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_manifest_reaches_disk_under_memory_pressure() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ManifestCache::open(Layout::open(dir.path()).unwrap(), 64 * 1024).unwrap();
        let mut digests = Vec::new();
        for i in 0..1000 {
            let m = padded(i, 1024);
            digests.push(m.digest.clone());
            cache.put(m).await;
        }
        cache.flushed().await;
        let missing = digests
            .iter()
            .filter(|d| !cache.manifest_path(d).is_file())
            .count();
        assert_eq!(missing, 0, "{missing} of 1000 manifests never reached disk");
    }

    /// A purge right after a put is not undone by the write still under way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_is_not_undone_by_a_write_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ManifestCache::open(Layout::open(dir.path()).unwrap(), 1 << 20).unwrap();
        for i in 0..200 {
            let m = padded(i, 100);
            let digest = m.digest.clone();
            cache.put(m).await;
            cache.remove_manifest(&digest).await;
            cache.flushed().await;
            assert!(
                !cache.manifest_path(&digest).exists(),
                "round {i}: purged manifest back on disk"
            );
            assert!(cache.in_memory(&digest).is_none());
        }
    }
}
