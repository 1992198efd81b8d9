//! The WebAssembly runtime: modules compiled once, warm instances.
//!
//! A function is a core module speaking ABI v1 (docs/ABI.md). This module
//! owns the wasmtime [`Engine`] and [`Linker`], checks a module's exports and
//! imports against the ABI before anything runs ([`Runtime::load`]), and
//! turns an [`InstancePre`] into [`Instance`]s that are reused across
//! invocations ("warm") until one fails.
//!
//! Limits: linear memory is capped by a [`wasmtime::StoreLimits`] in each
//! store (growth beyond it fails inside the guest). Wall-clock time is
//! bounded twice over, because a guest spends it in two places:
//!
//! - running WebAssembly code: epoch interruption. A ticker thread advances
//!   the engines' epoch every [`EPOCH_TICK`], and each call gets a deadline
//!   in ticks; past it the guest traps;
//! - waiting inside a WASI call (`poll_oneoff`, i.e. `sleep`, a clock
//!   wait): the guest calls of a module that imports `poll_oneoff` are made
//!   with wasmtime's async API and WASI's async implementation, on a small
//!   tokio runtime owned by the calling thread, under a
//!   `tokio::time::timeout` of the same length. When it fires, the call's
//!   future is dropped, which abandons the guest where it waits; the
//!   instance is discarded like after any failure. A module that does not
//!   import `poll_oneoff` cannot wait (every other WASI call returns at
//!   once here), so its calls are plain synchronous ones: an async call
//!   costs a fiber switch, measured at 0.5 µs on a trivial handler.
//!
//! Either way the invocation fails as [`Failure::Timeout`] at about its
//! limit. Instantiation, `_initialize` and `edgefn_init` get the same limit.
//!
//! A function may also ask for a *fuel* budget ([`FunctionSpec::fuel`]): a
//! count of executed WebAssembly operations, so the same input stops at the
//! same point on a Pi Zero and on a server. Counting costs run time, so such
//! functions are compiled by a second engine with fuel metering on, and the
//! others pay nothing for it.
//!
//! Guest code is CPU work: callers run [`Instance::invoke`] on their own
//! threads (see [`pool`]), never on an async reactor; it blocks the calling
//! thread until the invocation is over.

pub mod artifacts;
mod component;
mod host;
pub mod pool;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{
    Engine, ExternType, InstancePre, Linker, Memory, Module, Store, Trap, TypedFunc, ValType,
};

use crate::route::TopicFilter;
pub use crate::state::{FunctionState, StateWrite};
use artifacts::{ArtifactCache, Lease, Source};
pub use host::{Emitted, GuestLog, LogBudget, LogLevel, MAX_LOG_LINE, MAX_TOPIC_LEN, RefusedCalls};
use host::{HostState, LogSink};

/// Memory of a module whose function sets no `memory_limit`.
pub const DEFAULT_MODULE_MEMORY: usize = 16 << 20;

/// Memory of a component whose function sets no `memory_limit`: an
/// interpreter starts with 9 (JavaScript) to 14 MiB (Python) of its own.
pub const DEFAULT_COMPONENT_MEMORY: usize = 64 << 20;

/// The ABI version this runtime speaks (`edgefn_abi_version()` must return it).
pub const ABI_VERSION: i32 = 1;

/// How often the epoch advances, i.e. the granularity of timeouts. 10 ms
/// keeps the ticker's cost negligible on a Pi Zero while a 100 ms timeout
/// is still enforced within 10 %.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Most records one invocation may emit (and, separately, publish): a
/// runaway loop fails at `emit` (-3) instead of filling memory.
pub const MAX_RECORDS_PER_INVOCATION: usize = 1000;

/// Most bytes of guest stdout/stderr kept per invocation; the rest is
/// dropped with a note, so a chatty guest cannot flood the journal.
pub const MAX_CAPTURED_OUTPUT: usize = 64 * 1024;

/// Where compiled code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// Cranelift-compiled native code (x86_64, aarch64).
    #[default]
    Native,
    /// wasmtime's Pulley interpreter (for 32-bit ARM, where Cranelift has no
    /// backend; `pulley64` is usable on 64-bit hosts for testing).
    Pulley,
}

impl Target {
    /// What this host runs functions on: native code where Cranelift has a
    /// backend (x86_64, aarch64, riscv64, s390x), the Pulley interpreter
    /// elsewhere — notably 32-bit ARM (Pi Zero, 32-bit Raspberry Pi OS).
    pub fn for_host() -> Target {
        if cfg!(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64",
            target_arch = "s390x"
        )) {
            Target::Native
        } else {
            Target::Pulley
        }
    }
}

