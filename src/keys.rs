//! Ed25519 keys as text: the public key a gateway trusts
//! (`ed25519:BASE64`, what `edgefn keygen` prints and `deploy.trusted_keys`
//! holds) and the private key file (`ed25519-private:BASE64` of the seed).

use base64::Engine;
use ed25519_dalek::{SigningKey, VerifyingKey};

/// How a public key is written (in `trusted_keys`, and as a signer's key
/// id): this prefix, then the 32 bytes in standard base64.
const KEY_PREFIX: &str = "ed25519:";

/// A public key as `trusted_keys` takes it: `ed25519:BASE64`.
pub fn public_key_text(key: &VerifyingKey) -> String {
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
    )
}

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not `ed25519:` followed by base64 of 32 bytes.
    #[error(
        "{0:?} is not a key: expected \"ed25519:\" and 32 bytes in base64, as `edgefn keygen` prints"
    )]
    Syntax(String),
    /// 32 bytes, but not a valid Ed25519 public key.
    #[error("{0:?} is not a valid Ed25519 public key")]
    Invalid(String),
}

/// Reads a public key written as [`public_key_text`] writes it.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = text
        .trim()
        .strip_prefix(KEY_PREFIX)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| KeyError::Syntax(text.to_owned()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Invalid(text.to_owned()))
}

/// A private key file's text: `ed25519-private:BASE64` of the 32-byte seed.
pub fn private_key_text(key: &SigningKey) -> String {
    format!(
        "ed25519-private:{}\n",
        base64::engine::general_purpose::STANDARD.encode(key.to_bytes())
    )
}

/// Reads a private key file's text (see [`private_key_text`]).
pub fn parse_private_key(text: &str) -> Result<SigningKey, KeyError> {
    let seed = text
        .trim()
        .strip_prefix("ed25519-private:")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| KeyError::Syntax("the private key file".into()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A new private key from the system's random generator.
pub fn generate_key() -> std::io::Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(std::io::Error::other)?;
    Ok(SigningKey::from_bytes(&seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_written_and_read_back() {
        let k = generate_key().unwrap();
        let public = public_key_text(&k.verifying_key());
        assert!(public.starts_with("ed25519:"));
        assert_eq!(parse_public_key(&public).unwrap(), k.verifying_key());
        assert_eq!(
            parse_private_key(&private_key_text(&k)).unwrap().to_bytes(),
            k.to_bytes()
        );
        assert!(matches!(
            parse_public_key("ed25519:AAAA"),
            Err(KeyError::Syntax(_))
        ));
        assert!(matches!(
            parse_public_key("rsa:xyz"),
            Err(KeyError::Syntax(_))
        ));
        assert!(parse_private_key(&public).is_err());
    }
}
