//! herald's TLS record layer, in both directions: after a handshake rustls hands over the
//! connection's keys and sequence numbers (`handover.rs`) and is dropped with its buffers; records
//! are then sealed and opened here (TLS 1.3, and TLS 1.2 with AES-GCM or ChaCha20-Poly1305).

use std::ops::Range;

use bytes::Bytes;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext in one record (RFC 8446 5.1).
const MAX_FRAGMENT: usize = 1 << 14;
/// Largest record body accepted from a peer: TLS 1.3 allows 256 bytes of expansion (RFC 8446
/// 5.2), TLS 1.2 2,048 (RFC 5246 6.2.3).
pub(super) const MAX_WIRE: usize = MAX_FRAGMENT + 2048;
/// Record header: type, legacy version, length.
pub(super) const HEADER: usize = 5;
/// Content type `application_data`, outer and inner.
pub(super) const APPLICATION_DATA: u8 = 0x17;
/// Content type `alert`, and the `close_notify` alert (level warning, description 0).
pub(super) const ALERT: u8 = 0x15;
const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// Records sealed with one key before the stream ends (the client reconnects with fresh keys):
/// below AES-GCM's confidentiality limit of 2^24.5 records (RFC 8446 5.5), where rustls would
/// update the key instead.
const MAX_RECORDS: u64 = 1 << 23;

/// The length of the whole record (header included) at the start of `buf`, once all of it is
/// there; an error if the header announces more than a peer may send.
pub(super) fn whole_record(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(head) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
    if len > MAX_WIRE {
        return Err(RecordError::TooLarge);
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}

/// Why a received record cannot be taken: the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecordError {
    /// Longer than the protocol allows (`record_overflow`).
    TooLarge,
    /// Not authentic under the connection's key (`bad_record_mac`), or malformed.
    Bad,
    /// A content type not expected once the handshake is over (a change_cipher_spec).
    Unexpected,
    /// The key has been used for as many records as it may be.
    Exhausted,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordError::TooLarge => "TLS record too large",
            RecordError::Bad => "TLS record does not decrypt",
            RecordError::Unexpected => "unexpected TLS record type",
            RecordError::Exhausted => "TLS key used up",
        })
    }
}

impl std::error::Error for RecordError {}

/// One direction's key: the AEAD key, its IV, the next record's sequence number and the framing.
/// The key is kept as its bytes, and ring's key (its schedule and GHASH table, ~550 B for
/// AES-GCM) is built for each write or record: an idle connection holds 64 bytes per direction.
struct Key {
    alg: &'static aead::Algorithm,
    secret: [u8; 32],
    iv: [u8; NONCE_LEN],
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

/// Why herald's record layer cannot take over a connection (it is closed; the client reconnects).
#[derive(Debug)]
pub(super) struct Unsupported;

impl Key {
    /// From the secrets rustls extracted after a handshake, TLS 1.3 or TLS 1.2.
    fn new(tls13: bool, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Key, Unsupported> {
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
        // Checked once here, so that building it again later cannot fail.
        UnboundKey::new(alg, key.as_ref()).map_err(|_| Unsupported)?;
        let mut secret = [0u8; 32];
        secret
            .get_mut(..key.as_ref().len())
            .ok_or(Unsupported)?
            .copy_from_slice(key.as_ref());
        // TLS 1.2 AES-GCM: the 4-byte salt and 8 bytes from the key block, as rustls builds it.
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| Unsupported)?;
        Ok(Key {
            alg,
            secret,
            iv,
            seq,
            version,
        })
    }

