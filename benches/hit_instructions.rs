//! Instructions per manifest cache hit, for callgrind: `hit_instructions <kind> <n>` makes `n`
//! hits of one kind (`tag`, `digest`, `head`) after the warm-up and exits. Run it twice under
//! `valgrind --tool=callgrind` with different `n`: the difference in instructions divided by the
//! difference in `n` is the cost of one hit, with start-up cancelled out. `bench/bench.py` does
//! exactly that and prints the result.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod common;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with('-'));
    let kind = args.next().unwrap_or_else(|| "tag".into());
    let n: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let rig = common::start(2);
    let requests = common::requests(&rig);
    let index = match kind.as_str() {
        "tag" => 0,
        "digest" => 1,
        "head" => 2,
        other => panic!("unknown kind {other}: tag, digest or head"),
    };
    let mut client = common::Client::connect(rig.addr);
    client.send(&requests[index].1, 50);
    client.send(&requests[index].1, n);
    println!("{n} hits ({})", requests[index].0);
}
