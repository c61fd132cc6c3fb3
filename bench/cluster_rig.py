"""Shared setup of the replica and cold-blob benchmarks: Debian's reference registry as the
upstream, with blobs and an image pushed over the registry API; moto_server and redis-server for
clustered replicas; a replica's environment. Everything binds to 127.0.0.1 and goes into `procs`
for the caller to stop."""

import hashlib
import json
import os
import shutil
import subprocess
import urllib.request

from bench import free_port, wait_http

BUCKET = "pullthrough-bench"
QUIET = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


def start_registry(work, procs):
    """The reference registry on a free port; its base URL."""
    port = free_port()
    with open(f"{work}/registry.yml", "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/registry\nhttp:\n  addr: 127.0.0.1:{port}\n")
    procs.append(subprocess.Popen(["docker-registry", "serve", f"{work}/registry.yml"], **QUIET))
    upstream = f"http://127.0.0.1:{port}"
    wait_http(upstream + "/v2/")
    return upstream


def put_blob(upstream, data, repo="library/b"):
    """Pushes `data` as a blob (monolithic upload); its digest and size."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = urllib.request.urlopen(urllib.request.Request(f"{upstream}/v2/{repo}/blobs/uploads/", method="POST"))
    location = r.headers["Location"]
    location = location if location.startswith("http") else upstream + location
    sep = "&" if "?" in location else "?"
    urllib.request.urlopen(urllib.request.Request(f"{location}{sep}digest={digest}", data=data, method="PUT", headers={"Content-Type": "application/octet-stream"})).read()
    return digest, len(data)


def push_image(upstream, layer, tag="t", repo="library/b"):
    """Pushes an OCI image (a config and `layer`) as `repo:tag`; (manifest, config, layer) digests."""
    config_digest, config_size = put_blob(upstream, b'{"architecture":"amd64","os":"linux"}', repo)
    layer_digest, layer_size = put_blob(upstream, layer, repo)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    }).encode()
    urllib.request.urlopen(urllib.request.Request(f"{upstream}/v2/{repo}/manifests/{tag}", data=manifest, method="PUT", headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})).read()
    return "sha256:" + hashlib.sha256(manifest).hexdigest(), config_digest, layer_digest


def start_cluster_services(procs):
    """moto_server (with an empty bucket) and redis-server; the environment a clustered replica
    needs to use them."""
    s3_port, redis_port = free_port(), free_port()
    procs.append(subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(s3_port)], **QUIET))
    procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], **QUIET))
    s3 = f"http://127.0.0.1:{s3_port}"
    wait_http(s3 + "/")
    urllib.request.urlopen(urllib.request.Request(f"{s3}/{BUCKET}", method="PUT")).read()
    return {
        "PULLTHROUGH_STORAGE_URL": f"s3://{BUCKET}/cache",
        "PULLTHROUGH_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PULLTHROUGH_CLUSTER_SECRET": "bench-cluster-secret-0123456789",
        "AWS_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def start_pullthrough(binary, upstream, data_dir, procs, extra=None):
    """A pullthrough on a free port in front of `upstream`; its base URL."""
    port = free_port()
    env = {**os.environ, "PULLTHROUGH_UPSTREAM": upstream, "PULLTHROUGH_DATA_DIR": data_dir,
           "PULLTHROUGH_LISTEN": f"127.0.0.1:{port}", "RUST_LOG": "pullthrough=warn", "PULLTHROUGH_TAG_TTL": "1h",
           "PULLTHROUGH_MAX_CLIENT_CONNECTIONS": "4096", **(extra or {})}
    procs.append(subprocess.Popen([binary], env=env, **QUIET))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v2/")
    return url


def stop(procs, work):
    """Stops what was started and removes the work directory."""
    for p in procs:
        p.terminate()
        p.wait()
    shutil.rmtree(work, ignore_errors=True)