/// Why a module cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The module path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a WebAssembly module, or wasmtime rejected it.
    #[error("{path} is not a valid WebAssembly module: {reason}")]
    NotWasm {
        /// The module path.
        path: String,
        /// wasmtime's explanation.
        reason: String,
    },
    /// A valid module that does not follow ABI v1.
    #[error("{path} does not follow the edgefn ABI v{ABI_VERSION}: {reason} (see docs/ABI.md)")]
    Abi {
        /// The module path.
        path: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// Instantiation or initialisation failed.
    #[error("{path} failed to start: {reason}")]
    Start {
        /// The module path.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Why one invocation failed. Whatever it emitted is discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The handler returned a non-zero status.
    #[error("returned {code}{}", .message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Returned {
        /// The status.
        code: i32,
        /// What the guest passed to `set_error`, if anything.
        message: Option<String>,
    },
    /// The invocation ran past the function's timeout (the limit).
    #[error("timed out (timeout is {0:?})")]
    Timeout(Duration),
    /// The guest trapped (e.g. `unreachable`, a panic, out of memory, a bad
    /// pointer passed to a host import).
    #[error("trapped: {0}")]
    Trap(String),
    /// The invocation used up the function's fuel budget (the limit).
    #[error("ran out of fuel (budget is {0})")]
    OutOfFuel(u64),
    /// The guest called WASI `proc_exit`.
    #[error("exited with status {0}")]
    Exit(i32),
    /// A fresh instance could not be made.
    #[error("could not start an instance: {0}")]
    Start(String),
    /// A component's handler returned `err` with this text.
    #[error("failed: {0}")]
    Error(String),
}

impl Failure {
    /// A short, stable label for metrics and dead letters.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Returned { .. } | Failure::Error(_) => "error",
            Failure::Timeout(_) => "timeout",
            Failure::OutOfFuel(_) => "fuel",
            Failure::Trap(_) => "trap",
            Failure::Exit(_) => "exit",
            Failure::Start(_) => "start",
        }
    }
}

/// What a successful invocation produced.
#[derive(Debug, Default, Clone)]
pub struct Output {
    /// Records for upstream (`emit`), in call order.
    pub records: Vec<Emitted>,
    /// Messages for the local broker (`publish`), in call order.
    pub publishes: Vec<Emitted>,
    /// State writes, to commit with the records.
    pub state: Vec<StateWrite>,
}

/// A function's limits and environment: what the runtime needs to run it.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// Name, for logs.
    pub name: Arc<str>,
    /// Environment variables the guest sees.
    pub env: Vec<(String, String)>,
    /// Most bytes of linear memory, all of an instance's memories together;
    /// `None`: [`DEFAULT_MODULE_MEMORY`] for a module,
    /// [`DEFAULT_COMPONENT_MEMORY`] for a component.
    pub memory_limit: Option<usize>,
    /// Wall-clock limit per invocation.
    pub timeout: Duration,
    /// Largest payload of one emitted/published record.
    pub max_record_size: usize,
    /// Most bytes (topics and payloads) one invocation may emit, and
    /// separately publish.
    pub max_emit_bytes: usize,
    /// Longest topic `emit` accepts: what MQTT allows less the upstream
    /// topic prefix, which is prepended when the record is sent.
    pub max_topic_len: usize,
    /// Log lines per second the function's instances may write together.
    pub log_rate_limit: u32,
    /// WebAssembly operations one invocation may execute (wasmtime fuel),
    /// if the function wants a deterministic budget besides its timeout.
    /// Starting an instance gets it twice more: once for `_initialize` (with
    /// the start function and `edgefn_abi_version`), once for `edgefn_init`.
    pub fuel: Option<u64>,
    /// Topic filters `emit` may use (before the upstream prefix); `None`:
    /// any topic.
    pub emit_allow: Option<Arc<[TopicFilter]>>,
    /// Topic filters `publish` may use; empty: none.
    pub publish_allow: Arc<[TopicFilter]>,
    /// The function's durable state.
    pub state: Arc<FunctionState>,
    /// Import calls refused, counted.
    pub calls: Arc<RefusedCalls>,
}

impl FunctionSpec {
    /// A spec for unit tests: 1 MiB of memory, 1 s, no fuel budget.
    #[cfg(test)]
    pub(crate) fn for_test(name: &str) -> FunctionSpec {
        FunctionSpec {
            memory_limit: Some(1 << 20),
            ..FunctionSpec::new(name)
        }
    }

    /// `name` with the configuration's defaults: the default memory for
    /// its kind, 1 s, no fuel budget, no env, any emit and no publish,
    /// 1 MiB records and state.
    pub fn new(name: &str) -> FunctionSpec {
        FunctionSpec {
            name: name.into(),
            env: vec![],
            memory_limit: None,
            timeout: Duration::from_secs(1),
            max_record_size: 1 << 20,
            max_emit_bytes: 1 << 20,
            max_topic_len: MAX_TOPIC_LEN,
            log_rate_limit: 100,
            fuel: None,
            emit_allow: None,
            publish_allow: Arc::from([]),
            state: FunctionState::new(name, crate::state::DEFAULT_LIMIT),
            calls: Arc::default(),
        }
    }
}

/// The engines and linkers shared by every function.
pub struct Runtime {
    /// Compiles and runs modules without a fuel budget.
    plain: Flavor,
    /// Compiles and runs modules with one: the same, plus fuel metering.
    metered: Flavor,
    /// Advances the epoch while this runtime or any function it loaded lives.
    ticker: Arc<Ticker>,
    /// Where compiled modules are kept between runs, if anywhere.
    artifacts: Option<ArtifactCache>,
}

