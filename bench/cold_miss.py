#!/usr/bin/env python3
"""The cold-miss row alone, interleaved: each variant's p50 over a direct request, round by round.

Run with `python3 bench/cold_miss.py VARIANT...` where a variant is a binary path, optionally
followed by `:NAME=VALUE,...` environment settings, e.g.

    python3 bench/cold_miss.py target/release/pullthrough:PULLTHROUGH_RUNTIME=work-stealing \\
        target/release/pullthrough:PULLTHROUGH_RUNTIME=per-core

Debian's reference registry serves one small manifest under many tags. Every variant runs at
once (each with an empty cache); each round asks ROUNDS_OF (100) tags, each tag directly and
through each variant, in an order that turns from tag to tag (each takes every place, and
follows each of the others, as often), so that the machine's noise, and each miss's disk writes
behind its answer, fall on all of them alike. Requests are sequential, each on a new connection
(as `bench/bench.py`'s row 3). Prints each variant's overhead (its p50 minus the direct p50) per
round and the median over ROUNDS (5); beside it, the p50 of the same tags asked again (hits,
also each on a new connection): the part of the overhead that is the hop through pullthrough,
not the upstream exchange; and the CPU time each variant spent per miss (all its threads and
child processes, from /proc's schedstat, so the disk writes behind the answer count too), which
moves far less with the machine's noise than the p50 does, and its wake-ups per miss (times its
threads were put on a core).

The data directories and the registry's storage go under TMPDIR: `TMPDIR=/dev/shm` takes the
disk's fsync cost out of the comparison (on these VMs it moves from 0.1 to over 1 ms of CPU per
write from hour to hour).
"""

import glob
import hashlib
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ACCEPT, free_port, get, p50_ms, wait_http  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "5"))
ROUNDS_OF = int(os.environ.get("ROUNDS_OF", "100"))


def cpu_ns(pid):
    """CPU time so far of process `pid`, its threads and its children (nginx's workers), and
    the part of it in pullthrough's tokio threads other than the per-core workers (the blocking
    threads that write files behind the answer, and the main runtime's), and how many times its
    threads were put on a core (wake-ups; schedstat's third field)."""
    pids, total, behind, runs = [pid], 0, 0, 0
    for children in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            pids += [int(c) for c in open(children).read().split()]
        except (OSError, ValueError):
            pass
    for p in pids:
        for task in glob.glob(f"/proc/{p}/task/*"):
            try:
                stat = open(f"{task}/schedstat").read().split()
                ns, slices = int(stat[0]), int(stat[2])
                name = open(f"{task}/comm").read()
            except (OSError, ValueError, IndexError):
                continue
            total += ns
            runs += slices
            if name.startswith("tokio-rt"):
                behind += ns
    return total, behind, runs


