//! The rig the per-hit benchmarks share: a one-image upstream and pullthrough in this process on
//! loopback ports, and a blocking keep-alive client that allocates nothing per request, so what
//! is counted per request is the server's work.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use sha2::Digest as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// The manifest the upstream serves for `library/bench:1`.
const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:7d865e959b2466918c9863afca942d0fb89d7c9ac0c99bafc3749504ded97730","size":10}]}"#;
pub const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A running pullthrough with `library/bench:1` cached.
pub struct Rig {
    /// Where pullthrough listens.
    pub addr: SocketAddr,
    /// The manifest's digest.
    pub digest: String,
    _data: tempfile::TempDir,
}

/// The requests measured: a GET by tag, a GET by digest, a HEAD by tag.
pub fn requests(rig: &Rig) -> [(&'static str, Vec<u8>); 3] {
    let accept =
        format!("Accept: {MEDIA_TYPE}, application/vnd.docker.distribution.manifest.v2+json");
    let request = |method: &str, reference: &str| {
        format!(
            "{method} /v2/library/bench/manifests/{reference} HTTP/1.1\r\nHost: {}\r\n{accept}\r\nUser-Agent: bench\r\n\r\n",
            rig.addr
        )
        .into_bytes()
    };
    [
        ("GET by tag", request("GET", "1")),
        ("GET by digest", request("GET", &rig.digest)),
        ("HEAD by tag", request("HEAD", "1")),
    ]
}

/// Starts the upstream and pullthrough on a runtime of their own threads (`workers` of them,
/// as the binary would on that many cores) and caches the manifest with one pull.
pub fn start(workers: usize) -> Rig {
    // As `bench/bench.py` runs the binary: `RUST_LOG=pullthrough=warn` unless told otherwise,
    // with the binary's formatter and writer thread as it runs off a terminal (writing nowhere).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pullthrough=warn"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(pullthrough::logging::QUEUED_LINES)
        .finish(std::io::sink());
    std::mem::forget(guard);
    pullthrough::logging::write_access_lines_to(writer.clone());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .fmt_fields(pullthrough::logging::PlainFields)
        .with_writer(writer)
        .init();
    let data = tempfile::tempdir().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = data.path().to_path_buf();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
            let registry = axum::Router::new()
                .route("/v2/", axum::routing::get(|| async { "{}" }))
                .route(
                    "/v2/library/bench/manifests/{reference}",
                    axum::routing::get(manifest),
                );
            tokio::spawn(async move { axum::serve(upstream, registry).await });
            let config = pullthrough::Config {
                upstream: upstream_url.parse().unwrap(),
                data_dir: dir,
                tag_ttl: std::time::Duration::from_secs(3600),
                cache_min_free_disk: bytesize::ByteSize::b(0),
                ..pullthrough::Config::default()
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            pullthrough::run(config, listener, std::future::pending())
                .await
                .unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(MANIFEST)));
    let rig = Rig {
        addr,
        digest,
        _data: data,
    };
    let mut client = Client::connect(rig.addr);
    for (_, request) in requests(&rig) {
        client.send(&request, 1);
    }
    rig
}

async fn manifest() -> impl IntoResponse {
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(MANIFEST)));
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(MEDIA_TYPE)),
            (
                header::HeaderName::from_static("docker-content-digest"),
                HeaderValue::from_str(&digest).unwrap(),
            ),
        ],
        MANIFEST,
    )
}

/// A keep-alive HTTP/1.1 client over one connection with a fixed buffer.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects (retrying until the server listens).
    pub fn connect(addr: SocketAddr) -> Client {
        for _ in 0..100 {
            if let Ok(stream) = TcpStream::connect(addr) {
                stream.set_nodelay(true).unwrap();
                return Client {
                    stream,
                    buf: vec![0; 64 * 1024],
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("pullthrough did not listen on {addr}");
    }

    /// Sends `request` `n` times, reading each whole response; panics unless each is a 200.
    pub fn send(&mut self, request: &[u8], n: usize) {
        let head = request.starts_with(b"HEAD");
        for _ in 0..n {
            self.stream.write_all(request).unwrap();
            let mut filled = 0;
            let (header_end, length) = loop {
                let read = self.stream.read(&mut self.buf[filled..]).unwrap();
                assert!(read > 0, "pullthrough closed the connection");
                // Search only what is new (and the 3 bytes before it) for the end of the head.
                let from = filled.saturating_sub(3);
                filled += read;
                if let Some(end) = find(&self.buf[from..filled], b"\r\n\r\n").map(|e| e + from) {
                    let headers = &self.buf[..end];
                    assert!(
                        headers.starts_with(b"HTTP/1.1 200"),
                        "{}",
                        String::from_utf8_lossy(headers)
                    );
                    let length = content_length(headers);
                    break (end + 4, if head { 0 } else { length });
                }
            };
            while filled < header_end + length {
                let read = self.stream.read(&mut self.buf[filled..]).unwrap();
                assert!(read > 0, "pullthrough closed the connection");
                filled += read;
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(headers: &[u8]) -> usize {
    headers
        .split(|b| *b == b'\n')
        .find_map(|line| {
            let line = std::str::from_utf8(line).ok()?.trim();
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("a Content-Length")
}
