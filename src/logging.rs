//! Where log lines go: a writer thread of their own with a bounded queue, so a request's
//! access-log line costs its worker a copy into the queue, never a wait for stdout (a slow
//! terminal, a full pipe, a log collector that stalls). Lines are written in batches: the
//! thread drains the queue into a buffer and flushes it once the queue is empty. When the queue
//! is full, lines are dropped and counted (`pullthrough_log_lines_dropped_total`) rather than
//! blocking a worker.

use std::sync::OnceLock;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines waiting for the writer thread at most. The queue is allocated whole at startup (about
/// 32 bytes a line: 128 KiB here), so it is sized for idle memory; the writer drains it in
/// batches far faster than 4,096 lines arrive.
pub const QUEUED_LINES: usize = 4096;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The writer for standard output, and the guard that flushes what is queued when dropped
/// (keep it until the process ends).
pub fn stdout() -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("pullthrough-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

/// Log lines dropped since start because the writer thread's queue was full.
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}
