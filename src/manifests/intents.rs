//! The write ordering of the cache's files: an intent journal per kind of file, so that each
//! file ends as memory did whatever order the blocking threads that write it run in, and a
//! file read back into memory on a miss does not bring back what a purge removed meanwhile.

use moka::sync::Cache;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The order of one kind of file's changes. Each change (a write or a removal) takes a sequence
/// number in the same step as the memory change it mirrors; a write's file (prepared, fsynced
/// if need be, outside the lock) is renamed into place only if no newer change of that key came
/// since. So a file ends as memory did, whatever order the blocking threads run in: racing
/// updates leave the newest, and a purge is never undone by a write that was under way.
/// Reading a file back into memory (after memory dropped it) is ordered too: what was read is
/// kept only if no change of that key came while it was read.
#[derive(Debug)]
pub(super) struct Intents<K> {
    state: parking_lot::Mutex<IntentState<K>>,
}

#[derive(Debug)]
struct IntentState<K> {
    next: u64,
    /// Keys with writes or reads in flight.
    newest: HashMap<K, InFlight>,
}

/// A key's changes and reads in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The newest change's number (in an entry a read made, the journal's newest number
    /// when that read began, until a change of this key comes).
    seq: u64,
    writes: usize,
    reads: usize,
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
pub(super) async fn remove_in_order<K, V>(
    order: Arc<Intents<K>>,
    memory: Cache<K, V>,
    key: K,
    path: PathBuf,
) where
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
    /// A write of `key`, with the memory change it mirrors: its place in the key's order, to
    /// land once its file is ready.
    pub(super) fn write(self: &Arc<Self>, key: &K, change_memory: impl FnOnce()) -> Ticket<K> {
        let mut state = self.state.lock();
        change_memory();
        self.begin_write(&mut state, key)
    }

    /// Numbers a write of `key` and counts it in flight (under `state`'s lock).
    fn begin_write(self: &Arc<Self>, state: &mut IntentState<K>, key: &K) -> Ticket<K> {
        state.next += 1;
        let seq = state.next;
        let entry = state.newest.entry(key.clone()).or_insert(InFlight {
            seq,
            writes: 0,
            reads: 0,
        });
        entry.seq = seq;
        entry.writes += 1;
        Ticket {
            order: Arc::clone(self),
            key: key.clone(),
            seq,
        }
    }

    /// A removal of `key`: the memory change and the file's deletion in one step, newer than
    /// every write in flight.
    pub(super) fn remove(&self, key: &K, change_memory: impl FnOnce(), delete: impl FnOnce()) {
        let mut state = self.state.lock();
        change_memory();
        state.next += 1;
        let seq = state.next;
        if let Some(entry) = state.newest.get_mut(key) {
            entry.seq = seq;
        }
        delete();
    }

    /// A read of `key`'s file begins (memory did not have it): see [`Reading::adopt`].
    pub(super) fn reading(self: &Arc<Self>, key: &K) -> Reading<K> {
        let mut state = self.state.lock();
        let since = state.next;
        let entry = state.newest.entry(key.clone()).or_insert(InFlight {
            seq: since,
            writes: 0,
            reads: 0,
        });
        entry.reads += 1;
        Reading {
            order: Arc::clone(self),
            key: key.clone(),
            since,
            // Memory had something newer than the file, which that write has yet to land.
            behind_write: entry.writes > 0,
        }
    }
}

impl<K: std::hash::Hash + Eq> IntentState<K> {
    /// One write (or read) of `key` ended, landed or not: the key is forgotten with its last.
    fn ended(&mut self, key: &K, read: bool) {
        if let Some(entry) = self.newest.get_mut(key) {
            let count = if read {
                &mut entry.reads
            } else {
                &mut entry.writes
            };
            debug_assert!(*count > 0, "a write or read ended twice");
            *count = count.saturating_sub(1);
            if entry.writes == 0 && entry.reads == 0 {
                self.newest.remove(key);
            }
        }
    }
}

/// One write's place in its key's order ([`Intents::write`]). It ends when it lands, or when
/// it is dropped unlanded (its file could not be prepared, on a full or failing disk, or its
/// thread never ran it): either way the key's entry goes with the last write or read in
/// flight, so failed writes leave nothing behind.
#[derive(Debug)]
pub(super) struct Ticket<K: std::hash::Hash + Eq + Clone> {
    order: Arc<Intents<K>>,
    key: K,
    seq: u64,
}

