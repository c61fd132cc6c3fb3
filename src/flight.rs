//! Single-flight: concurrent requests for one key share one upstream operation. The operation
//! runs as its own task, so it finishes (and fills the cache) even when every client that
//! asked for it has gone away or given up at its deadline.

use crate::error::Error;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use tracing::Instrument;

type Outcome<V> = Result<V, Error>;
type Flight<V> = Shared<BoxFuture<'static, Outcome<V>>>;

/// In-flight operations by key.
pub struct Flights<K, V> {
    running: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

impl<K, V> fmt::Debug for Flights<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.running.lock().len();
        f.debug_struct("Flights").field("running", &n).finish()
    }
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            running: Arc::default(),
        }
    }
}

impl<K, V> Flights<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Joins the operation running for `key`, or starts `start()` as a new task.
    pub fn join<F>(&self, key: K, start: impl FnOnce() -> F) -> Flight<V>
    where
        F: Future<Output = Outcome<V>> + Send + 'static,
    {
        self.join_unless(&key, |_| None, |_| start())
    }

    /// [`Self::join`] (starting `start(key)`), unless no operation runs for `key` and `done(key)`
    /// finds its result. For
    /// operations that store their result before they end: a caller that looked for it just
    /// before one ended and joins just after finds it here instead of starting another.
    pub fn join_unless<F>(
        &self,
        key: &K,
        done: impl FnOnce(&K) -> Option<V>,
        start: impl FnOnce(K) -> F,
    ) -> Flight<V>
    where
        F: Future<Output = Outcome<V>> + Send + 'static,
    {
        let mut running = self.running.lock();
        if let Some(flight) = running.get(key) {
            return flight.clone();
        }
        // Under the lock: an operation's result is stored before it leaves the map.
        if let Some(value) = done(key) {
            return futures_util::future::ready(Ok(value)).boxed().shared();
        }
        // Boxed: an upstream fetch's state is many kilobytes, and a task's future is moved
        // into the task and its finished stage written over it (a copy of its whole size
        // each time, most of a cold miss's instructions unboxed).
        let operation = Box::pin(start(key.clone()));
        let leave = Leave {
            map: Arc::clone(&self.running),
            key: Some(key.clone()),
        };
        // The lock is held until the entry is inserted, so the task cannot remove it first.
        // The operation logs inside the span of the request that started it (its request id).
        let task = tokio::spawn(
            async move {
                let mut leave = leave;
                let outcome = operation.await;
                leave.now();
                outcome
            }
            .in_current_span(),
        );
        let flight = async move { task.await.unwrap_or_else(|e| Err(Error::from(e))) }
            .boxed()
            .shared();
        running.insert(key.clone(), flight.clone());
        flight
    }

    /// True while an operation for `key` runs.
    pub fn is_running(&self, key: &K) -> bool {
        self.running.lock().contains_key(key)
    }
}

/// Takes an operation's key out of the map when it ends: returned, panicked or dropped (a
/// panic must not leave its error in the map for every later join of the key).
struct Leave<K: Hash + Eq, V> {
    map: Arc<Mutex<HashMap<K, Flight<V>>>>,
    key: Option<K>,
}

impl<K: Hash + Eq, V> Leave<K, V> {
    fn now(&mut self) {
        if let Some(key) = self.key.take() {
            self.map.lock().remove(&key);
        }
    }
}

impl<K: Hash + Eq, V> Drop for Leave<K, V> {
    fn drop(&mut self) {
        self.now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_joins_share_one_run_that_outlives_its_callers() {
        let flights: Flights<u32, u32> = Flights::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let start = |runs: Arc<AtomicUsize>| {
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(7)
            }
        };
        let a = flights.join(1, start(runs.clone()));
        let b = flights.join(1, start(runs.clone()));
        assert_eq!((a.await.unwrap(), b.await.unwrap()), (7, 7));
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        drop(flights.join(2, start(runs.clone())));
        // Running until it ends (however slow the machine).
        for _ in 0..1_000 {
            if !flights.is_running(&2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "the dropped flight still ran"
        );
        assert!(!flights.is_running(&2));
    }

    #[tokio::test]
    async fn an_operation_that_panicked_leaves_and_the_next_join_runs_again() {
        let flights: Flights<u32, u32> = Flights::default();
        let panicked = flights.join(1, || async {
            if true {
                panic!("a bug in an operation");
            }
            Ok(0)
        });
        assert!(panicked.await.is_err());
        assert!(!flights.is_running(&1));
        assert_eq!(flights.join(1, || async { Ok(7) }).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_join_after_an_operation_ended_finds_what_it_stored() {
        let flights: Flights<u32, u32> = Flights::default();
        let (stored, runs) = (Arc::new(Mutex::new(None)), Arc::new(AtomicUsize::new(0)));
        let start = |stored: Arc<Mutex<Option<u32>>>, runs: Arc<AtomicUsize>| {
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                *stored.lock() = Some(7);
                Ok(7)
            }
        };
        let done = |_: &u32| *stored.lock();
        // Nothing stored: the operation runs, stores its result and ends.
        let first = flights.join_unless(&1, done, |_| start(stored.clone(), runs.clone())());
        assert_eq!(first.await.unwrap(), 7);
        assert!(!flights.is_running(&1));
        // A caller that looked before it ended joins after: no second run.
        let second = flights.join_unless(&1, done, |_| start(stored.clone(), runs.clone())());
        assert_eq!(second.await.unwrap(), 7);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // A plain join always runs again.
        assert_eq!(
            flights.join(1, start(stored, runs.clone())).await.unwrap(),
            7
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
