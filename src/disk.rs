//! The data directory: its layout, the marker that makes it pullthrough's, and crash-safe file
//! writes (every file is written under `tmp/`, flushed, and renamed into place, so a reader, or
//! a restart after `kill -9`, sees a whole file or none). pullthrough deletes only what it
//! created: it refuses a non-empty directory without its marker, and recreates its layout when
//! the directory is removed while it runs.

use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};

/// The file that marks a directory as a pullthrough cache.
pub const MARKER: &str = ".pullthrough-cache";
/// The lock file that keeps a second instance out of a data directory in use.
pub const LOCK: &str = ".pullthrough.lock";
/// The directories of the layout.
const DIRS: [&str; 4] = ["tmp", "manifests", "tags", "blobs"];

/// The on-disk layout under the data directory (or, for a further upstream, under
/// `upstreams/<host>/` with the data directory's `tmp/`).
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    /// The data directory itself.
    base: PathBuf,
}

/// A data directory taken by this process (see [`Layout::lock`]); dropping it lets another
/// process take it.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Why a directory cannot be used as the cache.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Not empty and not marked as pullthrough's.
    #[error(
        "{0} is not empty and is not a pullthrough cache (it has no {MARKER} file); choose an empty or new directory"
    )]
    Foreign(PathBuf),
    /// Another process holds the directory's lock.
    #[error(
        "{path} is in use by another pullthrough{}; give each instance its own data_dir",
        pid.map_or(String::new(), |p| format!(" (pid {p})"))
    )]
    InUse {
        /// The directory.
        path: PathBuf,
        /// The holder's process id, as it wrote it.
        pid: Option<u32>,
    },
    /// Not a directory, or not readable or writable.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

