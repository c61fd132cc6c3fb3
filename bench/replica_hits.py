#!/usr/bin/env python3
"""Manifest hits on a replica with Redis and object storage against a single node.

Usage: BENCH_DURATION=5s python3 bench/replica_hits.py [path/to/pullthrough]
(default: target/release/pullthrough). Starts Debian's reference registry with one image,
moto_server and redis-server, a single-node pullthrough and a clustered one (storage_url and
redis_url set), caches the tag on both, then alternates wrk runs (64 connections, GET by tag)
three times and prints each side's best and the ratio (issue target: >= 0.9).
"""
import os
import sys
import tempfile
import urllib.request

from bench import ROOT, raise_fd_limit, wrk
from cluster_rig import push_image, start_cluster_services, start_pullthrough, start_registry, stop

ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def main():
    raise_fd_limit()
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/pullthrough")
    work = tempfile.mkdtemp(prefix="pullthrough-replica-hits-")
    procs = []
    try:
        upstream = start_registry(work, procs)
        push_image(upstream, os.urandom(1000))
        cluster = start_cluster_services(procs)
        sides = {
            "single": start_pullthrough(binary, upstream, f"{work}/single", procs),
            "cluster": start_pullthrough(binary, upstream, f"{work}/cluster", procs, cluster),
        }
        path = "/v2/library/b/manifests/t"
        for url in sides.values():
            urllib.request.urlopen(urllib.request.Request(url + path, headers={"Accept": ACCEPT})).read()
        best = dict.fromkeys(sides, 0.0)
        for _ in range(3):
            for name, url in sides.items():
                best[name] = max(best[name], wrk(url + path, 64, [f"Accept: {ACCEPT}"])[0])
        print(f"manifest GET by tag, 64 connections, best of 3: single node {best['single']:.0f} req/s, "
              f"replica with Redis and object storage {best['cluster']:.0f} req/s, ratio {best['cluster'] / best['single']:.2f}")
    finally:
        stop(procs, work)


if __name__ == "__main__":
    main()
