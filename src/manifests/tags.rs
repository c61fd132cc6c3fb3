//! The tag index: tag → digest entries with their fetch and validation times (in memory, on
//! disk, and in object storage when replicas share one), how often each tag is served, and
//! which repositories upstream has shown a digest in.

use super::intents::{Reading, remove_in_order};
use super::store::{MAX_SHARED_OBJECT, ManifestCache};
use crate::clock::now_ms;
use crate::disk::Layout;
use crate::registry::{Digest, MediaType, RepoName, Tag};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// How often a tag was served, and when last (since this process started).
#[derive(Debug, Default)]
pub struct TagUsage {
    /// Client requests answered for the tag.
    pub hits: AtomicU64,
    /// The last one (ms since the Unix epoch).
    pub last_access: AtomicU64,
}

/// A tag entry read from another replica's object storage, not yet adopted here.
#[derive(Debug)]
pub struct SharedTag {
    /// The entry.
    pub entry: TagEntry,
    /// Its read, in the tag's order: adopting it fails if the tag changed here meanwhile.
    reading: Reading<(RepoName, Tag)>,
}

impl ManifestCache {
    fn tag_object(prefix: &str, name: &RepoName, tag: &Tag) -> String {
        format!("{prefix}tags/{name}/_tags/{tag}")
    }

    /// A tag entry another replica stored in object storage (`None` without object storage),
    /// to adopt here with [`ManifestCache::adopt_tag`].
    pub async fn shared_tag(&self, name: &RepoName, tag: &Tag) -> Option<SharedTag> {
        let (objects, prefix) = self.shared.as_ref()?;
        let reading = self.tag_order.reading(&(name.clone(), tag.clone()));
        let raw = objects
            .get_bytes(&Self::tag_object(prefix, name, tag), MAX_SHARED_OBJECT)
            .await?;
        let entry: TagEntry = serde_json::from_slice(&raw).ok()?;
        // An entry from a clock running ahead (by more than a few seconds) is not trusted: it
        // would look fresh for as long as the skew, everywhere.
        let soon = now_ms().saturating_add(5_000);
        (entry.validated_at <= soon && entry.fetched_at <= soon && entry.size <= MAX_SHARED_OBJECT)
            .then_some(SharedTag { entry, reading })
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

    /// The index entry of a tag.
    pub fn tag(&self, name: &RepoName, tag: &Tag) -> Option<TagEntry> {
        self.tags.get(&(name.clone(), tag.clone()))
    }

    /// Records a tag entry in memory, and on disk behind the caller (off the async workers,
    /// not fsynced: losing one only costs a HEAD). Racing updates leave the newest on disk and a
    /// purge stays purged (the intent journal, `intents.rs`).
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
        self.record_tag(name, tag, entry, None);
    }

    /// Records a tag entry read from object storage (memory and disk, not written back),
    /// unless the tag was purged or changed here while it was read: `false` then.
    pub fn adopt_tag(&self, name: &RepoName, tag: &Tag, shared: SharedTag) -> bool {
        self.record_tag(name, tag, shared.entry, Some(shared.reading))
    }

    /// Records a tag entry (one `read` from object storage only if its tag did not change
    /// meanwhile): in memory, and on disk behind the caller.
    fn record_tag(
        &self,
        name: &RepoName,
        tag: &Tag,
        entry: TagEntry,
        read: Option<Reading<(RepoName, Tag)>>,
    ) -> bool {
        let key = (name.clone(), tag.clone());
        let insert = || {
            self.grant(name, &entry.digest);
            self.tags.insert(key.clone(), entry.clone());
        };
        let write = match read {
            None => self.tag_order.write(&key, insert),
            Some(read) => match read.write(insert) {
                Some(write) => write,
                None => return false,
            },
        };
        let (path, layout) = (self.tag_path(name, tag), self.layout.clone());
        self.in_background("tag", format!("{name}:{tag}"), move || {
            let json = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
            let file = layout.prepare(&[&json], false)?;
            write.land(|| Layout::put_in_place(file, &path))
        });
        true
    }

    /// Forgets a tag upstream no longer has (here and in object storage).
    pub async fn remove_tag(&self, name: &RepoName, tag: &Tag) {
        if let Some((objects, prefix)) = &self.shared {
            objects.delete(&Self::tag_object(prefix, name, tag)).await;
        }
        self.forget_tag(name, tag).await;
    }

