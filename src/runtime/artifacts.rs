//! Precompiled modules on disk, so a restart does not recompile.
//!
//! Compiling a module with Cranelift is the slow part of loading it (tens
//! of milliseconds for a 100 KB module on a desktop, several times that on
//! a Pi). The [`ArtifactCache`] keeps what wasmtime made of each module in
//! a directory of its own (`<data_dir>/artifacts`), one file per module
//! and engine:
//!
//! ```text
//! <sha256 of the module, hex>-<engine>.cwasm
//! ```
//!
//! where `<engine>` is a hash of the engine's compatibility settings
//! (wasmtime's version, the target, fuel metering, ...), so one engine
//! never reads another's artifact. A file holds the SHA-256 of the
//! artifact, then the artifact. Loading checks that hash before handing the
//! bytes to wasmtime, which trusts them (it maps them as machine code): a
//! file torn by a power cut, rotted on the card or edited by hand is
//! discarded and the module compiled again. wasmtime then checks its own
//! header and refuses an artifact of another version or configuration; that
//! too means compiling again. Either way the new artifact replaces the old.
//!
//! Files are written without fsync: a lost or torn one costs a compile on
//! the next start, nothing else, and every fsync wears an SD card.
//!
//! Every loaded function holds a [`Lease`] on its file. [`ArtifactCache::prune`]
//! deletes the files no live function holds (versions replaced, removed,
//! or no longer in the configuration); the gateway calls it once its
//! functions are loaded and after every deploy.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// What an artifact file's name ends with.
const EXTENSION: &str = "cwasm";

/// What the cache keeps: a compiled core module or component.
pub trait Compiled: Sized {
    /// Compiles `bytes` for `engine`.
    fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self>;
    /// What wasmtime made of it, to write to disk.
    fn serialize(&self) -> wasmtime::Result<Vec<u8>>;
    /// Reads back what [`Compiled::serialize`] wrote.
    ///
    /// # Safety
    ///
    /// wasmtime runs `bytes` as machine code: they must be what
    /// `serialize` produced, unaltered.
    unsafe fn deserialize(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self>;
}

impl Compiled for Module {
    fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        Module::new(engine, bytes)
    }
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Module::serialize(self)
    }
    unsafe fn deserialize(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        // SAFETY: passed on from the caller.
        unsafe { Module::deserialize(engine, bytes) }
    }
}

impl Compiled for Component {
    fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        Component::new(engine, bytes)
    }
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Component::serialize(self)
    }
    unsafe fn deserialize(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        // SAFETY: passed on from the caller.
        unsafe { Component::deserialize(engine, bytes) }
    }
}

/// A directory of precompiled modules (see the module doc).
pub struct ArtifactCache {
    /// The directory.
    dir: PathBuf,
    /// The files live functions hold, by name.
    leases: Mutex<HashMap<String, Weak<Lease>>>,
    /// Makes temporary file names unique within the process.
    next_tmp: AtomicU64,
}

/// A live function's hold on its artifact file: the file is kept while
/// one exists.
#[derive(Debug)]
pub struct Lease;

/// How a module was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// From its artifact file.
    Cache,
    /// Compiled; its artifact written for next time.
    Compiled,
}

impl ArtifactCache {
    /// The cache in `dir`, created if missing.
    pub fn open(dir: &Path) -> io::Result<ArtifactCache> {
        std::fs::create_dir_all(dir)?;
        Ok(ArtifactCache {
            dir: dir.to_owned(),
            leases: Mutex::new(HashMap::new()),
            next_tmp: AtomicU64::new(0),
        })
    }

