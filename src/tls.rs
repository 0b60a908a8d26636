//! TLS on the gRPC listener (rustls), with optional client-certificate verification (mTLS).
//! The certificate, key and client CA files are watched and the configuration rebuilt when
//! they change, so a renewed certificate is served without a restart; a file that no longer
//! loads is reported and the configuration in force stays.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// An established TLS connection.
pub type TlsConnection = TlsStream<TcpStream>;

/// The files TLS is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; `None`: no client
    /// certificates asked for.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Builds a server configuration from the files, explaining what is wrong with them.
    pub fn load(&self) -> Result<ServerConfig, String> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
        };
        let certs = CertificateDer::pem_slice_iter(&read(&self.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("{}: {error}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!("{} holds no PEM certificate", self.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|error| format!("{}: {error}", self.key.display()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&read(path)?) {
                    let cert = cert.map_err(|error| format!("{}: {error}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|error| format!("{}: {error}", path.display()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|error| format!("{}: {error}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|error| {
            format!(
                "{} and {}: {error}",
                self.cert.display(),
                self.key.display()
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        let stamp = |path: &Path| crate::auth::file_stamp(path);
        let mut stamps = vec![stamp(&self.cert), stamp(&self.key)];
        if let Some(path) = &self.client_ca {
            stamps.push(stamp(path));
        }
        stamps
    }
}

/// The configuration in force, rebuilt when the files change.
struct Reloading {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    seen: RwLock<Vec<Option<(SystemTime, u64)>>>,
}

impl Reloading {
    fn reload_if_changed(&self) {
        let stamps = self.files.stamps();
        if stamps == *self.seen.read().expect("lock") {
            return;
        }
        *self.seen.write().expect("lock") = stamps;
        match self.files.load() {
            Ok(config) => {
                tracing::info!(cert = %self.files.cert.display(), "reloaded the TLS certificate");
                *self.current.write().expect("lock") = Arc::new(config);
            }
            Err(error) => {
                tracing::error!(%error, "cannot reload TLS files; the configuration in force stays")
            }
        }
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("lock").clone())
    }
}

/// Accepts TCP connections on `listener` and completes their TLS handshakes (each in its own
/// task, bounded in time); established connections come out of the returned channel, ready
/// for the gRPC server. The files are loaded now (an error says what is wrong) and watched.
pub fn incoming(
    listener: TcpListener,
    files: TlsFiles,
) -> Result<mpsc::Receiver<io::Result<TlsStream<TcpStream>>>, String> {
    // Stamped before loading: files replaced between the two are loaded again by the watcher.
    let seen = RwLock::new(files.stamps());
    let config = files.load()?;
    let reloading = Arc::new(Reloading {
        seen,
        files,
        current: RwLock::new(Arc::new(config)),
    });
    let (sender, receiver) = mpsc::channel(64);
    let watcher = Arc::downgrade(&reloading);
    let stop = sender.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
                _ = stop.closed() => return,
            }
            let Some(reloading) = watcher.upgrade() else {
                return;
            };
            reloading.reload_if_changed();
        }
    });
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept a connection");
                        continue;
                    }
                },
                _ = sender.closed() => return,
            };
            // Without TCP_NODELAY a response in more than one write waits for a delayed ACK.
            let _ = stream.set_nodelay(true);
            let acceptor = reloading.acceptor();
            let sender = sender.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = sender.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    Ok(receiver)
}