    /// Forgets a tag here (memory and disk) and not in object storage: for a purge another
    /// replica made, which deleted the shared entry itself. Deleting it again could delete the
    /// entry a replica stored after the purge, and cost the cluster one more upstream GET.
    pub async fn forget_tag(&self, name: &RepoName, tag: &Tag) {
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
    pub(super) fn load_tags(&self) -> std::io::Result<()> {
        let root = self.layout.root().join("tags");
        let mut stack = vec![root.clone()];
        let mut loaded = 0usize;
        while let Some(dir) = stack.pop() {
            for item in std::fs::read_dir(&dir)? {
                let item = item?;
                if !item.file_type()?.is_dir() {
                    continue;
                }
                if item.file_name() != "_tags" {
                    stack.push(item.path());
                } else if let Some(name) = repository_of(&root, &dir) {
                    loaded += self.load_tag_files(&name, &item.path())?;
                }
            }
        }
        tracing::info!(tags = loaded, "tag index loaded");
        Ok(())
    }

    /// Loads the tag files in repository `name`'s `_tags` directory; returns how many.
    fn load_tag_files(&self, name: &RepoName, dir: &Path) -> std::io::Result<usize> {
        let mut loaded = 0;
        for file in std::fs::read_dir(dir)? {
            let file = file?.path();
            match read_tag_file(&file) {
                Some((tag, entry)) => {
                    self.grant(name, &entry.digest);
                    self.tags.insert((name.clone(), tag), entry);
                    loaded += 1;
                }
                None => {
                    tracing::warn!(path = %file.display(), "deleting an unreadable tag file");
                    let _ = std::fs::remove_file(&file);
                }
            }
        }
        Ok(loaded)
    }
}

/// The repository whose `_tags` directory is in `dir`, a directory under the index's `root`.
fn repository_of(root: &Path, dir: &Path) -> Option<RepoName> {
    let relative = dir.strip_prefix(root).ok()?.to_str()?;
    RepoName::parse(relative, false).ok()
}

/// A tag file's tag (its name) and entry, when both can be read.
fn read_tag_file(file: &Path) -> Option<(Tag, TagEntry)> {
    let tag = Tag::parse(file.file_name()?.to_str()?).ok()?;
    let raw = std::fs::read(file).ok()?;
    Some((tag, serde_json::from_slice(&raw).ok()?))
}

#[cfg(test)]
mod tests {
    use super::super::store::tests::padded;
    use super::*;

    #[test]
    fn a_tags_directory_names_its_repository() {
        let root = Path::new("/data/tags");
        let cases = [
            ("/data/tags/library/alpine", Some("library/alpine")),
            ("/data/tags/alpine", Some("alpine")),
            ("/data/tags", None),
            ("/data/tags/Upper/case", None),
            ("/elsewhere/library/alpine", None),
        ];
        for (dir, want) in cases {
            let name = repository_of(root, Path::new(dir));
            assert_eq!(name.as_ref().map(RepoName::as_str), want, "{dir}");
        }
    }

    #[test]
    fn unreadable_tag_files_are_deleted_when_the_index_loads() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path()).unwrap();
        let tags = dir.path().join("tags/library/alpine/_tags");
        std::fs::create_dir_all(&tags).unwrap();
        std::fs::write(tags.join("latest"), b"not json").unwrap();
        let cache = ManifestCache::open(layout, 1 << 20).unwrap();
        let name = RepoName::parse("library/alpine", true).unwrap();
        assert!(cache.tag(&name, &Tag::parse("latest").unwrap()).is_none());
        assert!(!tags.join("latest").exists());
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

    /// An entry read from object storage (as `shared_tag` reads one) is adopted only if its
    /// tag was not purged or changed here while it was read.
    #[tokio::test]
    async fn an_entry_read_from_object_storage_is_adopted_only_if_the_tag_did_not_change() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ManifestCache::open(Layout::open(dir.path()).unwrap(), 1 << 20).unwrap();
        let name = RepoName::parse("library/alpine", true).unwrap();
        let tag = Tag::parse("3.20").unwrap();
        let entries: Vec<TagEntry> = (0..5)
            .map(|n| {
                let m = padded(n, 64);
                TagEntry::new(&m.digest, &m.media_type, 64)
            })
            .collect();
        let entry = |n: usize| entries[n].clone();
        let read = |e: TagEntry| SharedTag {
            entry: e,
            reading: cache.tag_order.reading(&(name.clone(), tag.clone())),
        };
        let untouched = read(entry(1));
        assert!(cache.adopt_tag(&name, &tag, untouched));
        assert_eq!(cache.tag(&name, &tag), Some(entry(1)));
        // Purged while it was read: nothing comes back.
        let purged = read(entry(2));
        cache.forget_tag(&name, &tag).await;
        assert!(!cache.adopt_tag(&name, &tag, purged));
        assert_eq!(cache.tag(&name, &tag), None, "a purged tag came back");
        // Fetched here while it was read: memory keeps what was fetched.
        let overtaken = read(entry(3));
        cache.set_tag(&name, &tag, entry(4)).await;
        assert!(!cache.adopt_tag(&name, &tag, overtaken));
        assert_eq!(cache.tag(&name, &tag), Some(entry(4)));
        cache.flushed().await;
        let reopened = ManifestCache::open(Layout::open(dir.path()).unwrap(), 1 << 20).unwrap();
        assert_eq!(
            reopened.tag(&name, &tag),
            Some(entry(4)),
            "disk differs from memory"
        );
    }
}
