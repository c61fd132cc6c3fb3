//! Heap allocations per manifest cache hit (GET by tag, GET by digest, HEAD), counted by dhat's
//! allocator over every thread of the process, server and client; the client allocates nothing
//! per request, so the count is the server's. Repeatable where wall-clock numbers are not.
//!
//! `cargo bench --bench hit_allocations`; `bench/bench.py` prints it too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod common;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    const N: u64 = 2_000;
    // `DHAT_FILE=dhat-heap.json` keeps the profile (every allocation site, for dh_view.html).
    let _profiler = match std::env::var("DHAT_FILE") {
        Ok(file) => dhat::Profiler::builder().file_name(file).build(),
        Err(_) => dhat::Profiler::builder().testing().build(),
    };
    let rig = common::start(2);
    let mut client = common::Client::connect(rig.addr);
    for (what, request) in common::requests(&rig) {
        client.send(&request, 200);
        let before = dhat::HeapStats::get();
        client.send(&request, N as usize);
        let after = dhat::HeapStats::get();
        println!(
            "allocations per manifest hit, {what}: {:.1} ({:.0} bytes)",
            (after.total_blocks - before.total_blocks) as f64 / N as f64,
            (after.total_bytes - before.total_bytes) as f64 / N as f64,
        );
    }
}
