//! Instructions per manifest cache hit, for callgrind: `hit_instructions <kind> <n>` makes `n`
//! hits of one kind (`tag`, `digest`, `head`) after the warm-up and exits; `miss` makes `n`
//! cold misses instead (each a new tag, the in-process upstream's work included). Run it twice
//! under `valgrind --tool=callgrind` with different `n`: the difference in instructions divided
//! by the difference in `n` is the cost of one hit, with start-up cancelled out. `bench/bench.py` does
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
    let mut client = common::Client::connect(rig.addr);
    if kind == "miss" {
        // Each request a tag not cached yet: one upstream GET, the manifest verified, kept
        // and written behind the answer. The upstream (in this process) is counted too.
        let miss = |i: usize| {
            format!(
                "GET /v2/library/bench/manifests/miss{i} HTTP/1.1\r\nHost: {}\r\nAccept: {}\r\n\r\n",
                rig.addr,
                common::MEDIA_TYPE
            )
            .into_bytes()
        };
        for i in 0..50 + n {
            client.send(&miss(i), 1);
        }
        println!("{n} misses");
        return;
    }
    let index = match kind.as_str() {
        "tag" => 0,
        "digest" => 1,
        "head" => 2,
        other => panic!("unknown kind {other}: tag, digest, head or miss"),
    };
    client.send(&requests[index].1, 50);
    client.send(&requests[index].1, n);
    println!("{n} hits ({})", requests[index].0);
}
