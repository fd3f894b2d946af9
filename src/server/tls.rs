//! TLS termination for a listener: loads a PEM chain and key (RSA, ECDSA or Ed25519; PKCS#8, PKCS#1
//! or SEC1), offers ALPN `h2` and `http/1.1`, and swaps in a new certificate when the files change or
//! on SIGHUP without touching open connections. Knows nothing of HTTP; `conn.rs` drives handshakes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::tickets::Tickets;
use crate::config;
use crate::error::{Error, Result};
use crate::shutdown::Hangups;

/// How long a client may take to complete its handshake before the connection is dropped; bounds
/// what a slow or silent client can hold (a connection permit, a task) before it sends a request.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the certificate files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The server side of TLS for one listener. Cheap to clone; clones share the certificate, so a
/// reload through any of them is seen by all.
#[derive(Clone)]
pub struct Acceptor {
    config: Arc<ServerConfig>,
    certs: Arc<CertStore>,
    /// The session-ticket keys, re-derived when `ticket_key` changes.
    tickets: Arc<Tickets>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("files", &self.certs.files)
            .finish()
    }
}

impl Acceptor {
    /// Load `[tls] cert` and `key`; the error names the file at fault.
    pub fn from_files(files: &config::Tls) -> Result<Acceptor> {
        // Stamp first, as in `reload`: a change during the read is seen by the next check.
        let stamp = Stamp::of(files);
        let key = load(files)?;
        Acceptor::with_store(
            CertStore {
                current: RwLock::new(key),
                files: Some(files.clone()),
                stamp: Mutex::new(stamp),
            },
            files.resumption.clone(),
            ticket_secret(files)?,
        )
    }

    /// A fixed certificate from PEM text (`herald demo`'s self-signed one); never reloaded.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Acceptor> {
        let fail = |message| Error::Tls {
            path: PathBuf::from("<in memory>"),
            message,
        };
        let chain = parse_chain(cert_pem).map_err(fail)?;
        let key = parse_key(key_pem).map_err(fail)?;
        let key = certified(chain, key).map_err(|(_, message)| fail(message))?;
        Acceptor::with_store(
            CertStore {
                current: RwLock::new(key),
                files: None,
                stamp: Mutex::new(None),
            },
            config::Resumption::default(),
            None,
        )
    }

    fn with_store(
        store: CertStore,
        resumption: config::Resumption,
        secret: Option<Vec<u8>>,
    ) -> Result<Acceptor> {
        let certs = Arc::new(store);
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports rustls's safe default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        // h2 first: a client offering both gets HTTP/2, whose streams share one connection.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // A returning client resumes: TLS 1.3 (and TLS 1.2 clients that ask) by a stateless
        // ticket, other TLS 1.2 clients by session ID from a cache of the configured size.
        // rustls's default is a 256-entry cache and no tickets: in a reconnect storm of
        // thousands almost every client would pay a full handshake.
        let tickets = Arc::new(
            Tickets::new(resumption.ticket_lifetime, secret.as_deref()).ok_or_else(|| {
                Error::Tls {
                    path: PathBuf::from("<session tickets>"),
                    message: "the system's random number generator failed".into(),
                }
            })?,
        );
        config.ticketer = tickets.clone();
        // rustls does the handshakes only: then it hands the keys to herald's record layer
        // (`handover.rs`) and its buffers are freed.
        config.enable_secret_extraction = true;
        config.session_storage = if resumption.session_cache == 0 {
            Arc::new(rustls::server::NoServerSessionStorage {})
        } else {
            rustls::server::ServerSessionMemoryCache::new(resumption.session_cache)
        };
        Ok(Acceptor {
            config: Arc::new(config),
            certs,
            tickets,
        })
    }

    /// The rustls configuration handshakes use (`handover.rs` drives them).
    pub(super) fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// The certificate chain new handshakes present (leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.certs.current().cert.clone()
    }

    /// Read the files again and, if they form a valid pair, use them for new handshakes; read
    /// `ticket_key` again and, if it changed, derive new ticket keys (tickets sealed under the old
    /// secret stop opening). On error what was in use stays, for each of the two independently.
    /// Does nothing for an in-memory certificate.
    pub fn reload(&self) -> Result<()> {
        let Some(files) = &self.certs.files else {
            return Ok(());
        };
        // Take the stamp before reading: a write that lands during the read changes the files
        // again after this stamp, so the watcher reloads once more.
        let stamp = Stamp::of(files);
        let result = load(files);
        let secret = ticket_secret(files);
        *self
            .certs
            .stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stamp;
        if let Ok(secret) = &secret {
            if self.tickets.set_secret(secret.as_deref()) {
                info!("TLS session-ticket keys derived from the new ticket_key");
            }
        }
        let key = result?;
        *self
            .certs
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = key;
        secret.map(|_| ())
    }

    /// Reload if the files' modification time, size or inode changed since the last load; returns
    /// `None` when they did not.
    pub fn reload_if_changed(&self) -> Option<Result<()>> {
        let files = self.certs.files.as_ref()?;
        let now = Stamp::of(files);
        if *self
            .certs
            .stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            == now
        {
            return None;
        }
        Some(self.reload())
    }

    /// Watch the files until `cancel`: check them every [`WATCH_INTERVAL`], and reload at once on
    /// SIGHUP. A failed reload is logged and the old certificate stays.
    pub async fn watch(self, cancel: CancellationToken, mut hangups: Hangups) {
        {
            if self.certs.files.is_none() {
                return;
            }
            let mut ticker = tokio::time::interval(WATCH_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                let forced = tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = ticker.tick() => false,
                    _ = hangups.next() => true,
                };
                let me = self.clone();
                // File reads may block (network file systems): keep them off the async workers.
                let outcome = tokio::task::spawn_blocking(move || {
                    if forced {
                        Some(me.reload())
                    } else {
                        me.reload_if_changed()
                    }
                })
                .await;
                match outcome {
                    Ok(Some(Ok(()))) => info!(forced, "TLS files reloaded"),
                    Ok(Some(Err(e))) => {
                        warn!(error = %e, "TLS reload failed; keeping what was in use")
                    }
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "TLS reload task failed"),
                }
            }
        }
    }
}

