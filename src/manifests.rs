//! The manifest cache: a digest → manifest store (exact bytes; RAM bounded by bytes, every
//! entry also on disk) and a separate tag → digest index with fetch and validation times, so
//! a manifest shared by several tags is held once. Digest entries never go stale; tag
//! freshness is decided by [`TagPolicy`].

use crate::clock::now_ms;
use crate::disk::{Layout, Writes};
use crate::objects::ObjectStorage;
use crate::registry::{Digest, Manifest, MediaType, RepoName, Tag};
use moka::sync::Cache;
use regex::RegexSet;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What the index knows about a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    /// The digest the tag pointed to when last validated.
    pub digest: Digest,
    /// Media type of that manifest.
    pub media_type: MediaType,
    /// Size of that manifest in bytes.
    pub size: u64,
    /// When the digest was first fetched (ms since the Unix epoch).
    pub fetched_at: u64,
    /// When upstream last confirmed the digest (ms since the Unix epoch).
    pub validated_at: u64,
    /// A newer digest upstream has, not yet taken (rate-limit budget below the reserve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_back: Option<Digest>,
}

impl TagEntry {
    /// A new entry validated now.
    pub fn new(digest: &Digest, media_type: &MediaType, size: u64) -> TagEntry {
        let now = now_ms();
        TagEntry {
            digest: digest.clone(),
            media_type: media_type.clone(),
            size,
            fetched_at: now,
            validated_at: now,
            held_back: None,
        }
    }
}

/// How far a tag answer can be trusted right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it without asking upstream.
    Fresh,
    /// Serve it, and revalidate in the background.
    Stale,
    /// Too old to serve without upstream's word.
    Expired,
}

/// The tag freshness rule: fresh for `ttl` after validation, then servable while revalidating
/// (or while upstream fails) for `max_stale` more; immutable tags are always fresh.
#[derive(Debug, Clone)]
pub struct TagPolicy {
    /// Freshness lifetime.
    pub ttl: Duration,
    /// Staleness allowed past `ttl`.
    pub max_stale: Duration,
    /// Tags that never move.
    pub immutable: RegexSet,
}

impl TagPolicy {
    /// Classifies an entry validated at `validated_at` (ms) as seen at `now` (ms).
    pub fn freshness(&self, tag: &Tag, validated_at: u64, now: u64) -> Freshness {
        if !self.immutable.is_empty() && self.immutable.is_match(tag.as_str()) {
            return Freshness::Fresh;
        }
        let age = Duration::from_millis(now.saturating_sub(validated_at));
        if age < self.ttl {
            Freshness::Fresh
        } else if age - self.ttl < self.max_stale {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }
}

/// How often a tag was served, and when last (since this process started).
#[derive(Debug, Default)]
pub struct TagUsage {
    /// Client requests answered for the tag.
    pub hits: AtomicU64,
    /// The last one (ms since the Unix epoch).
    pub last_access: AtomicU64,
}

/// Manifests by digest and tags by name, in memory and on disk.
#[derive(Debug)]
pub struct ManifestCache {
    by_digest: Cache<Digest, Arc<Manifest>>,
    tags: Cache<(RepoName, Tag), TagEntry>,
    /// (repository, digest) pairs upstream has shown us, for sharing content across
    /// repositories only where access is known.
    access: Cache<(RepoName, Digest), ()>,
    layout: Layout,
    /// Hits and last access of each tag (memory only).
    usage: Cache<(RepoName, Tag), Arc<TagUsage>>,
    /// The order of manifest file changes (by digest) and of tag file changes.
    manifest_order: Arc<Intents<Digest>>,
    tag_order: Arc<Intents<(RepoName, Tag)>>,
    /// Disk writes not finished yet.
    pending: Arc<Writes>,
    /// Object storage shared with other replicas, and this cache's place in it.
    shared: Option<(Arc<ObjectStorage>, String)>,
    /// Replicas coordinate through Redis: object storage writes are awaited.
    coordinated: bool,
}

/// The largest manifest or tag entry read back from object storage.
const MAX_SHARED_OBJECT: u64 = 4 * 1024 * 1024;

/// The order of one kind of file's changes. Each change (a write or a removal) takes a sequence
/// number in the same step as the memory change it mirrors; a write's file (prepared, fsynced
/// if need be, outside the lock) is renamed into place only if no newer change of that key came
/// since. So a file ends as memory did, whatever order the blocking threads run in: racing
/// updates leave the newest, and a purge is never undone by a write that was under way.
#[derive(Debug)]
struct Intents<K> {
    state: parking_lot::Mutex<IntentState<K>>,
}

#[derive(Debug)]
struct IntentState<K> {
    next: u64,
    /// Keys with writes in flight: the newest change's number, and how many writes are in flight.
    newest: HashMap<K, (u64, usize)>,
}

impl<K: std::hash::Hash + Eq + Clone> Default for Intents<K> {
    fn default() -> Self {
        Intents {
            state: parking_lot::Mutex::new(IntentState {
                next: 0,
                newest: HashMap::new(),
            }),
        }
    }
}

/// Removes `key` from `memory` and its file at `path` as one change in `order` (off the async
/// workers).
async fn remove_in_order<K, V>(order: Arc<Intents<K>>, memory: Cache<K, V>, key: K, path: PathBuf)
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let _ = tokio::task::spawn_blocking(move || {
        order.remove(
            &key,
            || memory.invalidate(&key),
            || {
                let _ = std::fs::remove_file(path);
            },
        );
    })
    .await;
}