/// An engine and the linkers built for it.
struct Flavor {
    /// Compiles and runs modules.
    engine: Engine,
    /// The `edgefn` and WASI preview 1 imports, WASI's async
    /// implementation: for modules that can wait in WASI (see
    /// [`can_wait`]).
    waiting: Linker<HostState>,
    /// The same with WASI's sync implementation: for the others, whose
    /// every WASI call returns at once; a guest call then needs no fiber.
    direct: Linker<HostState>,
    /// WASI 0.2 and the function world's interfaces, for components.
    components: wasmtime::component::Linker<HostState>,
}

impl Flavor {
    /// An engine for `target`, metering fuel if `fuel`, and its linker.
    fn new(target: Target, fuel: bool) -> anyhow::Result<Flavor> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.consume_fuel(fuel);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        if target == Target::Pulley {
            let name = if cfg!(target_pointer_width = "64") {
                "pulley64"
            } else {
                "pulley32"
            };
            config.target(name).map_err(wasm_err)?;
        }
        if cfg!(target_pointer_width = "32") {
            // A 32-bit host cannot reserve 4 GiB per memory: reserve only
            // what a limit allows and bounds-check explicitly.
            config.memory_reservation(0);
            config.memory_guard_size(0);
        }
        let engine = Engine::new(&config).map_err(wasm_err)?;
        // The async WASI: its waits are futures a timeout can drop (see the
        // module doc); the sync one would block the thread where nothing can.
        let mut waiting = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut waiting, |s: &mut HostState| &mut s.wasi)
            .map_err(wasm_err)?;
        host::add_to_linker(&mut waiting).map_err(wasm_err)?;
        let mut direct = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut direct, |s: &mut HostState| &mut s.wasi)
            .map_err(wasm_err)?;
        host::add_to_linker(&mut direct).map_err(wasm_err)?;
        let components = component::linker(&engine).map_err(wasm_err)?;
        Ok(Flavor {
            engine,
            waiting,
            direct,
            components,
        })
    }
}

/// The thread that advances the epoch; stopped when the last holder
/// (the runtime or a function) is dropped.
struct Ticker {
    /// Set to stop the thread.
    stop: Arc<AtomicBool>,
    /// Joined on drop.
    thread: Option<JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl Runtime {
    /// Creates the engines for `target` and starts the epoch ticker.
    ///
    /// Fails if wasmtime cannot be configured for the target on this host.
    pub fn new(target: Target) -> anyhow::Result<Runtime> {
        let plain = Flavor::new(target, false)?;
        let metered = Flavor::new(target, true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let engines = [plain.engine.clone(), metered.engine.clone()];
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("edgefn-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        for e in &engines {
                            e.increment_epoch();
                        }
                    }
                })?
        };
        Ok(Runtime {
            plain,
            metered,
            ticker: Arc::new(Ticker {
                stop,
                thread: Some(thread),
            }),
            artifacts: None,
        })
    }

    /// Keeps compiled modules in `dir` and loads them from there (see
    /// [`artifacts`]).
    ///
    /// Fails if the directory cannot be created.
    pub fn with_artifacts(mut self, dir: &std::path::Path) -> std::io::Result<Runtime> {
        self.artifacts = Some(ArtifactCache::open(dir)?);
        Ok(self)
    }

    /// Deletes the compiled modules no loaded function uses any more;
    /// returns how many. Nothing without [`Runtime::with_artifacts`].
    pub fn prune_artifacts(&self) -> usize {
        self.artifacts.as_ref().map_or(0, ArtifactCache::prune)
    }

    /// Reads, compiles and checks the module at `path` for `spec`, then
    /// starts one instance to prove it initialises.
    ///
    /// Fails with a [`LoadError`] naming the file and what is wrong.
    pub fn load_file(
        &self,
        path: &std::path::Path,
        spec: FunctionSpec,
    ) -> Result<Function, LoadError> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: display.clone(),
            source,
        })?;
        self.load(&display, &bytes, spec)
    }

    /// Like [`Runtime::load_file`], from bytes; `origin` names them in errors.
    pub fn load(
        &self,
        origin: &str,
        bytes: &[u8],
        spec: FunctionSpec,
    ) -> Result<Function, LoadError> {
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotWasm {
                path: origin.to_owned(),
                reason: "it does not start with the WebAssembly magic bytes \\0asm".into(),
            });
        }
        let flavor = if spec.fuel.is_some() {
            &self.metered
        } else {
            &self.plain
        };
        let not_wasm = |e: wasmtime::Error| LoadError::NotWasm {
            path: origin.to_owned(),
            reason: format!("{e:#}"),
        };
        let abi = |reason: String| LoadError::Abi {
            path: origin.to_owned(),
            reason,
        };
        let (code, artifact) = if component::is_component(bytes) {
            let (component, artifact) = self.compile::<Component>(&flavor.engine, bytes);
            let component = component.map_err(not_wasm)?;
            let shape = component::check(&flavor.engine, &component).map_err(abi)?;
            let linker = component::link(&flavor.components, &flavor.engine, &component)
                .map_err(|e| abi(format!("{e:#}")))?;
            let pre = linker
                .instantiate_pre(&component)
                .and_then(component::BindingsPre::new)
                .map_err(|e| abi(format!("{e:#}")))?;
            let code = Code::Component {
                pre,
                init: shape.init,
                uses_state: shape.uses_state,
            };
            (code, artifact)
        } else {
            let (module, artifact) = self.compile::<Module>(&flavor.engine, bytes);
            let module = module.map_err(not_wasm)?;
            check_abi(&module).map_err(abi)?;
            let waits = can_wait(&module);
            let uses_state = module
                .imports()
                .any(|i| i.module() == "edgefn" && i.name().starts_with("state_"));
            let linker = if waits {
                &flavor.waiting
            } else {
                &flavor.direct
            };
            let pre = linker
                .instantiate_pre(&module)
                .map_err(|e| abi(format!("{e:#}")))?;
            let code = Code::Module {
                pre,
                waits,
                uses_state,
            };
            (code, artifact)
        };
        if !matches!(artifact, Some((_, Source::Cache))) {
            release_freed_memory();
        }
        let memory_limit = spec.memory_limit.unwrap_or(if code.is_component() {
            DEFAULT_COMPONENT_MEMORY
        } else {
            DEFAULT_MODULE_MEMORY
        });
        let mut function = Function {
            memory_at_start: 0,
            memory_limit,
            log_budget: Arc::new(LogBudget::new(spec.log_rate_limit)),
            spec: Arc::new(spec),
            engine: flavor.engine.clone(),
            code,
            origin: origin.to_owned(),
            precompiled: matches!(artifact, Some((_, Source::Cache))),
            _artifact: artifact.map(|(lease, _)| lease),
            _ticker: self.ticker.clone(),
        };
        // Prove it starts (and reports the right ABI version) before it is
        // trusted with a device's message. On a thread of its own: the
        // caller may be an async task, where guest code must not run.
        let started = std::thread::scope(|s| {
            s.spawn(|| {
                function
                    .instantiate()
                    .map(|i| i.store.data().limits.memory())
            })
            .join()
            .unwrap_or_else(|_| Err(StartError::Other("the start panicked".into())))
        });
        function.memory_at_start = started.map_err(|reason| match reason {
            StartError::Version(v) => LoadError::Abi {
                path: origin.to_owned(),
                reason: format!(
                    "edgefn_abi_version() returned {v}; this edgefn supports {ABI_VERSION}"
                ),
            },
            StartError::Other(reason) => LoadError::Start {
                path: origin.to_owned(),
                reason,
            },
        })?;
        Ok(function)
    }
}

