//! The fleet engineer's side: keys, and bundles built from a module and a
//! manifest (`edgefn keygen`, `edgefn deploy`, `edgefn remove`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::bundle::{self, Body, Change, Targets};
use crate::config::FunctionManifest;
use crate::runtime::{FunctionSpec, Runtime, Target};

/// Writes a new private key to `out` (mode 0600; an existing file is not
/// replaced) and returns the public key as `deploy.trusted_keys` takes it.
pub fn keygen(out: &Path) -> anyhow::Result<String> {
    let key = bundle::generate_key().context("cannot draw a random key")?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    file.write_all(bundle::private_key_text(&key).as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(bundle::public_key_text(&key.verifying_key()))
}

/// Reads the private key file `path`.
pub fn read_signing_key(path: &Path) -> anyhow::Result<ed25519_dalek::SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the signing key {}", path.display()))?;
    bundle::parse_private_key(&text)
        .with_context(|| format!("{} is not an edgefn signing key", path.display()))
}

/// Reads a manifest file: one `[[functions]]` table, or the same keys at
/// the top level. A `module` in it is resolved against the file's
/// directory.
pub fn read_manifest(path: &Path) -> anyhow::Result<FunctionManifest> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the manifest {}", path.display()))?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tables {
        functions: Vec<FunctionManifest>,
    }
    let parse = |text: &str| -> anyhow::Result<FunctionManifest> {
        let c = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        if c.get_array("functions").is_ok() {
            let mut t: Tables = c.try_deserialize()?;
            if t.functions.len() != 1 {
                bail!(
                    "holds {} [[functions]] tables; a manifest holds one",
                    t.functions.len()
                );
            }
            return Ok(t.functions.remove(0));
        }
        Ok(c.try_deserialize()?)
    };
    let mut m = parse(&text).with_context(|| format!("manifest {}", path.display()))?;
    if let Some(module) = &m.module {
        let base = path.parent().unwrap_or(Path::new("."));
        m.module = Some(base.join(module).to_string_lossy().into_owned());
    }
    Ok(m)
}

/// What `edgefn deploy` makes a bundle of.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    /// The manifest, flags applied; its `module` is the module's path
    /// unless `module` is given.
    pub manifest: FunctionManifest,
    /// The module's path, if not the manifest's.
    pub module: Option<PathBuf>,
    /// The bundle's version.
    pub version: u64,
    /// Who it is for.
    pub targets: Targets,
}

/// Checks the request as a gateway would (the manifest's keys, the module
/// against the ABI and its limits) and seals it as a bundle, signed with
/// `key` (unsigned without one).
pub fn deploy_bundle(
    req: DeployRequest,
    key: Option<&ed25519_dalek::SigningKey>,
) -> anyhow::Result<Vec<u8>> {
    check_targets(&req.targets)?;
    let mut manifest = req.manifest;
    let path = match (req.module, manifest.module.take()) {
        (Some(p), _) => p,
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => bail!("no module: give MODULE.wasm, or `module` in the manifest"),
    };
    let module = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let config = manifest.clone().check().map_err(|problems| {
        let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
        anyhow::anyhow!(
            "the manifest has {} problem(s):\n{}",
            problems.len(),
            list.join("\n")
        )
    })?;
    let runtime = Runtime::new(Target::for_host())?;
    runtime.load(
        &path.display().to_string(),
        &module,
        FunctionSpec::from_config(&config, ""),
    )?;
    let body = Body {
        version: req.version,
        targets: req.targets,
        key_id: None,
        change: Change::Deploy {
            manifest: Box::new(manifest),
            module,
            sha256: Vec::new(),
        },
    };
    Ok(bundle::seal(body, key))
}

/// A signed tombstone for the function `name`.
pub fn remove_bundle(
    name: &str,
    version: u64,
    targets: Targets,
    key: Option<&ed25519_dalek::SigningKey>,
) -> anyhow::Result<Vec<u8>> {
    check_targets(&targets)?;
    let body = Body {
        version,
        targets,
        key_id: None,
        change: Change::Remove { name: name.into() },
    };
    Ok(bundle::seal(body, key))
}

fn check_targets(t: &Targets) -> anyhow::Result<()> {
    if t.gateways.is_empty() && t.groups.is_empty() {
        bail!("no target: give --gateway ID or --group NAME (repeatable)");
    }
    for name in t.gateways.iter().chain(&t.groups) {
        if name.is_empty() || name.contains(['/', '+', '#', '\0']) {
            bail!("{name:?} cannot be a target: it is a topic level (no '/', '+', '#')");
        }
    }
    Ok(())
}

/// The default version: the current time in milliseconds, which grows
/// from one deploy to the next from the same machine.
pub fn version_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
