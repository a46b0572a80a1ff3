//! TLS towards POP3 clients (POP3S and STLS): a rustls server configuration (ring, TLS 1.2+)
//! whose certificate can be swapped while running, so a renewed certificate needs no restart.
//! A reload that fails keeps the certificate in use and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read certificate chain {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCert { path: PathBuf },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("certificate {cert} and key {key} do not belong together or the key type is unsupported: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Read a PEM chain and key and check that they match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, CertError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| CertError::Cert {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCert {
            path: cert.to_owned(),
        });
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| CertError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, der, &rustls::crypto::ring::default_provider()).map_err(|e| {
        CertError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        }
    })
}

/// The certificate in use, replaceable at run time.
#[derive(Debug)]
pub struct ReloadableCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of (cert, key) when last loaded, to notice renewals.
    loaded_mtimes: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

impl ReloadableCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ReloadableCert>, CertError> {
        let mtimes = (mtime(cert), mtime(key));
        let certified = load_certified_key(cert, key)?;
        Ok(Arc::new(ReloadableCert {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            current: RwLock::new(Arc::new(certified)),
            loaded_mtimes: RwLock::new(mtimes),
        }))
    }

    /// Load the files again; on failure keep serving the old certificate.
    pub fn reload(&self) -> Result<(), CertError> {
        let mtimes = (mtime(&self.cert_path), mtime(&self.key_path));
        let certified = load_certified_key(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
        *self
            .loaded_mtimes
            .write()
            .unwrap_or_else(|e| e.into_inner()) = mtimes;
        Ok(())
    }

    /// Reload if either file changed since the last load. Returns whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, CertError> {
        let now = (mtime(&self.cert_path), mtime(&self.key_path));
        let loaded = *self.loaded_mtimes.read().unwrap_or_else(|e| e.into_inner());
        if now == loaded {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// A TLS acceptor (TLS 1.2 and 1.3, ring) that always uses the current certificate.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, CertError> {
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Watch the files and reload on change, every `interval`, logging the outcome.
    pub fn watch(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                match self.reload_if_changed() {
                    Ok(true) => {
                        tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate changed but cannot be loaded; keeping the old one")
                    }
                }
            }
        })
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
