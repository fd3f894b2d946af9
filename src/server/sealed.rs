//! TLS 1.3 and TLS 1.2 (AEAD) application-data records sealed by herald itself, for an HTTP/1.1
//! stream over TLS on the fast path: after the handshake rustls hands over the send key and sequence number, and the
//! connection's rustls state (its buffers, ~25 KiB with hyper's) is freed. Sends only: what the
//! client sends afterwards is not decrypted (a stream ignores it; its end is the socket's end).

use bytes::Bytes;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext in one record (RFC 8446 5.1).
const MAX_FRAGMENT: usize = 1 << 14;
/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// Content type `application_data`, outer and inner.
const APPLICATION_DATA: u8 = 0x17;
/// Inner content type `alert`, and the `close_notify` alert (level warning, description 0).
const ALERT: u8 = 0x15;
const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// Records sealed with one key before the stream ends (the client reconnects with fresh keys):
/// below AES-GCM's confidentiality limit of 2^24.5 records (RFC 8446 5.5), where rustls would
/// update the key instead.
const MAX_RECORDS: u64 = 1 << 23;

/// The send half of a TLS 1.3 or TLS 1.2 (AEAD) connection's record layer.
pub(super) struct Sealer {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    /// Sequence number of the next record.
    seq: u64,
    version: Version,
}

/// How records are framed: TLS 1.3 hides the content type inside and authenticates the header;
/// TLS 1.2 authenticates sequence, type, version and length, and AES-GCM sends the last 8 bytes of
/// the nonce before the ciphertext (RFC 5288; ChaCha20 does not, RFC 7905).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Version {
    Tls13,
    Tls12Gcm,
    Tls12Chacha,
}

/// Why the fast path cannot take over a connection's sending (it stays with rustls).
#[derive(Debug)]
pub(super) struct Unsupported;

/// Make rustls queue everything it owes the peer before its keys are taken: a TLS 1.3 KeyUpdate
/// the client asked for is answered under the old key and parked until rustls next writes, while
/// the send key has already moved on; without this, the parked answer would be dropped and every
/// record sealed after the handover would be under a key the client does not have yet.
pub(super) fn settle(conn: &mut rustls::ServerConnection) {
    use std::io::Write;
    // An empty write flushes the parked message into the send buffer (nothing else is written).
    let _ = conn.writer().write(&[]);
}

