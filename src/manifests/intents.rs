//! The write ordering of the cache's files: an intent journal per kind of file, so that each
//! file ends as memory did whatever order the blocking threads that write it run in.

use moka::sync::Cache;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The order of one kind of file's changes. Each change (a write or a removal) takes a sequence
/// number in the same step as the memory change it mirrors; a write's file (prepared, fsynced
/// if need be, outside the lock) is renamed into place only if no newer change of that key came
/// since. So a file ends as memory did, whatever order the blocking threads run in: racing
/// updates leave the newest, and a purge is never undone by a write that was under way.
#[derive(Debug)]
pub(super) struct Intents<K> {
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
    /// A write of `key`, with the memory change it mirrors; returns its number.
    pub(super) fn write(&self, key: &K, change_memory: impl FnOnce()) -> u64 {
        let mut state = self.state.lock();
        change_memory();
        state.next += 1;
        let seq = state.next;
        let entry = state.newest.entry(key.clone()).or_insert((0, 0));
        *entry = (seq, entry.1 + 1);
        seq
    }

    /// Puts write `seq`'s file in place (`land`) if it is still the newest change of `key`.
    pub(super) fn land(
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
    pub(super) fn remove(&self, key: &K, change_memory: impl FnOnce(), delete: impl FnOnce()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Lands write `seq` of `key`, recording whether its file was put in place.
    fn land(order: &Intents<&'static str>, key: &'static str, seq: u64) -> bool {
        let mut landed = false;
        order
            .land(&key, seq, || {
                landed = true;
                Ok(())
            })
            .unwrap();
        landed
    }

    #[test]
    fn only_the_newest_write_of_a_key_lands() {
        let order = Intents::default();
        let older = order.write(&"a", || {});
        let newer = order.write(&"a", || {});
        let other = order.write(&"b", || {});
        assert!(land(&order, "a", newer));
        assert!(
            !land(&order, "a", older),
            "an older write undid a newer one"
        );
        assert!(land(&order, "b", other), "keys are ordered apart");
        assert!(
            order.state.lock().newest.is_empty(),
            "landed keys are forgotten"
        );
    }

    #[test]
    fn a_removal_outranks_the_writes_in_flight() {
        let order = Intents::default();
        let (mut memory, mut deleted) = (false, false);
        let seq = order.write(&"a", || {});
        order.remove(&"a", || memory = true, || deleted = true);
        assert!(memory && deleted);
        assert!(
            !land(&order, "a", seq),
            "a purge was undone by a write under way"
        );
        let after = order.write(&"a", || {});
        assert!(land(&order, "a", after), "a write after the removal lands");
    }
}