impl Runtime {
    /// `bytes` compiled for `engine`, through the artifact cache if there
    /// is one, with the artifact's lease and whether it was precompiled.
    fn compile<C: artifacts::Compiled>(
        &self,
        engine: &Engine,
        bytes: &[u8],
    ) -> (wasmtime::Result<C>, Option<(Arc<Lease>, Source)>) {
        match &self.artifacts {
            Some(cache) => match cache.compiled::<C>(engine, bytes) {
                Ok((code, lease, source)) => (Ok(code), Some((lease, source))),
                Err(e) => (Err(e), None),
            },
            None => (C::compile(engine, bytes), None),
        }
    }
}

/// Gives memory freed by a compile back to the system. glibc keeps freed
/// memory in its per-thread arenas, and Cranelift compiling a component
/// (an interpreter: 12–19 MB of WebAssembly) on every core leaves hundreds
/// of megabytes there; measured on a Python function's first start: 351 MB
/// resident after the compile, 55 MB when started from its artifact.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heaps to the
    // system; nothing in use moves.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// wasmtime has its own error type; the rest of edgefn speaks anyhow.
fn wasm_err(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

/// Checks exports and imports against ABI v1, before instantiation.
fn check_abi(module: &Module) -> Result<(), String> {
    use ValType::I32;
    let func = |name: &str| -> Result<Option<wasmtime::FuncType>, String> {
        match module.get_export(name) {
            None => Ok(None),
            Some(ExternType::Func(f)) => Ok(Some(f)),
            Some(_) => Err(format!("export `{name}` is not a function")),
        }
    };
    let expect =
        |name: &str, params: &[ValType], results: &[ValType], required: bool| match func(name)? {
            None if required => Err(if name == "edgefn_abi_version" {
                "it does not export `edgefn_abi_version`: not an edgefn module".to_owned()
            } else {
                format!("missing export `{name}`")
            }),
            None => Ok(()),
            Some(ty) => {
                let same = |a: &mut dyn ExactSizeIterator<Item = ValType>, b: &[ValType]| {
                    a.len() == b.len() && a.zip(b).all(|(x, y)| x.matches(y))
                };
                if same(&mut ty.params(), params) && same(&mut ty.results(), results) {
                    Ok(())
                } else {
                    Err(format!(
                        "export `{name}` has type {ty}; expected (func (param{}) (result{}))",
                        params.iter().map(|_| " i32").collect::<String>(),
                        results.iter().map(|_| " i32").collect::<String>()
                    ))
                }
            }
        };
    expect("edgefn_abi_version", &[], &[I32], true)?;
    expect("edgefn_alloc", &[I32], &[I32], true)?;
    expect("edgefn_on_message", &[I32, I32, I32, I32], &[I32], true)?;
    expect("edgefn_init", &[], &[I32], false)?;
    expect("_initialize", &[], &[], false)?;
    match module.get_export("memory") {
        Some(ExternType::Memory(_)) => {}
        _ => return Err("missing export `memory`".into()),
    }
    if module.get_export("_start").is_some() {
        return Err(
            "it exports `_start` (a WASI command); build a reactor/library instead \
                    (Rust: crate-type = [\"cdylib\"]; clang: -mexec-model=reactor)"
                .into(),
        );
    }
    for import in module.imports() {
        match import.module() {
            "wasi_snapshot_preview1" => {}
            "edgefn" if host::IMPORTS.contains(&import.name()) => {}
            "edgefn" => {
                return Err(format!(
                    "it imports `edgefn.{}`, which this edgefn does not provide (it has: {})",
                    import.name(),
                    host::IMPORTS.join(", ")
                ));
            }
            other => {
                return Err(format!(
                    "it imports `{other}.{}`; only modules `edgefn` and `wasi_snapshot_preview1` exist",
                    import.name()
                ));
            }
        }
    }
    Ok(())
}

/// Whether `module` can wait inside a WASI call: whether it imports
/// `poll_oneoff`, WASI's only call that waits (`sleep`, clock waits). Every
/// other call returns at once here: stdin is empty, stdout and stderr are
/// captured in memory, and there are no files or sockets.
fn can_wait(module: &Module) -> bool {
    module
        .imports()
        .any(|i| i.module() == "wasi_snapshot_preview1" && i.name() == "poll_oneoff")
}

/// A compiled, checked function, ready to make instances.
pub struct Function {
    /// Name, limits, env.
    spec: Arc<FunctionSpec>,
    /// The engine it was compiled for.
    engine: Engine,
    /// Its code, imports resolved once; instantiation is then cheap.
    code: Code,
    /// Bytes of linear memory (all memories) a fresh instance has once
    /// started.
    memory_at_start: usize,
    /// Most bytes of linear memory an instance may have.
    memory_limit: usize,
    /// Where the module came from, for messages.
    origin: String,
    /// Log lines its instances may write, shared by them.
    log_budget: Arc<LogBudget>,
    /// Whether its code came from a precompiled artifact.
    precompiled: bool,
    /// Keeps its artifact on disk while it lives.
    _artifact: Option<Arc<Lease>>,
    /// Keeps timeouts enforced while the function lives.
    _ticker: Arc<Ticker>,
}

/// A function's compiled code: a core module (ABI v1) or a component (the
/// WIT world).
enum Code {
    /// A core module.
    Module {
        /// Ready to instantiate.
        pre: InstancePre<HostState>,
        /// Whether it can wait in WASI: then its guest calls are async,
        /// under a timeout (see the module doc).
        waits: bool,
        /// Whether it imports a state call.
        uses_state: bool,
    },
    /// A component; its guest calls are always async.
    Component {
        /// Ready to instantiate.
        pre: component::BindingsPre<HostState>,
        /// Whether it exports `init`.
        init: bool,
        /// Whether it imports the state interface.
        uses_state: bool,
    },
}

impl Code {
    fn is_component(&self) -> bool {
        matches!(self, Code::Component { .. })
    }
}

/// Why an instance could not be started.
enum StartError {
    /// `edgefn_abi_version()` returned another version.
    Version(i32),
    /// Anything else, explained.
    Other(String),
}

impl From<StartError> for Failure {
    fn from(e: StartError) -> Failure {
        Failure::Start(match e {
            StartError::Version(v) => format!("ABI version {v}"),
            StartError::Other(s) => s,
        })
    }
}

impl Function {
    /// The function's name and limits.
    pub fn spec(&self) -> &FunctionSpec {
        &self.spec
    }

    /// Whether it imports a state call (its invocations then run one at a
    /// time, in the order their messages came).
    pub fn uses_state(&self) -> bool {
        match self.code {
            Code::Module { uses_state, .. } | Code::Component { uses_state, .. } => uses_state,
        }
    }

    /// Bytes of linear memory, all its memories together, a fresh instance
    /// has once started: what `memory_limit` must leave room above.
    pub fn memory_at_start(&self) -> usize {
        self.memory_at_start
    }

    /// Most bytes of linear memory an instance may have, all its memories
    /// together: the spec's, or the default for its kind.
    pub fn memory_limit(&self) -> usize {
        self.memory_limit
    }

    /// Whether it is a component (the WIT world) rather than a core module
    /// (ABI v1).
    pub fn is_component(&self) -> bool {
        self.code.is_component()
    }

    /// Where the module was loaded from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether its machine code was read from a precompiled artifact
    /// instead of compiled (see [`Runtime::with_artifacts`]).
    pub fn precompiled(&self) -> bool {
        self.precompiled
    }

    /// Log lines dropped so far by the function's rate limit.
    pub fn log_lines_suppressed(&self) -> u64 {
        self.log_budget.suppressed()
    }

    /// A fresh instance whose logs go to `tracing`.
    ///
    /// Fails if instantiation, `_initialize` or `edgefn_init` fails.
    pub fn new_instance(&self) -> Result<Instance, Failure> {
        self.instantiate().map_err(Failure::from)
    }

    /// A fresh instance whose logs are collected into each invocation's
    /// result instead (for `edgefn invoke`).
    pub fn new_capturing_instance(&self) -> Result<Instance, Failure> {
        let mut i = self.instantiate().map_err(Failure::from)?;
        i.store.data_mut().sink = LogSink::Collect(Vec::new());
        Ok(i)
    }

    fn instantiate(&self) -> Result<Instance, StartError> {
        let timeout = self.spec.timeout;
        let state = HostState::new(
            self.spec.clone(),
            self.log_budget.clone(),
            self.memory_limit,
            self.is_component(),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(deadline_ticks(timeout));
        refuel(&mut store, self.spec.fuel);
        let body = match &self.code {
            Code::Module { pre, waits, .. } => self.start_module(&mut store, pre, *waits),
            Code::Component { pre, init, .. } => self.start_component(&mut store, pre, *init),
        };
        let body = body.map_err(|e| match (e, store.data().limits.refused()) {
            (StartError::Other(reason), Some(wanted)) => StartError::Other(format!(
                "{reason} (while it started, a growth of its memory to {} was refused: memory_limit is {})",
                crate::text::mib(wanted),
                crate::text::mib(self.memory_limit),
            )),
            (e, _) => e,
        })?;
        store.data_mut().flush_output();
        Ok(Instance {
            store,
            body,
            invocations: 0,
        })
    }

    /// Instantiates a module, runs `_initialize`, checks the ABI version
    /// and runs `edgefn_init`.
    fn start_module(
        &self,
        store: &mut Store<HostState>,
        pre: &InstancePre<HostState>,
        waits: bool,
    ) -> Result<Body, StartError> {
        let timeout = self.spec.timeout;
        let instance = if waits {
            block_on_within(timeout, pre.instantiate_async(&mut *store))
        } else {
            Some(pre.instantiate(&mut *store))
        }
        .ok_or_else(|| timed_out("instantiation", timeout))?
        .map_err(|e| start_failed("instantiation failed", e))?;
        let memory = instance
            .get_memory(&mut *store, "memory")
            .ok_or_else(|| StartError::Other("no memory export".into()))?;
        let typed = |store: &mut Store<HostState>, name: &str| {
            instance.get_typed_func::<(), i32>(store, name).ok()
        };
        let deadline = || Instant::now() + timeout;
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut *store, "_initialize") {
            guest(store, &init, (), waits, deadline)
                .ok_or_else(|| timed_out("_initialize", timeout))?
                .map_err(|e| start_failed("_initialize trapped", e))?;
        }
        let version = typed(store, "edgefn_abi_version")
            .ok_or_else(|| StartError::Other("no edgefn_abi_version".into()))?;
        let version = guest(store, &version, (), waits, deadline)
            .ok_or_else(|| timed_out("edgefn_abi_version", timeout))?
            .map_err(|e| start_failed("edgefn_abi_version trapped", e))?;
        if version != ABI_VERSION {
            return Err(StartError::Version(version));
        }
        if let Some(init) = typed(store, "edgefn_init") {
            store.set_epoch_deadline(deadline_ticks(timeout));
            refuel(store, self.spec.fuel);
            let status = guest(store, &init, (), waits, deadline)
                .ok_or_else(|| timed_out("edgefn_init", timeout))?
                .map_err(|e| start_failed("edgefn_init trapped", e))?;
            if status != 0 {
                let message = store.data_mut().error.take();
                return Err(StartError::Other(format!(
                    "edgefn_init returned {status}{}",
                    message.map(|m| format!(": {m}")).unwrap_or_default()
                )));
            }
        }
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut *store, "edgefn_alloc")
            .map_err(|e| start_failed("edgefn_alloc", e))?;
        let on_message = instance
            .get_typed_func::<(i32, i32, i32, i32), i32>(&mut *store, "edgefn_on_message")
            .map_err(|e| start_failed("edgefn_on_message", e))?;
        Ok(Body::Module {
            waits,
            memory,
            alloc,
            on_message,
        })
    }

    /// Instantiates a component (its start-up code runs then) and runs its
    /// `init`, if it exports one.
    fn start_component(
        &self,
        store: &mut Store<HostState>,
        pre: &component::BindingsPre<HostState>,
        init: bool,
    ) -> Result<Body, StartError> {
        let timeout = self.spec.timeout;
        let instance = block_on_within(timeout, pre.instance_pre().instantiate_async(&mut *store))
            .ok_or_else(|| timed_out("instantiation", timeout))?
            .map_err(|e| start_failed("instantiation failed", e))?;
        let bindings = component::Bindings::new(&mut *store, &instance)
            .map_err(|e| start_failed("the handler", e))?;
        if init {
            let init = instance
                .get_typed_func::<(), (Result<(), String>,)>(&mut *store, component::INIT)
                .map_err(|e| start_failed("export `init` has the wrong type", e))?;
            store.set_epoch_deadline(deadline_ticks(timeout));
            refuel(store, self.spec.fuel);
            let (result,) = block_on_within(timeout, init.call_async(&mut *store, ()))
                .ok_or_else(|| timed_out("init", timeout))?
                .map_err(|e| start_failed("init trapped", e))?;
            if let Err(message) = result {
                return Err(StartError::Other(format!("init failed: {message}")));
            }
        }
        Ok(Body::Component(bindings))
    }
}

