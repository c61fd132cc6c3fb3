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

/// The calling worker's entry of `per_worker` (one per worker) and its index; `None` on any
/// other thread, or past the entries' end.
pub fn own<T>(per_worker: &[T]) -> Option<(usize, &T)> {
    current().and_then(|i| per_worker.get(i).map(|entry| (i, entry)))
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

    #[test]
    fn a_worker_owns_its_entry_and_no_other_thread_owns_one() {
        let entries = ["a", "b"];
        assert_eq!(own(&entries), None);
        std::thread::spawn(move || {
            enter(1);
            assert_eq!(own(&entries), Some((1, &"b")));
            enter(2);
            assert_eq!(own(&entries), None, "past the end");
        })
        .join()
        .unwrap();
    }
}
