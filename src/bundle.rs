//! Bundles: a function (or its removal) as a fleet engineer signs it and a
//! gateway checks it. The format is specified in docs/DEPLOY.md.
//!
//! A bundle is a CBOR map `{format, body, signature}`. `body` is a byte
//! string holding the CBOR encoding of a [`Body`]: what is signed are those
//! exact bytes (after a domain-separation prefix), so a verifier never
//! re-encodes anything and no canonical-encoding rules can differ between
//! signer and gateway. `signature` is an Ed25519 signature, or absent for an
//! unsigned bundle (accepted only with `deploy.allow_unsigned`).
//!
//! [`open`] checks everything a bundle can be checked for on its own: size,
//! structure, signer, signature, the module's SHA-256, and that the gateway
//! is among its targets. Its version against what the gateway accepted
//! before, and its manifest and module against the runtime, are checked by
//! the caller.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::FunctionManifest;
use crate::keys::{parse_public_key, public_key_text};

/// The bundle format this edgefn writes and reads.
pub const FORMAT: u32 = 1;

/// The highest version a bundle may have: versions are kept in SQLite's
/// signed 64-bit integers, where a larger one would compare as negative.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// Signed together with the body, so a signature over a bundle cannot be
/// taken for a signature over anything else.
const DOMAIN: &[u8] = b"edgefn bundle v1\0";

/// The outer map, as sent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    /// [`FORMAT`].
    format: u32,
    /// The CBOR encoding of a [`Body`].
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    /// Ed25519 over [`DOMAIN`] followed by `body`.
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    signature: Option<Vec<u8>>,
}

/// What a bundle says, all of it signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// Strictly increasing per function name; at most [`MAX_VERSION`].
    pub version: u64,
    /// The signed floor: the lowest version of this function a gateway
    /// may run once it accepted this bundle, rollbacks included; absent:
    /// none. At most `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<u64>,
    /// Until when (ms since the Unix epoch) a gateway accepts this bundle
    /// from the control topics; absent: no end. A bundle already accepted
    /// keeps running past it (restarts included): the end only stops a
    /// captured old bundle from being served to a gateway later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// Who may apply it.
    pub targets: Targets,
    /// The signer's public key (`ed25519:BASE64`), absent when unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// A function to run, or one to remove.
    pub change: Change,
}

/// The gateways a bundle is for: any gateway named, and any gateway in a
/// group named.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Gateway ids.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Group names (`deploy.groups` of a gateway).
    #[serde(default)]
    pub groups: Vec<String>,
}

impl Targets {
    /// Whether the gateway `id`, in `groups`, is a target.
    pub fn include(&self, id: &str, groups: &[String]) -> bool {
        self.gateways.iter().any(|g| g == id) || self.groups.iter().any(|g| groups.contains(g))
    }
}

/// What a bundle does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// Run this module as the function the manifest describes.
    Deploy {
        /// The keys of a `[[functions]]` table, without `module`.
        manifest: Box<FunctionManifest>,
        /// The WebAssembly module.
        #[serde(with = "serde_bytes")]
        module: Vec<u8>,
        /// SHA-256 of `module`.
        #[serde(with = "serde_bytes")]
        sha256: Vec<u8>,
    },
    /// Stop running the function called `name` (a tombstone).
    Remove {
        /// The function's name.
        name: String,
    },
}

impl Body {
    /// A bundle of `change` at `version` for `targets`, unsigned, with no
    /// floor and no end (set `min_version` and `expires_ms` as wanted).
    pub fn new(version: u64, targets: Targets, change: Change) -> Body {
        Body {
            version,
            min_version: None,
            expires_ms: None,
            targets,
            key_id: None,
            change,
        }
    }

    /// Why the version numbers are wrong, if they are: a version above
    /// [`MAX_VERSION`], or a floor above the version.
    pub fn version_problem(&self) -> Option<String> {
        if self.version > MAX_VERSION {
            return Some(format!(
                "version {} is above {MAX_VERSION}, the highest a gateway can keep",
                self.version
            ));
        }
        match self.min_version {
            Some(floor) if floor > self.version => Some(format!(
                "min_version {floor} is above the bundle's own version {}",
                self.version
            )),
            _ => None,
        }
    }

    /// Whether it is past its end at `now_ms` (ms since the epoch).
    pub fn expired_at(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|end| now_ms > end)
    }

    /// The function this bundle is about.
    pub fn name(&self) -> &str {
        match &self.change {
            Change::Deploy { manifest, .. } => &manifest.name,
            Change::Remove { name } => name,
        }
    }
}