    /// `bytes` compiled for `engine`: read from its artifact when there is
    /// a sound one, else compiled and its artifact (re)written. The lease
    /// keeps the file through the next [`ArtifactCache::prune`]s.
    pub fn compiled<C: Compiled>(
        &self,
        engine: &Engine,
        bytes: &[u8],
    ) -> wasmtime::Result<(C, Arc<Lease>, Source)> {
        let name = file_name(engine, bytes);
        let lease = self.lease(&name);
        let path = self.dir.join(&name);
        if let Some(module) = self.read::<C>(engine, &path) {
            return Ok((module, lease, Source::Cache));
        }
        let module = C::compile(engine, bytes)?;
        let artifact = match module.serialize() {
            Ok(artifact) => artifact,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot serialize a compiled module");
                return Ok((module, lease, Source::Compiled));
            }
        };
        if let Err(e) = self.write(&path, &artifact) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write a precompiled module; the next start compiles it again");
            return Ok((module, lease, Source::Compiled));
        }
        drop(artifact);
        // Run what a restart will run: the artifact as read back holds less
        // memory than the compiler's result (a Python function: about 55 MB
        // resident against 150 MB).
        let module = self.read::<C>(engine, &path).unwrap_or(module);
        Ok((module, lease, Source::Compiled))
    }

    /// Deletes every artifact (and left-over temporary file) that no live
    /// function holds. Returns how many files it deleted.
    pub fn prune(&self) -> usize {
        let live: Vec<String> = {
            let mut leases = self.leases.lock().expect("leases lock");
            leases.retain(|_, l| l.strong_count() > 0);
            leases.keys().cloned().collect()
        };
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot list the precompiled modules");
                return 0;
            }
        };
        let mut deleted = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // An artifact, or the temporary file of a write: one in
            // progress is inside `module`, which holds its lease, so a
            // temporary file without one is left over from a crash.
            let ours = name.ends_with(&format!(".{EXTENSION}"))
                || (name.contains(&format!(".{EXTENSION}.")) && name.ends_with(".tmp"));
            if !ours || live.iter().any(|l| name.starts_with(l.as_str())) {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => deleted += 1,
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot delete a precompiled module")
                }
            }
        }
        deleted
    }

    /// The lease on `name`, shared with any live function holding it.
    fn lease(&self, name: &str) -> Arc<Lease> {
        let mut leases = self.leases.lock().expect("leases lock");
        if let Some(l) = leases.get(name).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(Lease);
        leases.insert(name.to_owned(), Arc::downgrade(&l));
        l
    }

    /// The module in the artifact at `path`, if the file exists, its hash
    /// matches and wasmtime accepts it.
    fn read<C: Compiled>(&self, engine: &Engine, path: &Path) -> Option<C> {
        let file = match std::fs::read(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read a precompiled module; compiling");
                return None;
            }
        };
        let Some((hash, artifact)) = file.split_at_checked(32) else {
            tracing::warn!(path = %path.display(), "a precompiled module is truncated; compiling");
            return None;
        };
        if Sha256::digest(artifact).as_slice() != hash {
            tracing::warn!(path = %path.display(), "a precompiled module does not match its hash; compiling");
            return None;
        }
        // SAFETY: wasmtime runs what `deserialize` is given as machine
        // code, so it must be an artifact wasmtime itself produced. This
        // one is: the daemon wrote it with `Module::serialize` into its own
        // data directory, and the hash checked above proves the bytes are
        // the ones it wrote. wasmtime then checks the artifact's version
        // and configuration against this engine.
        match unsafe { C::deserialize(engine, artifact) } {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::info!(path = %path.display(), reason = %format!("{e:#}"), "a precompiled module is not for this edgefn; compiling");
                None
            }
        }
    }

    /// Writes `artifact` to `path` with its hash, through a temporary file
    /// renamed over it (a reader sees the old file or the new one).
    fn write(&self, path: &Path, artifact: &[u8]) -> io::Result<()> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}-{n}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let mut file = Vec::with_capacity(32 + artifact.len());
        file.extend_from_slice(&Sha256::digest(artifact));
        file.extend_from_slice(artifact);
        std::fs::write(&tmp, &file)?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// The artifact file name of `bytes` compiled for `engine`.
