//! Stateless TLS session tickets with rotating keys: a reconnecting client resumes without the
//! server remembering it, so a reconnect storm costs abbreviated handshakes however many clients
//! there are. One ChaCha20-Poly1305 key per period of `lifetime`; tickets of this period and the
//! previous one are accepted, older ones are not (key erasure bounds what a stolen key decrypts).

use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
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
/// process that starts in period `p` has no key for `p - 1`).
struct Keys {
    period: u64,
    current: LessSafeKey,
    previous: Option<LessSafeKey>,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Tickets {
    /// Keys that rotate every `lifetime` (at least one second; whole seconds).
    pub fn new(lifetime: Duration) -> Option<Tickets> {
        let lifetime = lifetime.as_secs().max(1);
        let rng = SystemRandom::new();
        let period = now() / lifetime;
        let current = fresh_key(&rng)?;
        Some(Tickets {
            lifetime,
            keys: RwLock::new(Keys {
                period,
                current,
                previous: None,
            }),
            rng,
        })
    }

    /// Move to the period `now` falls in, making its key and erasing keys two periods old.
    fn roll(&self, period: u64) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if period <= keys.period {
            return;
        }
        let Some(next) = fresh_key(&self.rng) else {
            return;
        };
        let old = std::mem::replace(&mut keys.current, next);
        // Only the period right before keeps its key; a longer gap erases both.
        keys.previous = (period == keys.period + 1).then_some(old);
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
        let period = self.period();
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

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        self.roll(self.period());
        self.open(ticket)
    }
}

impl Tickets {
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
        let t = Tickets::new(Duration::from_secs(3600)).unwrap();
        let sealed = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&sealed).unwrap(), b"session state");
        let p = t.keys.read().unwrap().period;
        t.roll(p + 1);
        assert_eq!(t.open(&sealed), Some(b"session state".to_vec()));
        t.roll(p + 2);
        assert_eq!(t.open(&sealed), None);
    }

    #[test]
    fn tampered_or_foreign_tickets_are_refused() {
        let t = Tickets::new(Duration::from_secs(3600)).unwrap();
        let other = Tickets::new(Duration::from_secs(3600)).unwrap();
        let mut sealed = t.encrypt(b"state").unwrap();
        assert_eq!(other.decrypt(&sealed), None);
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(t.decrypt(&sealed), None);
        assert_eq!(t.decrypt(&[]), None);
        assert_eq!(t.decrypt(&[0u8; HEADER_LEN]), None);
        assert_eq!(t.decrypt(&vec![0u8; MAX_TICKET + 1]), None);
    }
}
