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

    /// Renames a prepared file to `path`, creating its directory. The directory is usually
    /// there already: it is made only when the rename finds it missing (two system calls
    /// fewer per write than making sure first).
    pub fn put_in_place(file: tempfile::NamedTempFile, path: &Path) -> std::io::Result<()> {
        match file.persist(path) {
            Ok(_) => Ok(()),
            Err(e) if e.error.kind() == std::io::ErrorKind::NotFound => {
                let Some(parent) = path.parent() else {
                    return Err(e.error);
                };
                std::fs::create_dir_all(parent)?;
                e.file.persist(path).map(drop).map_err(|e| e.error)
            }
            Err(e) => Err(e.error),
        }
    }

    /// Reads a small state file of the layout (`None` if absent or unreadable).
    pub fn read_state(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(name)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;

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

    #[test]
    fn a_file_is_put_in_place_its_directory_made_only_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let layout = Layout::open(&root).unwrap();
        let target = root.join("tags/acme/app/_tags/1");
        for body in [&b"one"[..], b"two"] {
            let file = layout.prepare(&[body], false).unwrap();
            Layout::put_in_place(file, &target).unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), body);
        }
        assert_eq!(std::fs::read_dir(layout.tmp()).unwrap().count(), 0);
    }

    fn nothing_queued(writes: &Writes) -> bool {
        std::iter::once(&writes.shared)
            .chain(writes.per_worker.iter())
            .all(|q| q.0.lock().is_empty())
    }

    fn current_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The order writes ran in.
    type Ran = std::sync::Arc<parking_lot::Mutex<Vec<usize>>>;

    /// Records the order writes ran in.
    fn recorder() -> (Ran, impl Fn(usize) -> Job) {
        let ran = Ran::default();
        let log = std::sync::Arc::clone(&ran);
        let write = move |i: usize| -> Job {
            let log = std::sync::Arc::clone(&log);
            Box::new(move || log.lock().push(i))
        };
        (ran, write)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_queued_together_share_one_thread_in_order_and_are_waited_for() {
        let writes = std::sync::Arc::new(Writes::default());
        let (ran, write) = recorder();
        let threads = std::sync::Arc::new(parking_lot::Mutex::new(HashSet::new()));
        // Two full batches at once, then fewer than a batch, which wait for the handoff.
        const REST: usize = BATCH - 1;
        let all = 2 * BATCH + REST;
        for i in 0..all {
            let (write, threads) = (write(i), std::sync::Arc::clone(&threads));
            writes.behind(move || {
                threads.lock().insert(std::thread::current().id());
                write();
            });
        }
        assert_eq!(writes.count.load(Ordering::SeqCst), all);
        writes.idle().await;
        let ran = ran.lock().clone();
        let mut sorted = ran.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..all).collect::<Vec<_>>(), "each ran once");
        // Each batch in order, on one thread.
        for batch in [0..BATCH, BATCH..2 * BATCH, 2 * BATCH..all] {
            let order: Vec<_> = ran.iter().filter(|i| batch.contains(i)).copied().collect();
            assert_eq!(order, batch.collect::<Vec<_>>());
        }
        assert!(
            threads.lock().len() <= 3,
            "{} threads",
            threads.lock().len()
        );
        assert!(nothing_queued(&writes));

        // The first two of a later miss go to one thread.
        let (seen, pair) = (
            std::sync::Arc::new(parking_lot::Mutex::new(Vec::new())),
            write,
        );
        for i in 0..2 {
            let (seen, write) = (std::sync::Arc::clone(&seen), pair(100 + i));
            writes.behind(move || {
                seen.lock().push(std::thread::current().id());
                write();
            });
        }
        writes.idle().await;
        let seen = seen.lock();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], seen[1], "one wake-up for both");
    }

    #[test]
    fn a_worker_whose_runtime_ended_drops_only_its_own_queued_writes() {
        let writes = std::sync::Arc::new(Writes::default());
        let (ran, write) = recorder();
        // Here, on no worker: queued, and waiting for this runtime's handoff.
        let here = current_thread_runtime();
        here.block_on(async { writes.behind(write(0)) });
        // A worker queues one and its runtime ends before its handoff runs.
        std::thread::scope(|s| {
            s.spawn(|| {
                crate::worker::enter(0);
                let worker = current_thread_runtime();
                worker.block_on(async { writes.behind(write(1)) });
            });
        });
        here.block_on(writes.idle());
        assert_eq!(*ran.lock(), vec![0]);
        assert!(nothing_queued(&writes));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_write_that_panics_ends_alone() {
        let writes = std::sync::Arc::new(Writes::default());
        let (ran, write) = recorder();
        writes.behind(write(0));
        writes.behind(|| panic!("a write's bug"));
        writes.behind(write(2));
        writes.idle().await;
        assert_eq!(*ran.lock(), vec![0, 2]);
    }

    #[test]
    fn writes_whose_runtime_ended_before_their_thread_was_woken_end_unwritten_and_block_none() {
        let writes = std::sync::Arc::new(Writes::default());
        let (ran, write) = recorder();
        let runtime = current_thread_runtime();
        // Queued, but the task that hands them over never runs.
        runtime.block_on(async {
            writes.behind(write(0));
            writes.behind(write(1));
        });
        drop(runtime);
        assert_eq!(writes.count.load(Ordering::SeqCst), 0);
        assert!(nothing_queued(&writes));
        // Later writes are not stuck behind them.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            writes.behind(write(2));
            writes.idle().await;
        });
        assert_eq!(*ran.lock(), vec![2]);
    }
}

