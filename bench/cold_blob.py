#!/usr/bin/env python3
"""The cold-blob row of bench.py on its own, with the CPU each process spent.

Usage: python3 bench/cold_blob.py [path/to/pullthrough]   (default: target/release/pullthrough;
build it first with `cargo build --release`). MIB (256) sets the blob's size, N (3) the number of
pulls; PERF=1 records `perf record -g` of pullthrough's pull into /tmp/pullthrough-cold-blob.perf.

Each round pulls the blob straight from Debian's reference registry, then through a fresh
pullthrough (empty data directory), both by one client that hashes what it receives, and prints
the two rates, their ratio and the CPU seconds of pullthrough, the registry and the client: on
a machine whose cores the three share, the sum of those over the wall time shows whether the
pull is CPU-bound.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench import ROOT, free_port, wait_http
from cluster_rig import put_blob, start_registry, stop

BINARY = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/pullthrough")
MIB = int(os.environ.get("MIB", "256"))
N = int(os.environ.get("N", "3"))
PERF = os.environ.get("PERF")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu():
    t = os.times()
    return t.user + t.system


def main():
    work = tempfile.mkdtemp(prefix="pullthrough-cold-blob-")
    procs = []
    try:
        upstream = start_registry(work, procs)
        registry = procs[-1]
        digest, _ = put_blob(upstream, os.urandom(MIB << 20))

        def timed(url):
            h = hashlib.sha256()
            started = time.perf_counter()
            with urllib.request.urlopen(url) as r:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
            return (MIB << 20) / (time.perf_counter() - started) / 1e6, h.hexdigest() == digest[7:]

        for i in range(N):
            r0, c0 = cpu_seconds(registry.pid), own_cpu()
            direct, _ = timed(f"{upstream}/v2/library/b/blobs/{digest}")
            direct_cpu = (cpu_seconds(registry.pid) - r0, own_cpu() - c0)
            listen = free_port()
            env = {**os.environ, "PULLTHROUGH_UPSTREAM": upstream, "PULLTHROUGH_DATA_DIR": f"{work}/data{i}",
                   "PULLTHROUGH_LISTEN": f"127.0.0.1:{listen}", "RUST_LOG": "pullthrough=warn",
                   "PULLTHROUGH_CACHE_MAX_DISK": str(4 * MIB << 20)}
            pt = subprocess.Popen([BINARY], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_http(f"http://127.0.0.1:{listen}/v2/")
            perf = None
            if PERF:
                perf = subprocess.Popen(["perf", "record", "-g", "-o", "/tmp/pullthrough-cold-blob.perf", "-p", str(pt.pid)], stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            p0, r0, c0 = cpu_seconds(pt.pid), cpu_seconds(registry.pid), own_cpu()
            through, verified = timed(f"http://127.0.0.1:{listen}/v2/library/b/blobs/{digest}")
            p1, r1, c1 = cpu_seconds(pt.pid), cpu_seconds(registry.pid), own_cpu()
            if perf:
                perf.send_signal(2)
                perf.wait()
            pt.terminate()
            pt.wait()
            shutil.rmtree(f"{work}/data{i}", ignore_errors=True)
            print(f"direct {direct:6.0f} MB/s (CPU s: registry {direct_cpu[0]:.2f}, client {direct_cpu[1]:.2f})   "
                  f"through {through:6.0f} MB/s (CPU s: pullthrough {p1 - p0:.2f}, registry {r1 - r0:.2f}, client {c1 - c0:.2f})   "
                  f"ratio {through / direct:.2f}   verified {verified}", flush=True)
    finally:
        stop(procs, work)


if __name__ == "__main__":
    main()
