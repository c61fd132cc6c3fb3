#!/usr/bin/env python3
"""Manifest hits on a replica with Redis and object storage against a single node.

Usage: BENCH_DURATION=5s python3 bench/replica_hits.py [path/to/pullthrough]
(default: target/release/pullthrough). Starts Debian's reference registry with one image,
moto_server and redis-server, a single-node pullthrough and a clustered one (storage_url and
redis_url set), caches the tag on both, then alternates wrk runs (64 connections, GET by tag)
three times and prints each side's best and the ratio (issue target: >= 0.9).
"""
import hashlib, json, os, subprocess, sys, tempfile, time, urllib.request, shutil, re
from bench import ROOT, free_port, wait_http, raise_fd_limit, wrk
raise_fd_limit()
binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/pullthrough")
work = tempfile.mkdtemp(prefix="hc-"); procs = []
try:
    rp, mp, sp = free_port(), free_port(), free_port()
    open(f"{work}/r.yml","w").write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/registry\nhttp:\n  addr: 127.0.0.1:{rp}\n")
    procs.append(subprocess.Popen(["docker-registry","serve",f"{work}/r.yml"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(["moto_server","-H","127.0.0.1","-p",str(mp)],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(["redis-server","--port",str(sp),"--bind","127.0.0.1","--save","","--appendonly","no"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL))
    up = f"http://127.0.0.1:{rp}"; wait_http(up + "/v2/"); wait_http(f"http://127.0.0.1:{mp}/")
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{mp}/pullthrough-hits", method="PUT")).read()
    def put_blob(data):
        dg = "sha256:" + hashlib.sha256(data).hexdigest()
        r = urllib.request.urlopen(urllib.request.Request(f"{up}/v2/library/b/blobs/uploads/", method="POST"))
        loc = r.headers["Location"]; loc = loc if loc.startswith("http") else up + loc
        urllib.request.urlopen(urllib.request.Request(f"{loc}{'&' if '?' in loc else '?'}digest={dg}", data=data, method="PUT", headers={"Content-Type":"application/octet-stream"})).read()
        return dg, len(data)
    cd, cs = put_blob(b'{"architecture":"amd64","os":"linux"}'); ld, ls = put_blob(os.urandom(1000))
    m = json.dumps({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":cd,"size":cs},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":ld,"size":ls}]}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{up}/v2/library/b/manifests/t", data=m, method="PUT", headers={"Content-Type":"application/vnd.oci.image.manifest.v1+json"})).read()
    def start(name, cluster):
        port = free_port()
        env = {**os.environ, "PULLTHROUGH_UPSTREAM": up, "PULLTHROUGH_DATA_DIR": f"{work}/{name}", "PULLTHROUGH_LISTEN": f"127.0.0.1:{port}", "RUST_LOG": "pullthrough=warn", "PULLTHROUGH_TAG_TTL": "1h", "PULLTHROUGH_MAX_CLIENT_CONNECTIONS": "4096"}
        if cluster:
            env.update({"PULLTHROUGH_STORAGE_URL": "s3://pullthrough-hits/c", "PULLTHROUGH_REDIS_URL": f"redis://127.0.0.1:{sp}/0", "PULLTHROUGH_CLUSTER_SECRET": "x" * 24,
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{mp}", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})
        p = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); procs.append(p)
        u = f"http://127.0.0.1:{port}"; wait_http(u + "/v2/")
        urllib.request.urlopen(urllib.request.Request(f"{u}/v2/library/b/manifests/t", headers={"Accept":"application/vnd.oci.image.manifest.v1+json"})).read()
        return u
    single, clustered = start("single", False), start("cluster", True)
    path = "/v2/library/b/manifests/t"
    best = {"single": 0, "cluster": 0}
    for _ in range(3):
        for name, u in (("single", single), ("cluster", clustered)):
            r = wrk(u + path, 64, ["Accept: application/vnd.oci.image.manifest.v1+json"])
            best[name] = max(best[name], r[0])
    print(f"manifest GET by tag, 64 connections, best of 3: single node {best['single']:.0f} req/s, replica with Redis and object storage {best['cluster']:.0f} req/s, ratio {best['cluster']/best['single']:.2f}")
finally:
    for q in procs: q.terminate(); q.wait()
    shutil.rmtree(work, ignore_errors=True)