/// The start error for a step that failed.
fn start_failed(what: &str, e: wasmtime::Error) -> StartError {
    StartError::Other(format!("{what}: {e:#}"))
}

/// The start error for a step that ran past the timeout.
fn timed_out(what: &str, timeout: Duration) -> StartError {
    StartError::Other(format!("{what} timed out (timeout is {timeout:?})"))
}

thread_local! {
    /// The calling thread's own runtime for guest calls (WASI's waits are
    /// tokio timers): current-thread, timers only, made on first use.
    static GUEST_RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread tokio runtime");
}

/// Calls `f` with `params`: for a function that can wait in WASI, as
/// [`block_on_within`] the time left until `deadline`; for the others
/// directly (`Some` always; the epoch deadline bounds them).
fn guest<P, R>(
    store: &mut Store<HostState>,
    f: &TypedFunc<P, R>,
    params: P,
    waits: bool,
    deadline: impl FnOnce() -> Instant,
) -> Option<wasmtime::Result<R>>
where
    P: wasmtime::WasmParams + Send + Sync,
    R: wasmtime::WasmResults + Send + Sync,
{
    if waits {
        let left = deadline().saturating_duration_since(Instant::now());
        block_on_within(left, f.call_async(store, params))
    } else {
        Some(f.call(store, params))
    }
}