impl Sealer {
    /// From the secrets rustls extracted after a handshake (`tx`), TLS 1.3 or TLS 1.2.
    pub(super) fn new(
        tls13: bool,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> Result<Sealer, Unsupported> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(Unsupported),
        };
        let version = match (tls13, alg == &aead::CHACHA20_POLY1305) {
            (true, _) => Version::Tls13,
            (false, false) => Version::Tls12Gcm,
            (false, true) => Version::Tls12Chacha,
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| Unsupported)?;
        // TLS 1.2 AES-GCM: the 4-byte salt and 8 bytes from the key block, as rustls builds it.
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| Unsupported)?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
            iv,
            seq,
            version,
        })
    }

    /// `parts`, concatenated, as one or more sealed records (`None` once the key is used up or
    /// if sealing fails: the stream must end). Each byte is copied once, into the record.
    pub(super) fn seal(&mut self, parts: &[&[u8]]) -> Option<Bytes> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let records = total.div_ceil(MAX_FRAGMENT).max(1);
        let mut out = Vec::with_capacity(total + records * (HEADER + 9 + aead::MAX_TAG_LEN));
        let (mut part, mut at) = (0, 0);
        for r in 0..records {
            let len = if r + 1 == records {
                total - r * MAX_FRAGMENT
            } else {
                MAX_FRAGMENT
            };
            let start = out.len();
            self.open_record(APPLICATION_DATA, len, &mut out)?;
            // The record's plaintext: the next `len` bytes of `parts`.
            let mut need = len;
            while need > 0 {
                let p = parts.get(part)?;
                let take = need.min(p.len() - at);
                out.extend_from_slice(&p[at..at + take]);
                (need, at) = (need - take, at + take);
                if at == p.len() {
                    (part, at) = (part + 1, 0);
                }
            }
            self.close_record(APPLICATION_DATA, start, len, &mut out)?;
        }
        Some(Bytes::from(out))
    }

    /// `parts` (if any) sealed as application data, then a `close_notify` alert: the end of the
    /// connection, told so that the client knows it saw everything.
    pub(super) fn seal_last(&mut self, parts: &[&[u8]]) -> Option<Bytes> {
        let mut out = if parts.iter().any(|p| !p.is_empty()) {
            Vec::from(self.seal(parts)?)
        } else {
            Vec::new()
        };
        let start = out.len();
        self.open_record(ALERT, CLOSE_NOTIFY.len(), &mut out)?;
        out.extend_from_slice(&CLOSE_NOTIFY);
        self.close_record(ALERT, start, CLOSE_NOTIFY.len(), &mut out)?;
        Some(Bytes::from(out))
    }

    /// This record's nonce: the IV with the sequence number XORed into its last 8 bytes.
    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        nonce
    }

    /// Bytes between the header and the ciphertext (TLS 1.2 AES-GCM's explicit nonce).
    fn explicit_len(&self) -> usize {
        if self.version == Version::Tls12Gcm {
            NONCE_LEN - 4
        } else {
            0
        }
    }

    /// Append the header of a record of type `kind` with `len` bytes of plaintext (and, for TLS
    /// 1.2 AES-GCM, the explicit nonce).
    fn open_record(&self, kind: u8, len: usize, out: &mut Vec<u8>) -> Option<()> {
        let (outer, inner_type) = match self.version {
            Version::Tls13 => (APPLICATION_DATA, 1),
            _ => (kind, 0),
        };
        let wire =
            u16::try_from(self.explicit_len() + len + inner_type + aead::MAX_TAG_LEN).ok()?;
        out.extend_from_slice(&[outer, 0x03, 0x03]);
        out.extend_from_slice(&wire.to_be_bytes());
        if self.version == Version::Tls12Gcm {
            out.extend_from_slice(&self.nonce()[4..]);
        }
        Some(())
    }

    /// Seal, in place, the record of type `kind` that starts at `start` in `out` (its header,
    /// then its `len` bytes of plaintext).
    fn close_record(
        &mut self,
        kind: u8,
        start: usize,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        if self.seq >= MAX_RECORDS {
            return None;
        }
        let body = start + HEADER + self.explicit_len();
        // TLS 1.3: the record header; TLS 1.2: sequence, type, version, plaintext length.
        let mut aad = [0u8; 13];
        let aad_len = match self.version {
            Version::Tls13 => {
                out.push(kind);
                aad[..HEADER].copy_from_slice(out.get(start..start + HEADER)?);
                HEADER
            }
            _ => {
                aad[..8].copy_from_slice(&self.seq.to_be_bytes());
                aad[8..11].copy_from_slice(&[kind, 0x03, 0x03]);
                aad[11..].copy_from_slice(&u16::try_from(len).ok()?.to_be_bytes());
                aad.len()
            }
        };
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(self.nonce()),
                Aad::from(&aad[..aad_len]),
                &mut out[body..],
            )
            .ok()?;
        self.seq += 1;
        out.extend_from_slice(tag.as_ref());
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    use super::*;

    /// A rustls client and server handshaken in memory, the server with secret extraction on.
    fn pair(
        suite: rustls::SupportedCipherSuite,
    ) -> (rustls::ClientConnection, rustls::ServerConnection) {
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::ring::default_provider()
        });
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[suite.version()])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[suite.version()])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut &wire[..]).unwrap();
            s.process_new_packets().unwrap();
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut &wire[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (c, s)
    }

    /// What rustls's client makes of `wire`.
    fn client_reads(c: &mut rustls::ClientConnection, wire: &[u8]) -> Vec<u8> {
        let mut rest = wire;
        let mut got = Vec::new();
        while !rest.is_empty() {
            c.read_tls(&mut rest).unwrap();
            c.process_new_packets().unwrap();
            // Taken as it comes: rustls holds only so much unread plaintext.
            let _ = c.reader().read_to_end(&mut got);
        }
        got
    }

    #[test]
    fn rustls_clients_read_what_we_seal_for_every_suite() {
        use rustls::crypto::ring::cipher_suite::*;
        let suites = [
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        for suite in suites {
            let tls13 = suite.version() == &rustls::version::TLS13;
            let (mut c, mut s) = pair(suite);
            // rustls writes first (its sequence numbers continue in ours).
            s.writer().write_all(b"from rustls;").unwrap();
            let mut wire = Vec::new();
            s.write_tls(&mut wire).unwrap();
            let secrets = s.dangerous_extract_secrets().unwrap();
            let mut sealer = Sealer::new(tls13, secrets.tx.0, secrets.tx.1).unwrap();
            let big = vec![b'x'; 40_000];
            wire.extend_from_slice(&sealer.seal(&[b"a", b"b", b"c"]).unwrap());
            wire.extend_from_slice(&sealer.seal(&[&big]).unwrap());
            wire.extend_from_slice(&sealer.seal(&[b""]).unwrap());
            wire.extend_from_slice(&sealer.seal_last(&[b"end"]).unwrap());
            let mut want = b"from rustls;abc".to_vec();
            want.extend_from_slice(&big);
            want.extend_from_slice(b"end");
            assert_eq!(client_reads(&mut c, &wire), want, "{suite:?}");
            // The client saw a clean close (close_notify), not a truncation.
            let mut rest = Vec::new();
            assert_eq!(c.reader().read_to_end(&mut rest).unwrap(), 0, "{suite:?}");
        }
    }

    #[test]
    fn a_key_update_the_client_asked_for_before_the_handover_is_answered() {
        use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let (mut c, mut s) = pair(TLS13_AES_128_GCM_SHA256);
        // The client asks for new keys, then sends its request, in one flight.
        c.refresh_traffic_keys().unwrap();
        c.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        s.read_tls(&mut &wire[..]).unwrap();
        s.process_new_packets().unwrap();
        let mut req = [0u8; 64];
        let n = s.reader().read(&mut req).unwrap();
        assert_eq!(&req[..n], b"GET / HTTP/1.1\r\n\r\n");
        // The handover, as the fast path does it.
        settle(&mut s);
        let mut wire = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        let secrets = s.dangerous_extract_secrets().unwrap();
        let mut sealer = Sealer::new(true, secrets.tx.0, secrets.tx.1).unwrap();
        wire.extend_from_slice(&sealer.seal(&[b"data: 1\n\n"]).unwrap());
        assert_eq!(client_reads(&mut c, &wire), b"data: 1\n\n");
    }

    #[test]
    fn a_used_up_key_seals_nothing() {
        let (_, s) = pair(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256);
        let secrets = s.dangerous_extract_secrets().unwrap();
        let mut sealer = Sealer::new(true, MAX_RECORDS - 1, secrets.tx.1).unwrap();
        assert!(sealer.seal(&[b"last"]).is_some());
        assert!(sealer.seal(&[b"one too many"]).is_none());
    }
}
