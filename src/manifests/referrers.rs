//! The referrers lists: for each (repository, subject digest), what the upstream's referrers
//! API answered and the index under the referrers tag schema, with fetch and validation times.
//! In memory (bounded by bytes) and on disk (`referrers/<name>/_referrers/<alg>-<hex>`, read
//! back on a memory miss, so lists outlive restarts), written behind the caller in the order
//! of the intent journal like tags.

use super::intents::remove_in_order;
use super::store::ManifestCache;
use crate::disk::Layout;
use crate::registry::{ArtifactFilter, Digest, Referrer, RepoName};
use crate::registry::{render_referrers, union_referrers};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of referrers lists kept in memory per upstream (every list is on disk too).
pub(super) const MEMORY_BYTES: u64 = 16 * 1024 * 1024;
/// The largest referrers file read back from disk.
const MAX_FILE: u64 = 32 * 1024 * 1024;

/// What pullthrough knows of a subject's referrers upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferrersEntry {
    /// The descriptors the upstream's referrers API answered, all pages; `None` when the
    /// upstream has no referrers API (it answered 404).
    #[serde(default)]
    pub api: Option<Vec<Value>>,
    /// The index under the referrers tag schema (`sha256-<hex>`), when upstream has that tag.
    #[serde(default)]
    pub tag: Option<TagIndex>,
    /// When the list was first fetched (ms since the Unix epoch).
    pub fetched_at: u64,
    /// When upstream last confirmed it (ms since the Unix epoch).
    pub validated_at: u64,
    /// The API's answer went on past what pullthrough follows (pages or bytes): cut there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// The index under the referrers tag schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagIndex {
    /// Its digest (revalidation compares it with a HEAD's, and GETs only when it moved).
    pub digest: Digest,
    /// Its `manifests` entries, as they are.
    pub manifests: Vec<Value>,
}

/// A referrers list ready to serve: the entry, its union by digest, and the unfiltered answer.
#[derive(Debug)]
pub struct Referrers {
    /// What it was made from.
    pub entry: ReferrersEntry,
    /// The union by digest of the API's descriptors and the tag index's.
    pub list: Vec<Referrer>,
    /// The answer without a filter, rendered once.
    pub body: Bytes,
    /// About the heap all this takes (see [`Referrers::weight`]), reckoned once.
    heap: usize,
}

impl Referrers {
    /// Merges an entry: the API's descriptors first, then the tag index's not among them.
    pub fn new(mut entry: ReferrersEntry) -> Referrers {
        // Lists collected page by page, or parsed, have room to spare.
        if let Some(api) = &mut entry.api {
            api.shrink_to_fit();
        }
        if let Some(tag) = &mut entry.tag {
            tag.manifests.shrink_to_fit();
        }
        let list = union_referrers([
            entry.api.as_deref().unwrap_or_default(),
            entry.tag.as_ref().map_or(&[][..], |t| &t.manifests[..]),
        ]);
        let body = render_referrers(&list, &ArtifactFilter::default());
        let heap = heap_of_list(&entry, &list, &body);
        Referrers {
            entry,
            list,
            body,
            heap,
        }
    }

