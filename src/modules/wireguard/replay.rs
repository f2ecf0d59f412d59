//! The TAI64N timestamp sealed in a handshake initiation, read without
//! boringtun, so a peer rebuilt on reload (new preshared key or keepalive:
//! boringtun offers no setter, so its `Tunn` is replaced) still refuses an
//! initiation older than the last one the old `Tunn` accepted. The kernel
//! keeps that timestamp in the peer; boringtun keeps it inside the `Tunn`,
//! out of reach.
//!
//! This is the first half of the Noise IK responder (WireGuard whitepaper
//! §5.4.2): decrypt the initiator's static key, then the timestamp.

use blake2::digest::{FixedOutput, Mac};
use blake2::{Blake2s256, Digest};
use boringtun::x25519;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;

/// The size of a handshake initiation.
pub const INITIATION_LEN: usize = 148;

/// `HASH("Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")`.
const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// The protocol identifier mixed into the first hash.
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";

/// A TAI64N timestamp as sent (big-endian seconds, then nanoseconds), so
/// byte order is time order.
pub type Tai64n = [u8; 12];

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <hmac::SimpleHmac<Blake2s256> as Mac>::new_from_slice(key).expect("any key length");
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// `KDF2`: the next chaining key and a message key.
fn kdf2(chaining_key: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let temp = hmac(chaining_key, &[input]);
    let ck = hmac(&temp, &[&[1]]);
    let key = hmac(&temp, &[&ck, &[2]]);
    (ck, key)
}

fn open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    ChaCha20Poly1305::new(key.into())
        .decrypt(&[0u8; 12].into(), Payload { msg: sealed, aad })
        .ok()
}

/// The sender's static public key and timestamp of an initiation sent to
/// `ours`; `None` if it was not sealed for us (or is not an initiation).
pub fn initiation_timestamp(
    ours: &x25519::StaticSecret,
    datagram: &[u8],
) -> Option<([u8; 32], Tai64n)> {
    if datagram.len() != INITIATION_LEN || datagram[..4] != [1, 0, 0, 0] {
        return None;
    }
    let ephemeral: [u8; 32] = datagram[8..40].try_into().ok()?;
    let sealed_static = &datagram[40..88];
    let sealed_time = &datagram[88..116];
    let our_public = x25519::PublicKey::from(ours);

    let ck = hash(&[CONSTRUCTION]);
    let h = hash(&[&ck, IDENTIFIER]);
    let h = hash(&[&h, our_public.as_bytes()]);
    let h = hash(&[&h, &ephemeral]);
    let ck = hmac(&hmac(&ck, &[&ephemeral]), &[&[1]]);
    let es = ours.diffie_hellman(&x25519::PublicKey::from(ephemeral));
    let (ck, key) = kdf2(&ck, es.as_bytes());
    let their_static: [u8; 32] = open(&key, sealed_static, &h)?.try_into().ok()?;
    let h = hash(&[&h, sealed_static]);
    let ss = ours.diffie_hellman(&x25519::PublicKey::from(their_static));
    let (_, key) = kdf2(&ck, ss.as_bytes());
    let time: Tai64n = open(&key, sealed_time, &h)?.try_into().ok()?;
    Some((their_static, time))
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::{Tunn, TunnResult};

    fn initiation(from: &x25519::StaticSecret, to: &x25519::PublicKey) -> Vec<u8> {
        let mut t = Tunn::new(from.clone(), *to, None, None, 1, None);
        let mut buf = vec![0u8; 256];
        match t.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    #[test]
    fn reads_the_sender_and_a_growing_timestamp() {
        let server = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        let client = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        let server_pub = x25519::PublicKey::from(&server);
        let first = initiation(&client, &server_pub);
        std::thread::sleep(std::time::Duration::from_millis(30));
        let second = initiation(&client, &server_pub);
        let (who, t1) = initiation_timestamp(&server, &first).expect("ours");
        let (_, t2) = initiation_timestamp(&server, &second).expect("ours");
        assert_eq!(who, *x25519::PublicKey::from(&client).as_bytes());
        assert!(t2 > t1, "{t1:?} then {t2:?}");
        // The seconds are TAI64: 2^62 + Unix seconds + the leap seconds
        // the sender counts (boringtun says 37).
        let secs = u64::from_be_bytes(t1[..8].try_into().unwrap()) - (1 << 62);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(secs.abs_diff(now) < 60, "{secs} vs {now}");
    }

    #[test]
    fn others_initiations_and_garbage_are_not_read() {
        let server = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        let other = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        let client = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        let to_other = initiation(&client, &x25519::PublicKey::from(&other));
        assert!(initiation_timestamp(&server, &to_other).is_none());
        let mut bent = initiation(&client, &x25519::PublicKey::from(&server));
        bent[100] ^= 1;
        assert!(initiation_timestamp(&server, &bent).is_none());
        assert!(initiation_timestamp(&server, &[1, 0, 0, 0]).is_none());
        assert!(initiation_timestamp(&server, &[0u8; 148]).is_none());
    }
}
