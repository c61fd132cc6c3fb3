#!/usr/bin/env python3
"""The cold-blob row of bench.py on its own, with the CPU each process spent.

Usage: python3 bench/cold_blob.py [path/to/pullthrough ...]   (default: target/release/pullthrough;
build it first with `cargo build --release`). MIB (256) sets the blob's size, N (3) the number of
rounds; PERF=1 records `perf record -g` of the (first) pullthrough's pull into
/tmp/pullthrough-cold-blob.perf.

Each round pulls the blob straight from Debian's reference registry, then through a fresh
pullthrough (empty data directory) of each binary given, in turn (so two binaries are measured
interleaved, under the same load), all by one client that hashes what it receives. Each pull
prints its rate, the ratio to the direct pull and the CPU seconds of pullthrough, the registry
and the client: on a machine whose cores the three share, the sum of those over the wall time
shows whether the pull is CPU-bound. pullthrough's CPU (utime + stime from /proc/<pid>/stat
around the pull) is also printed per GiB, on a row of its own, and summed up per binary at the
end (median, min-max).
"""

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench import ROOT, cpu_seconds, free_port, wait_http
from cluster_rig import put_blob, start_registry, stop

BINARIES = sys.argv[1:] or [os.path.join(ROOT, "target/release/pullthrough")]
MIB = int(os.environ.get("MIB", "256"))
N = int(os.environ.get("N", "3"))
PERF = os.environ.get("PERF")
GIB_PER_PULL = MIB / 1024


def minor_faults(pid):
    """Minor page faults of a process so far (fresh memory touched), from /proc/<pid>/stat."""
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[7])


def own_cpu():
    t = os.times()
    return t.user + t.system


def spread(values, fmt):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main():
    work = tempfile.mkdtemp(prefix="pullthrough-cold-blob-")
    procs = []
    results = {binary: [] for binary in BINARIES}
    directs = []
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

        def through(binary, data_dir, perf_out):
            listen = free_port()
            env = {**os.environ, "PULLTHROUGH_UPSTREAM": upstream, "PULLTHROUGH_DATA_DIR": data_dir,
                   "PULLTHROUGH_LISTEN": f"127.0.0.1:{listen}", "RUST_LOG": "pullthrough=warn",
                   "PULLTHROUGH_CACHE_MAX_DISK": str(4 * MIB << 20)}
            pt = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_http(f"http://127.0.0.1:{listen}/v2/")
            perf = None
            if perf_out:
                perf = subprocess.Popen(["perf", "record", "-g", "-o", perf_out, "-p", str(pt.pid)], stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            p0, r0, c0, f0 = cpu_seconds(pt.pid), cpu_seconds(registry.pid), own_cpu(), minor_faults(pt.pid)
            rate, verified = timed(f"http://127.0.0.1:{listen}/v2/library/b/blobs/{digest}")
            p1, r1, c1, f1 = cpu_seconds(pt.pid), cpu_seconds(registry.pid), own_cpu(), minor_faults(pt.pid)
            if perf:
                perf.send_signal(2)
                perf.wait()
            pt.terminate()
            pt.wait()
            shutil.rmtree(data_dir, ignore_errors=True)
            return rate, verified, p1 - p0, r1 - r0, c1 - c0, f1 - f0

        for i in range(N):
            r0, c0 = cpu_seconds(registry.pid), own_cpu()
            direct, _ = timed(f"{upstream}/v2/library/b/blobs/{digest}")
            direct_cpu = (cpu_seconds(registry.pid) - r0, own_cpu() - c0)
            directs.append((direct, sum(direct_cpu)))
            print(f"direct {direct:6.0f} MB/s   CPU s: registry {direct_cpu[0]:.2f}, client {direct_cpu[1]:.2f}, "
                  f"together {sum(direct_cpu):.2f} per pull, {sum(direct_cpu) / GIB_PER_PULL:.2f} per GiB", flush=True)
            for b, binary in enumerate(BINARIES):
                perf_out = "/tmp/pullthrough-cold-blob.perf" if PERF and b == 0 else None
                rate, verified, pt_cpu, reg_cpu, client_cpu, faults = through(binary, f"{work}/data{i}-{b}", perf_out)
                results[binary].append((rate, pt_cpu))
                print(f"  through {binary}: {rate:6.0f} MB/s   ratio {rate / direct:.2f}   verified {verified}   "
                      f"CPU s: pullthrough {pt_cpu:.2f}, registry {reg_cpu:.2f}, client {client_cpu:.2f}; "
                      f"pullthrough's page faults {faults}", flush=True)
                print(f"  through {binary}: pullthrough CPU-seconds {pt_cpu:.3f} per {MIB} MiB pull, "
                      f"{pt_cpu / GIB_PER_PULL:.3f} per GiB", flush=True)
        print(f"direct: {spread([d[0] for d in directs], '{:.0f}')} MB/s, registry + client "
              f"{spread([d[1] / GIB_PER_PULL for d in directs], '{:.3f}')} CPU-s per GiB")
        for binary, rows in results.items():
            print(f"{binary}: {spread([r[0] for r in rows], '{:.0f}')} MB/s, pullthrough CPU-s "
                  f"{spread([r[1] for r in rows], '{:.3f}')} per {MIB} MiB, "
                  f"{spread([r[1] / GIB_PER_PULL for r in rows], '{:.3f}')} per GiB")
    finally:
        stop(procs, work)


if __name__ == "__main__":
    main()
