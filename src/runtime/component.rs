//! Functions as WebAssembly components: the WIT world `edgefn:function`
//! (`wit/edgefn.wit`, docs/ABI.md), which componentize-py, componentize-js
//! and wit-bindgen build against.
//!
//! A component gets the same host as a module, through the world's
//! interfaces: `host` (emit, publish, log) and `state` map onto the very
//! [`HostState`] calls ABI v1 makes, with the same checks and counters, and
//! a refusal comes back as the world's `error` enum. WASI 0.2 comes from
//! wasmtime-wasi over the same locked-down context as preview 1: the
//! function's environment, clocks, random, stdout/stderr into its log; no
//! preopened directories and no network, so those calls fail. Interfaces a
//! toolchain imports whether or not the code uses them (componentize-js
//! imports `wasi:http`) are defined as traps: the component instantiates,
//! and only a call to one fails, with its name.
//!
//! Every guest call of a component is async (WASI 0.2's waits are futures)
//! and made under the function's timeout, like a module that can wait.

use wasmtime::Engine;
use wasmtime::component::types::{ComponentItem, Type};
use wasmtime::component::{Component, HasSelf, Linker, ResourceType};

use super::host::{HostState, LogLevel, Refusal};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "function",
        exports: { default: async },
        // Linked by wasmtime-wasi with the rest of WASI 0.2.
        with: { "wasi:cli/environment": wasmtime_wasi::p2::bindings::cli::environment },
    });
}

pub(super) use bindings::Function as Bindings;
pub(super) use bindings::FunctionPre as BindingsPre;
pub(super) use bindings::edgefn::function::types::{Context, Message, Trigger};
use bindings::edgefn::function::types::{Error as WitError, Level};

/// The package of the function world; imports from it are the host's.
const PACKAGE: &str = "edgefn:function/";

/// The exports the world asks for: the handler, and the optional
/// initialiser of `function-with-init`.
const HANDLER: &str = "handle";
pub(super) const INIT: &str = "init";

/// Whether `bytes` is a component (the preamble's layer field is 1) rather
/// than a core module (layer 0).
pub(super) fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes.starts_with(b"\0asm") && bytes[6..8] == [1, 0]
}

/// A linker with WASI 0.2 (async) and the world's imports.
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    use bindings::edgefn::function::{host, state, types};
    types::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    host::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    state::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// What a loaded component offers, checked before it is instantiated.
pub(super) struct Shape {
    /// Whether it exports `init`.
    pub(super) init: bool,
    /// Whether it imports the `state` interface.
    pub(super) uses_state: bool,
}

/// Checks a component's exports and imports against the world: it must
/// export `handle` (and may export `init`), and import only the world's
/// interfaces and WASI's (unknown WASI interfaces are linked as traps by
/// [`link`]).
pub(super) fn check(engine: &Engine, component: &Component) -> Result<Shape, String> {
    let ty = component.component_type();
    let handler = match ty.get_export(engine, HANDLER).map(|e| e.ty) {
        None => false,
        Some(ComponentItem::ComponentFunc(_)) => true,
        Some(_) => return Err(format!("export `{HANDLER}` is not a function")),
    };
    if !handler {
        let exports: Vec<&str> = ty.exports(engine).map(|(n, _)| n).collect();
        return Err(format!(
            "it does not export `{HANDLER}`: not a component of the world \
             edgefn:function/function@1.0.0 (wit/edgefn.wit); it exports: {}",
            if exports.is_empty() {
                "nothing".to_owned()
            } else {
                exports.join(", ")
            }
        ));
    }
    let init = match ty.get_export(engine, INIT).map(|e| e.ty) {
        None => false,
        Some(ComponentItem::ComponentFunc(f))
            if f.params().len() == 0
                && matches!(f.results().collect::<Vec<_>>()[..], [Type::Result(_)]) =>
        {
            true
        }
        Some(_) => {
            return Err(format!(
                "export `{INIT}` is not `func() -> result<_, string>` (world function-with-init)"
            ));
        }
    };
    let mut uses_state = false;
    for (name, _) in ty.imports(engine) {
        if let Some(interface) = name.strip_prefix(PACKAGE) {
            let interface = interface.split('@').next().unwrap_or(interface);
            if !["types", "host", "state"].contains(&interface) {
                return Err(format!(
                    "it imports `{name}`, which this edgefn does not provide \
                     (edgefn:function has: types, host, state)"
                ));
            }
            uses_state |= interface == "state";
        } else if !name.starts_with("wasi:") {
            return Err(format!(
                "it imports `{name}`; only the interfaces of edgefn:function and WASI 0.2 exist"
            ));
        }
    }
    Ok(Shape { init, uses_state })
}

