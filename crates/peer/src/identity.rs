//! The node's Ed25519 identity, generated on first start into `DIR/identity.key` (PKCS#8 PEM,
//! mode 0600), and a self-signed certificate made from it at every start.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ED25519};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity file {0}: {1}")]
    Io(String, std::io::Error),
    #[error("identity key {0} is unusable: {1}")]
    Key(String, String),
    #[error("certificate generation failed: {0}")]
    Cert(String),
}

pub struct Identity {
    key: KeyPair,
    public: [u8; 32],
    cert: CertificateDer<'static>,
}

/// Lower-case RFC 4648 base32 without padding, refusing non-zero trailing bits (so every
/// key has one spelling).
fn b32() -> &'static data_encoding::Encoding {
    static B32: std::sync::OnceLock<data_encoding::Encoding> = std::sync::OnceLock::new();
    B32.get_or_init(|| {
        let mut spec = data_encoding::Specification::new();
        spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
        spec.check_trailing_bits = true;
        spec.encoding().expect("a valid base32 alphabet")
    })
}

/// Lower-case RFC 4648 base32 without padding.
pub fn base32(bytes: &[u8]) -> String {
    b32().encode(bytes)
}

fn unbase32(s: &str) -> Option<Vec<u8>> {
    b32().decode(s.as_bytes()).ok()
}

/// `ed25519:<base32 of the 32-byte public key>`.
pub fn key_id(public: &[u8; 32]) -> String {
    format!("ed25519:{}", base32(public))
}

/// Parses a key id strictly; the error says what is wrong.
pub fn parse_key_id(s: &str) -> Result<[u8; 32], String> {
    let b32 = s
        .strip_prefix("ed25519:")
        .ok_or_else(|| format!("key id {s:?} must start with `ed25519:`"))?;
    if b32.len() != 52 {
        return Err(format!(
            "key id {s:?}: expected 52 base32 characters, got {}",
            b32.len()
        ));
    }
    let bytes = unbase32(b32).ok_or_else(|| format!("key id {s:?} is not lower-case base32"))?;
    bytes
        .try_into()
        .map_err(|_| format!("key id {s:?} is not a 32-byte key"))
}

impl Identity {
    /// Loads `DIR/identity.key`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        let path = dir.join("identity.key");
        let shown = path.display().to_string();
        let key = match std::fs::read_to_string(&path) {
            Ok(pem) => KeyPair::from_pem(&pem)
                .map_err(|e| IdentityError::Key(shown.clone(), e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate_for(&PKCS_ED25519)
                    .map_err(|e| IdentityError::Cert(e.to_string()))?;
                thali_sys::files::write_private(&path, key.serialize_pem().as_bytes())
                    .map_err(|e| IdentityError::Io(shown.clone(), e))?;
                tracing::info!(file = %shown, "generated the node identity");
                key
            }
            Err(e) => return Err(IdentityError::Io(shown, e)),
        };
        Self::from_key(key).map_err(|e| match e {
            IdentityError::Cert(m) => IdentityError::Key(shown, m),
            other => other,
        })
    }

    /// A fresh identity that is not stored anywhere (tests, tools).
    pub fn generate() -> Result<Identity, IdentityError> {
        let key =
            KeyPair::generate_for(&PKCS_ED25519).map_err(|e| IdentityError::Cert(e.to_string()))?;
        Self::from_key(key)
    }

    fn from_key(key: KeyPair) -> Result<Identity, IdentityError> {
        if key.algorithm() != &PKCS_ED25519 {
            return Err(IdentityError::Cert("not an Ed25519 key".into()));
        }
        let public: [u8; 32] = key
            .public_key_raw()
            .try_into()
            .map_err(|_| IdentityError::Cert("Ed25519 public key is not 32 bytes".into()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| IdentityError::Cert(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, key_id(&public));
        params.distinguished_name = dn;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Cert(e.to_string()))?;
        Ok(Identity {
            cert: cert.der().clone(),
            key,
            public,
        })
    }

    pub fn public_key(&self) -> &[u8; 32] {
        &self.public
    }

    pub fn key_id(&self) -> String {
        key_id(&self.public)
    }

    pub fn cert(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// The 32-byte Ed25519 secret (seed), read from the key's PKCS#8 encoding.
    pub fn ed25519_seed(&self) -> Option<[u8; 32]> {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        ed25519_dalek::SigningKey::from_pkcs8_der(&self.key.serialize_der())
            .ok()
            .map(|k| k.to_bytes())
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_roundtrip_and_rfc_vectors() {
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
        assert_eq!(base32(b"f"), "my");
        for n in 0..40u8 {
            let v: Vec<u8> = (0..n).collect();
            assert_eq!(unbase32(&base32(&v)).unwrap(), v);
        }
        assert!(unbase32("MZXW").is_none());
        assert!(unbase32("mz1").is_none());
    }

    #[test]
    fn key_ids_parse_strictly() {
        let id = Identity::generate().unwrap();
        let kid = id.key_id();
        assert_eq!(kid.len(), 8 + 52);
        assert_eq!(&parse_key_id(&kid).unwrap(), id.public_key());
        assert!(parse_key_id("rsa:abc").unwrap_err().contains("ed25519:"));
        assert!(parse_key_id("ed25519:abc").unwrap_err().contains("52"));
        assert!(parse_key_id(&kid.to_uppercase().replace("ED25519", "ed25519")).is_err());
        // The last character carries 4 padding bits that must be zero.
        let mut bad = kid.clone();
        bad.pop();
        bad.push('b');
        assert!(parse_key_id(&bad).is_err());
    }

    #[test]
    fn identity_persists() {
        let dir = std::env::temp_dir().join(format!("thali-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Identity::load_or_create(&dir).unwrap();
        let b = Identity::load_or_create(&dir).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Attached to requests that arrived over the peer listener: the client's key id.
#[derive(Clone, Debug)]
pub struct PeerKeyId(pub String);

/// Attached beside `PeerKeyId` when no `_security` names the key: the router reads at most a
/// pairing message's worth of such a request's body, and briefly.
#[derive(Clone, Copy, Debug)]
pub struct Stranger;

/// Attached beside `PeerKeyId` when the peer came over TCP: its IP address (onion streams have
/// none), for budgets kept per address.
#[derive(Clone, Debug)]
pub struct PeerAddr(pub std::net::IpAddr);
