//! Which per-core worker thread the caller runs on (`runtime = "per-core"`), so that what a
//! worker's requests open, such as upstream connections, can stay on that worker's runtime.

use std::cell::Cell;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// How many per-core workers a server starts: one per core this process may run on.
pub fn count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Marks the calling thread as per-core worker `index`, for the rest of its life.
pub fn enter(index: usize) {
    INDEX.with(|i| i.set(Some(index)));
}

/// The per-core worker the calling thread is; `None` on any other thread (the main runtime's,
/// the blocking pool's, and every thread under `work-stealing`).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_thread_that_entered_is_a_worker() {
        assert_eq!(current(), None);
        std::thread::spawn(|| {
            enter(3);
            assert_eq!(current(), Some(3));
        })
        .join()
        .unwrap();
        assert_eq!(current(), None, "another thread's index is its own");
    }
}
