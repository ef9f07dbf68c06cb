//! Restricted discovery (Tor client authorization) keyed by thali identities. A node's x25519
//! discovery key is its Ed25519 identity key mapped to Curve25519 (RFC 7748's birational map,
//! `to_montgomery` / `to_scalar_bytes`), so a service can list the discovery keys of the peers
//! it knows by key id alone, and a peer needs no extra key exchange. The cost is one key used for
//! both signatures and descriptor decryption (see ed25519-dalek's note); a descriptor key only
//! lets its holder decrypt the list of introduction points.

use tor_hscrypto::pk::{HsClientDescEncKey, HsClientDescEncSecretKey};
use tor_llcrypto::pk::curve25519;

/// The discovery key a service lists for the peer with this Ed25519 public key.
pub fn client_key(ed25519_public: &[u8; 32]) -> Option<HsClientDescEncKey> {
    let point = ed25519_dalek::VerifyingKey::from_bytes(ed25519_public)
        .ok()?
        .to_montgomery();
    Some(curve25519::PublicKey::from(point.to_bytes()).into())
}

/// This node's discovery secret, from its Ed25519 seed.
pub fn client_secret(ed25519_seed: &[u8; 32]) -> HsClientDescEncSecretKey {
    let scalar = ed25519_dalek::SigningKey::from_bytes(ed25519_seed).to_scalar_bytes();
    curve25519::StaticSecret::from(scalar).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_and_secret_halves_match() {
        let id = thali_peer::Identity::generate().unwrap();
        let seed = id.ed25519_seed().expect("seed from PKCS#8");
        let from_secret = HsClientDescEncKey::from(&client_secret(&seed));
        let from_public = client_key(id.public_key()).unwrap();
        assert_eq!(from_secret.to_string(), from_public.to_string());
        assert!(from_public.to_string().starts_with("descriptor:x25519:"));
        // The seed really is the key: it signs as the identity's public key.
        let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
        assert_eq!(sk.verifying_key().to_bytes(), *id.public_key());
    }
}
