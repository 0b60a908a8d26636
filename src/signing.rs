//! Standard Webhooks signatures: secrets (`whsec_` + base64 key), signing and verifying.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Prefix of Standard Webhooks symmetric secrets.
pub const SECRET_PREFIX: &str = "whsec_";

/// Why a secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Not `whsec_` followed by base64.
    #[error("secret must be `whsec_` followed by base64")]
    Malformed,
    /// Decoded key length outside 24..=64 bytes.
    #[error("secret key must be 24 to 64 bytes, got {0}")]
    Length(usize),
}

/// Decodes a `whsec_...` secret into its HMAC key.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::Malformed)?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| SecretError::Malformed)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SecretError::Length(key.len()));
    }
    Ok(key)
}

/// Generates a new secret with a random 32-byte key.
pub fn generate_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// Computes the `webhook-signature` value for one attempt.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mac = message_mac(key, id, timestamp, body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// True if any space-separated signature in `header` is a valid `v1` signature of the message.
/// The comparison runs in constant time.
pub fn verify(key: &[u8], id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
    header.split(' ').any(|candidate| {
        let Some(encoded) = candidate.strip_prefix("v1,") else {
            return false;
        };
        let Ok(expected) = STANDARD.decode(encoded) else {
            return false;
        };
        message_mac(key, id, timestamp, body)
            .verify_slice(&expected)
            .is_ok()
    })
}

/// HMAC-SHA256 over `{id}.{timestamp}.{body}`.
fn message_mac(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: u64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        let key = decode_secret(SECRET).unwrap();
        assert_eq!(
            sign(&key, ID, TIMESTAMP, BODY),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn verify_accepts_any_listed_signature_and_rejects_tampering() {
        let key = decode_secret(SECRET).unwrap();
        let good = sign(&key, ID, TIMESTAMP, BODY);
        assert!(verify(&key, ID, TIMESTAMP, BODY, &good));
        assert!(verify(
            &key,
            ID,
            TIMESTAMP,
            BODY,
            &format!("v1,bm9wZQ== {good}")
        ));
        assert!(!verify(&key, ID, TIMESTAMP + 1, BODY, &good));
        assert!(!verify(&key, ID, TIMESTAMP, b"{}", &good));
        assert!(!verify(&key, ID, TIMESTAMP, BODY, "v1,bm9wZQ=="));
    }

    #[test]
    fn secrets_are_checked_and_generated_valid() {
        assert_eq!(decode_secret("abc"), Err(SecretError::Malformed));
        assert_eq!(decode_secret("whsec_!!"), Err(SecretError::Malformed));
        assert_eq!(decode_secret("whsec_AAAA"), Err(SecretError::Length(3)));
        let generated = generate_secret();
        assert_eq!(decode_secret(&generated).unwrap().len(), 32);
        assert_ne!(generated, generate_secret());
    }
}
