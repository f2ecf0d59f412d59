//! X25519 keys in the base64 form `wg genkey` and `wg pubkey` print.
//!
//! [`PrivateKey`] never prints its bytes: its `Debug` is redacted and it has
//! no `Display`, so a key cannot end up in a log line by accident.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};

/// Why a key did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key: expected 44 characters of base64 (32 bytes), as `wg genkey` prints")]
pub struct KeyError;

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyError)?;
    bytes.try_into().map_err(|_| KeyError)
}

/// A Curve25519 private key.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A new random key, clamped as `wg genkey` clamps it.
    pub fn generate() -> Self {
        let mut k = StaticSecret::random_from_rng(rand_core::OsRng).to_bytes();
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Self(k)
    }

    /// Parses base64 text.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(Self)
    }

    /// The base64 text (for writing key files; never log it).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(DalekPublic::from(&StaticSecret::from(self.0)).to_bytes())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A Curve25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses base64 text.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_pair_from_wireguard_docs() {
        // Pair produced by `wg genkey | tee k | wg pubkey`.
        let k = PrivateKey::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            k.public_key().to_string(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_roundtrip() {
        let k = PrivateKey::generate();
        let b = k.as_bytes();
        assert_eq!(b[0] & 7, 0);
        assert_eq!(b[31] & 128, 0);
        assert_eq!(b[31] & 64, 64);
        let again = PrivateKey::from_base64(&k.to_base64()).unwrap();
        assert_eq!(again.public_key(), k.public_key());
        assert_ne!(PrivateKey::generate().as_bytes(), b);
    }

    #[test]
    fn bad_keys_and_redaction() {
        assert!(PrivateKey::from_base64("short").is_err());
        assert!(PublicKey::from_base64("AAAA").is_err());
        let k = PrivateKey::generate();
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
