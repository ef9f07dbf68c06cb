//! Pairing by code: Thali's commit-reveal identity exchange (`../shared/reference/thali.md` §5),
//! without I/O. Both nodes already hold each other's public key from the mutual-TLS connection
//! the exchange runs over; the 6-digit code their users compare proves no one in the middle
//! swapped the keys. The side whose key is smaller commits to its random value before it sees
//! the other's, so a man in the middle gets one guess per attempt: a one-in-a-million chance,
//! which the caller keeps small by limiting attempts.
//!
//! 1. smaller → larger: `commitment = HMAC-SHA256(rn_small, pk_small ‖ pk_large)`
//! 2. larger → smaller: `rn_large` (16 random bytes)
//! 3. smaller → larger: `rn_small`; the larger side checks the commitment
//! 4. both show `HMAC-SHA256(rn_large, pk_large ‖ pk_small ‖ rn_small)` as a number mod 10^6
//!    (the exact 256-bit value mod 10^6, not Thali's JavaScript rounding through a double).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::cmp::Ordering;

/// Bytes of each side's random value.
pub const NONCE_LEN: usize = 16;

pub type Nonce = [u8; NONCE_LEN];
pub type Commitment = [u8; 32];

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    #[error("a node cannot pair with itself")]
    SameKey,
    #[error("the revealed value does not match the commitment")]
    CommitmentMismatch,
}

/// Which part a node plays: set by comparing the two public keys' bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Smaller,
    Larger,
}

pub fn role(mine: &[u8], theirs: &[u8]) -> Result<Role, PairingError> {
    match mine.cmp(theirs) {
        Ordering::Less => Ok(Role::Smaller),
        Ordering::Greater => Ok(Role::Larger),
        Ordering::Equal => Err(PairingError::SameKey),
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

pub fn commitment(rn_small: &Nonce, pk_small: &[u8], pk_large: &[u8]) -> Commitment {
    hmac(rn_small, &[pk_small, pk_large])
}

/// The code both users compare, `0..1_000_000`.
pub fn code(rn_large: &Nonce, pk_large: &[u8], pk_small: &[u8], rn_small: &Nonce) -> u32 {
    let h = hmac(rn_large, &[pk_large, pk_small, rn_small]);
    // The big-endian 256-bit number mod 10^6, a byte at a time.
    h.iter()
        .fold(0u64, |acc, b| (acc * 256 + u64::from(*b)) % 1_000_000) as u32
}

/// The code as shown: six digits, zero-padded.
pub fn show(code: u32) -> String {
    format!("{code:06}")
}

/// The smaller side of one exchange.
pub struct Smaller {
    mine: Vec<u8>,
    theirs: Vec<u8>,
    rn: Nonce,
}

impl Smaller {
    /// Starts with a fresh random value; returns the commitment to send.
    pub fn start(mine: &[u8], theirs: &[u8], rn: Nonce) -> (Smaller, Commitment) {
        let c = commitment(&rn, mine, theirs);
        (
            Smaller {
                mine: mine.to_vec(),
                theirs: theirs.to_vec(),
                rn,
            },
            c,
        )
    }

    /// The larger side's value arrived: the value to reveal, and the code to show.
    pub fn on_nonce(self, rn_large: &Nonce) -> (Nonce, u32) {
        (self.rn, code(rn_large, &self.theirs, &self.mine, &self.rn))
    }
}

/// The larger side of one exchange.
pub struct Larger {
    mine: Vec<u8>,
    theirs: Vec<u8>,
    rn: Nonce,
    commitment: Commitment,
}

impl Larger {
    /// The smaller side's commitment arrived: keep it, and send our random value.
    pub fn on_commitment(
        mine: &[u8],
        theirs: &[u8],
        commitment: Commitment,
        rn: Nonce,
    ) -> (Larger, Nonce) {
        (
            Larger {
                mine: mine.to_vec(),
                theirs: theirs.to_vec(),
                rn,
                commitment,
            },
            rn,
        )
    }

    /// The smaller side revealed its value: the code to show, if it matches its commitment.
    pub fn on_reveal(self, rn_small: &Nonce) -> Result<u32, PairingError> {
        let expected = commitment(rn_small, &self.theirs, &self.mine);
        // Constant time: the comparison must not tell a guesser how close it came.
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_slice(),
            self.commitment.as_slice(),
        )) {
            return Err(PairingError::CommitmentMismatch);
        }
        Ok(code(&self.rn, &self.mine, &self.theirs, rn_small))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(a: &[u8], b: &[u8], rn_a: Nonce, rn_b: Nonce) -> (u32, u32) {
        let (small, large, rn_s, rn_l) = match role(a, b).unwrap() {
            Role::Smaller => (a, b, rn_a, rn_b),
            Role::Larger => (b, a, rn_b, rn_a),
        };
        let (s, c) = Smaller::start(small, large, rn_s);
        let (l, n) = Larger::on_commitment(large, small, c, rn_l);
        let (reveal, code_s) = s.on_nonce(&n);
        let code_l = l.on_reveal(&reveal).unwrap();
        (code_s, code_l)
    }

    #[test]
    fn both_sides_show_the_same_code_whoever_starts() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let (x, y) = exchange(&a, &b, [7; 16], [9; 16]);
        assert_eq!(x, y);
        assert!(x < 1_000_000);
        assert_eq!(exchange(&b, &a, [9; 16], [7; 16]), (x, x));
        assert_eq!(show(42), "000042");
    }

    #[test]
    fn a_key_swapped_in_the_middle_changes_the_codes() {
        // Mallory sits between Alice and Bob with her own key: each side pairs with her, and the
        // two codes the users compare disagree (but for a one-in-a-million chance).
        let (alice, bob, mallory) = ([1u8; 32], [3u8; 32], [2u8; 32]);
        let mut same = 0;
        for i in 0..200u8 {
            let (c1, _) = exchange(&alice, &mallory, [i; 16], [i.wrapping_add(1); 16]);
            let (c2, _) = exchange(
                &mallory,
                &bob,
                [i.wrapping_add(2); 16],
                [i.wrapping_add(3); 16],
            );
            same += usize::from(c1 == c2);
        }
        assert_eq!(same, 0);
    }

    #[test]
    fn a_changed_reveal_or_self_pairing_is_refused() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let (_, c) = Smaller::start(&a, &b, [5; 16]);
        let (l, _) = Larger::on_commitment(&b, &a, c, [6; 16]);
        assert_eq!(l.on_reveal(&[4; 16]), Err(PairingError::CommitmentMismatch));
        assert_eq!(role(&a, &a), Err(PairingError::SameKey));
    }

    #[test]
    fn known_answers_from_an_independent_implementation() {
        // Python's hmac: int.from_bytes(HMAC-SHA256(rn_large, b"L" + b"S" + rn_small)) % 10**6,
        // the whole 256-bit number (not a double's rounding of it).
        assert_eq!(code(&[1; 16], b"L", b"S", &[2; 16]), 127_934);
        assert_eq!(
            hex::encode(commitment(&[5; 16], &[1; 32], &[2; 32])),
            "c61fba40e0908fffd313922f40b4d4228cae5190c17ca9cb3e1fda66d726b421"
        );
    }
}
