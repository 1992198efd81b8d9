//! chaos: a function that misbehaves on request, for testing how the gateway
//! handles failures. Not an example to copy.
//!
//! The payload, read as text, selects what it does: the first of these words
//! that the payload contains wins (so `"trap"`, `trap` and `{"cmd":"trap"}`
//! all trap). A payload that is not UTF-8 is a plain input.
//!
//! | word      | what the invocation does                                                   | outcome |
//! |-----------|----------------------------------------------------------------------------|---------|
//! | `trap`    | executes `unreachable`                                                     | trap |
//! | `spin`    | loops forever (a volatile read each turn, so it is not optimised away)     | timeout |
//! | `oom`     | allocates and touches 1 MiB blocks until an allocation fails, then aborts  | trap (memory limit) |
//! | `fail`    | emits `attempted` to `chaos/fail`, then returns `Err("asked to fail")`     | failure, error message `asked to fail`, the record is discarded |
//! | `exit`    | `std::process::exit(3)` (WASI `proc_exit(3)`)                              | failure |
//! | `badptr`  | calls the raw `edgefn.emit` with topic pointer 0x7fff_fff0, length 100; if the host returns instead of trapping, tries the same range as the payload; if that returns too, fails with `host accepted an out-of-bounds …` | trap |
//! | `count`   | emits `{"count":N,"init":I}` to `chaos/count`: N counts this instance's invocations of `count` (1 on a fresh instance), I how often `edgefn_init` ran in it (1) | ok |
//! | `env`     | emits the value of env var `GREETING` to `chaos/env`; fails with `GREETING is not set` if it is unset | ok |
//! | `print`   | `println!("hello from stdout")`, `eprintln!("hello from stderr")`, emits nothing | ok |
//! | `publish` | publishes the payload unchanged to `devices/chaos/cmd` (local broker)      | ok |
//! | `many`    | tries to emit 1001 records (payloads `0`..`1000`) to `chaos/many`; the host should accept 1000 and refuse the last with -3; logs the refusal at warn, returns Ok | ok, 1000 records |
//! | `log`     | one `edgefn.log` line at each level 0..=4 (`chaos log level N`), and one at level 9 | ok |
//! | `sleep`   | sleeps an hour in WASI `poll_oneoff` (`std::thread::sleep`)                | timeout |
//! | `stdin`   | reads stdin to its end, emits how many bytes it read to `chaos/stdin` (the gateway gives an empty stdin: `0`) | ok |
//! | `poison`  | emits the payload to `chaos/poison\u{7}`: a valid MQTT topic with a control character, which Mosquitto answers by closing the connection | ok |
//! | `bulk`    | tries to emit 32 records of 65,000 bytes to `chaos/bulk`; with the default `max_emit_bytes` (1 MiB, topics counted) the host accepts 16 and refuses the rest with -4; logs the first refusal at warn, returns Ok | ok, 16 records |
//! | `chatty`  | logs 1000 lines of 10,000 bytes each (`chaos chatty N xxx…`), then emits `done` to `chaos/chatty` | ok |
//! | otherwise | emits the payload unchanged to `echo/<input topic>`                        | ok |
//!
//! `edgefn_init` is exported too: it returns 0 and counts its calls (see `count`).

use edgefn_sdk::{emit, env, publish, warn, Error, Level, Message};
use std::sync::atomic::{AtomicU32, Ordering};

edgefn_sdk::handler!(handle, init = init);

/// Invocations of `count` in this instance (globals persist in a warm instance).
static COUNT: AtomicU32 = AtomicU32::new(0);
/// How many times `edgefn_init` ran in this instance.
static INIT_CALLS: AtomicU32 = AtomicU32::new(0);

/// Commands in the order they are matched.
const COMMANDS: [&str; 17] = [
    "trap", "spin", "oom", "fail", "exit", "badptr", "count", "env", "print", "publish", "many", "log", "sleep",
    "stdin", "poison", "bulk", "chatty",
];

fn init() -> Result<(), Error> {
    INIT_CALLS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

fn command(payload: &[u8]) -> Option<&'static str> {
    let text = std::str::from_utf8(payload).ok()?;
    COMMANDS.iter().copied().find(|c| text.contains(c))
}