    /// ring's key, built from the bytes (a key schedule with AES-NI: well under a microsecond).
    fn aead(&self) -> Option<LessSafeKey> {
        let key = UnboundKey::new(self.alg, self.secret.get(..self.alg.key_len())?).ok()?;
        Some(LessSafeKey::new(key))
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

    /// TLS 1.2's additional data: sequence, type, version, plaintext length.
    fn aad12(&self, kind: u8, len: usize) -> Option<[u8; 13]> {
        let mut aad = [0u8; 13];
        aad[..8].copy_from_slice(&self.seq.to_be_bytes());
        aad[8..11].copy_from_slice(&[kind, 0x03, 0x03]);
        aad[11..].copy_from_slice(&u16::try_from(len).ok()?.to_be_bytes());
        Some(aad)
    }
}

/// The send half of a connection's record layer.
pub(super) struct Sealer(Key);

/// The receive half.
pub(super) struct Opener(Key);

/// A record opened in place: its content type and where its plaintext is in the record.
pub(super) struct Opened {
    pub kind: u8,
    pub plain: Range<usize>,
}

impl Opener {
    /// From the secrets rustls extracted after a handshake (`rx`), TLS 1.3 or TLS 1.2.
    pub(super) fn new(
        tls13: bool,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> Result<Opener, Unsupported> {
        Key::new(tls13, seq, secrets).map(Opener)
    }

    /// Open the whole record `rec` (header included, as [`whole_record`] measured it) in place.
    pub(super) fn open(&mut self, rec: &mut [u8]) -> Result<Opened, RecordError> {
        let k = &mut self.0;
        if k.seq == u64::MAX {
            return Err(RecordError::Exhausted);
        }
        let (head, body) = rec.split_at_mut(HEADER);
        let outer = head[0];
        let nonce;
        let skip;
        let mut aad = [0u8; 13];
        let aad_len;
        match k.version {
            Version::Tls13 => {
                // A change_cipher_spec (only ever in the clear, during the handshake) or any
                // other outer type is not application traffic.
                if outer != APPLICATION_DATA {
                    return Err(RecordError::Unexpected);
                }
                nonce = k.nonce();
                skip = 0;
                aad[..HEADER].copy_from_slice(head);
                aad_len = HEADER;
            }
            _ => {
                if !matches!(outer, APPLICATION_DATA | ALERT | 0x16) {
                    return Err(RecordError::Unexpected);
                }
                skip = k.explicit_len();
                let explicit = body.get(..skip).ok_or(RecordError::Bad)?;
                nonce = if k.version == Version::Tls12Gcm {
                    let mut n = k.iv;
                    n[4..].copy_from_slice(explicit);
                    n
                } else {
                    k.nonce()
                };
                let len = body
                    .len()
                    .checked_sub(skip + aead::MAX_TAG_LEN)
                    .ok_or(RecordError::Bad)?;
                aad = k.aad12(outer, len).ok_or(RecordError::Bad)?;
                aad_len = aad.len();
            }
        }
        let sealed = body.get_mut(skip..).ok_or(RecordError::Bad)?;
        let plain = k
            .aead()
            .ok_or(RecordError::Bad)?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..aad_len]),
                sealed,
            )
            .map_err(|_| RecordError::Bad)?;
        k.seq += 1;
        let start = HEADER + skip;
        let (kind, len) = if k.version == Version::Tls13 {
            // The content type is the last non-zero byte; zeros after it are padding.
            let at = plain
                .iter()
                .rposition(|&b| b != 0)
                .ok_or(RecordError::Bad)?;
            (plain[at], at)
        } else {
            (outer, plain.len())
        };
        if len > MAX_FRAGMENT {
            return Err(RecordError::TooLarge);
        }
        Ok(Opened {
            kind,
            plain: start..start + len,
        })
    }
}

