//! A remote tier (object storage, Redis) that is left alone for a while after it failed, so a
//! dead endpoint does not add its timeout to every request; with its request and failure counts
//! for metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Resting {
    rest: Duration,
    started: Instant,
    /// Until when (ms since `started`) the tier is left alone.
    until: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
}

impl Resting {
    /// Left alone for `rest` after each failure.
    pub fn new(rest: Duration) -> Resting {
        Resting {
            rest,
            started: Instant::now(),
            until: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the tier may be asked now.
    pub fn available(&self) -> bool {
        self.now_ms() >= self.until.load(Ordering::Relaxed)
    }

    /// Counts a request.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failure and starts (or extends) a rest; true for the first failure of a spell,
    /// the one to log.
    pub fn failed(&self) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let until = now.saturating_add(u64::try_from(self.rest.as_millis()).unwrap_or(u64::MAX));
        self.until.swap(until, Ordering::Relaxed) <= now
    }

    /// Requests made and requests failed.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}
