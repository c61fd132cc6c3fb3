#!/usr/bin/env python3
"""What replicas cost object storage and Redis, per pull (docs/scaling.md's first table).

Usage: python3 bench/replica_costs.py [path/to/pullthrough]   (default: target/release/pullthrough)

Starts Debian's reference registry with one image (a config and a 20 MiB layer), moto_server
(pip install 'moto[server]') and redis-server, and two pullthrough replicas sharing them. Pulls
the image through the first replica twice, then through the second twice, and prints the change
of pullthrough_object_storage_requests_total and pullthrough_redis_requests_total around each
pull, then a replica's idle Redis rate.
"""
import os
import re
import sys
import tempfile
import time
import urllib.request

from bench import ROOT
from cluster_rig import push_image, start_cluster_services, start_pullthrough, start_registry, stop

ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def metric(url, name):
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^pullthrough_{name}(?:_total)?(?:{{[^}}]*}})? (\S+)$", text, re.M))


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/pullthrough")
    work = tempfile.mkdtemp(prefix="pullthrough-replica-costs-")
    procs = []
    try:
        upstream = start_registry(work, procs)
        manifest, config, layer = push_image(upstream, os.urandom(20 << 20))
        cluster = start_cluster_services(procs)

        def pull(url):
            for ref in ("t", manifest):
                urllib.request.urlopen(urllib.request.Request(f"{url}/v2/library/b/manifests/{ref}", headers={"Accept": ACCEPT})).read()
            for digest in (config, layer):
                urllib.request.urlopen(f"{url}/v2/library/b/blobs/{digest}").read()

        def costs(url, what):
            s0, r0 = metric(url, "object_storage_requests"), metric(url, "redis_requests")
            started = time.time()
            pull(url)
            idle = 4 * (time.time() - started)  # the background polls: 4 per second
            s1, r1 = metric(url, "object_storage_requests"), metric(url, "redis_requests")
            print(f"{what:55s} object storage ops {s1 - s0:4.0f}   Redis requests {r1 - r0:4.0f} (of which about {idle:.0f} are the background polls)")

        a = start_pullthrough(binary, upstream, f"{work}/a", procs, cluster)
        time.sleep(0.5)
        costs(a, "cold pull (tag, manifest, config, 20 MiB layer), replica A")
        time.sleep(1.5)
        costs(a, "same pull again on A (hits)")
        b = start_pullthrough(binary, upstream, f"{work}/b", procs, cluster)
        time.sleep(0.5)
        costs(b, "same pull on replica B (empty disk; object storage)")
        costs(b, "same pull again on B (hits)")
        r0 = metric(b, "redis_requests")
        time.sleep(10)
        print(f"idle replica: {(metric(b, 'redis_requests') - r0) / 10:.1f} Redis requests per second")
    finally:
        stop(procs, work)


if __name__ == "__main__":
    main()
