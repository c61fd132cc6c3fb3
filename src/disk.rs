//! Crash-safe file writes for the cache: every file is written under `tmp/`, flushed, and
//! renamed into place, so a reader (or a restart after `kill -9`) sees a whole file or none.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The on-disk layout under the data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Creates the directories and removes temp files a previous process left behind.
    pub fn open(root: &Path) -> std::io::Result<Layout> {
        let layout = Layout {
            root: root.to_path_buf(),
        };
        let tmp = layout.tmp();
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        for dir in [
            tmp,
            layout.root.join("manifests"),
            layout.root.join("tags"),
            layout.root.join("blobs"),
        ] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(layout)
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where partial files live until they are complete.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh temp file.
    pub fn temp_file(&self) -> std::io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix("part-")
            .tempfile_in(self.tmp())
    }

    /// Writes `bytes` to `path` atomically; `durable` also fsyncs before the rename.
    pub fn write_atomic(&self, path: &Path, bytes: &[&[u8]], durable: bool) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = self.temp_file()?;
        for part in bytes {
            file.write_all(part)?;
        }
        if durable {
            file.as_file().sync_all()?;
        }
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}
