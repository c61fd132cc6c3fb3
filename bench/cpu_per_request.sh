#!/bin/bash
# bench/cpu_per_request.sh BINARY... : CPU microseconds per manifest-by-tag hit (process utime+stime over wrk's
# request count), 64 connections, 5 s, 3 interleaved rounds; LEVEL=info logs to a file per binary.
# Needs docker-registry, skopeo, wrk and bc (apt). ROUNDS="1 2 3 4 5" for more rounds.
set -e
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf $work' EXIT
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s/reg\nhttp:\n  addr: 127.0.0.1:15900\n' $work > $work/reg.yml
docker-registry serve $work/reg.yml >/dev/null 2>&1 &
sleep 1
mkdir -p $work/l/blobs/sha256; echo '{"imageLayoutVersion":"1.0.0"}' > $work/l/oci-layout
cfg='{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'; ch=$(printf %s "$cfg" | sha256sum | cut -c1-64); printf %s "$cfg" > $work/l/blobs/sha256/$ch
m="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$ch\",\"size\":${#cfg}},\"layers\":[]}"
mh=$(printf %s "$m" | sha256sum | cut -c1-64); printf %s "$m" > $work/l/blobs/sha256/$mh
echo "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$mh\",\"size\":${#m},\"annotations\":{\"org.opencontainers.image.ref.name\":\"1\"}}]}" > $work/l/index.json
skopeo copy -q --dest-tls-verify=false oci:$work/l:1 docker://127.0.0.1:15900/library/b:1
port=15910; pids=()
for b in "$@"; do port=$((port+1)); mkdir $work/d$port
  PULLTHROUGH_UPSTREAM=http://127.0.0.1:15900 PULLTHROUGH_DATA_DIR=$work/d$port PULLTHROUGH_LISTEN=127.0.0.1:$port PULLTHROUGH_TAG_TTL=1h RUST_LOG=pullthrough=${LEVEL:-warn} $b > $work/log.$port 2>&1 &
  pids+=($!)
done
sleep 1
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
hz=$(getconf CLK_TCK)
for r in ${ROUNDS:-1 2 3}; do port=15910; i=0; for b in "$@"; do port=$((port+1)); pid=${pids[$i]}; i=$((i+1))
  curl -s -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' http://127.0.0.1:$port/v2/library/b/manifests/1
  t0=$(ticks $pid)
  out=$(wrk -t2 -c64 -d5s -H 'Accept: application/vnd.oci.image.manifest.v1+json' http://127.0.0.1:$port/v2/library/b/manifests/1)
  t1=$(ticks $pid)
  n=$(echo "$out" | awk '/requests in/{print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
  echo "round $r $b rps=$rps cpu_us_per_req=$(echo "($t1-$t0)*1000000/$hz/$n" | bc -l | cut -c1-6)"
done; done