fn file_name(engine: &Engine, bytes: &[u8]) -> String {
    // SipHash with fixed keys: the same in every run of one build. A
    // different hash in another build only means compiling once more.
    let mut h = std::hash::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let module: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{module}-{:016x}.{EXTENSION}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        Engine::default()
    }

    const WAT: &str = r#"(module (func (export "f") (result i32) i32.const 7))"#;

    fn artifacts(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    fn wasm(wat: &str) -> Vec<u8> {
        wat::parse_str(wat).unwrap()
    }

    #[test]
    fn compiles_once_then_reads_the_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path()).unwrap();
        let bytes = wasm(WAT);
        let (_, _lease, source) = cache.compiled::<Module>(&engine(), &bytes).unwrap();
        assert_eq!(source, Source::Compiled);
        assert_eq!(artifacts(dir.path()).len(), 1);
        let again = ArtifactCache::open(dir.path()).unwrap();
        let (m, _lease, source) = again.compiled::<Module>(&engine(), &bytes).unwrap();
        assert_eq!(source, Source::Cache);
        assert!(m.get_export("f").is_some());
    }

    #[test]
    fn a_damaged_artifact_is_compiled_again_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = wasm(WAT);
        drop(
            ArtifactCache::open(dir.path())
                .unwrap()
                .compiled::<Module>(&engine(), &bytes),
        );
        let path = artifacts(dir.path()).pop().unwrap();
        let mut file = std::fs::read(&path).unwrap();
        let last = file.len() - 1;
        file[last] ^= 0xff;
        std::fs::write(&path, &file).unwrap();
        let cache = ArtifactCache::open(dir.path()).unwrap();
        let (_, _lease, source) = cache.compiled::<Module>(&engine(), &bytes).unwrap();
        assert_eq!(source, Source::Compiled);
        let (_, _lease, source) = cache.compiled::<Module>(&engine(), &bytes).unwrap();
        assert_eq!(source, Source::Cache, "the rewritten artifact is sound");

        // Truncated to less than its hash.
        std::fs::write(&path, b"short").unwrap();
        let (_, _lease, source) = cache.compiled::<Module>(&engine(), &bytes).unwrap();
        assert_eq!(source, Source::Compiled);
    }

    #[test]
    fn another_engine_configuration_has_its_own_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path()).unwrap();
        let bytes = wasm(WAT);
        let mut fuel = wasmtime::Config::new();
        fuel.consume_fuel(true);
        let metered = Engine::new(&fuel).unwrap();
        let (_, _a, s1) = cache.compiled::<Module>(&engine(), &bytes).unwrap();
        let (_, _b, s2) = cache.compiled::<Module>(&metered, &bytes).unwrap();
        assert_eq!((s1, s2), (Source::Compiled, Source::Compiled));
        assert_eq!(artifacts(dir.path()).len(), 2);
    }

    #[test]
    fn an_artifact_wasmtime_refuses_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path()).unwrap();
        let bytes = wasm(WAT);
        // A sound hash over bytes that are no artifact.
        let path = dir.path().join(file_name(&engine(), &bytes));
        cache.write(&path, b"not an artifact").unwrap();
        let (_, _lease, source) = cache.compiled::<Module>(&engine(), &bytes).unwrap();
        assert_eq!(source, Source::Compiled);
        let (_, _lease, source) = cache.compiled::<Module>(&engine(), &bytes).unwrap();
        assert_eq!(source, Source::Cache);
    }

    #[test]
    fn prune_keeps_only_what_live_functions_hold() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path()).unwrap();
        let kept = wasm(WAT);
        let dropped = wasm(r#"(module (func (export "g")))"#);
        let (_, lease, _) = cache.compiled::<Module>(&engine(), &kept).unwrap();
        // Two functions with the same module share one file and one lease.
        let (_, same, _) = cache.compiled::<Module>(&engine(), &kept).unwrap();
        assert!(Arc::ptr_eq(&lease, &same));
        drop(cache.compiled::<Module>(&engine(), &dropped).unwrap());
        std::fs::write(dir.path().join("x.cwasm.1-0.tmp"), b"left over").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"not ours").unwrap();
        assert_eq!(artifacts(dir.path()).len(), 4);
        assert_eq!(cache.prune(), 2);
        let left = artifacts(dir.path());
        assert_eq!(left.len(), 2);
        assert!(left.iter().any(|p| p.ends_with("notes.txt")));
        drop((lease, same));
        assert_eq!(cache.prune(), 1);
        assert_eq!(artifacts(dir.path()).len(), 1);
    }
}
