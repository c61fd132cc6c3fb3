//! Shared object storage (`storage_url = "s3://bucket/prefix"`): the content every replica
//! shares, behind each replica's own memory and disk caches.
//!
//! The bucket mirrors the data directory's layout under the prefix: `blobs/sha256/<hex>`,
//! `manifests/sha256/<hex>` (the media type's line, then the bytes), `tags/<name>/_tags/<tag>`
//! (the tag entry's JSON), and the same under `upstreams/<host>/` for `[[upstreams]]` entries.
//! What is written there was verified first (a blob is uploaded from its verified, stored file;
//! a multipart upload that fails is aborted), and what is read from there is verified again
//! before it is served or stored, so a damaged bucket costs a fetch, never a wrong byte.
//!
//! Object storage is a cache tier, never a dependency: when it fails, reads fall through to
//! upstream and writes are dropped (logged, counted), and for a short while after a failure it is
//! not asked at all, so a dead endpoint does not add its timeout to every request.

use crate::resting::Resting;
use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// How long object storage is left alone after it failed.
const REST_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// The longest a small request (HEAD, PUT of a manifest, DELETE, or the answer's head of a GET)
/// may take: a bucket that accepts connections but does not answer costs this, not minutes.
const QUICK: Duration = Duration::from_secs(5);

async fn quick<T>(
    request: impl Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    tokio::time::timeout(QUICK, request)
        .await
        .unwrap_or_else(|_| {
            Err(object_store::Error::Generic {
                store: "object storage",
                source: format!("no answer within {} s", QUICK.as_secs()).into(),
            })
        })
}

/// Part size of multipart uploads (S3 needs at least 5 MiB per part but the last).
const PART: usize = 8 * 1024 * 1024;