/// The certificate in use and where it came from.
#[derive(Debug)]
struct CertStore {
    /// Swapped whole on reload; a handshake clones the `Arc`, so connections that already have it
    /// are unaffected.
    current: RwLock<Arc<CertifiedKey>>,
    /// None for an in-memory certificate, which is never reloaded.
    files: Option<config::Tls>,
    /// What the files looked like at the last load (successful or not), so that a broken file is
    /// reported once per change rather than on every check.
    stamp: Mutex<Option<Stamp>>,
}

impl CertStore {
    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Modification time, size and inode of the cert, key and `ticket_key` files: a change in any
/// means new files (an in-place write changes the time and usually the size; a symlink or rename
/// swap, as certbot and Kubernetes secrets do, changes the inode).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(
    [(Option<SystemTime>, u64, u64); 2],
    Option<(Option<SystemTime>, u64, u64)>,
);

impl Stamp {
    fn of(files: &config::Tls) -> Option<Stamp> {
        let tickets = match &files.resumption.ticket_key {
            Some(path) => Some(file_stamp(path)?),
            None => None,
        };
        Some(Stamp(
            [file_stamp(&files.cert)?, file_stamp(&files.key)?],
            tickets,
        ))
    }
}

fn file_stamp(path: &Path) -> Option<(Option<SystemTime>, u64, u64)> {
    let meta = fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok(), meta.len(), inode))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Shortest `ticket_key` accepted: the ticket keys are only as strong as this secret.
const MIN_TICKET_SECRET: usize = 32;

/// Read `[tls] ticket_key`, if set: at least 32 bytes (random, e.g. `openssl rand 48`). The error
/// names the file.
pub fn ticket_secret(files: &config::Tls) -> Result<Option<Vec<u8>>> {
    let Some(path) = &files.resumption.ticket_key else {
        return Ok(None);
    };
    let fail = |message: String| Error::Tls {
        path: path.clone(),
        message,
    };
    let secret = fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if secret.len() < MIN_TICKET_SECRET {
        return Err(fail(format!(
            "a ticket key needs at least {MIN_TICKET_SECRET} random bytes, the file has {} (make one with `openssl rand 48 > FILE`)",
            secret.len()
        )));
    }
    Ok(Some(secret))
}

/// Read and check a certificate chain and its private key: both parse, and the key belongs to the
/// leaf. Each error names the file at fault.
pub fn load(files: &config::Tls) -> Result<Arc<CertifiedKey>> {
    let read = |path: &Path| {
        fs::read(path).map_err(|e| Error::Tls {
            path: path.to_path_buf(),
            message: format!("cannot read: {e}"),
        })
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let chain = parse_chain(&cert_pem).map_err(|message| Error::Tls {
        path: files.cert.clone(),
        message,
    })?;
    let key = parse_key(&key_pem).map_err(|message| Error::Tls {
        path: files.key.clone(),
        message,
    })?;
    certified(chain, key).map_err(|(fault, message)| match fault {
        Fault::Cert => Error::Tls {
            path: files.cert.clone(),
            message,
        },
        Fault::Key => Error::Tls {
            path: files.key.clone(),
            message,
        },
        Fault::Pair => Error::Tls {
            path: files.key.clone(),
            message: format!("{message} in {}", files.cert.display()),
        },
    })
}

/// Which file a pairing error is blamed on.
enum Fault {
    Cert,
    Key,
    Pair,
}

fn parse_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    if chain.is_empty() {
        return Err(
            "no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks, leaf first)".into(),
        );
    }
    Ok(chain)
}

fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no private key found (expected PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\")".to_string()
        }
        e => format!("invalid PEM: {e}"),
    })
}

/// Pair a chain with its key: the key must be usable by rustls and belong to the leaf.
fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, (Fault, String)> {
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => (
                Fault::Pair,
                "the private key does not match the certificate".to_string(),
            ),
            rustls::Error::InvalidCertificate(e) => {
                (Fault::Cert, format!("invalid certificate: {e}"))
            }
            e => (Fault::Key, format!("unusable private key: {e}")),
        })
}
