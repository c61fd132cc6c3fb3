//! TLS on the listener (optional): `tls_cert` and `tls_key` are PEM files, served with rustls
//! (HTTP/2 and HTTP/1.1 by ALPN). The files are read again when they change (checked every few
//! seconds) or on SIGHUP, so certificate rotation needs no restart; a rotation that does not
//! load (a half-written file) keeps the certificate in use and is logged once, and tried again
//! when the files change. A change is seen in the metadata of the files symlinks lead to, so a
//! swapped symlink (a Kubernetes secret's `..data`) counts even to files with old times.

use parking_lot::{Mutex, RwLock};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio_rustls::TlsAcceptor;

/// How often the files are checked for a rotation.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The largest certificate chain or key file read: a chain is a few KiB, so anything bigger is
/// a mistake, refused without being read.
const MAX_FILE: u64 = 1024 * 1024;

/// What tells a file changed without reading it, from the file its path resolves to (symlinks
/// followed): device and inode (a new file, or a symlink swapped to another), size, and the
/// modification and status change times (a write in place). The change time matters: tools
/// that copy or unpack files keep their old modification time, but the change time of a file
/// written or renamed is always now. Metadata rather than a hash of the content: a hash would
/// read both files at every check, while a stat reads nothing until something changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Stamp {
    /// The stamp of what `path` leads to, or `None` if it cannot be read.
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The stamps of the certificate and key files.
type Stamps = (Option<Stamp>, Option<Stamp>);

/// The certificate being served, and where it comes from.
#[derive(Debug)]
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// Stamps of the files at the last attempt to load them, loaded or not: files that did not
    /// load are not read (nor logged) again until they change.
    tried: Mutex<Stamps>,
}

impl Certificates {
    fn stamps(&self) -> Stamps {
        (Stamp::of(&self.cert), Stamp::of(&self.key))
    }

    /// Reads the files again if they changed since the last attempt (or when `force`); keeps
    /// the old certificate if the new one does not load.
    pub fn reload(&self, force: bool) {
        // Taken before reading: a change while reading shows at the next check.
        let stamps = self.stamps();
        {
            let mut tried = self.tried.lock();
            if !force && *tried == stamps {
                return;
            }
            *tried = stamps;
        }
        match load(&self.provider, &self.cert, &self.key) {
            Ok(key) => {
                *self.current.write() = key;
                tracing::info!(cert = %self.cert.display(), "TLS certificate loaded");
            }
            Err(e) => {
                tracing::error!(cert = %self.cert.display(), error = %e, "TLS certificate did not load; serving the previous one");
            }
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read()))
    }
}

/// The contents of `path`, refused if over [`MAX_FILE`] (read no further than that).
fn read_capped(path: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let cannot = || format!("cannot read {}", path.display());
    let file = std::fs::File::open(path).with_context(cannot)?;
    let too_big = || anyhow::anyhow!("{} is larger than {MAX_FILE} bytes", path.display());
    if file.metadata().with_context(cannot)?.len() > MAX_FILE {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    // One byte over the cap tells a file that grew since its size was read.
    file.take(MAX_FILE.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(cannot)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_FILE {
        return Err(too_big());
    }
    Ok(bytes)
}

fn load(provider: &CryptoProvider, cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    use anyhow::Context;
    let chain = CertificateDer::pem_slice_iter(&read_capped(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let key = PrivateKeyDer::from_pem_slice(&read_capped(key)?)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .context("the private key is of a kind rustls cannot use")?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .context("the private key does not belong to the certificate")?;
    Ok(Arc::new(certified))
}

/// The acceptor for `cert` and `key`, or a one-line error for a startup message; spawns the
/// rotation checks (file changes and SIGHUP) for as long as the certificates are in use.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<(TlsAcceptor, Arc<Certificates>)> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let stamps = (Stamp::of(cert), Stamp::of(key));
    let current = load(&provider, cert, key)?;
    let certificates = Arc::new(Certificates {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        provider: Arc::clone(&provider),
        current: RwLock::new(current),
        tried: Mutex::new(stamps),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&certificates) as Arc<dyn ResolvesServerCert>);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    spawn_rotation(Arc::downgrade(&certificates));
    Ok((TlsAcceptor::from(Arc::new(config)), certificates))
}

fn spawn_rotation(certificates: Weak<Certificates>) {
    tokio::spawn(async move {
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let forced = match hangup.as_mut() {
                Some(h) => tokio::select! {
                    _ = h.recv() => true,
                    () = tokio::time::sleep(CHECK_EVERY) => false,
                },
                None => {
                    tokio::time::sleep(CHECK_EVERY).await;
                    false
                }
            };
            let Some(certificates) = certificates.upgrade() else {
                return;
            };
            tokio::task::spawn_blocking(move || certificates.reload(forced));
        }
    });
}