/// Writes under way that nobody waits for (a cache entry made durable behind its response), so
/// that shutdown can wait for them.
#[derive(Debug)]
pub struct Writes {
    count: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
    /// Blocking writes waiting for their thread (see [`Writes::behind`]), by runtime, so that
    /// a runtime's handoff carries only its own runtime's writes: those of every thread that is
    /// no per-core worker (the main runtime's)...
    shared: Queued,
    /// ...and those of each per-core worker.
    per_worker: Box<[Queued]>,
}

impl Default for Writes {
    fn default() -> Writes {
        Writes {
            count: std::sync::atomic::AtomicUsize::new(0),
            done: tokio::sync::Notify::new(),
            shared: Queued::default(),
            per_worker: (0..crate::worker::count())
                .map(|_| Queued::default())
                .collect(),
        }
    }
}

/// A blocking write, with its [`Writing`] guard inside.
type Job = Box<dyn FnOnce() + Send>;

/// The most blocking writes one thread takes in turn; more queued at once wake another. A
/// cold miss makes two (three with a referrers list), which must not fill a batch: a full one
/// wakes its thread at once, before the answer is written. Kept small because the writes of a
/// batch wait for one another (a slow disk's stall holds up the rest of its batch).
const BATCH: usize = 4;

/// Blocking writes not yet handed to a thread; non-empty exactly while a [`Handoff`] is
/// scheduled for them (or they fill a batch and go at once).
#[derive(Default)]
struct Queued(parking_lot::Mutex<Vec<Job>>);

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Queued({})", self.0.lock().len())
    }
}

impl Queued {
    fn take(&self) -> Vec<Job> {
        std::mem::take(&mut *self.0.lock())
    }
}

/// The task that hands one queue's writes to a blocking thread. Dropped unrun (its runtime
/// shut down before `flushed` was awaited), it drops them, so their guards end and later
/// writes queue afresh.
struct Handoff(Option<(std::sync::Arc<Writes>, Option<usize>)>);

impl Handoff {
    fn take(&mut self) -> Vec<Job> {
        self.0
            .take()
            .map(|(writes, worker)| writes.queue(worker).take())
            .unwrap_or_default()
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        let dropped = self.take();
        if !dropped.is_empty() {
            tracing::warn!(
                writes = dropped.len(),
                "cache writes dropped unwritten: their runtime ended first"
            );
        }
    }
}

/// Runs `jobs` in turn on one blocking thread; a job that panics ends alone.
fn run_blocking(jobs: Vec<Job>) {
    if jobs.is_empty() {
        return;
    }
    tokio::task::spawn_blocking(move || {
        for job in jobs {
            // The panic is reported by the hook; the writes after it still run.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    });
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

    /// Runs `write` on a blocking thread behind the caller, counted until done (from a task on
    /// the caller's runtime).
    ///
    /// The thread is woken from a task of its own, after one yield: on a per-core worker (a
    /// current-thread runtime, tasks run in the order they woke) the tasks already queued run
    /// first, so a cold miss's answer is written before its writes wake a thread (waking one
    /// is a system call, and on a busy core the woken thread may run first). Writes queued
    /// meanwhile on the same runtime go to the same thread, in order, up to [`BATCH`]: a cold
    /// miss's manifest and tag cost one wake-up, not two racing for the blocking pool's lock.
    /// Under `work-stealing` another thread may take the task sooner; the order is then not
    /// promised, only that the caller never waits.
    pub fn behind(self: &std::sync::Arc<Self>, write: impl FnOnce() + Send + 'static) {
        let writing = self.start();
        let job: Job = Box::new(move || {
            write();
            drop(writing);
        });
        let (worker, mine) = match crate::worker::own(&self.per_worker) {
            Some((i, queue)) => (Some(i), queue),
            None => (None, &self.shared),
        };
        let mut queued = mine.0.lock();
        queued.push(job);
        match queued.len() {
            1 => {
                drop(queued);
                let mut handoff = Handoff(Some((std::sync::Arc::clone(self), worker)));
                tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    run_blocking(handoff.take());
                });
            }
            BATCH => {
                let jobs = std::mem::take(&mut *queued);
                drop(queued);
                run_blocking(jobs);
            }
            _ => {}
        }
    }

    /// The queue of per-core worker `worker`, or the shared one.
    fn queue(&self, worker: Option<usize>) -> &Queued {
        worker
            .and_then(|i| self.per_worker.get(i))
            .unwrap_or(&self.shared)
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
