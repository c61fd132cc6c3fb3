"""What the oras tests (tests/oras.rs) ask of PyPI's `oras` client, run with the venv's python.

push REGISTRY DIR: pushes, straight to the registry, a subject (`demo/app:1`), a Helm chart
  (`demo/chart:1.0.0`: Helm's config and chart layer types) and an SBOM that refers to the
  subject (`demo/app:sbom-1`: the empty config, `artifactType`, `subject`). The registry has no
  referrers API, so the SBOM is then listed under the referrers tag schema, as clients do for
  such registries (oras-go and cosign do this themselves; oras-py 0.2 leaves it to the caller).
pull REGISTRY DIR DIGEST: through REGISTRY (pullthrough), pulls the chart's files and the SBOM by
  its digest, and reads the subject's referrers.

Each prints one JSON object on stdout.
"""

import hashlib
import json
import os
import sys

import oras.defaults
import oras.oci
import oras.provider

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"


def raw_manifest(remote, host, repo, reference):
    url = f"http://{host}/v2/{repo}/manifests/{reference}"
    r = remote.do_request(url, "GET", headers={"Accept": f"{MANIFEST}, {INDEX}"})
    return r.status_code, r.content, r.headers.get("Docker-Content-Digest")


def push(host, workdir):
    remote = oras.provider.Registry(hostname=host, insecure=True)
    os.chdir(workdir)
    with open("hello.txt", "w") as f:
        f.write("hello from oras\n")
    remote.push(target=f"{host}/demo/app:1", files=["hello.txt:text/plain"], quiet=True)
    _, subject_bytes, subject_digest = raw_manifest(remote, host, "demo/app", "1")

    with open("Chart.json", "w") as f:
        f.write('{"name":"demo","version":"1.0.0","apiVersion":"v2"}')
    with open("demo-1.0.0.tgz", "wb") as f:
        f.write(bytes(range(256)) * 40)
    remote.push(
        target=f"{host}/demo/chart:1.0.0",
        files=["demo-1.0.0.tgz:application/vnd.cncf.helm.chart.content.v1.tar+gzip"],
        manifest_config="Chart.json:application/vnd.cncf.helm.config.v1+json",
        quiet=True,
    )
    _, chart_bytes, chart_digest = raw_manifest(remote, host, "demo/chart", "1.0.0")

    # The SBOM: the empty config, its own artifactType, and the subject.
    container = remote.get_container(f"{host}/demo/app:sbom-1")
    with open("empty.json", "w") as f:
        f.write("{}")
    config = {"mediaType": EMPTY, "digest": oras.defaults.blank_config_hash, "size": 2}
    remote.upload_blob("empty.json", container, config)
    with open("sbom.spdx.json", "w") as f:
        f.write('{"spdxVersion":"SPDX-2.3","name":"demo"}')
    layer = oras.oci.NewLayer("sbom.spdx.json", media_type="application/spdx+json")
    layer["annotations"] = {oras.defaults.annotation_title: "sbom.spdx.json"}
    remote.upload_blob("sbom.spdx.json", container, layer)
    manifest = oras.oci.NewManifest()
    manifest.update(
        {
            "artifactType": "application/spdx+json",
            "config": config,
            "layers": [layer],
            "subject": {"mediaType": MANIFEST, "digest": subject_digest, "size": len(subject_bytes)},
            "annotations": {"org.opencontainers.image.created": "2026-12-06T00:00:00Z"},
        }
    )
    remote.upload_manifest(manifest, container)
    _, sbom_bytes, sbom_digest = raw_manifest(remote, host, "demo/app", "sbom-1")

    # No referrers API here (404), so the referrers tag schema: sha256-<hex> lists the SBOM.
    api = remote.do_request(f"http://{host}/v2/demo/app/referrers/{subject_digest}", "GET")
    tag = subject_digest.replace(":", "-")
    before, _, _ = raw_manifest(remote, host, "demo/app", tag)
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            {
                "mediaType": MANIFEST,
                "digest": sbom_digest,
                "size": len(sbom_bytes),
                "artifactType": "application/spdx+json",
                "annotations": manifest["annotations"],
            }
        ],
    }
    put = remote.do_request(
        f"http://{host}/v2/demo/app/manifests/{tag}",
        "PUT",
        headers={"Content-Type": INDEX},
        data=json.dumps(index).encode(),
    )
    print(
        json.dumps(
            {
                "subject": subject_digest,
                "chart": chart_digest,
                "chart_sha256": hashlib.sha256(chart_bytes).hexdigest(),
                "sbom": sbom_digest,
                "sbom_size": len(sbom_bytes),
                "api_status": api.status_code,
                "tag_before": before,
                "tag_put": put.status_code,
            }
        )
    )


def pull(host, workdir, sbom_digest):
    remote = oras.provider.Registry(hostname=host, insecure=True)
    out = os.path.join(workdir, "out")
    files = remote.pull(target=f"{host}/demo/chart:1.0.0", outdir=out)
    pulled = {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in files}
    sbom = remote.get_manifest(f"{host}/demo/app@{sbom_digest}")
    sbom_files = remote.pull(target=f"{host}/demo/app@{sbom_digest}", outdir=out)
    print(
        json.dumps(
            {
                "chart_files": pulled,
                "sbom_artifact_type": sbom.get("artifactType"),
                "sbom_subject": sbom.get("subject", {}).get("digest"),
                "sbom_files": [os.path.basename(p) for p in sbom_files],
            }
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "push":
        push(sys.argv[2], sys.argv[3])
    else:
        pull(sys.argv[2], sys.argv[3], sys.argv[4])