impl Layout {
    /// Opens (or creates) the cache directory: refuses a foreign one, then creates the layout
    /// and removes temp files a previous process left behind.
    pub fn open(root: &Path) -> Result<Layout, LayoutError> {
        let io = |source| LayoutError::Io {
            path: root.to_path_buf(),
            source,
        };
        let layout = Layout {
            root: root.to_path_buf(),
            base: root.to_path_buf(),
        };
        std::fs::create_dir_all(root).map_err(io)?;
        Self::check_ours(root)?;
        let tmp = layout.tmp();
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io)?;
        }
        layout.create().map_err(io)?;
        Ok(layout)
    }

    /// Refuses a directory that holds anything but a pullthrough cache (or its lock file).
    fn check_ours(root: &Path) -> Result<(), LayoutError> {
        if root.join(MARKER).is_file() {
            return Ok(());
        }
        let io = |source| LayoutError::Io {
            path: root.to_path_buf(),
            source,
        };
        let names: Vec<_> = std::fs::read_dir(root)
            .map_err(io)?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name != LOCK)
            .collect();
        // A cache from before the marker existed holds only the layout's directories
        // (an old layout has no upstreams/ or upstream.json).
        let adoptable = names.iter().all(|n| DIRS.contains(&n.as_str()))
            && ["manifests", "tags", "blobs"]
                .iter()
                .all(|d| root.join(d).is_dir());
        if !names.is_empty() && !adoptable {
            return Err(LayoutError::Foreign(root.to_path_buf()));
        }
        Ok(())
    }

    /// Takes the data directory for this process: an exclusive `flock` on its lock file, held
    /// until the returned lock is dropped, with this process's id written in it for the message
    /// a second instance gets. A foreign directory is refused before anything is written.
    pub fn lock(root: &Path) -> Result<DirLock, LayoutError> {
        let io = |source| LayoutError::Io {
            path: root.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(root).map_err(io)?;
        Self::check_ours(root)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(LOCK))
            .map_err(io)?;
        use rustix::fs::{FlockOperation, flock};
        if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if e != rustix::io::Errno::WOULDBLOCK {
                return Err(io(e.into()));
            }
            let mut text = String::new();
            let _ = std::io::Read::take(&mut file, 32).read_to_string(&mut text);
            return Err(LayoutError::InUse {
                path: root.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        file.set_len(0).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DirLock { _file: file })
    }

    /// The layout of a further upstream's manifests and tags, under `upstreams/<name>/`.
    pub fn upstream(&self, name: &str) -> std::io::Result<Layout> {
        let child = Layout {
            root: self.base.join("upstreams").join(name),
            base: self.base.clone(),
        };
        child.create()?;
        Ok(child)
    }

    /// Creates the marker and the layout's directories (again, if they were removed).
    fn create(&self) -> std::io::Result<()> {
        for dir in DIRS {
            std::fs::create_dir_all(self.base.join(dir))?;
        }
        for dir in ["manifests", "tags"] {
            std::fs::create_dir_all(self.root.join(dir))?;
        }
        let marker = self.base.join(MARKER);
        if !marker.is_file() {
            std::fs::write(
                marker,
                "This directory is a pullthrough cache; pullthrough may delete anything in it.\n",
            )?;
        }
        Ok(())
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where partial files live until they are complete.
    pub fn tmp(&self) -> PathBuf {
        self.base.join("tmp")
    }

    /// A fresh temp file; the layout is recreated if it has gone.
    pub fn temp_file(&self) -> std::io::Result<tempfile::NamedTempFile> {
        let make = || {
            tempfile::Builder::new()
                .prefix("part-")
                .tempfile_in(self.tmp())
        };
        match make() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(data_dir = %self.root.display(), "the cache's directories are gone; recreating them");
                self.create()?;
                make()
            }
            other => other,
        }
    }

    /// Writes `bytes` to `path` atomically; `durable` also fsyncs before the rename.
    pub fn write_atomic(&self, path: &Path, bytes: &[&[u8]], durable: bool) -> std::io::Result<()> {
        Layout::put_in_place(self.prepare(bytes, durable)?, path)
    }

    /// A temp file holding `bytes` (fsynced if `durable`), for [`Layout::put_in_place`].
    pub fn prepare(
        &self,
        bytes: &[&[u8]],
        durable: bool,
    ) -> std::io::Result<tempfile::NamedTempFile> {
        let mut file = self.temp_file()?;
        for part in bytes {
            file.write_all(part)?;
        }
        if durable {
            file.as_file().sync_all()?;
        }
        Ok(file)
    }

    /// Renames a prepared file to `path`, creating its directory.
    pub fn put_in_place(file: tempfile::NamedTempFile, path: &Path) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    /// Reads a small state file of the layout (`None` if absent or unreadable).
    pub fn read_state(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(name)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_foreign_directories_and_adopts_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("home");
        std::fs::create_dir_all(foreign.join("tmp")).unwrap();
        std::fs::write(foreign.join("tmp/notes.txt"), "mine").unwrap();
        assert!(matches!(
            Layout::open(&foreign),
            Err(LayoutError::Foreign(_))
        ));
        assert!(foreign.join("tmp/notes.txt").exists(), "nothing deleted");

        let fresh = dir.path().join("new");
        Layout::open(&fresh).unwrap();
        assert!(fresh.join(MARKER).is_file());
        std::fs::write(fresh.join("tmp/part-x"), "partial").unwrap();
        Layout::open(&fresh).unwrap();
        assert!(
            !fresh.join("tmp/part-x").exists(),
            "own temp files are wiped"
        );

        let old = dir.path().join("old");
        for d in ["manifests", "tags", "blobs", "tmp"] {
            std::fs::create_dir_all(old.join(d)).unwrap();
        }
        Layout::open(&old).unwrap();
        assert!(
            old.join(MARKER).is_file(),
            "an unmarked cache of the old layout is adopted"
        );
    }

    #[test]
    fn recreates_the_layout_when_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let layout = Layout::open(&root).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        let target = root.join("manifests/sha256/x");
        layout.write_atomic(&target, &[b"data"], false).unwrap();
        assert_eq!(std::fs::read(target).unwrap(), b"data");
        assert!(root.join(MARKER).is_file());
    }
}

/// Writes under way that nobody waits for (a cache entry made durable behind its response), so
/// that shutdown can wait for them.
#[derive(Debug, Default)]
pub struct Writes {
    count: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

/// One write under way; it ends when dropped.
#[derive(Debug)]
pub struct Writing(std::sync::Arc<Writes>);

impl Writes {
    /// Counts a write until the returned guard is dropped.
    pub fn start(self: &std::sync::Arc<Self>) -> Writing {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Writing(std::sync::Arc::clone(self))
    }

    /// Waits until no write is under way.
    pub async fn idle(&self) {
        loop {
            let done = self.done.notified();
            if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.done.notify_waiters();
        }
    }
}
