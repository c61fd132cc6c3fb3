#!/usr/bin/env python3
"""What replicas cost object storage and Redis, per pull (docs/scaling.md's first table).

Usage: python3 bench/replica_costs.py [path/to/pullthrough]   (default: target/release/pullthrough)

Starts Debian's reference registry with one image (a config and a 20 MiB layer), moto_server
(pip install 'moto[server]') and redis-server, and two pullthrough replicas sharing them. Pulls
the image through the first replica twice, then through the second twice, and prints the change
of pullthrough_object_storage_requests_total and pullthrough_redis_requests_total around each
pull, then a replica's idle Redis rate.
"""
import hashlib, json, os, subprocess, sys, tempfile, time, urllib.request, shutil, re
from bench import ROOT, free_port, wait_http
binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/pullthrough")
work = tempfile.mkdtemp(prefix="costs-"); procs = []
def metric(url, name):
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^pullthrough_{name}(?:_total)?(?:{{[^}}]*}})? (\S+)$", text, re.M))
try:
    rp, mp, sp = free_port(), free_port(), free_port()
    open(f"{work}/r.yml","w").write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/registry\nhttp:\n  addr: 127.0.0.1:{rp}\n")
    procs.append(subprocess.Popen(["docker-registry","serve",f"{work}/r.yml"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(["moto_server","-H","127.0.0.1","-p",str(mp)],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(["redis-server","--port",str(sp),"--bind","127.0.0.1","--save","","--appendonly","no"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL))
    up = f"http://127.0.0.1:{rp}"; wait_http(up + "/v2/"); wait_http(f"http://127.0.0.1:{mp}/")
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{mp}/pullthrough-costs", method="PUT")).read()
    def put_blob(data):
        dg = "sha256:" + hashlib.sha256(data).hexdigest()
        r = urllib.request.urlopen(urllib.request.Request(f"{up}/v2/library/b/blobs/uploads/", method="POST"))
        loc = r.headers["Location"]; loc = loc if loc.startswith("http") else up + loc
        urllib.request.urlopen(urllib.request.Request(f"{loc}{'&' if '?' in loc else '?'}digest={dg}", data=data, method="PUT", headers={"Content-Type":"application/octet-stream"})).read()
        return dg, len(data)
    cd, cs = put_blob(b'{"architecture":"amd64","os":"linux"}'); ld, ls = put_blob(os.urandom(20 << 20))
    m = json.dumps({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":cd,"size":cs},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":ld,"size":ls}]}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{up}/v2/library/b/manifests/t", data=m, method="PUT", headers={"Content-Type":"application/vnd.oci.image.manifest.v1+json"})).read()
    md = "sha256:" + hashlib.sha256(m).hexdigest()
    def replica(name):
        port = free_port()
        env = {**os.environ, "PULLTHROUGH_UPSTREAM": up, "PULLTHROUGH_DATA_DIR": f"{work}/{name}", "PULLTHROUGH_LISTEN": f"127.0.0.1:{port}", "RUST_LOG": "pullthrough=warn",
               "PULLTHROUGH_STORAGE_URL": "s3://pullthrough-costs/c", "PULLTHROUGH_REDIS_URL": f"redis://127.0.0.1:{sp}/0", "PULLTHROUGH_CLUSTER_SECRET": "x" * 24,
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{mp}", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", "PULLTHROUGH_TAG_TTL": "1h"}
        p = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); procs.append(p)
        u = f"http://127.0.0.1:{port}"; wait_http(u + "/v2/"); return u
    def pull(u):
        urllib.request.urlopen(urllib.request.Request(f"{u}/v2/library/b/manifests/t", headers={"Accept":"application/vnd.oci.image.manifest.v1+json"})).read()
        urllib.request.urlopen(urllib.request.Request(f"{u}/v2/library/b/manifests/{md}", headers={"Accept":"application/vnd.oci.image.manifest.v1+json"})).read()
        for d in (cd, ld): urllib.request.urlopen(f"{u}/v2/library/b/blobs/{d}").read()
    def costs(u, what, f):
        s0, r0 = metric(u, "object_storage_requests"), metric(u, "redis_requests")
        t0 = time.time(); f(); dt = time.time() - t0
        s1, r1 = metric(u, "object_storage_requests"), metric(u, "redis_requests")
        idle = 4 * dt  # background Redis polls: 4 per second
        print(f"{what:55s} object storage ops {s1-s0:4.0f}   Redis requests {r1-r0:4.0f} (of which about {idle:.0f} are the background polls)")
    a = replica("a"); time.sleep(0.5)
    costs(a, "cold pull (tag, manifest, config, 20 MiB layer), replica A", lambda: pull(a))
    time.sleep(1.5)
    costs(a, "same pull again on A (hits)", lambda: pull(a))
    b = replica("b"); time.sleep(0.5)
    costs(b, "same pull on replica B (empty disk; object storage)", lambda: pull(b))
    costs(b, "same pull again on B (hits)", lambda: pull(b))
    r0 = metric(b, "redis_requests"); time.sleep(10); r1 = metric(b, "redis_requests")
    print(f"idle replica: {(r1-r0)/10:.1f} Redis requests per second")
finally:
    for q in procs: q.terminate(); q.wait()
    shutil.rmtree(work, ignore_errors=True)