impl<K: std::hash::Hash + Eq + Clone> Intents<K> {
    /// A write of `key`, with the memory change it mirrors; returns its number.
    fn write(&self, key: &K, change_memory: impl FnOnce()) -> u64 {
        let mut state = self.state.lock();
        change_memory();
        state.next += 1;
        let seq = state.next;
        let entry = state.newest.entry(key.clone()).or_insert((0, 0));
        *entry = (seq, entry.1 + 1);
        seq
    }

    /// Puts write `seq`'s file in place (`land`) if it is still the newest change of `key`.
    fn land(
        &self,
        key: &K,
        seq: u64,
        land: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut state = self.state.lock();
        let newest = state.newest.get(key).map(|e| e.0);
        let landed = if newest == Some(seq) { land() } else { Ok(()) };
        if let Some(entry) = state.newest.get_mut(key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                state.newest.remove(key);
            }
        }
        landed
    }

    /// A removal of `key`: the memory change and the file's deletion in one step, newer than
    /// every write in flight.
    fn remove(&self, key: &K, change_memory: impl FnOnce(), delete: impl FnOnce()) {
        let mut state = self.state.lock();
        change_memory();
        state.next += 1;
        let seq = state.next;
        if let Some(entry) = state.newest.get_mut(key) {
            entry.0 = seq;
        }
        delete();
    }
}

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
            pending: Arc::default(),
            usage: Cache::builder().max_capacity(1_000_000).build(),
            shared: None,
            coordinated: false,
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

    fn manifest_object(prefix: &str, digest: &Digest) -> String {
        format!(
            "{prefix}manifests/{}/{}",
            digest.algorithm().as_str(),
            digest.hex()
        )
    }

    fn tag_object(prefix: &str, name: &RepoName, tag: &Tag) -> String {
        format!("{prefix}tags/{name}/_tags/{tag}")
    }

    /// Runs an object storage write: awaited in a cluster (the replicas waiting on this one's
    /// lock read it next), else behind the caller, counted until done.
    async fn share(&self, request: impl Future<Output = ()> + Send + 'static) {
        if self.coordinated {
            return request.await;
        }
        let writing = self.pending.start();
        tokio::spawn(async move {
            request.await;
            drop(writing);
        });
    }

    /// A tag entry another replica stored in object storage (`None` without object storage).
    pub async fn shared_tag(&self, name: &RepoName, tag: &Tag) -> Option<TagEntry> {
        let (objects, prefix) = self.shared.as_ref()?;
        let raw = objects
            .get_bytes(&Self::tag_object(prefix, name, tag), MAX_SHARED_OBJECT)
            .await?;
        let entry: TagEntry = serde_json::from_slice(&raw).ok()?;
        // An entry from a clock running ahead (by more than a few seconds) is not trusted: it
        // would look fresh for as long as the skew, everywhere.
        let soon = now_ms().saturating_add(5_000);
        (entry.validated_at <= soon && entry.fetched_at <= soon && entry.size <= MAX_SHARED_OBJECT)
            .then_some(entry)
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.layout
            .root()
            .join("manifests")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    fn tag_path(&self, name: &RepoName, tag: &Tag) -> PathBuf {
        // Repository components never start with '_', so `_tags` cannot collide with one.
        self.layout
            .root()
            .join("tags")
            .join(name.as_str())
            .join("_tags")
            .join(tag.as_str())
    }

    /// A manifest by digest if it is in memory (no disk read).
    pub fn in_memory(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        self.by_digest.get(digest)
    }

    /// A manifest by digest, from memory or disk (read and hashed off the async workers). A
    /// file whose bytes do not hash to its name is deleted, never served.
    pub async fn get(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        if let Some(m) = self.by_digest.get(digest) {
            return Some(m);
        }
        let path = self.manifest_path(digest);
        let wanted = digest.clone();
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
            None => return self.get_shared(digest).await,
        };
        self.by_digest.insert(digest.clone(), Arc::clone(&m));
        Some(m)
    }

    /// A manifest another replica stored in object storage, verified, then kept here too.
    async fn get_shared(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        let (objects, prefix) = self.shared.as_ref()?;
        let key = Self::manifest_object(prefix, digest);
        let raw = objects.get_bytes(&key, MAX_SHARED_OBJECT).await?;
        let Some(manifest) = decode_manifest(&raw, digest) else {
            tracing::warn!(%digest, "a manifest in object storage does not match its digest; deleting it");
            objects.delete(&key).await;
            return None;
        };
        Some(self.store(manifest))
    }

    /// Stores a verified manifest in memory and, durably, on disk (and in object storage: in a
    /// cluster before returning, so the replicas waiting for it find it).
    pub async fn put(&self, manifest: Manifest) -> Arc<Manifest> {
        let m = self.store(manifest);
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

    fn store(&self, manifest: Manifest) -> Arc<Manifest> {
        let m = Arc::new(manifest);
        // Verified bytes, whole: served from memory at once, made durable (fsynced) behind the
        // response, never partial on disk (written beside and renamed).
        let digest = m.digest.clone();
        let seq = self.manifest_order.write(&digest, || {
            self.by_digest.insert(digest.clone(), Arc::clone(&m));
        });
        let path = self.manifest_path(&digest);
        let (layout, stored, order) = (
            self.layout.clone(),
            Arc::clone(&m),
            Arc::clone(&self.manifest_order),
        );
        self.in_background("manifest", digest.to_string(), move || {
            // A digest's file never changes: one already there is not written again (the write
            // still ends, so its key's order entry goes).
            if path.is_file() {
                return order.land(&stored.digest, seq, || Ok(()));
            }
            let header = format!("{}\n", stored.media_type);
            let file = layout.prepare(&[header.as_bytes(), &stored.bytes], true)?;
            order.land(&stored.digest, seq, || Layout::put_in_place(file, &path))
        });
        m
    }

    /// Runs a disk write off the async workers without the caller waiting, counted until done;
    /// a failure is logged.
    fn in_background(
        &self,
        what: &'static str,
        which: String,
        write: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) {
        let writing = self.pending.start();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = write() {
                tracing::error!(error = %e, what, which, "could not store on disk");
            }
            drop(writing);
        });
    }

    /// Waits until every disk write started so far has finished (for shutdown and tests).
    pub async fn flushed(&self) {
        self.pending.idle().await;
    }

    /// Counts a client request answered for a tag.
    pub fn touch(&self, name: &RepoName, tag: &Tag) {
        let key = (name.clone(), tag.clone());
        // `get` first: `get_with` allocates even when the entry exists.
        let usage = match self.usage.get(&key) {
            Some(usage) => usage,
            None => self.usage.get_with(key, || Arc::new(TagUsage::default())),
        };
        usage.hits.fetch_add(1, Ordering::Relaxed);
        usage.last_access.store(now_ms(), Ordering::Relaxed);
    }

    /// Hits and last access of a tag (zero and none when never served by this process).
    pub fn usage(&self, name: &RepoName, tag: &Tag) -> (u64, Option<u64>) {
        self.usage
            .get(&(name.clone(), tag.clone()))
            .map_or((0, None), |u| {
                (
                    u.hits.load(Ordering::Relaxed),
                    Some(u.last_access.load(Ordering::Relaxed)),
                )
            })
    }

    /// Every tag in the index, sorted by repository and tag.
    pub fn all_tags(&self) -> Vec<(RepoName, Tag, TagEntry)> {
        let mut all: Vec<_> = self
            .tags
            .iter()
            .map(|(key, entry)| (key.0.clone(), key.1.clone(), entry))
            .collect();
        all.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
        all
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

    /// The index entry of a tag.
    pub fn tag(&self, name: &RepoName, tag: &Tag) -> Option<TagEntry> {
        self.tags.get(&(name.clone(), tag.clone()))
    }

    /// Records a tag entry in memory, and on disk behind the caller (off the async workers,
    /// not fsynced: losing one only costs a HEAD). Racing updates leave the newest on disk and a
    /// purge stays purged ([`Intents`]).
    pub async fn set_tag(&self, name: &RepoName, tag: &Tag, entry: TagEntry) {
        if let Some((objects, prefix)) = &self.shared
            && let Ok(json) = serde_json::to_vec(&entry)
        {
            let (objects, key) = (Arc::clone(objects), Self::tag_object(prefix, name, tag));
            self.share(async move {
                objects.put_bytes(&key, json.into()).await;
            })
            .await;
        }
        self.adopt_tag(name, tag, entry);
    }

    /// Records a tag entry read from object storage (memory and disk, not written back).
    pub fn adopt_tag(&self, name: &RepoName, tag: &Tag, entry: TagEntry) {
        self.grant(name, &entry.digest);
        let key = (name.clone(), tag.clone());
        let seq = self.tag_order.write(&key, || {
            self.tags.insert(key.clone(), entry.clone());
        });
        let (path, layout, order) = (
            self.tag_path(name, tag),
            self.layout.clone(),
            Arc::clone(&self.tag_order),
        );
        self.in_background("tag", format!("{name}:{tag}"), move || {
            let json = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
            let file = layout.prepare(&[&json], false)?;
            order.land(&key, seq, || Layout::put_in_place(file, &path))
        });
    }

    /// Forgets a tag upstream no longer has (here and in object storage).
    pub async fn remove_tag(&self, name: &RepoName, tag: &Tag) {
        if let Some((objects, prefix)) = &self.shared {
            objects.delete(&Self::tag_object(prefix, name, tag)).await;
        }
        remove_in_order(
            Arc::clone(&self.tag_order),
            self.tags.clone(),
            (name.clone(), tag.clone()),
            self.tag_path(name, tag),
        )
        .await;
    }

    /// Records that `name` may read `digest` upstream.
    pub fn grant(&self, name: &RepoName, digest: &Digest) {
        self.access.insert((name.clone(), digest.clone()), ());
    }

    /// Whether upstream has shown `digest` in `name`.
    pub fn granted(&self, name: &RepoName, digest: &Digest) -> bool {
        self.access.contains_key(&(name.clone(), digest.clone()))
    }

    /// Loads `tags/<name>/_tags/<tag>` files; unreadable ones are deleted.
    fn load_tags(&self) -> std::io::Result<()> {
        let root = self.layout.root().join("tags");
        let mut stack = vec![root.clone()];
        let mut loaded = 0usize;
        while let Some(dir) = stack.pop() {
            for item in std::fs::read_dir(&dir)? {
                let item = item?;
                let path = item.path();
                if !item.file_type()?.is_dir() {
                    continue;
                }
                if item.file_name() != "_tags" {
                    stack.push(path);
                    continue;
                }
                let Some(name) = dir
                    .strip_prefix(&root)
                    .ok()
                    .and_then(|p| p.to_str())
                    .and_then(|p| RepoName::parse(p, false).ok())
                else {
                    continue;
                };
                for file in std::fs::read_dir(&path)? {
                    let file = file?.path();
                    let tag = file
                        .file_name()
                        .and_then(|t| t.to_str())
                        .and_then(|t| Tag::parse(t).ok());
                    let entry = std::fs::read(&file)
                        .ok()
                        .and_then(|raw| serde_json::from_slice::<TagEntry>(&raw).ok());
                    match (tag, entry) {
                        (Some(tag), Some(entry)) => {
                            self.grant(&name, &entry.digest);
                            self.tags.insert((name.clone(), tag), entry);
                            loaded += 1;
                        }
                        _ => {
                            tracing::warn!(path = %file.display(), "deleting an unreadable tag file");
                            let _ = std::fs::remove_file(&file);
                        }
                    }
                }
            }
        }
        tracing::info!(tags = loaded, "tag index loaded");
        Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn tag_freshness_follows_ttl_and_max_stale() {
        let policy = TagPolicy {
            ttl: Duration::from_secs(60),
            max_stale: Duration::from_secs(3600),
            immutable: RegexSet::new([r"^v\d+\.\d+\.\d+$"]).unwrap(),
        };
        let tag = |t: &str| Tag::parse(t).unwrap();
        let s = 1000;
        let cases = [
            ("latest", 0, Freshness::Fresh),
            ("latest", 59 * s, Freshness::Fresh),
            ("latest", 60 * s, Freshness::Stale),
            ("latest", 3659 * s, Freshness::Stale),
            ("latest", 3660 * s, Freshness::Expired),
            ("v1.2.3", 999_999 * s, Freshness::Fresh),
            ("v1.2", 999_999 * s, Freshness::Expired),
        ];
        for (t, age, want) in cases {
            assert_eq!(
                policy.freshness(&tag(t), 1_000_000_000, 1_000_000_000 + age),
                want,
                "{t} {age}"
            );
        }
        let blocking = TagPolicy {
            max_stale: Duration::ZERO,
            ..policy
        };
        assert_eq!(
            blocking.freshness(&tag("latest"), 0, 60 * s),
            Freshness::Expired
        );
    }

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

    fn padded(i: usize, size: usize) -> Manifest {
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

    /// A purge racing a new entry for the same tag: memory and disk end alike.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_purge_racing_a_new_tag_entry_leaves_memory_and_disk_alike() {
        let dir = tempfile::tempdir().unwrap();
        let cache =
            Arc::new(ManifestCache::open(Layout::open(dir.path()).unwrap(), 1 << 20).unwrap());
        let name = RepoName::parse("library/alpine", true).unwrap();
        let tag = Tag::parse("latest").unwrap();
        let m = padded(1, 100);
        let mut apart = 0;
        for i in 0..500u64 {
            let mut first = TagEntry::new(&m.digest, &m.media_type, 100);
            first.validated_at = i;
            cache.set_tag(&name, &tag, first.clone()).await;
            let mut second = first.clone();
            second.validated_at = i + 1_000_000;
            let (purger, setter) = (Arc::clone(&cache), Arc::clone(&cache));
            let (n1, t1, n2, t2) = (name.clone(), tag.clone(), name.clone(), tag.clone());
            let purge = tokio::spawn(async move { purger.remove_tag(&n1, &t1).await });
            let set = tokio::spawn(async move {
                while setter.tag(&n2, &t2).is_some() {
                    tokio::task::yield_now().await;
                }
                setter.set_tag(&n2, &t2, second).await;
            });
            purge.await.unwrap();
            set.await.unwrap();
            cache.flushed().await;
            let memory = cache.tag(&name, &tag);
            let disk = std::fs::read(cache.tag_path(&name, &tag))
                .ok()
                .and_then(|raw| serde_json::from_slice::<TagEntry>(&raw).ok());
            if memory != disk {
                apart += 1;
            }
        }
        assert_eq!(apart, 0, "{apart} of 500 rounds: memory and disk differ");
    }
}