/// Runs `call` to completion on this thread, or gives up after `limit`
/// (`None`), dropping it wherever it waits.
///
/// Panics if called from within an async task (guest code must not run on
/// a reactor thread).
fn block_on_within<F: std::future::Future>(limit: Duration, call: F) -> Option<F::Output> {
    // The timer is made inside `block_on`: it needs the runtime's context.
    GUEST_RUNTIME.with(|rt| {
        rt.block_on(async { tokio::time::timeout(limit, call).await })
            .ok()
    })
}

/// Gives a store a fresh fuel budget, if its function has one.
///
/// wasmtime traps when the fuel left reaches zero, so it gets one unit more
/// than the budget: a budget of N lets an invocation use exactly N.
fn refuel(store: &mut Store<HostState>, budget: Option<u64>) {
    if let Some(fuel) = budget {
        store
            .set_fuel(fuel.saturating_add(1))
            .expect("fuel budgets only on metering engines");
    }
}

/// Fuel used since [`refuel`] with `budget`, at most the budget.
fn fuel_used(store: &Store<HostState>, budget: Option<u64>) -> Option<u64> {
    let budget = budget?;
    let left = store.get_fuel().unwrap_or(0);
    Some(budget.saturating_add(1).saturating_sub(left).min(budget))
}

/// Epoch ticks for a timeout: rounded up, plus one because the current tick
/// may be nearly over when the deadline is set.
fn deadline_ticks(timeout: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    (timeout.as_nanos().div_ceil(tick)) as u64 + 1
}

