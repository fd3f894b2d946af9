//! TLS for tests: a CA made with rcgen at run time, leaves it signs (for `localhost` and
//! `127.0.0.1`), cert/key files in a tempdir that tests can replace, rustls and reqwest clients that
//! trust the CA, and a TLS (h2 + http/1.1) flavour of the test upstream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::{handle, TestHerald, TestUpstream, UpstreamState};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority for one test, with its certificate also written to `ca.pem`.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// A leaf certificate and its key, as PEM (what herald reads) and the DER the server presents.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    /// A CA with an ECDSA P-256 key.
    pub fn new() -> TestCa {
        TestCa::with_key(KeyPair::generate().unwrap())
    }

    /// A CA with an Ed25519 key: its signatures have a fixed length, so two leaves that differ
    /// only in same-length fields have files of the same size.
    pub fn new_ed25519() -> TestCa {
        TestCa::with_key(KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap())
    }

    fn with_key(key: KeyPair) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "herald test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            path,
            _dir: dir,
        }
    }

    fn sign(&self, cn: &str, serial: u64, public: &impl PublicKeyData) -> rcgen::Certificate {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.signed_by(public, &self.issuer).unwrap()
    }

    /// A leaf with a fresh ECDSA P-256 key (PKCS#8).
    pub fn leaf(&self, cn: &str, serial: u64) -> Leaf {
        self.leaf_with(cn, serial, KeyPair::generate().unwrap())
    }

    /// A leaf with a fresh Ed25519 key (PKCS#8).
    pub fn leaf_ed25519(&self, cn: &str, serial: u64) -> Leaf {
        self.leaf_with(
            cn,
            serial,
            KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        )
    }

    fn leaf_with(&self, cn: &str, serial: u64, key: KeyPair) -> Leaf {
        let cert = self.sign(cn, serial, &key);
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A leaf for a private key file from `tests/fixtures/tls`, which covers key formats rcgen
    /// cannot make with ring: RSA PKCS#1 and EC SEC1.
    pub fn leaf_from_fixture(&self, cn: &str, serial: u64, key_file: &str) -> Leaf {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(key_file);
        let key_pem = std::fs::read_to_string(path).unwrap();
        let cert = self.sign(cn, serial, &FixtureKey::new(&key_pem));
        Leaf {
            cert_pem: cert.pem(),
            key_pem,
            der: cert.der().clone(),
        }
    }

    /// Roots that hold only this CA.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        roots
    }

    /// A rustls client that trusts only this CA and offers `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A reqwest client that trusts only this CA (ALPN h2 and http/1.1).
    pub fn https_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }
}

/// The public half of a fixture key, as rcgen wants it: the raw key (the SubjectPublicKeyInfo's
/// BIT STRING) and a signature algorithm of its kind.
struct FixtureKey {
    raw: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl FixtureKey {
    fn new(key_pem: &str) -> FixtureKey {
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
        let alg = match signer.algorithm() {
            rustls::SignatureAlgorithm::RSA => &rcgen::PKCS_RSA_SHA256,
            rustls::SignatureAlgorithm::ECDSA => &rcgen::PKCS_ECDSA_P256_SHA256,
            other => panic!("no fixture support for {other:?}"),
        };
        let spki = signer.public_key().unwrap();
        FixtureKey {
            raw: spki_bit_string(spki.as_ref()).to_vec(),
            alg,
        }
    }
}

impl PublicKeyData for FixtureKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// `SEQUENCE { algorithm SEQUENCE, subjectPublicKey BIT STRING }` → the BIT STRING's key bytes.
fn spki_bit_string(spki: &[u8]) -> &[u8] {
    /// One DER header at `at`: (tag, content start, content length).
    fn header(d: &[u8], at: usize) -> (u8, usize, usize) {
        let first = d[at + 1];
        if first < 0x80 {
            return (d[at], at + 2, first as usize);
        }
        let n = (first & 0x7f) as usize;
        let len = d[at + 2..at + 2 + n]
            .iter()
            .fold(0, |acc, b| acc << 8 | *b as usize);
        (d[at], at + 2 + n, len)
    }
    let (tag, body_start, _) = header(spki, 0);
    assert_eq!(tag, 0x30, "SEQUENCE");
    let (_, alg_start, alg_len) = header(spki, body_start);
    let (tag, bits, len) = header(spki, alg_start + alg_len);
    assert_eq!(tag, 0x03, "BIT STRING");
    // The first content byte counts unused bits (0 for keys).
    &spki[bits + 1..bits + len]
}

/// `[tls]` cert and key files in a tempdir, replaceable while herald runs.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsFiles {
    pub fn new(leaf: &Leaf) -> TlsFiles {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            _dir: dir,
        };
        files.write(leaf);
        files
    }

    /// Overwrite both files in place (key first, so a reader never pairs the new cert with the
    /// old key for longer than the two writes take).
    pub fn write(&self, leaf: &Leaf) {
        std::fs::write(&self.key, &leaf.key_pem).unwrap();
        std::fs::write(&self.cert, &leaf.cert_pem).unwrap();
    }

    /// The `[tls]` section naming these files.
    pub fn toml(&self) -> String {
        format!(
            "[tls]\ncert = '{}'\nkey = '{}'\n",
            self.cert.display(),
            self.key.display()
        )
    }
}

/// A completed client handshake and what it negotiated.
pub struct Handshake {
    pub stream: TlsStream<TcpStream>,
    pub alpn: Option<Vec<u8>>,
    /// The leaf certificate the server presented.
    pub leaf: CertificateDer<'static>,
    pub elapsed: Duration,
}

/// Connect to `addr` and handshake as `localhost`, trusting `ca`, offering `alpn`.
pub async fn handshake(addr: SocketAddr, ca: &TestCa, alpn: &[&[u8]]) -> Handshake {
    let start = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(alpn));
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("handshake within 5s")
    .expect("handshake succeeds");
    let elapsed = start.elapsed();
    let (_, conn) = stream.get_ref();
    Handshake {
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        leaf: conn.peer_certificates().unwrap()[0].clone().into_owned(),
        elapsed,
        stream,
    }
}

impl TestHerald {
    /// `https://127.0.0.1:PORT/path` (the test leaves carry an IP SAN for 127.0.0.1).
    pub fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.addr.port(), path)
    }
}

impl TestUpstream {
    /// Like `start`, over TLS with `leaf`, speaking HTTP/2 or HTTP/1.1 as ALPN decides.
    pub async fn start_tls(leaf: &Leaf) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der.clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let state = Arc::new(Mutex::new(UpstreamState::default()));
        let stop = CancellationToken::new();
        let join = tokio::spawn(tls_accept_loop(
            listener,
            acceptor,
            state.clone(),
            stop.clone(),
        ));
        TestUpstream {
            addr,
            scheme: "https",
            state,
            stop,
            join,
        }
    }
}

async fn tls_accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<Mutex<UpstreamState>>,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
        };
        let (acceptor, state, stop) = (acceptor.clone(), state.clone(), stop.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
