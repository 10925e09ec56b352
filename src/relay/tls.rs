//! The listeners' certificate: `tls.crt` and `tls.key` from a directory (a mounted
//! `kubernetes.io/tls` Secret that cert-manager renews). Each new connection looks at the files'
//! size and modification time (and kubelet's `..data` version) and loads them again when they
//! changed; a pair that does not load keeps the previous one in service.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};

/// Why the certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("reading {path}: {why}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        why: String,
    },
    /// The PEM holds no certificate or no key, or rustls refused them.
    #[error("{dir}: {why}")]
    Invalid {
        /// The directory.
        dir: String,
        /// What is wrong.
        why: String,
    },
}

type Stamp = (Option<PathBuf>, Vec<(u64, Option<SystemTime>)>);

/// The directory and the configuration last loaded from it.
pub struct CertDir {
    dir: PathBuf,
    current: Mutex<Option<(Stamp, TlsAcceptor)>>,
}

impl std::fmt::Debug for CertDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertDir").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl CertDir {
    /// Loads `dir/tls.crt` and `dir/tls.key`; an error when they do not load.
    pub fn load(dir: PathBuf) -> Result<Self, CertError> {
        let this = Self { dir, current: Mutex::new(None) };
        this.acceptor()?;
        Ok(this)
    }

    fn stamp(&self) -> Stamp {
        let version = std::fs::canonicalize(self.dir.join("..data")).ok();
        let files = ["tls.crt", "tls.key"]
            .iter()
            .map(|f| std::fs::metadata(self.dir.join(f)).map(|m| (m.len(), m.modified().ok())).unwrap_or((0, None)))
            .collect();
        (version, files)
    }

    /// The acceptor for a new connection: reloaded when the files changed; the previous one
    /// when the new files do not load (logged).
    pub fn acceptor(&self) -> Result<TlsAcceptor, CertError> {
        let stamp = self.stamp();
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, acceptor)) = current.as_ref()
            && *seen == stamp
        {
            return Ok(acceptor.clone());
        }
        match load(&self.dir) {
            Ok(acceptor) => {
                if current.is_some() {
                    tracing::info!(dir = %self.dir.display(), "the relay's TLS certificate was reloaded");
                }
                *current = Some((stamp, acceptor.clone()));
                Ok(acceptor)
            }
            Err(e) => match current.as_ref() {
                Some((_, previous)) => {
                    tracing::warn!(error = %e, "the changed TLS certificate does not load; the previous one stays");
                    Ok(previous.clone())
                }
                None => Err(e),
            },
        }
    }
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|e| CertError::Read { path: path.display().to_string(), why: e.to_string() })
}

fn load(dir: &Path) -> Result<TlsAcceptor, CertError> {
    let invalid = |why: &str| CertError::Invalid { dir: dir.display().to_string(), why: why.to_owned() };
    let certs: Vec<CertificateDer<'static>> = pem::parse_many(read(&dir.join("tls.crt"))?)
        .map_err(|_| invalid("tls.crt is not PEM"))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(invalid("tls.crt holds no certificate"));
    }
    let key = pem::parse_many(read(&dir.join("tls.key"))?)
        .map_err(|_| invalid("tls.key is not PEM"))?
        .into_iter()
        .find_map(|p| match p.tag() {
            "PRIVATE KEY" => Some(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.into_contents()))),
            "RSA PRIVATE KEY" => Some(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(p.into_contents()))),
            "EC PRIVATE KEY" => Some(PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(p.into_contents()))),
            _ => None,
        })
        .ok_or_else(|| invalid("tls.key holds no private key"))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(&e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(&format!("the certificate and key do not load: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