/// A warm instance: reuse it until an invocation fails, then drop it.
pub struct Instance {
    /// The store holding the instance's memory, limits and host state.
    store: Store<HostState>,
    /// How to call its handler.
    body: Body,
    /// Successful invocations so far.
    invocations: u64,
}

/// An instance's handler.
enum Body {
    /// A core module's exports.
    Module {
        /// Whether its function can wait in WASI (see [`Code::Module`]).
        waits: bool,
        /// The guest's linear memory.
        memory: Memory,
        /// `edgefn_alloc`.
        alloc: TypedFunc<i32, i32>,
        /// `edgefn_on_message`.
        on_message: TypedFunc<(i32, i32, i32, i32), i32>,
    },
    /// A component's exports.
    Component(component::Bindings),
}

/// The result of an invocation on a capturing instance, for `edgefn invoke`.
#[derive(Debug)]
pub struct Report {
    /// What the function produced, or why it failed.
    pub result: Result<Output, Failure>,
    /// Its log calls and stdout/stderr lines, in order.
    pub logs: Vec<GuestLog>,
    /// Wall-clock time of the invocation.
    pub elapsed: Duration,
    /// Fuel the invocation used, if the function has a budget.
    pub fuel_used: Option<u64>,
}

impl Instance {
    /// Runs the handler on one message. On `Err` the instance must be
    /// dropped: its memory may be in any state.
    pub fn invoke(&mut self, topic: &str, payload: &[u8]) -> Result<Output, Failure> {
        self.invoke_attempt(topic, payload, 1)
    }

    /// Like [`Instance::invoke`], for the `attempt`th try of a message (1:
    /// the first; a component sees it in its context).
    pub fn invoke_attempt(
        &mut self,
        topic: &str,
        payload: &[u8],
        attempt: u32,
    ) -> Result<Output, Failure> {
        let (timeout, fuel) = {
            let spec = &self.store.data().spec;
            (spec.timeout, spec.fuel)
        };
        self.store.set_epoch_deadline(deadline_ticks(timeout));
        refuel(&mut self.store, fuel);
        self.store.data_mut().begin();
        let result = match &self.body {
            Body::Module { .. } => self.call_module(topic, payload, timeout),
            Body::Component(_) => self.call_component(topic, payload, attempt, timeout),
        };
        let state = self.store.data_mut();
        state.flush_output();
        match result {
            Ok(Ok(())) => {
                self.invocations += 1;
                let out = state.take_output();
                // Seen by the next invocation at once (see [`state`]).
                state.spec.state.apply(&out.state);
                Ok(out)
            }
            Ok(Err(failure)) => Err(failure),
            Err(e) => Err(classify(e, timeout, fuel)),
        }
    }