impl Sealer {
    /// From the secrets rustls extracted after a handshake (`tx`), TLS 1.3 or TLS 1.2.
    pub(super) fn new(
        tls13: bool,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> Result<Sealer, Unsupported> {
        Key::new(tls13, seq, secrets).map(Sealer)
    }

    /// `parts`, concatenated, as one or more sealed records (`None` once the key is used up or
    /// if sealing fails: the stream must end). Each byte is copied once, into the record.
    pub(super) fn seal(&mut self, parts: &[&[u8]]) -> Option<Bytes> {
        let mut out = Vec::new();
        self.seal_into(parts, &mut out)?;
        Some(Bytes::from(out))
    }

    /// [`Sealer::seal`], appending to `out`.
    pub(super) fn seal_into(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Option<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let records = total.div_ceil(MAX_FRAGMENT).max(1);
        out.reserve(total + records * (HEADER + 9 + aead::MAX_TAG_LEN));
        let key = self.0.aead()?;
        let (mut part, mut at) = (0, 0);
        for r in 0..records {
            let len = if r + 1 == records {
                total - r * MAX_FRAGMENT
            } else {
                MAX_FRAGMENT
            };
            let start = out.len();
            self.open_record(APPLICATION_DATA, len, out)?;
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
            self.close_record(&key, APPLICATION_DATA, start, len, out)?;
        }
        Some(())
    }

    /// `parts` (if any) sealed as application data, then a `close_notify` alert: the end of the
    /// connection, told so that the client knows it saw everything.
    pub(super) fn seal_last(&mut self, parts: &[&[u8]]) -> Option<Bytes> {
        let mut out = Vec::new();
        self.seal_last_into(parts, &mut out)?;
        Some(Bytes::from(out))
    }

    /// [`Sealer::seal_last`], appending to `out`.
    pub(super) fn seal_last_into(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Option<()> {
        if parts.iter().any(|p| !p.is_empty()) {
            self.seal_into(parts, out)?;
        }
        let start = out.len();
        self.open_record(ALERT, CLOSE_NOTIFY.len(), out)?;
        out.extend_from_slice(&CLOSE_NOTIFY);
        self.close_record(&self.0.aead()?, ALERT, start, CLOSE_NOTIFY.len(), out)
    }

    /// Append the header of a record of type `kind` with `len` bytes of plaintext (and, for TLS
    /// 1.2 AES-GCM, the explicit nonce).
    fn open_record(&self, kind: u8, len: usize, out: &mut Vec<u8>) -> Option<()> {
        let k = &self.0;
        let (outer, inner_type) = match k.version {
            Version::Tls13 => (APPLICATION_DATA, 1),
            _ => (kind, 0),
        };
        let wire = u16::try_from(k.explicit_len() + len + inner_type + aead::MAX_TAG_LEN).ok()?;
        out.extend_from_slice(&[outer, 0x03, 0x03]);
        out.extend_from_slice(&wire.to_be_bytes());
        if k.version == Version::Tls12Gcm {
            out.extend_from_slice(&k.nonce()[4..]);
        }
        Some(())
    }

    /// Seal, in place, the record of type `kind` that starts at `start` in `out` (its header,
    /// then its `len` bytes of plaintext).
    fn close_record(
        &mut self,
        key: &LessSafeKey,
        kind: u8,
        start: usize,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        let k = &mut self.0;
        if k.seq >= MAX_RECORDS {
            return None;
        }
        let body = start + HEADER + k.explicit_len();
        // TLS 1.3: the record header; TLS 1.2: sequence, type, version, plaintext length.
        let mut aad = [0u8; 13];
        let aad_len = match k.version {
            Version::Tls13 => {
                out.push(kind);
                aad[..HEADER].copy_from_slice(out.get(start..start + HEADER)?);
                HEADER
            }
            _ => {
                aad = k.aad12(kind, len)?;
                aad.len()
            }
        };
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(k.nonce()),
                Aad::from(&aad[..aad_len]),
                &mut out[body..],
            )
            .ok()?;
        k.seq += 1;
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

    /// Every suite herald's record layer takes over: TLS 1.3's three, TLS 1.2's AEAD ones.
    const SUITES: [rustls::SupportedCipherSuite; 6] = {
        use rustls::crypto::ring::cipher_suite::*;
        [
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ]
    };

    #[test]
    fn rustls_clients_read_what_we_seal_for_every_suite() {
        for suite in SUITES {
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

    /// The records in `wire`, opened one by one: (content type, plaintext) each.
    fn open_all(opener: &mut Opener, mut wire: Vec<u8>) -> Result<Vec<(u8, Vec<u8>)>, RecordError> {
        let mut got = Vec::new();
        while let Some(len) = whole_record(&wire)? {
            let o = opener.open(&mut wire[..len])?;
            got.push((o.kind, wire[o.plain].to_vec()));
            wire.drain(..len);
        }
        assert!(wire.is_empty(), "a part of a record left over");
        Ok(got)
    }

    #[test]
    fn what_rustls_clients_send_opens_for_every_suite() {
        for suite in SUITES {
            let tls13 = suite.version() == &rustls::version::TLS13;
            let (mut c, s) = pair(suite);
            let secrets = s.dangerous_extract_secrets().unwrap();
            let mut opener = Opener::new(tls13, secrets.rx.0, secrets.rx.1).unwrap();
            let big = vec![b'y'; 40_000];
            c.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            c.writer().write_all(&big).unwrap();
            c.send_close_notify();
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let got = open_all(&mut opener, wire).unwrap();
            let data: Vec<u8> = got
                .iter()
                .filter(|(k, _)| *k == APPLICATION_DATA)
                .flat_map(|(_, p)| p.clone())
                .collect();
            let mut want = b"GET / HTTP/1.1\r\n\r\n".to_vec();
            want.extend_from_slice(&big);
            assert_eq!(data, want, "{suite:?}");
            assert_eq!(
                got.last().unwrap(),
                &(ALERT, CLOSE_NOTIFY.to_vec()),
                "{suite:?}"
            );
        }
    }

    #[test]
    fn a_changed_byte_a_replayed_record_and_an_oversized_one_are_refused() {
        use rustls::crypto::ring::cipher_suite::*;
        for suite in [
            TLS13_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ] {
            let tls13 = suite.version() == &rustls::version::TLS13;
            let (mut c, s) = pair(suite);
            let secrets = s.dangerous_extract_secrets().unwrap();
            let mut opener = Opener::new(tls13, secrets.rx.0, secrets.rx.1).unwrap();
            c.writer().write_all(b"one").unwrap();
            let mut first = Vec::new();
            c.write_tls(&mut first).unwrap();
            let mut tampered = first.clone();
            let last = tampered.len() - 1;
            tampered[last] ^= 1;
            let len = tampered.len();
            assert_eq!(
                opener.open(&mut tampered[..len]).err(),
                Some(RecordError::Bad)
            );
            // The genuine record still opens (a refused one does not move the sequence)...
            let mut ok = first.clone();
            assert!(opener.open(&mut ok[..len]).is_ok());
            // ...and the same record again does not: its sequence number is spent.
            let mut again = first.clone();
            assert_eq!(opener.open(&mut again[..len]).err(), Some(RecordError::Bad));
            let huge = [APPLICATION_DATA, 3, 3, 0xff, 0xff];
            assert_eq!(whole_record(&huge).err(), Some(RecordError::TooLarge));
            // A change_cipher_spec after the handshake.
            let mut ccs = [0x14, 3, 3, 0, 1, 1];
            assert!(opener.open(&mut ccs).is_err());
        }
    }

    #[test]
    fn a_key_update_from_the_client_opens_as_a_handshake_message() {
        let (mut c, s) = pair(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256);
        let secrets = s.dangerous_extract_secrets().unwrap();
        let mut opener = Opener::new(true, secrets.rx.0, secrets.rx.1).unwrap();
        c.refresh_traffic_keys().unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        let got = open_all(&mut opener, wire).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 0x16, "a handshake message (KeyUpdate, type 24)");
        assert_eq!(got[0].1[0], 24);
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