/// The WASI 0.2 packages the gateway links (wasmtime-wasi's); an import
/// from another WASI package is linked as traps by [`link`].
const WASI_PROVIDED: &[&str] = &[
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:cli/",
    "wasi:filesystem/",
    "wasi:sockets/",
];

/// `base` plus, for every import of `component` from a WASI package the
/// gateway does not provide (componentize-js imports `wasi:http` whether
/// or not the code uses it), functions that trap saying so, and resources
/// nothing can make.
pub(super) fn link(
    base: &Linker<HostState>,
    engine: &Engine,
    component: &Component,
) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = base.clone();
    let ty = component.component_type();
    // A stubbed interface may use WASI's stream resources (`wasi:http/types`
    // does); those must be the very types the gateway's `wasi:io` has.
    let mut io_resources = Vec::new();
    for (name, import) in ty.imports(engine) {
        let (true, ComponentItem::ComponentInstance(instance)) =
            (name.starts_with("wasi:io/"), import.ty)
        else {
            continue;
        };
        for (export, item) in instance.exports(engine) {
            if let ComponentItem::Resource(r) = item.ty {
                let host = match export {
                    "input-stream" => ResourceType::host::<wasmtime_wasi::p2::DynInputStream>(),
                    "output-stream" => ResourceType::host::<wasmtime_wasi::p2::DynOutputStream>(),
                    "pollable" => ResourceType::host::<wasmtime_wasi::p2::DynPollable>(),
                    "error" => ResourceType::host::<wasmtime_wasi::p2::IoError>(),
                    _ => continue,
                };
                io_resources.push((r, host));
            }
        }
    }
    for (name, import) in ty.imports(engine) {
        if !name.starts_with("wasi:") || WASI_PROVIDED.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let ComponentItem::ComponentInstance(instance) = import.ty else {
            continue;
        };
        let mut stubs = linker.instance(name)?;
        for (export, item) in instance.exports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(_) => {
                    let what = format!("{name}#{export}");
                    stubs.func_new(export, move |_, _, _, _| {
                        wasmtime::bail!("`{what}` is not available to edgefn functions")
                    })?;
                }
                ComponentItem::Resource(r) => {
                    let host = io_resources
                        .iter()
                        .find(|(io, _)| *io == r)
                        .map_or_else(ResourceType::host::<()>, |(_, host)| *host);
                    stubs.resource(export, host, |_, _| Ok(()))?;
                }
                _ => {}
            }
        }
    }
    Ok(linker)
}

impl From<Refusal> for WitError {
    fn from(r: Refusal) -> WitError {
        match r {
            Refusal::InvalidTopic => WitError::InvalidTopic,
            Refusal::TooLarge => WitError::TooLarge,
            Refusal::TooManyRecords => WitError::TooManyRecords,
            Refusal::TooManyBytes => WitError::TooManyBytes,
            Refusal::NotAllowed => WitError::NotAllowed,
            Refusal::StateLimit => WitError::StateLimit,
            Refusal::InvalidKey => WitError::InvalidKey,
            Refusal::TooManyWrites => WitError::TooManyWrites,
        }
    }
}

impl bindings::edgefn::function::types::Host for HostState {}

impl bindings::edgefn::function::host::Host for HostState {
    fn emit(&mut self, topic: String, payload: Vec<u8>) -> Result<(), WitError> {
        self.record(topic.as_bytes(), payload, false)
            .map_err(WitError::from)
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), WitError> {
        self.record(topic.as_bytes(), payload, true)
            .map_err(WitError::from)
    }

    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        self.guest_log(level, message);
    }
}

impl bindings::edgefn::function::state::Host for HostState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, WitError> {
        self.state_get(key.as_bytes(), |v| v.map(<[u8]>::to_vec))
            .map_err(WitError::from)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), WitError> {
        self.state_write(key.as_bytes(), Some(&value))
            .map_err(WitError::from)
    }

    fn delete(&mut self, key: String) -> Result<(), WitError> {
        self.state_write(key.as_bytes(), None)
            .map_err(WitError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::is_component;

    #[test]
    fn components_are_told_from_modules_by_their_layer() {
        assert!(is_component(b"\0asm\x0d\0\x01\0"));
        assert!(!is_component(b"\0asm\x01\0\0\0"));
        assert!(!is_component(b"\0asm\x0d\0"));
        assert!(!is_component(b"\x7fELF\x0d\0\x01\0"));
    }
}
