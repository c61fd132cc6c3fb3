#!/bin/sh
# nginx as a plain reverse proxy (no cache, keepalive to the upstream), started as pullthrough
# would be: PULLTHROUGH_LISTEN, PULLTHROUGH_UPSTREAM and PULLTHROUGH_DATA_DIR. The reference for
# what one proxy hop costs a cold miss on this machine:
#
#     python3 bench/cold_miss.py target/release/pullthrough bench/nginx_proxy.sh
set -eu
dir=$PULLTHROUGH_DATA_DIR
mkdir -p "$dir"
upstream=${PULLTHROUGH_UPSTREAM#http://}
cat > "$dir/nginx.conf" <<EOF
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream registry {
    server $upstream;
    keepalive 16;
  }
  server {
    listen $PULLTHROUGH_LISTEN;
    location / {
      proxy_pass http://registry;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
exec nginx -c "$dir/nginx.conf" -g "daemon off;"
