#!/usr/bin/env python3
"""pullthrough benchmark: cache-hit speed and memory against nginx serving the same bytes.

Run with `python3 bench/bench.py` (root installs wrk, nginx, docker-registry and skopeo from
Debian's packages if they are missing). It builds pullthrough in release mode, fills Debian's
reference registry with an image whose layer is 256 MiB, puts pullthrough in front of it, and
measures, in one run:

  1. manifest cache hits (GET by tag, 64 connections, wrk) against nginx serving the same
     manifest bytes as a static file with the same headers: requests/s, p99, and the ratio;
  2. pullthrough's resident memory after those hits (well over 100,000 of them);
  3. a cached 256 MiB blob (4 connections, wrk) against nginx serving the same file: MB/s and
     the ratio;
  4. the growth of pullthrough's peak resident memory while 20 clients pull the uncached
     256 MiB blob at once.

Targets (issue 2 and 4): hits >= 0.8 x nginx, p99 < 2 ms, RSS < 50 MiB after 100k hits; cached
blob >= 0.5 x nginx; cold-pull RSS growth < 64 MiB.
"""

import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATION = os.environ.get("BENCH_DURATION", "10s")
BLOB_MIB = int(os.environ.get("BENCH_BLOB_MIB", "256"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def ensure_tools():
    missing = [p for p, b in [("wrk", "wrk"), ("nginx", "nginx"), ("skopeo", "skopeo"), ("docker-registry", "docker-registry")] if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"install first: apt-get install -y {' '.join(missing)}")
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def blob(layout, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs/sha256", digest[7:]), "wb") as f:
        f.write(data)
    return digest, len(data)


def make_layout(layout):
    os.makedirs(os.path.join(layout, "blobs/sha256"))
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    rng = random.Random(42)
    layer = b"".join(rng.randbytes(1 << 20) for _ in range(BLOB_MIB))
    layer_digest, layer_size = blob(layout, layer)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()
    config_digest, config_size = blob(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    }).encode()
    manifest_digest, manifest_size = blob(layout, manifest)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}, f)
    return manifest, manifest_digest, layer, layer_digest


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def wrk(url, connections, headers=()):
    args = ["wrk", "-t2", f"-c{connections}", f"-d{DURATION}", "--latency"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args + [url], check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    mb = float(transfer.group(1)) * {"B": 1e-6, "KB": 1e-3, "MB": 1, "GB": 1e3}[transfer.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} error responses from {url}\n{out}")
    return rps, p99_ms, total, mb


def main():
    ensure_tools()
    subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target/release/pullthrough")
    work = tempfile.mkdtemp(prefix="pullthrough-bench-")
    os.chmod(work, 0o755)  # nginx workers run as www-data
    procs = []
    try:
        print(f"building a test image with a {BLOB_MIB} MiB layer ...", flush=True)
        manifest, manifest_digest, layer, layer_digest = make_layout(os.path.join(work, "layout"))

        reg_port = free_port()
        with open(os.path.join(work, "registry.yml"), "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/registry\nhttp:\n  addr: 127.0.0.1:{reg_port}\n")
        procs.append(subprocess.Popen(["docker-registry", "serve", f"{work}/registry.yml"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{reg_port}/v2/")
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{work}/layout:bench", f"docker://127.0.0.1:{reg_port}/library/bench:bench"], check=True)
        # skopeo may recompress the layer on the way: take what the registry actually holds.
        registry = f"http://127.0.0.1:{reg_port}/v2/library/bench"
        manifest = urllib.request.urlopen(urllib.request.Request(f"{registry}/manifests/bench", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})).read()
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        layer_digest = json.loads(manifest)["layers"][0]["digest"]
        layer = urllib.request.urlopen(f"{registry}/blobs/{layer_digest}").read()

        def start_pullthrough(data_dir):
            port = free_port()
            env = {**os.environ, "PULLTHROUGH_UPSTREAM": f"http://127.0.0.1:{reg_port}", "PULLTHROUGH_DATA_DIR": data_dir,
                   "PULLTHROUGH_LISTEN": f"127.0.0.1:{port}", "PULLTHROUGH_TAG_TTL": "1h", "RUST_LOG": "pullthrough=warn",
                   "PULLTHROUGH_CACHE_MAX_DISK": str(4 * BLOB_MIB * 1024 * 1024)}
            p = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_http(f"http://127.0.0.1:{port}/v2/")
            return p, f"http://127.0.0.1:{port}"

        # nginx serving the same bytes as static files, with the same headers.
        static = os.path.join(work, "static")
        os.makedirs(static)
        with open(os.path.join(static, "manifest"), "wb") as f:
            f.write(manifest)
        with open(os.path.join(static, "blob"), "wb") as f:
            f.write(layer)
        nginx_port = free_port()
        with open(os.path.join(work, "nginx.conf"), "w") as f:
            f.write(f"""worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{nginx_port};
    location = /v2/library/bench/manifests/bench {{
      alias {static}/manifest;
      default_type application/vnd.oci.image.manifest.v1+json;
      add_header Docker-Content-Digest {manifest_digest};
      add_header Docker-Distribution-API-Version registry/2.0;
      etag off;
      add_header ETag '"{manifest_digest}"';
    }}
    location = /v2/library/bench/blobs/{layer_digest} {{
      alias {static}/blob;
      default_type application/octet-stream;
      add_header Docker-Content-Digest {layer_digest};
    }}
  }}
}}
""")
        procs.append(subprocess.Popen(["nginx", "-c", f"{work}/nginx.conf", "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        nginx = f"http://127.0.0.1:{nginx_port}"
        wait_http(nginx + "/v2/library/bench/manifests/bench")

        pt, url = start_pullthrough(os.path.join(work, "data"))
        accept = "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
        manifest_path = "/v2/library/bench/manifests/bench"
        blob_path = f"/v2/library/bench/blobs/{layer_digest}"
        urllib.request.urlopen(urllib.request.Request(url + manifest_path, headers={"Accept": accept.split(": ", 1)[1]})).read()
        assert hashlib.sha256(urllib.request.urlopen(url + blob_path).read()).hexdigest() == layer_digest[7:]

        # Alternate the two servers and keep each one's best run: on 2 shared cores single runs
        # swing by 10-20 %, and both sides deserve the same luck.
        def best(runs):
            return max(runs, key=lambda r: r[0])

        print(f"\n1. manifest cache hits, 64 connections, best of {ROUNDS} runs of {DURATION} each", flush=True)
        nginx_runs, pt_runs = [], []
        for _ in range(ROUNDS):
            nginx_runs.append(wrk(nginx + manifest_path, 64, [accept]))
            pt_runs.append(wrk(url + manifest_path, 64, [accept]))
        n_rps, n_p99, _, _ = best(nginx_runs)
        p_rps, p_p99, _, _ = best(pt_runs)
        p_total = sum(r[2] for r in pt_runs)
        print(f"   nginx        {n_rps:10.0f} req/s   p99 {n_p99:.2f} ms")
        print(f"   pullthrough  {p_rps:10.0f} req/s   p99 {p_p99:.2f} ms")
        print(f"   ratio        {p_rps / n_rps:.2f} x nginx   (target >= 0.8; p99 target < 2 ms)")
        print(f"\n2. pullthrough resident memory after {p_total} hits: {rss_kib(pt.pid) / 1024:.1f} MiB (target < 50 MiB)")

        print(f"\n3. cached {BLOB_MIB} MiB blob, 4 connections, best of {ROUNDS} runs of {DURATION} each", flush=True)
        n_mb = p_mb = 0.0
        for _ in range(ROUNDS):
            n_mb = max(n_mb, wrk(nginx + blob_path, 4)[3])
            p_mb = max(p_mb, wrk(url + blob_path, 4)[3])
        print(f"   nginx        {n_mb:10.0f} MB/s")
        print(f"   pullthrough  {p_mb:10.0f} MB/s")
        print(f"   ratio        {p_mb / n_mb:.2f} x nginx   (target >= 0.5)")

        pt.terminate()
        pt.wait()
        cold, cold_url = start_pullthrough(os.path.join(work, "cold"))
        urllib.request.urlopen(urllib.request.Request(cold_url + manifest_path, headers={"Accept": accept.split(": ", 1)[1]})).read()
        before = rss_kib(cold.pid)
        results = []

        def pull():
            h = hashlib.sha256()
            with urllib.request.urlopen(cold_url + blob_path) as r:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
            results.append(h.hexdigest() == layer_digest[7:])

        threads = [threading.Thread(target=pull) for _ in range(20)]
        started = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = rss_kib(cold.pid, "VmHWM")
        print(f"\n4. 20 concurrent cold pulls of the {BLOB_MIB} MiB blob: {time.time() - started:.1f} s, all verified: {all(results) and len(results) == 20}")
        print(f"   resident memory {before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB: growth {(peak - before) / 1024:.1f} MiB (target < 64 MiB)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