/// Why a bundle is refused. Each has a stable code, for the status topic
/// and for scripts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Larger than `deploy.max_bundle_size`.
    #[error("the bundle is {size} bytes, more than deploy.max_bundle_size ({max})")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not a bundle: not CBOR, or not the structure of one.
    #[error("not a valid bundle: {0}")]
    Malformed(String),
    /// A format this edgefn does not read.
    #[error("bundle format {0}; this edgefn reads format {FORMAT}")]
    Format(u32),
    /// No signature, and unsigned bundles are not allowed.
    #[error("the bundle is not signed, and deploy.allow_unsigned is off")]
    Unsigned,
    /// Signed by a key not in `deploy.trusted_keys`.
    #[error("signed by {0}, which is not in deploy.trusted_keys")]
    UntrustedKey(String),
    /// The signature does not match the body.
    #[error("the signature does not match the bundle's contents")]
    BadSignature,
    /// The module is not the one the bundle's SHA-256 names.
    #[error("the module's SHA-256 is not the one the bundle names")]
    HashMismatch,
    /// This gateway is not among the targets.
    #[error("this gateway ({0}) is not among the bundle's targets")]
    NotTargeted(String),
}

impl Refusal {
    /// The stable code (`snake_case`).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::TooLarge { .. } => "too_large",
            Refusal::Malformed(_) => "malformed",
            Refusal::Format(_) => "unsupported_format",
            Refusal::Unsigned => "unsigned",
            Refusal::UntrustedKey(_) => "untrusted_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::HashMismatch => "hash_mismatch",
            Refusal::NotTargeted(_) => "not_targeted",
        }
    }
}

/// What a gateway checks bundles against.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// Keys whose signatures are accepted.
    pub trusted_keys: Vec<VerifyingKey>,
    /// Whether an unsigned bundle is accepted.
    pub allow_unsigned: bool,
    /// This gateway's id.
    pub gateway_id: String,
    /// This gateway's groups.
    pub groups: Vec<String>,
    /// Largest bundle, bytes.
    pub max_size: usize,
}

/// Checks `bytes` as a bundle for the gateway `v` describes (see the module
/// doc for what is checked, and what is left to the caller).
pub fn open(bytes: &[u8], v: &Verifier) -> Result<Body, Refusal> {
    if bytes.len() > v.max_size {
        return Err(Refusal::TooLarge {
            size: bytes.len(),
            max: v.max_size,
        });
    }
    let envelope: Envelope =
        ciborium::from_reader(bytes).map_err(|e| Refusal::Malformed(e.to_string()))?;
    if envelope.format != FORMAT {
        return Err(Refusal::Format(envelope.format));
    }
    let body: Body = ciborium::from_reader(envelope.body.as_slice())
        .map_err(|e| Refusal::Malformed(format!("body: {e}")))?;
    match (&envelope.signature, &body.key_id) {
        (None, _) if !v.allow_unsigned => return Err(Refusal::Unsigned),
        (None, _) => {}
        (Some(_), None) => {
            return Err(Refusal::Malformed("a signature without a key_id".into()));
        }
        (Some(signature), Some(key_id)) => {
            let key = parse_public_key(key_id).map_err(|e| Refusal::Malformed(e.to_string()))?;
            if !v.trusted_keys.contains(&key) {
                return Err(Refusal::UntrustedKey(key_id.clone()));
            }
            let signature = Signature::from_slice(signature).map_err(|_| Refusal::BadSignature)?;
            key.verify(&signed(&envelope.body), &signature)
                .map_err(|_| Refusal::BadSignature)?;
        }
    }
    if let Change::Deploy { module, sha256, .. } = &body.change
        && Sha256::digest(module).as_slice() != sha256.as_slice()
    {
        return Err(Refusal::HashMismatch);
    }
    if !body.targets.include(&v.gateway_id, &v.groups) {
        return Err(Refusal::NotTargeted(v.gateway_id.clone()));
    }
    Ok(body)
}

/// Encodes `body` as a bundle, signed with `key` (unsigned without one).
/// Sets the body's `key_id` (and, for a deploy, its `sha256`) first.
pub fn seal(mut body: Body, key: Option<&SigningKey>) -> Vec<u8> {
    body.key_id = key.map(|k| public_key_text(&k.verifying_key()));
    if let Change::Deploy { module, sha256, .. } = &mut body.change {
        *sha256 = Sha256::digest(&*module).to_vec();
    }
    let mut encoded = Vec::new();
    ciborium::into_writer(&body, &mut encoded).expect("encoding to memory");
    let signature = key.map(|k| k.sign(&signed(&encoded)).to_bytes().to_vec());
    let mut out = Vec::new();
    ciborium::into_writer(
        &Envelope {
            format: FORMAT,
            body: encoded,
            signature,
        },
        &mut out,
    )
    .expect("encoding to memory");
    out
}