fn handle(msg: &Message) -> Result<(), Error> {
    match command(msg.payload()) {
        Some("trap") => trap(),
        Some("spin") => spin(),
        Some("oom") => oom(),
        Some("fail") => {
            emit("chaos/fail", "attempted")?;
            Err("asked to fail".into())
        }
        Some("exit") => std::process::exit(3),
        Some("badptr") => badptr(),
        Some("count") => {
            let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
            let init = INIT_CALLS.load(Ordering::SeqCst);
            emit("chaos/count", format!(r#"{{"count":{},"init":{}}}"#, n, init))?;
            Ok(())
        }
        Some("env") => match env("GREETING") {
            Some(greeting) => Ok(emit("chaos/env", greeting)?),
            None => Err("GREETING is not set".into()),
        },
        Some("print") => {
            println!("hello from stdout");
            eprintln!("hello from stderr");
            Ok(())
        }
        Some("publish") => Ok(publish("devices/chaos/cmd", msg.payload())?),
        Some("many") => {
            for i in 0..1001 {
                if let Err(e) = emit("chaos/many", i.to_string()) {
                    warn(&format!("record {} refused: {} (code {})", i, e, e.code()));
                }
            }
            Ok(())
        }
        Some("log") => {
            for level in [Level::Trace, Level::Debug, Level::Info, Level::Warn, Level::Error] {
                edgefn_sdk::log(level, &format!("chaos log level {}", level as i32));
            }
            log_raw(9, "chaos log level 9");
            Ok(())
        }
        Some("sleep") => {
            std::thread::sleep(std::time::Duration::from_secs(3600));
            Err("slept an hour: the gateway's timeout did not stop it".into())
        }
        Some("stdin") => {
            let mut input = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut input)
                .map_err(|e| Error::new(format!("cannot read stdin: {}", e)))?;
            Ok(emit("chaos/stdin", input.len().to_string())?)
        }
        Some("poison") => Ok(emit("chaos/poison\u{7}", msg.payload())?),
        Some("bulk") => {
            let block = vec![b'b'; 65_000];
            let mut warned = false;
            for i in 0..32 {
                if let Err(e) = emit("chaos/bulk", &block) {
                    if !warned {
                        warn(&format!("record {} refused: {} (code {})", i, e, e.code()));
                        warned = true;
                    }
                }
            }
            Ok(())
        }
        Some("chatty") => {
            let filler = "x".repeat(10_000);
            for i in 0..1000 {
                edgefn_sdk::info(&format!("chaos chatty {} {}", i, filler));
            }
            Ok(emit("chaos/chatty", "done")?)
        }
        _ => Ok(emit(&format!("echo/{}", msg.topic()), msg.payload())?),
    }
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

fn spin() -> ! {
    let turns = 0u32;
    loop {
        // SAFETY: reading a live local; volatile so the loop is not removed.
        unsafe { std::ptr::read_volatile(&turns) };
    }
}

fn oom() -> ! {
    const BLOCK: usize = 1 << 20;
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        // Fails (aborts: a trap) once memory.grow is refused at the limit.
        let mut block = vec![0u8; BLOCK];
        let mut i = 0;
        while i < BLOCK {
            // SAFETY: i < BLOCK; volatile so the writes and the block stay.
            unsafe { std::ptr::write_volatile(block.as_mut_ptr().add(i), 1) };
            i += 4096;
        }
        blocks.push(block);
    }
}

#[cfg(target_arch = "wasm32")]
fn badptr() -> Result<(), Error> {
    let ok = b"chaos/badptr";
    // SAFETY: the host checks the ranges; this one is out of bounds on purpose.
    let code = unsafe { edgefn_sdk::sys::emit(0x7fff_fff0, 100, ok.as_ptr() as i32, ok.len() as i32) };
    let code2 = unsafe { edgefn_sdk::sys::emit(ok.as_ptr() as i32, ok.len() as i32, 0x7fff_fff0, 100) };
    Err(format!("host accepted an out-of-bounds pointer: emit returned {} (bad topic) and {} (bad payload)", code, code2)
        .into())
}

#[cfg(not(target_arch = "wasm32"))]
fn badptr() -> Result<(), Error> {
    Err("badptr only means something in wasm32".into())
}

/// The raw `edgefn.log` import, to send a level outside 0..=4.
#[cfg(target_arch = "wasm32")]
fn log_raw(level: i32, message: &str) {
    // SAFETY: a live slice of our memory.
    unsafe { edgefn_sdk::sys::log(level, message.as_ptr() as i32, message.len() as i32) }
}

#[cfg(not(target_arch = "wasm32"))]
fn log_raw(_level: i32, message: &str) {
    edgefn_sdk::info(message);
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefn_sdk::testing;

    #[test]
    fn commands_match_in_order() {
        assert_eq!(command(b"trap"), Some("trap"));
        assert_eq!(command(br#"{"cmd":"count"}"#), Some("count"));
        assert_eq!(command(b"publish and print"), Some("print"));
        assert_eq!(command(b"hello"), None);
        assert_eq!(command(&[0xff, b't', b'r', b'a', b'p']), None);
    }

    #[test]
    fn plain_input_is_echoed() {
        let (r, c) = testing::invoke(handle, "sensors/x", b"{\"a\":1}");
        assert_eq!(r, Ok(()));
        assert_eq!(c.emitted[0].topic, "echo/sensors/x");
        assert_eq!(c.emitted[0].payload, b"{\"a\":1}");
        let (_, c) = testing::invoke(handle, "t", &[0xff, 0]);
        assert_eq!(c.emitted[0].payload, [0xff, 0]);
    }

    #[test]
    fn count_fail_env_publish_many_log() {
        let (_, c) = testing::invoke(handle, "t", b"count");
        let first = c.emitted[0].payload_str().to_string();
        assert!(first.starts_with("{\"count\":"), "{}", first);
        let (r, c) = testing::invoke(handle, "t", b"fail");
        assert_eq!(r, Err(Error::new("asked to fail")));
        assert_eq!(c.error.as_deref(), Some("asked to fail"));
        testing::set_env("GREETING", Some("hi"));
        let (_, c) = testing::invoke(handle, "t", b"env");
        assert_eq!(c.emitted[0].payload, b"hi");
        testing::set_env("GREETING", None);
        assert!(testing::invoke(handle, "t", b"env").0.is_err());
        let (_, c) = testing::invoke(handle, "t", b"publish x");
        assert_eq!(c.published[0].topic, "devices/chaos/cmd");
        assert_eq!(c.published[0].payload, b"publish x");
        let (r, c) = testing::invoke(handle, "t", b"many");
        assert_eq!(r, Ok(()));
        assert_eq!(c.emitted.len(), 1000);
        assert_eq!(c.logs_at(Level::Warn).len(), 1);
        let (_, c) = testing::invoke(handle, "t", b"log");
        assert_eq!(c.logs.len(), 6);
    }
}