impl<K: std::hash::Hash + Eq + Clone> Ticket<K> {
    /// Puts this write's file in place (`land`) if it is still the newest change of its key;
    /// the write ends as the ticket drops.
    pub(super) fn land(self, land: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        let state = self.order.state.lock();
        let newest = state.newest.get(&self.key).map(|e| e.seq);
        if newest == Some(self.seq) {
            land()
        } else {
            Ok(())
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Ticket<K> {
    fn drop(&mut self) {
        self.order.state.lock().ended(&self.key, false);
    }
}

/// A read of a key's file (or object) under way ([`Intents::reading`]); it ends as it drops.
#[derive(Debug)]
pub(super) struct Reading<K: std::hash::Hash + Eq + Clone> {
    order: Arc<Intents<K>>,
    key: K,
    /// The newest change's number when the read began.
    since: u64,
    /// A write of the key was in flight when the read began.
    behind_write: bool,
}

impl<K: std::hash::Hash + Eq + Clone> Reading<K> {
    /// Whether the key changed since the read began: a removal (what was read was purged), or
    /// a write, begun or landed (memory had, or has, something newer than the file).
    fn changed(&self, state: &IntentState<K>) -> bool {
        self.behind_write
            || state
                .newest
                .get(&self.key)
                .is_some_and(|e| e.seq > self.since || e.writes > 0)
    }

    /// Puts what was read in memory (`adopt`) unless the key changed while it was read.
    /// `false` when it was not kept.
    pub(super) fn adopt(self, adopt: impl FnOnce()) -> bool {
        let state = self.order.state.lock();
        let changed = self.changed(&state);
        if !changed {
            adopt();
        }
        !changed
    }

    /// As [`Reading::adopt`], for what is also written to a file here (read from elsewhere,
    /// object storage): the memory change and the write's place in the key's order, unless
    /// the key changed while it was read.
    pub(super) fn write(self, change_memory: impl FnOnce()) -> Option<Ticket<K>> {
        let mut state = self.order.state.lock();
        if self.changed(&state) {
            return None;
        }
        change_memory();
        Some(self.order.begin_write(&mut state, &self.key))
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Reading<K> {
    fn drop(&mut self) {
        self.order.state.lock().ended(&self.key, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lands a write, recording whether its file was put in place.
    fn land(ticket: Ticket<&'static str>) -> bool {
        let mut landed = false;
        ticket
            .land(|| {
                landed = true;
                Ok(())
            })
            .unwrap();
        landed
    }

    #[test]
    fn only_the_newest_write_of_a_key_lands() {
        let order = Arc::new(Intents::default());
        let older = order.write(&"a", || {});
        let newer = order.write(&"a", || {});
        let other = order.write(&"b", || {});
        assert!(land(newer));
        assert!(!land(older), "an older write undid a newer one");
        assert!(land(other), "keys are ordered apart");
        assert!(
            order.state.lock().newest.is_empty(),
            "landed keys are forgotten"
        );
    }

    #[test]
    fn a_removal_outranks_the_writes_in_flight() {
        let order = Arc::new(Intents::default());
        let (mut memory, mut deleted) = (false, false);
        let under_way = order.write(&"a", || {});
        order.remove(&"a", || memory = true, || deleted = true);
        assert!(memory && deleted);
        assert!(!land(under_way), "a purge was undone by a write under way");
        let after = order.write(&"a", || {});
        assert!(land(after), "a write after the removal lands");
    }

    #[test]
    fn a_write_that_never_lands_is_forgotten_and_orders_nothing() {
        let order = Arc::new(Intents::default());
        let failed = order.write(&"a", || {});
        let newer = order.write(&"a", || {});
        // Its file could not be prepared (a full disk): the write ends unlanded.
        drop(failed);
        assert!(land(newer), "a failed older write held back a newer one");
        // The newest write failed: an older one still under way must not land over it (memory
        // holds the newest).
        let older = order.write(&"b", || {});
        let newest = order.write(&"b", || {});
        drop(newest);
        assert!(
            !land(older),
            "an older write landed after the newest failed"
        );
        let lone = order.write(&"c", || {});
        drop(lone);
        assert!(
            order.state.lock().newest.is_empty(),
            "a write that failed left its key behind"
        );
    }

    /// Whether a read of `key` begun before `meanwhile` ran is kept.
    fn kept(
        order: &Arc<Intents<&'static str>>,
        key: &'static str,
        meanwhile: impl FnOnce(),
    ) -> bool {
        let reading = order.reading(&key);
        meanwhile();
        let mut adopted = false;
        assert_eq!(reading.adopt(|| adopted = true), adopted);
        adopted
    }

    #[test]
    fn a_file_read_back_is_kept_only_if_its_key_did_not_change_meanwhile() {
        let order = Arc::new(Intents::default());
        assert!(kept(&order, "a", || {}), "an untouched read was not kept");
        assert!(
            !kept(&order, "a", || order.remove(&"a", || {}, || {})),
            "a read brought back what a purge removed"
        );
        let mut write = None;
        assert!(
            !kept(&order, "a", || write = Some(order.write(&"a", || {}))),
            "a read replaced what a write put in memory"
        );
        assert!(land(write.unwrap()), "a read held back a write's file");
        // A write under way before the read: memory has something newer than the file.
        let under_way = order.write(&"b", || {});
        assert!(
            !kept(&order, "b", || {}),
            "a read overtook a write under way"
        );
        assert!(land(under_way), "a read held back a write under way");
        assert!(
            kept(&order, "b", || {}),
            "a read after the write landed was not kept"
        );
        // A write under way when the read began lands before the read ends: memory had the
        // newer value all along.
        let under_way = order.write(&"e", || {});
        let reading = order.reading(&"e");
        assert!(land(under_way));
        assert!(
            !reading.adopt(|| {}),
            "a read overtook a write that landed meanwhile"
        );
        // What is read from elsewhere and written here too: written only if unchanged.
        let reading = order.reading(&"f");
        let written = reading.write(|| {}).expect("an untouched read is written");
        assert!(land(written), "its file lands");
        let reading = order.reading(&"f");
        order.remove(&"f", || {}, || {});
        assert!(reading.write(|| {}).is_none(), "a purged object came back");
        // Reads of other keys, and other keys' changes, are apart.
        assert!(kept(&order, "c", || order.remove(&"d", || {}, || {})));
        assert!(
            order.state.lock().newest.is_empty(),
            "reads left their keys behind"
        );
    }
}
