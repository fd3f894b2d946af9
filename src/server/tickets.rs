//! Stateless TLS session tickets with rotating keys: a reconnecting client resumes without the
//! server remembering it, so a reconnect storm costs abbreviated handshakes however many clients
//! there are. One ChaCha20-Poly1305 key per period of `lifetime`; tickets of this period and the
//! previous one are accepted, older ones are not. With random keys, erasure bounds what a stolen
//! key decrypts; keys derived from a shared secret (HKDF, the period as info, so that several
//! heralds and a restarted one accept each other's tickets) are only as safe as that secret,
//! which opens every period's tickets: rotate the file.

use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// A ticket's header: the period whose key sealed it (big endian), then the nonce.
const PERIOD_LEN: usize = 8;
const HEADER_LEN: usize = PERIOD_LEN + NONCE_LEN;
/// Tickets carry a few hundred bytes of session state; anything much larger is not ours.
const MAX_TICKET: usize = 4096;

/// Ticket keys for one listener. Periods are counted from the Unix epoch, so rotation happens
/// at the same instants whatever the process's start time.
pub struct Tickets {
    lifetime: u64,
    keys: RwLock<Keys>,
    rng: SystemRandom,
}

/// The key of the current period and of the one before it (each `None` if never made: a
/// process that starts in period `p` has no key for `p - 1`), and where they come from.
struct Keys {
    period: u64,
    current: LessSafeKey,
    previous: Option<LessSafeKey>,
    /// The shared secret's pseudo-random key, when keys are derived rather than random.
    secret: Option<hkdf::Prk>,
    /// A digest of that secret, to tell a changed file from the same one read again.
    fingerprint: Option<[u8; 32]>,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Tickets {
    /// Keys that rotate every `lifetime` (at least one second; whole seconds): random, or derived
    /// from `secret` (then the previous period's key is there from the start).
    pub fn new(lifetime: Duration, secret: Option<&[u8]>) -> Option<Tickets> {
        let lifetime = lifetime.as_secs().max(1);
        let rng = SystemRandom::new();
        let keys = Keys::start(secret, &rng, lifetime, now() / lifetime)?;
        Some(Tickets {
            lifetime,
            keys: RwLock::new(keys),
            rng,
        })
    }

    /// Use `secret` (None: random keys) from now on, if it is not the one in use: `[tls]
    /// ticket_key` was rotated. A clean cut: tickets sealed under the old secret no longer open
    /// (their clients make one full handshake), which is what a rotation after a leak needs.
    /// Returns whether the keys changed.
    pub fn set_secret(&self, secret: Option<&[u8]>) -> bool {
        let fingerprint = secret.map(fingerprint);
        if self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .fingerprint
            == fingerprint
        {
            return false;
        }
        let Some(fresh) = Keys::start(secret, &self.rng, self.lifetime, self.period()) else {
            return false;
        };
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        true
    }

    /// Move to the period `now` falls in, making its key and erasing keys two periods old. A
    /// clock stepped back by more than a period starts over from `period` (a key made under the
    /// wrong time is not kept until time catches up with it).
    fn roll(&self, period: u64) {
        // Most calls find nothing to do: checked under the read lock, so ticket operations in
        // a reconnect storm do not queue on the write lock.
        let current = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .period;
        if period == current || period + 1 == current {
            return;
        }
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if period == keys.period || period + 1 == keys.period {
            return;
        }
        if period < keys.period {
            if let (Some(current), previous) = (
                key_for(&keys.secret, &self.rng, self.lifetime, period),
                period
                    .checked_sub(1)
                    .and_then(|p| key_for(&keys.secret, &self.rng, self.lifetime, p)),
            ) {
                keys.period = period;
                keys.current = current;
                keys.previous = previous;
            }
            return;
        }
        let Some(next) = key_for(&keys.secret, &self.rng, self.lifetime, period) else {
            return;
        };
        let old = std::mem::replace(&mut keys.current, next);
        // Only the period right before keeps its key; after a longer gap a random key is gone
        // (a derived one is derived again).
        keys.previous = if period == keys.period + 1 {
            Some(old)
        } else if keys.secret.is_some() {
            key_for(&keys.secret, &self.rng, self.lifetime, period - 1)
        } else {
            None
        };
        keys.period = period;
    }

    fn period(&self) -> u64 {
        now() / self.lifetime
    }
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    /// What clients are told: the longest a ticket can be accepted (sealed as its period begins,
    /// it opens to the end of the next). One offered later than we accept costs the client only
    /// a fallback to a full handshake. TLS 1.3 caps the hint at 7 days.
    fn lifetime(&self) -> u32 {
        u32::try_from((2 * self.lifetime).min(7 * 24 * 3600)).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(self.period(), plain)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        self.roll(self.period());
        self.open(ticket)
    }
}

impl Tickets {
    /// Seal `plain` as of `period` (the current one, outside tests).
    fn encrypt_at(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        self.roll(period);
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let stamp = keys.period.to_be_bytes();
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + aead::MAX_TAG_LEN);
        out.extend_from_slice(&stamp);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        keys.current
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(stamp),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// Open a ticket sealed with the current or the previous period's key.
    fn open(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() > MAX_TICKET || ticket.len() < HEADER_LEN + aead::MAX_TAG_LEN {
            return None;
        }
        let (stamp, rest) = ticket.split_at(PERIOD_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let stamp: [u8; PERIOD_LEN] = stamp.try_into().ok()?;
        let period = u64::from_be_bytes(stamp);
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let key = if period == keys.period {
            &keys.current
        } else if period.checked_add(1) == Some(keys.period) {
            keys.previous.as_ref()?
        } else {
            return None;
        };
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = key.open_in_place(nonce, Aad::from(stamp), &mut body).ok()?;
        Some(plain.to_vec())
    }
}

impl Keys {
    /// The keys of `period` (and, when derived, of the one before) from `secret`, or random.
    fn start(
        secret: Option<&[u8]>,
        rng: &SystemRandom,
        lifetime: u64,
        period: u64,
    ) -> Option<Keys> {
        let prk = secret.map(|s| {
            hkdf::Salt::new(hkdf::HKDF_SHA256, b"herald session-ticket keys v1").extract(s)
        });
        let current = key_for(&prk, rng, lifetime, period)?;
        let previous = match &prk {
            Some(_) => period
                .checked_sub(1)
                .and_then(|p| key_for(&prk, rng, lifetime, p)),
            None => None,
        };
        Some(Keys {
            period,
            current,
            previous,
            secret: prk,
            fingerprint: secret.map(fingerprint),
        })
    }
}

fn fingerprint(secret: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The key of `period`: derived from the secret (the same in every herald that shares it; the
/// lifetime is part of the info, so heralds with different lifetimes do not share keys), or random.
fn key_for(
    secret: &Option<hkdf::Prk>,
    rng: &SystemRandom,
    lifetime: u64,
    period: u64,
) -> Option<LessSafeKey> {
    let Some(prk) = secret else {
        return fresh_key(rng);
    };
    let (lifetime, period) = (lifetime.to_be_bytes(), period.to_be_bytes());
    let info = [&lifetime[..], &period[..]];
    let okm = prk.expand(&info, &aead::CHACHA20_POLY1305).ok()?;
    Some(LessSafeKey::new(UnboundKey::from(okm)))
}

fn fresh_key(rng: &SystemRandom) -> Option<LessSafeKey> {
    let mut key = [0u8; 32];
    rng.fill(&mut key).ok()?;
    let key = UnboundKey::new(&aead::CHACHA20_POLY1305, &key).ok()?;
    Some(LessSafeKey::new(key))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_in_its_period_and_the_next_and_not_after() {
        let t = Tickets::new(Duration::from_secs(3600), None).unwrap();
        let sealed = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&sealed).unwrap(), b"session state");
        let p = t.keys.read().unwrap().period;
        t.roll(p + 1);
        assert_eq!(t.open(&sealed), Some(b"session state".to_vec()));
        t.roll(p + 2);
        assert_eq!(t.open(&sealed), None);
    }

    #[test]
    fn a_clock_stepped_back_starts_over_instead_of_keeping_a_future_key() {
        let t = Tickets::new(Duration::from_secs(3600), None).unwrap();
        let p = t.keys.read().unwrap().period;
        // The clock jumped ahead, a ticket was sealed then, and the clock was corrected.
        t.roll(p + 5);
        let future = t.encrypt_at(p + 5, b"state").unwrap();
        t.roll(p);
        assert_eq!(t.keys.read().unwrap().period, p);
        // The key of the wrong time is gone with it.
        assert_eq!(t.open(&future), None);
        // One period back is ordinary skew between clocks: nothing changes.
        t.roll(p + 1);
        let sealed = t.encrypt_at(p + 1, b"state").unwrap();
        t.roll(p);
        assert_eq!(t.keys.read().unwrap().period, p + 1);
        assert_eq!(t.open(&sealed), Some(b"state".to_vec()));
    }

    #[test]
    fn tampered_or_foreign_tickets_are_refused() {
        let t = Tickets::new(Duration::from_secs(3600), None).unwrap();
        let other = Tickets::new(Duration::from_secs(3600), None).unwrap();
        let mut sealed = t.encrypt(b"state").unwrap();
        assert_eq!(other.decrypt(&sealed), None);
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(t.decrypt(&sealed), None);
        assert_eq!(t.decrypt(&[]), None);
        assert_eq!(t.decrypt(&[0u8; HEADER_LEN]), None);
        assert_eq!(t.decrypt(&vec![0u8; MAX_TICKET + 1]), None);
    }

    #[test]
    fn a_new_secret_is_a_clean_cut_and_the_same_one_changes_nothing() {
        let hour = Duration::from_secs(3600);
        let t = Tickets::new(hour, Some(&[1u8; 48])).unwrap();
        let old = t.encrypt(b"state").unwrap();
        assert!(
            !t.set_secret(Some(&[1u8; 48])),
            "the same secret read again"
        );
        assert_eq!(t.decrypt(&old).unwrap(), b"state");
        assert!(t.set_secret(Some(&[2u8; 48])));
        assert_eq!(t.decrypt(&old), None, "sealed under the old secret");
        let new = t.encrypt(b"state").unwrap();
        let peer = Tickets::new(hour, Some(&[2u8; 48])).unwrap();
        assert_eq!(peer.decrypt(&new).unwrap(), b"state");
        // Random keys stay random (and stay put) when no secret is configured.
        let r = Tickets::new(hour, None).unwrap();
        let sealed = r.encrypt(b"state").unwrap();
        assert!(!r.set_secret(None));
        assert_eq!(r.decrypt(&sealed).unwrap(), b"state");
    }

    #[test]
    fn heralds_sharing_a_secret_open_each_others_tickets_and_no_one_elses() {
        let hour = Duration::from_secs(3600);
        let secret = [7u8; 48];
        let a = Tickets::new(hour, Some(&secret)).unwrap();
        let b = Tickets::new(hour, Some(&secret)).unwrap();
        let stranger = Tickets::new(hour, Some(&[8u8; 48])).unwrap();
        let other_lifetime = Tickets::new(Duration::from_secs(600), Some(&secret)).unwrap();
        let sealed = a.encrypt(b"state").unwrap();
        assert_eq!(b.decrypt(&sealed).unwrap(), b"state");
        assert_eq!(stranger.decrypt(&sealed), None);
        assert_eq!(other_lifetime.decrypt(&sealed), None);
        // A herald started in the next period still opens it (the previous key is derived),
        // and one two periods on does not.
        let p = a.keys.read().unwrap().period;
        b.roll(p + 1);
        assert_eq!(b.open(&sealed).unwrap(), b"state");
        b.roll(p + 3);
        assert_eq!(b.open(&sealed), None);
    }
}
