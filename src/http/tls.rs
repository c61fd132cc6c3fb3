//! TLS on the listener (optional): `tls_cert` and `tls_key` are PEM files, served with rustls
//! (HTTP/2 and HTTP/1.1 by ALPN). The files are read again when they change (checked every few
//! seconds) or on SIGHUP, so certificate rotation needs no restart; a rotation that does not
//! load (a half-written file) keeps the certificate in use and is logged.

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};
use tokio_rustls::TlsAcceptor;

/// How often the files are checked for a rotation.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The certificate being served, and where it comes from.
#[derive(Debug)]
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of the files when last loaded.
    loaded: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Certificates {
    fn load(&self) -> anyhow::Result<Arc<CertifiedKey>> {
        load(&self.provider, &self.cert, &self.key)
    }

    /// Reads the files again if they changed (or when `force`); keeps the old certificate if
    /// the new one does not load.
    pub fn reload(&self, force: bool) {
        let stamp = (modified(&self.cert), modified(&self.key));
        if !force && *self.loaded.read() == stamp {
            return;
        }
        match self.load() {
            Ok(key) => {
                *self.current.write() = key;
                *self.loaded.write() = stamp;
                tracing::info!(cert = %self.cert.display(), "TLS certificate loaded");
            }
            Err(e) => {
                tracing::error!(cert = %self.cert.display(), error = %e, "TLS certificate did not load; serving the previous one");
                // Try again at the next check even if the times do not change.
                *self.loaded.write() = (None, None);
            }
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read()))
    }
}

fn load(provider: &CryptoProvider, cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    use anyhow::Context;
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
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
    let current = load(&provider, cert, key)?;
    let certificates = Arc::new(Certificates {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        provider: Arc::clone(&provider),
        current: RwLock::new(current),
        loaded: RwLock::new((modified(cert), modified(key))),
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
