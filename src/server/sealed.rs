//! TLS 1.3 application-data records sealed by herald itself, for an HTTP/1.1 stream over TLS on
//! the fast path: after the handshake rustls hands over the send key and sequence number, and the
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

/// The send half of a TLS 1.3 connection's record layer.
pub(super) struct Sealer {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    /// Sequence number of the next record.
    seq: u64,
}

/// Why the fast path cannot take over a connection's sending (it stays with rustls).
#[derive(Debug)]
pub(super) struct Unsupported;

impl Sealer {
    /// From the secrets rustls extracted after a TLS 1.3 handshake (`tx`).
    pub(super) fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Sealer, Unsupported> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(Unsupported),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| Unsupported)?;
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| Unsupported)?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// `parts`, concatenated, as one or more sealed records (`None` once the key is used up or
    /// if sealing fails: the stream must end). Each byte is copied once, into the record.
    pub(super) fn seal(&mut self, parts: &[&[u8]]) -> Option<Bytes> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let records = total.div_ceil(MAX_FRAGMENT).max(1);
        let mut out = Vec::with_capacity(total + records * (HEADER + 1 + aead::MAX_TAG_LEN));
        let (mut part, mut at) = (0, 0);
        for r in 0..records {
            let len = if r + 1 == records {
                total - r * MAX_FRAGMENT
            } else {
                MAX_FRAGMENT
            };
            let start = out.len();
            self.open_record(len, &mut out)?;
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
            self.close_record(start, &mut out)?;
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
        self.open_record(CLOSE_NOTIFY.len(), &mut out)?;
        out.extend_from_slice(&CLOSE_NOTIFY);
        self.close_record_as(ALERT, start, &mut out)?;
        Some(Bytes::from(out))
    }

    /// Append a record header for `len` bytes of plaintext.
    fn open_record(&self, len: usize, out: &mut Vec<u8>) -> Option<()> {
        let wire = u16::try_from(len + 1 + aead::MAX_TAG_LEN).ok()?;
        out.extend_from_slice(&[APPLICATION_DATA, 0x03, 0x03]);
        out.extend_from_slice(&wire.to_be_bytes());
        Some(())
    }

    /// Seal the record that starts at `start` in `out` (header, then its plaintext) in place.
    fn close_record(&mut self, start: usize, out: &mut Vec<u8>) -> Option<()> {
        self.close_record_as(APPLICATION_DATA, start, out)
    }

    /// `close_record` with the inner content type `kind`.
    fn close_record_as(&mut self, kind: u8, start: usize, out: &mut Vec<u8>) -> Option<()> {
        if self.seq >= MAX_RECORDS {
            return None;
        }
        out.push(kind);
        let header: [u8; HEADER] = out[start..start + HEADER].try_into().ok()?;
        // Per-record nonce: the IV with the sequence number XORed into its last 8 bytes.
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut out[start + HEADER..],
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
            .with_protocol_versions(&[&rustls::version::TLS13])
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
            .with_protocol_versions(&[&rustls::version::TLS13])
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
        let suites = [
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        for suite in suites {
            let (mut c, mut s) = pair(suite);
            // rustls writes first (its sequence numbers continue in ours).
            s.writer().write_all(b"from rustls;").unwrap();
            let mut wire = Vec::new();
            s.write_tls(&mut wire).unwrap();
            let secrets = s.dangerous_extract_secrets().unwrap();
            let mut sealer = Sealer::new(secrets.tx.0, secrets.tx.1).unwrap();
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
    fn a_used_up_key_seals_nothing() {
        let (_, s) = pair(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256);
        let secrets = s.dangerous_extract_secrets().unwrap();
        let mut sealer = Sealer::new(MAX_RECORDS - 1, secrets.tx.1).unwrap();
        assert!(sealer.seal(&[b"last"]).is_some());
        assert!(sealer.seal(&[b"one too many"]).is_none());
    }
}