/// The bytes a signature covers.
fn signed(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn verifier() -> Verifier {
        Verifier {
            trusted_keys: vec![key(1).verifying_key(), key(2).verifying_key()],
            allow_unsigned: false,
            gateway_id: "pi-01".into(),
            groups: vec!["site-a".into()],
            max_size: 1 << 20,
        }
    }

    fn deploy(targets: Targets) -> Body {
        Body::new(
            7,
            targets,
            Change::Deploy {
                manifest: Box::new(FunctionManifest {
                    name: "clean".into(),
                    triggers: vec!["sensors/#".into()],
                    timeout: Some("100ms".into()),
                    ..Default::default()
                }),
                module: b"\0asm\x01\0\0\0".to_vec(),
                sha256: vec![],
            },
        )
    }

    fn to_pi01() -> Targets {
        Targets {
            gateways: vec!["pi-01".into()],
            groups: vec![],
        }
    }

    /// Decodes a bundle's envelope and body, for tampering with them.
    fn take_apart(bytes: &[u8]) -> (Envelope, Body) {
        let e: Envelope = ciborium::from_reader(bytes).unwrap();
        let b = ciborium::from_reader(e.body.as_slice()).unwrap();
        (e, b)
    }

    fn put_together(mut e: Envelope, b: &Body) -> Vec<u8> {
        e.body.clear();
        ciborium::into_writer(b, &mut e.body).unwrap();
        let mut out = Vec::new();
        ciborium::into_writer(&e, &mut out).unwrap();
        out
    }

    #[test]
    fn a_sealed_bundle_opens_with_what_was_sealed() {
        let sealed = seal(deploy(to_pi01()), Some(&key(2)));
        let body = open(&sealed, &verifier()).unwrap();
        assert_eq!(body.name(), "clean");
        assert_eq!(body.version, 7);
        assert_eq!(body.key_id, Some(public_key_text(&key(2).verifying_key())));
        let Change::Deploy { sha256, .. } = &body.change else {
            panic!("{body:?}")
        };
        assert_eq!(sha256.len(), 32);
        // By group too.
        let by_group = Targets {
            gateways: vec![],
            groups: vec!["site-a".into()],
        };
        assert!(open(&seal(deploy(by_group), Some(&key(1))), &verifier()).is_ok());
    }

    #[test]
    fn each_kind_of_bad_bundle_is_refused_with_its_own_code() {
        let v = verifier();
        let code = |bytes: &[u8]| open(bytes, &v).unwrap_err().code();
        let good = seal(deploy(to_pi01()), Some(&key(1)));

        assert_eq!(code(&seal(deploy(to_pi01()), None)), "unsigned");
        assert_eq!(
            code(&seal(deploy(to_pi01()), Some(&key(3)))),
            "untrusted_key"
        );
        assert_eq!(code(b"garbage"), "malformed");
        assert_eq!(code(&good[..good.len() / 2]), "malformed");
        assert_eq!(code(&[]), "malformed");
        let other = Targets {
            gateways: vec!["pi-02".into()],
            groups: vec!["site-b".into()],
        };
        assert_eq!(code(&seal(deploy(other), Some(&key(1)))), "not_targeted");
        let small = Verifier {
            max_size: good.len() - 1,
            ..verifier()
        };
        assert_eq!(open(&good, &small).unwrap_err().code(), "too_large");

        // Tampered after signing: the module (hash and signature), the
        // targets, the manifest.
        let (e, mut b) = take_apart(&good);
        if let Change::Deploy { module, .. } = &mut b.change {
            module.push(0);
        }
        assert_eq!(code(&put_together(e, &b)), "bad_signature");
        let (e, mut b) = take_apart(&good);
        b.targets.gateways.push("pi-02".into());
        assert_eq!(code(&put_together(e, &b)), "bad_signature");
        let (e, mut b) = take_apart(&good);
        b.version += 1;
        assert_eq!(code(&put_together(e, &b)), "bad_signature");
        // Unsigned and altered: only the hash can tell.
        let lax = Verifier {
            allow_unsigned: true,
            ..verifier()
        };
        let (e, mut b) = take_apart(&seal(deploy(to_pi01()), None));
        if let Change::Deploy { module, .. } = &mut b.change {
            module[0] = 1;
        }
        assert_eq!(
            open(&put_together(e, &b), &lax).unwrap_err().code(),
            "hash_mismatch"
        );
        let (mut e, b) = take_apart(&good);
        e.format = 2;
        assert_eq!(code(&put_together(e, &b)), "unsupported_format");
    }

    #[test]
    fn a_tombstone_is_signed_like_a_deploy() {
        let remove = Body::new(
            9,
            to_pi01(),
            Change::Remove {
                name: "clean".into(),
            },
        );
        let body = open(&seal(remove.clone(), Some(&key(1))), &verifier()).unwrap();
        assert_eq!((body.name(), body.version), ("clean", 9));
        assert_eq!(
            open(&seal(remove, None), &verifier()).unwrap_err().code(),
            "unsigned"
        );
    }
}