    /// What the list weighs in memory, in bytes, for the cache's bound: the heap it takes
    /// (reckoned from the values held, not from the rendered body: an upstream may list one
    /// digest many times, which the union keeps once), and the key's.
    pub fn weight(&self, name: &RepoName) -> u32 {
        let bytes = self.heap.saturating_add(name.as_str().len());
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// The size of a `serde_json::Value` in a vector or map.
const VALUE: usize = std::mem::size_of::<Value>();

/// About the heap a referrers list takes: the descriptors as JSON values twice (the entry's
/// and the union's, about ten times their rendered size), the rendered body, and a fixed part
/// (an empty list takes 320 bytes, the cache's entry some more). A quarter more for what the
/// reckoning leaves out (it came 5–12 % under the heap measured) and the allocator's rounding.
/// `tests/referrers_memory.rs` holds it to the heap dhat counts.
fn heap_of_list(entry: &ReferrersEntry, list: &[Referrer], body: &Bytes) -> usize {
    const FIXED: usize = 384;
    let values = |list: &Vec<Value>| {
        list.iter()
            .fold(list.capacity().saturating_mul(VALUE), |sum, v| {
                sum.saturating_add(heap_of(v))
            })
    };
    let entry = entry
        .api
        .as_ref()
        .map_or(0, values)
        .saturating_add(entry.tag.as_ref().map_or(0, |t| values(&t.manifests)));
    let union = list.iter().fold(
        list.len().saturating_mul(std::mem::size_of::<Referrer>()),
        |sum, r| {
            let own = heap_of(&r.descriptor)
                .saturating_add(r.artifact_type.as_ref().map_or(0, String::capacity))
                .saturating_add(16 + r.digest.hex().len());
            sum.saturating_add(own)
        },
    );
    let values = entry.saturating_add(union);
    FIXED
        .saturating_add(body.len())
        .saturating_add(values.saturating_add(values / 4))
}

/// About the heap a parsed JSON value holds beyond its own slot: strings' bytes, arrays'
/// slots, and objects' B-tree nodes. A node holds up to 11 keys and values (about 640 bytes,
/// allocated in full); past one node, nodes are counted as if 5 full, as keys inserted in order
/// leave them, with an inner node (96 bytes more) for every 5. Values come from `serde_json`'s
/// parser, nested at most 128 deep.
fn heap_of(value: &Value) -> usize {
    const NODE: usize = 11 * (std::mem::size_of::<String>() + VALUE) + 32;
    match value {
        Value::String(s) => s.capacity(),
        Value::Array(items) => items
            .iter()
            .fold(items.capacity().saturating_mul(VALUE), |sum, v| {
                sum.saturating_add(heap_of(v))
            }),
        Value::Object(map) => {
            let nodes = match map.len() {
                0 => 0,
                1..=11 => NODE,
                n => n.div_ceil(5).saturating_mul(NODE + 96),
            };
            map.iter().fold(nodes, |sum, (k, v)| {
                sum.saturating_add(k.capacity()).saturating_add(heap_of(v))
            })
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

type Key = (RepoName, Digest);

impl ManifestCache {
    fn referrers_dir(&self, name: &RepoName) -> PathBuf {
        // Repository components never start with '_', so `_referrers` cannot collide with one.
        self.layout
            .root()
            .join("referrers")
            .join(name.as_str())
            .join("_referrers")
    }

    fn referrers_path(&self, name: &RepoName, subject: &Digest) -> PathBuf {
        self.referrers_dir(name).join(format!(
            "{}-{}",
            subject.algorithm().as_str(),
            subject.hex()
        ))
    }

    /// The referrers list of `subject` in `name`: from memory, else from disk (read off the
    /// async workers; an unreadable file is deleted; one purged or replaced while it is read is
    /// answered to this caller, not kept).
    pub async fn referrers(&self, name: &RepoName, subject: &Digest) -> Option<Arc<Referrers>> {
        let key = (name.clone(), subject.clone());
        if let Some(found) = self.referrers.get(&key) {
            return Some(found);
        }
        let path = self.referrers_path(name, subject);
        let reading = self.referrers_order.reading(&key);
        let entry = tokio::task::spawn_blocking(move || read_entry(&path))
            .await
            .ok()
            .flatten()?;
        let referrers = Arc::new(Referrers::new(entry));
        // Kept in memory unless it was purged or replaced while it was read.
        reading.adopt(|| self.referrers.insert(key, Arc::clone(&referrers)));
        Some(referrers)
    }

    /// Records a referrers list in memory, and (unless it is empty) on disk behind the caller
    /// (not fsynced: losing one costs a refetch). Racing updates leave the newest; a purge
    /// stays purged.
    pub fn set_referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        entry: ReferrersEntry,
    ) -> Arc<Referrers> {
        let referrers = Arc::new(Referrers::new(entry));
        let key = (name.clone(), subject.clone());
        let write = self.referrers_order.write(&key, || {
            self.referrers.insert(key.clone(), Arc::clone(&referrers));
        });
        let (path, layout, stored) = (
            self.referrers_path(name, subject),
            self.layout.clone(),
            Arc::clone(&referrers),
        );
        self.in_background("referrers", format!("{name}@{subject}"), move || {
            // An empty list is kept in memory only (any client can ask for any subject: files
            // for each would fill the disk), and an older file of the subject goes.
            if stored.list.is_empty() {
                return write.land(|| match std::fs::remove_file(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    removed => removed,
                });
            }
            let json = serde_json::to_vec(&stored.entry).map_err(std::io::Error::other)?;
            let file = layout.prepare(&[&json], false)?;
            write.land(|| Layout::put_in_place(file, &path))
        });
        referrers
    }

    /// Forgets a referrers list (memory and disk).
    pub async fn remove_referrers(&self, name: &RepoName, subject: &Digest) {
        remove_in_order(
            Arc::clone(&self.referrers_order),
            self.referrers.clone(),
            (name.clone(), subject.clone()),
            self.referrers_path(name, subject),
        )
        .await;
    }

    /// The subjects of `name` with a referrers list here (memory or disk), sorted.
    pub async fn referrers_subjects(&self, name: &RepoName) -> Vec<Digest> {
        let mut subjects: Vec<Digest> = self
            .referrers
            .iter()
            .filter(|(key, _)| key.0 == *name)
            .map(|(key, _)| key.1.clone())
            .collect();
        let dir = self.referrers_dir(name);
        let on_disk = tokio::task::spawn_blocking(move || subjects_in(&dir))
            .await
            .unwrap_or_default();
        subjects.extend(on_disk);
        subjects.sort_by_key(Digest::to_string);
        subjects.dedup();
        subjects
    }
}

/// The memory side of the referrers lists, bounded by bytes.
pub(super) fn memory() -> moka::sync::Cache<Key, Arc<Referrers>> {
    moka::sync::Cache::builder()
        .max_capacity(MEMORY_BYTES)
        .weigher(|(name, _): &Key, r: &Arc<Referrers>| r.weight(name))
        .build()
}

/// A referrers file's entry; an unreadable one is deleted.
fn read_entry(path: &Path) -> Option<ReferrersEntry> {
    let file = std::fs::File::open(path).ok()?;
    let mut raw = Vec::new();
    let read = std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE), &mut raw);
    match read.ok().and_then(|_| serde_json::from_slice(&raw).ok()) {
        Some(entry) => Some(entry),
        None => {
            tracing::warn!(path = %path.display(), "deleting an unreadable referrers file");
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

/// The subjects named by the files of a `_referrers` directory (`<alg>-<hex>`).
fn subjects_in(dir: &Path) -> Vec<Digest> {
    let Ok(items) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    items
        .filter_map(Result::ok)
        .filter_map(|item| {
            let name = item.file_name();
            let (algorithm, hex) = name.to_str()?.split_once('-')?;
            format!("{algorithm}:{hex}").parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(seed: &str) -> ReferrersEntry {
        let d = Digest::sha256(seed.as_bytes());
        ReferrersEntry {
            api: Some(vec![json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": d.to_string(),
                "size": 10,
                "artifactType": "application/spdx+json",
            })]),
            tag: None,
            fetched_at: 1,
            validated_at: 2,
            truncated: false,
        }
    }

    #[tokio::test]
    async fn referrers_lists_outlive_a_restart_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        let name = RepoName::parse("library/alpine", true).unwrap();
        let subject = Digest::sha256(b"subject");
        {
            let cache = ManifestCache::open(Layout::open(dir.path()).unwrap(), 1 << 20).unwrap();
            cache.set_referrers(&name, &subject, entry("a"));
            cache.flushed().await;
        }
        let cache = ManifestCache::open(Layout::open(dir.path()).unwrap(), 1 << 20).unwrap();
        let read = cache.referrers(&name, &subject).await.unwrap();
        assert_eq!(read.entry, entry("a"));
        assert_eq!(read.list.len(), 1);
        assert_eq!(
            cache.referrers_subjects(&name).await,
            std::slice::from_ref(&subject)
        );
        cache.remove_referrers(&name, &subject).await;
        cache.flushed().await;
        assert!(cache.referrers(&name, &subject).await.is_none());
        assert!(cache.referrers_subjects(&name).await.is_empty());

        // A damaged file is deleted, not served.
        let path = cache.referrers_path(&name, &subject);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"not json").unwrap();
        assert!(cache.referrers(&name, &subject).await.is_none());
        assert!(!path.exists());
    }
}