/// An S3-compatible bucket (and prefix) shared by replicas.
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// Left alone after a failure; requests and failures counted.
    resting: Resting,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStorage")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl ObjectStorage {
    /// Object storage for `s3://bucket[/prefix]`, with endpoint, region and credentials from the
    /// standard `AWS_*` environment variables. Nothing is contacted yet.
    pub fn from_url(url: &str) -> Result<ObjectStorage, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if parsed.scheme() != "s3" {
            return Err(
                "must be s3://bucket or s3://bucket/prefix (or empty for the local disk only)"
                    .into(),
            );
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or("names no bucket")?;
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err("must not have a query or fragment".into());
        }
        let prefix = parsed.path().trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err("prefix must not contain . or .. segments".into());
        }
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            ..RetryConfig::default()
        };
        // Set key by key: the client options read from `AWS_*` (AWS_ALLOW_HTTP) stay.
        let client = |key| AmazonS3ConfigKey::Client(key);
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry)
            .with_config(client(ClientConfigKey::ConnectTimeout), "2s")
            // A whole large blob is one request: generous, but bounded.
            .with_config(client(ClientConfigKey::Timeout), "600s")
            .build()
            .map_err(|e| e.to_string())?;
        Ok(ObjectStorage {
            store: Arc::new(store),
            prefix: prefix.to_owned(),
            resting: Resting::new(REST_AFTER_FAILURE),
        })
    }

    /// Requests made and requests failed.
    pub fn counts(&self) -> (u64, u64) {
        self.resting.counts()
    }

    fn key(&self, relative: &str) -> Key {
        self.resting.request();
        if self.prefix.is_empty() {
            Key::from(relative)
        } else {
            Key::from(format!("{}/{relative}", self.prefix))
        }
    }

    /// Whether the bucket may be asked now (not resting after a failure).
    pub fn available(&self) -> bool {
        self.resting.available()
    }

    fn failed(&self, what: &str, relative: &str, e: &object_store::Error) {
        // Logged once per failure spell, not once per request.
        if self.resting.failed() {
            tracing::warn!(what, key = relative, error = %e, "object storage failed; going on without it for {}s", REST_AFTER_FAILURE.as_secs());
        }
    }

    /// An object's bytes, whole (within `QUICK`); `None` when it is absent, or the bucket
    /// failed or rests.
    pub async fn get_bytes(&self, relative: &str, max: u64) -> Option<Bytes> {
        match tokio::time::timeout(QUICK, self.get_bytes_unbounded(relative, max)).await {
            Ok(bytes) => bytes,
            Err(_) => {
                let e = object_store::Error::Generic {
                    store: "object storage",
                    source: "object body not read in time".into(),
                };
                self.failed("get", relative, &e);
                None
            }
        }
    }

    async fn get_bytes_unbounded(&self, relative: &str, max: u64) -> Option<Bytes> {
        let (size, mut stream) = self.get_stream_from(relative, 0).await?;
        if size > max {
            return None;
        }
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        use futures_util::StreamExt;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) if (out.len() + chunk.len()) as u64 <= max => {
                    out.extend_from_slice(&chunk)
                }
                _ => return None,
            }
        }
        Some(Bytes::from(out))
    }

    /// An object's whole size and its bytes from `offset`; `None` when it is absent (or
    /// shorter), or the bucket failed or rests.
    pub async fn get_stream_from(
        &self,
        relative: &str,
        offset: u64,
    ) -> Option<(
        u64,
        futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
    )> {
        if !self.available() {
            return None;
        }
        let options = object_store::GetOptions {
            range: (offset > 0).then_some(object_store::GetRange::Offset(offset)),
            ..Default::default()
        };
        match quick(self.store.get_opts(&self.key(relative), options)).await {
            Ok(result) => Some((result.meta.size, result.into_stream())),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => {
                self.failed("get", relative, &e);
                None
            }
        }
    }

    /// Whether an object exists (`None`: the bucket failed or rests).
    pub async fn exists(&self, relative: &str) -> Option<bool> {
        if !self.available() {
            return None;
        }
        match quick(self.store.head(&self.key(relative))).await {
            Ok(_) => Some(true),
            Err(object_store::Error::NotFound { .. }) => Some(false),
            Err(e) => {
                self.failed("head", relative, &e);
                None
            }
        }
    }

    /// Writes a small object whole; whether it was written.
    pub async fn put_bytes(&self, relative: &str, bytes: Bytes) -> bool {
        if !self.available() {
            return false;
        }
        match quick(self.store.put(&self.key(relative), bytes.into())).await {
            Ok(_) => true,
            Err(e) => {
                self.failed("put", relative, &e);
                false
            }
        }
    }

    /// Uploads a verified file, in parts; the object appears only when every part arrived, and
    /// an upload that fails is aborted. Skipped when the object is already there. Whether the
    /// object is there now.
    pub async fn put_file(&self, relative: &str, path: &std::path::Path) -> bool {
        match self.exists(relative).await {
            Some(false) => {}
            Some(true) => return true,
            None => return false,
        }
        let key = self.key(relative);
        let upload = match quick(self.store.put_multipart(&key)).await {
            Ok(upload) => upload,
            Err(e) => {
                self.failed("upload", relative, &e);
                return false;
            }
        };
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let copied: Result<(), String> = async {
            let mut file = tokio::fs::File::open(path)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 1024 * 1024];
            loop {
                let n = file.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                // At most 4 parts in flight.
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| e.to_string())?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        match copied {
            Ok(()) => match writer.finish().await {
                Ok(_) => true,
                Err(e) => {
                    self.failed("upload", relative, &e);
                    false
                }
            },
            Err(e) => {
                tracing::warn!(key = relative, error = %e, "could not read a stored blob to upload it; upload aborted");
                let _ = writer.abort().await;
                false
            }
        }
    }

    /// Deletes an object (purges); absent is fine.
    pub async fn delete(&self, relative: &str) -> bool {
        if !self.available() {
            return false;
        }
        match quick(self.store.delete(&self.key(relative))).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => true,
            Err(e) => {
                self.failed("delete", relative, &e);
                false
            }
        }
    }
}