    /// Like [`Instance::invoke`], with the logs and the time taken.
    pub fn invoke_report(&mut self, topic: &str, payload: &[u8]) -> Report {
        let started = Instant::now();
        let result = self.invoke(topic, payload);
        let elapsed = started.elapsed();
        let fuel_used = fuel_used(&self.store, self.store.data().spec.fuel);
        let logs = match &mut self.store.data_mut().sink {
            LogSink::Collect(v) => std::mem::take(v),
            LogSink::Tracing => Vec::new(),
        };
        Report {
            result,
            logs,
            elapsed,
            fuel_used,
        }
    }

    /// Successful invocations this instance has served.
    pub fn invocations(&self) -> u64 {
        self.invocations
    }

    /// Whether the instance should be replaced before its next message: a
    /// component whose memories hold more than 7/8 of its limit. An
    /// interpreter's heap only grows (SpiderMonkey in a component collects
    /// garbage only when it cannot allocate, and then fails: measured, the
    /// JavaScript clean-temperature at 64 MiB crashed after 53,198 warm
    /// invocations), so a fresh instance is cheaper than the failure.
    pub fn worn(&self) -> bool {
        let data = self.store.data();
        matches!(self.body, Body::Component(_))
            && data.limits.memory() > data.limits.memory_limit() / 8 * 7
    }

    /// Copies the message into a module and runs its handler, within
    /// `timeout` (an [`Trap::Interrupt`] error past it).
    fn call_module(
        &mut self,
        topic: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> wasmtime::Result<Result<(), Failure>> {
        let Body::Module {
            waits,
            memory,
            alloc,
            on_message,
        } = &self.body
        else {
            unreachable!("call_module on a component");
        };
        let (waits, memory) = (*waits, *memory);
        let (alloc, on_message) = (alloc.clone(), on_message.clone());
        let timed_out = || wasmtime::Error::new(Trap::Interrupt);
        // Read the clock only where a timer needs it.
        let started = std::cell::OnceCell::new();
        let deadline = || *started.get_or_init(|| Instant::now() + timeout);
        let total = topic.len() + payload.len();
        let len = i32::try_from(total).map_err(|_| wasmtime::format_err!("message too large"))?;
        let ptr = guest(&mut self.store, &alloc, len, waits, deadline).ok_or_else(timed_out)??;
        if ptr == 0 && total > 0 {
            wasmtime::bail!("edgefn_alloc({total}) returned 0 (out of memory)");
        }
        let base = ptr as u32 as usize;
        let mem = memory.data_mut(&mut self.store);
        let region = mem.get_mut(base..base + total).ok_or_else(|| {
            wasmtime::format_err!("edgefn_alloc returned an out-of-bounds pointer")
        })?;
        region[..topic.len()].copy_from_slice(topic.as_bytes());
        region[topic.len()..].copy_from_slice(payload);
        let tlen = topic.len() as i32;
        let params = (ptr, tlen, ptr.wrapping_add(tlen), payload.len() as i32);
        let code = guest(&mut self.store, &on_message, params, waits, deadline)
            .ok_or_else(timed_out)??;
        Ok(match code {
            0 => Ok(()),
            code => Err(Failure::Returned {
                code,
                message: self.store.data_mut().error.take(),
            }),
        })
    }

    /// Runs a component's handler on the message, within `timeout`.
    fn call_component(
        &mut self,
        topic: &str,
        payload: &[u8],
        attempt: u32,
        timeout: Duration,
    ) -> wasmtime::Result<Result<(), Failure>> {
        let Body::Component(bindings) = &self.body else {
            unreachable!("call_component on a module");
        };
        let trigger = if matches!(self.store.data().sink, LogSink::Collect(_)) {
            component::Trigger::Test
        } else if topic.starts_with(crate::schedule::TOPIC_PREFIX) {
            component::Trigger::Schedule
        } else {
            component::Trigger::Mqtt
        };
        let message = component::Message {
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            context: component::Context {
                function: self.store.data().spec.name.to_string(),
                attempt,
                trigger,
            },
        };
        let result = block_on_within(timeout, bindings.call_handle(&mut self.store, &message))
            .ok_or_else(|| wasmtime::Error::new(Trap::Interrupt))??;
        Ok(result.map_err(Failure::Error))
    }
}

/// Turns a wasmtime error into a [`Failure`].
fn classify(e: wasmtime::Error, timeout: Duration, fuel: Option<u64>) -> Failure {
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Failure::Exit(exit.0);
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        if *trap == Trap::Interrupt {
            return Failure::Timeout(timeout);
        }
        if let (Trap::OutOfFuel, Some(budget)) = (trap, fuel) {
            return Failure::OutOfFuel(budget);
        }
        return Failure::Trap(trap.to_string());
    }
    // A host import's error (e.g. a bad pointer): its own message, without
    // the wasm backtrace wasmtime adds as context.
    Failure::Trap(e.root_cause().to_string())
}

#[cfg(test)]
mod tests;