def variants(args):
    for arg in args:
        binary, _, settings = arg.partition(":")
        env = dict(s.split("=", 1) for s in settings.split(",") if s)
        yield arg, binary, env


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    work = tempfile.mkdtemp(prefix="pullthrough-cold-miss-")
    procs = []
    try:
        reg_port = free_port()
        with open(os.path.join(work, "registry.yml"), "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/registry\nhttp:\n  addr: 127.0.0.1:{reg_port}\n")
        procs.append(subprocess.Popen(["docker-registry", "serve", f"{work}/registry.yml"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        registry = f"http://127.0.0.1:{reg_port}/v2/library/bench"
        wait_http(f"http://127.0.0.1:{reg_port}/v2/")
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        start = urllib.request.urlopen(urllib.request.Request(f"{registry}/blobs/uploads/", data=b"", method="POST"))
        location = start.headers["Location"]
        location = location if location.startswith("http") else f"http://127.0.0.1:{reg_port}{location}"
        sep = "&" if "?" in location else "?"
        urllib.request.urlopen(urllib.request.Request(f"{location}{sep}digest={config_digest}", data=config, method="PUT", headers={"Content-Type": "application/octet-stream"})).read()
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
            "layers": [],
        }).encode()
        tags = [f"miss{i}" for i in range(ROUNDS * ROUNDS_OF)]
        for tag in tags:
            urllib.request.urlopen(urllib.request.Request(f"{registry}/manifests/{tag}", data=manifest, method="PUT", headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})).read()

        urls, pids = {}, {}
        for name, binary, extra in variants(sys.argv[1:]):
            port = free_port()
            env = {**os.environ, **extra, "PULLTHROUGH_UPSTREAM": f"http://127.0.0.1:{reg_port}",
                   "PULLTHROUGH_DATA_DIR": os.path.join(work, f"data-{port}"),
                   "PULLTHROUGH_LISTEN": f"127.0.0.1:{port}", "RUST_LOG": "pullthrough=warn"}
            procs.append(subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls[name], pids[name] = f"http://127.0.0.1:{port}", procs[-1].pid
            wait_http(f"{urls[name]}/v2/")
        time.sleep(1)

        overheads = {name: [] for name in urls}
        cpu = {name: [] for name in urls}
        # Every order of the direct request and the variants, taken in turn from tag to tag: each
        # takes every place, and follows each of the others, as often. A request right after a
        # pullthrough miss shares the cores with that miss's disk writes (0.15 ms slower here),
        # and a rotation of one order always put the same variant right after the first one.
        # Shuffled (seeded), so that a round that sees only some of the orders (with four or
        # more variants there are more orders than tags in a round) sees a fair sample of them,
        # not the run of orders that all start with the same request.
        # Past six (720 orders) a seeded sample stands for them all: the count grows as n!.
        everyone = [None, *urls]
        if len(everyone) <= 6:
            orders = list(itertools.permutations(everyone))
        else:
            orders = [tuple(random.Random(i).sample(everyone, len(everyone))) for i in range(720)]
        random.Random(1).shuffle(orders)
        for r in range(ROUNDS):
            direct = []
            through = {name: [] for name in urls}
            before = {name: cpu_ns(pids[name]) for name in urls}
            for k, tag in enumerate(tags[r * ROUNDS_OF:(r + 1) * ROUNDS_OF]):
                for name in orders[(r * ROUNDS_OF + k) % len(orders)]:
                    started = time.perf_counter()
                    if name is None:
                        get(f"{registry}/manifests/{tag}", accept=ACCEPT)
                        direct.append(time.perf_counter() - started)
                    else:
                        get(f"{urls[name]}/v2/library/bench/manifests/{tag}", accept=ACCEPT)
                        through[name].append(time.perf_counter() - started)
            # Once the writes behind the last answers are done.
            time.sleep(0.2)
            for name in urls:
                (total, behind, runs), (total0, behind0, runs0) = cpu_ns(pids[name]), before[name]
                cpu[name].append(((total - total0) / ROUNDS_OF / 1000, (behind - behind0) / ROUNDS_OF / 1000,
                                  (runs - runs0) / ROUNDS_OF))
            # The same tags again, now cached: what the hop through pullthrough costs by itself.
            hits = {name: [] for name in urls}
            for tag in tags[r * ROUNDS_OF:(r + 1) * ROUNDS_OF]:
                for name, url in urls.items():
                    started = time.perf_counter()
                    get(f"{url}/v2/library/bench/manifests/{tag}", accept=ACCEPT)
                    hits[name].append(time.perf_counter() - started)
            line = [f"round {r + 1}: direct p50 {p50_ms(direct):.3f} ms"]
            for name in urls:
                overhead = p50_ms(through[name]) - p50_ms(direct)
                overheads[name].append(overhead)
                line.append(f"{name} {overhead:+.3f} (a hit {p50_ms(hits[name]):.3f}, {cpu[name][-1][0]:.0f} us CPU per miss, "
                            f"{cpu[name][-1][1]:.0f} of it in blocking and main-runtime threads, "
                            f"{cpu[name][-1][2]:.1f} wake-ups per miss)")
            print("; ".join(line), flush=True)
        for name in urls:
            print(f"{name}: overhead median {statistics.median(overheads[name]):+.3f} ms over {ROUNDS} rounds (target <= 0.2 ms); "
                  f"CPU per miss median {statistics.median(c[0] for c in cpu[name]):.0f} us, "
                  f"{statistics.median(c[0] - c[1] for c in cpu[name]):.0f} us of it outside blocking and main-runtime threads; "
                  f"{statistics.median(c[2] for c in cpu[name]):.1f} wake-ups per miss")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
