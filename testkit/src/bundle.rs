//! Signed function bundles as a fleet engineer's `edgefn deploy` makes
//! them, and the status a gateway reports for each function.

use ed25519_dalek::SigningKey;
use edgefn::bundle::{Body, Change, Targets, seal};
use edgefn::config::FunctionManifest;

use crate::Seen;

/// The key the tests sign with.
pub fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// `deploy.trusted_keys`' text for `key`.
pub fn trusted(key: &SigningKey) -> String {
    edgefn::keys::public_key_text(&key.verifying_key())
}

/// The body of a bundle deploying `manifest` with `module` to `pi-01`, as
/// version `version`.
pub fn deploy_body(manifest: FunctionManifest, module: Vec<u8>, version: u64) -> Body {
    Body::new(
        version,
        Targets {
            gateways: vec!["pi-01".into()],
            groups: vec![],
        },
        Change::Deploy {
            manifest: Box::new(manifest),
            module,
            sha256: vec![],
        },
    )
}

/// [`deploy_body`], sealed with `key`.
pub fn sealed(
    key: &SigningKey,
    version: u64,
    manifest: FunctionManifest,
    module: Vec<u8>,
) -> Vec<u8> {
    seal(deploy_body(manifest, module, version), Some(key))
}

/// Whether the last status of `function` among `seen` says `version` is
/// active.
pub fn active(function: &str, version: u64) -> impl Fn(&[Seen]) -> bool {
    let topic = format!("/{function}/status");
    move |s: &[Seen]| {
        last_status(s, &topic).is_some_and(|j| j["state"] == "active" && j["version"] == version)
    }
}

/// The last status among `seen` on a topic ending with `topic`, as JSON.
pub fn last_status(seen: &[Seen], topic: &str) -> Option<serde_json::Value> {
    seen.iter()
        .rev()
        .find(|m| m.topic.ends_with(topic))
        .map(Seen::json)
}
