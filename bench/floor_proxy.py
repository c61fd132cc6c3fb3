#!/usr/bin/env python3
"""The least a caching proxy can do for a cold blob: the floor that bench/cold_blob.py compares with.

Not a registry cache: one blocking loop that answers `GET /v2/` and `GET /v2/<name>/blobs/<digest>`
by fetching the blob from PULLTHROUGH_UPSTREAM and, for each chunk received into one reused
buffer, hashing it, appending it to a file and sending it to the client; then fsync, a digest
check and a rename, as any cache that keeps what it verified must. Everything else pullthrough
does (HTTP parsing and framing, tasks, followers, limits, logs) is left out, and the loop spends
its CPU in C (recv, hashlib's SHA-256, write, send). Started as a binary would be:

    python3 bench/cold_blob.py target/release/pullthrough bench/floor_proxy.py

so its CPU-seconds per GiB are the floor of that row on the same machine, in the same run.
"""

import hashlib
import os
import socket
import urllib.parse

BUF = memoryview(bytearray(1 << 20))


def head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head.decode("latin-1").split("\r\n"), rest


def blob(client, path, upstream, data_dir):
    up = urllib.parse.urlsplit(upstream)
    sock = socket.create_connection((up.hostname, up.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {up.netloc}\r\nConnection: close\r\n\r\n".encode())
    lines, rest = head(sock)
    length = next(int(v) for k, v in (line.split(":", 1) for line in lines[1:]) if k.lower() == "content-length")
    client.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode())
    digest = path.rsplit("/", 1)[1]
    partial = os.path.join(data_dir, digest + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sha = hashlib.sha256()
    chunk, received = memoryview(rest), 0
    while True:
        sha.update(chunk)
        os.write(fd, chunk)
        client.sendall(chunk)
        received += len(chunk)
        n = sock.recv_into(BUF) if received < length else 0
        if n == 0:
            break
        chunk = BUF[:n]
    os.fsync(fd)
    os.close(fd)
    sock.close()
    if "sha256:" + sha.hexdigest() == digest:
        os.rename(partial, os.path.join(data_dir, digest))


def main():
    host, port = os.environ["PULLTHROUGH_LISTEN"].rsplit(":", 1)
    upstream = os.environ["PULLTHROUGH_UPSTREAM"]
    data_dir = os.environ["PULLTHROUGH_DATA_DIR"]
    os.makedirs(data_dir, exist_ok=True)
    listener = socket.create_server((host, int(port)))
    while True:
        client, _ = listener.accept()
        with client:
            lines, _ = head(client)
            if not lines:
                continue
            path = lines[0].split(" ")[1]
            if "/blobs/" in path:
                blob(client, path, upstream, data_dir)
            else:
                client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")


if __name__ == "__main__":
    main()
