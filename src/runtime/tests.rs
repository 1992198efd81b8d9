//! Runtime tests on small hand-written modules (WAT), each probing one rule
//! of ABI v1. The real example functions are exercised by `tests/`.

use super::*;
use crate::runtime::pool::{Outcome, Pool};

/// A module following ABI v1 whose handler body is `body`. Memory: one page
/// at most `max_pages`; data at 16: "out/topic" (9 bytes). The input block
/// is bump-allocated from 1024 and reset on each call. Globals: `$calls`
/// counts successful starts of the handler.
fn module(body: &str, extra: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (import "edgefn" "set_error" (func $set_error (param i32 i32)))
  (import "edgefn" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "out/topicboom")
  (global $calls (mut i32) (i32.const 0))
  (func (export "edgefn_abi_version") (result i32) (i32.const 1))
  (func (export "edgefn_alloc") (param $n i32) (result i32) (i32.const 1024))
  (func (export "edgefn_on_message") (param $tp i32) (param $tl i32) (param $pp i32) (param $pl i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    {body})
  {extra}
)"#
    );
    wat::parse_str(text).expect("valid WAT")
}

/// Emits the payload to `out/topic`, then returns 0.
const ECHO: &str = "(drop (call $emit (i32.const 16) (i32.const 9) (local.get $pp) (local.get $pl))) (i32.const 0)";

fn spec(timeout_ms: u64) -> FunctionSpec {
    FunctionSpec {
        name: "test".into(),
        env: vec![],
        memory_limit: Some(1 << 20),
        timeout: Duration::from_millis(timeout_ms),
        max_record_size: 1024,
        max_emit_bytes: 1 << 20,
        max_topic_len: crate::runtime::MAX_TOPIC_LEN,
        ..FunctionSpec::for_test("test")
    }
}

fn load(bytes: &[u8]) -> Result<Function, LoadError> {
    Runtime::new(Target::Native)
        .unwrap()
        .load("test.wasm", bytes, spec(1000))
}

fn abi_error(bytes: &[u8]) -> String {
    match load(bytes) {
        Err(e @ LoadError::Abi { .. }) => e.to_string(),
        Err(e) => panic!("expected an ABI error, got {e}"),
        Ok(_) => panic!("expected an ABI error, the module loaded"),
    }
}

#[test]
fn a_valid_module_runs_and_emits() {
    let f = load(&module(ECHO, "")).unwrap();
    let mut i = f.new_instance().unwrap();
    let out = i.invoke("in/x", b"hello").unwrap();
    assert_eq!(
        out.records,
        [Emitted {
            topic: "out/topic".into(),
            payload: b"hello".to_vec()
        }]
    );
    assert!(out.publishes.is_empty());
}

#[test]
fn instances_stay_warm_between_invocations() {
    // Emits only on the third call of the same instance: globals persist.
    let body = "(if (i32.eq (global.get $calls) (i32.const 3)) (then (drop (call $emit (i32.const 16) (i32.const 9) (local.get $pp) (local.get $pl))))) (i32.const 0)";
    let f = load(&module(body, "")).unwrap();
    let mut i = f.new_instance().unwrap();
    let counts: Vec<usize> = (0..4)
        .map(|_| i.invoke("t", b"x").unwrap().records.len())
        .collect();
    assert_eq!(counts, [0, 0, 1, 0]);
    assert_eq!(i.invocations(), 4);
    // A fresh instance starts over.
    let mut fresh = f.new_instance().unwrap();
    assert_eq!(fresh.invoke("t", b"x").unwrap().records.len(), 0);
}

#[test]
fn not_wasm_is_refused_with_the_file_named() {
    let err = load(b"this is not wasm").err().unwrap();
    assert!(matches!(err, LoadError::NotWasm { .. }));
    assert!(err.to_string().contains("test.wasm"), "{err}");
    let err = load(b"\0asm\x01\0\0\0garbage").err().unwrap();
    assert!(matches!(err, LoadError::NotWasm { .. }), "{err}");
}

#[test]
fn a_module_without_the_version_export_is_not_an_edgefn_module() {
    let wasm = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    assert!(abi_error(&wasm).contains("not an edgefn module"));
}

#[test]
fn a_wrong_abi_version_is_refused() {
    let text = String::from_utf8(
        wasmprinter_free_module(ECHO)
            .replace(
                "(i32.const 1))\n  (func (export \"edgefn_alloc\")",
                "(i32.const 2))\n  (func (export \"edgefn_alloc\")",
            )
            .into_bytes(),
    )
    .unwrap();
    let msg = abi_error(&wat::parse_str(&text).unwrap());
    assert!(msg.contains("returned 2"), "{msg}");
}

/// The WAT text of [`module`] (for tests that edit it).
fn wasmprinter_free_module(body: &str) -> String {
    format!(
        r#"(module
  (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "out/topic")
  (func (export "edgefn_abi_version") (result i32) (i32.const 1))
  (func (export "edgefn_alloc") (param $n i32) (result i32) (i32.const 1024))
  (func (export "edgefn_on_message") (param $tp i32) (param $tl i32) (param $pp i32) (param $pl i32) (result i32)
    {body})
)"#
    )
}

#[test]
fn missing_exports_are_named() {
    let text = wasmprinter_free_module(ECHO).replace("\"edgefn_on_message\"", "\"on_message\"");
    let msg = abi_error(&wat::parse_str(&text).unwrap());
    assert!(msg.contains("missing export `edgefn_on_message`"), "{msg}");
    let text = wasmprinter_free_module(ECHO).replace("(export \"memory\")", "");
    let msg = abi_error(&wat::parse_str(&text).unwrap());
    assert!(msg.contains("`memory`"), "{msg}");
}

#[test]
fn a_wasi_command_is_refused() {
    let text = wasmprinter_free_module(ECHO).replace(
        "(memory (export \"memory\") 1)",
        "(memory (export \"memory\") 1) (func (export \"_start\"))",
    );
    assert!(abi_error(&wat::parse_str(&text).unwrap()).contains("_start"));
}

#[test]
fn unknown_imports_are_named() {
    let text = wasmprinter_free_module(ECHO).replace(
        "(memory (export \"memory\") 1)",
        "(import \"edgefn\" \"teleport\" (func)) (memory (export \"memory\") 1)",
    );
    assert!(abi_error(&wat::parse_str(&text).unwrap()).contains("edgefn.teleport"));
    let text = wasmprinter_free_module(ECHO).replace(
        "(memory (export \"memory\") 1)",
        "(import \"env\" \"socket\" (func)) (memory (export \"memory\") 1)",
    );
    assert!(abi_error(&wat::parse_str(&text).unwrap()).contains("env.socket"));
}

#[test]
fn an_out_of_bounds_pointer_fails_only_that_invocation() {
    let body = "(if (i32.eq (local.get $pl) (i32.const 3)) (then (drop (call $emit (i32.const 0x7ffffff0) (i32.const 100) (i32.const 0) (i32.const 0))))) (drop (call $emit (i32.const 16) (i32.const 9) (local.get $pp) (local.get $pl))) (i32.const 0)";
    let f = load(&module(body, "")).unwrap();
    let mut i = f.new_instance().unwrap();
    let err = i.invoke("t", b"bad").unwrap_err();
    assert!(
        matches!(&err, Failure::Trap(m) if m.contains("out-of-bounds")),
        "{err}"
    );
    // A fresh instance of the same function carries on.
    let mut i = f.new_instance().unwrap();
    assert_eq!(i.invoke("t", b"good").unwrap().records.len(), 1);
}

#[test]
fn a_runaway_loop_times_out() {
    let f = Runtime::new(Target::Native)
        .unwrap()
        .load(
            "spin.wasm",
            &module("(loop $l (br $l)) (i32.const 0)", ""),
            spec(50),
        )
        .unwrap();
    let err = f.new_instance().unwrap().invoke("t", b"").unwrap_err();
    assert!(matches!(err, Failure::Timeout(_)), "{err}");
}

/// Loops once per payload byte, then returns 0.
const LOOP_PER_BYTE: &str = "(block $done (loop $l
      (br_if $done (i32.eqz (local.get $pl)))
      (local.set $pl (i32.sub (local.get $pl) (i32.const 1)))
      (br $l)))
    (i32.const 0)";

/// A function running `body` with a fuel budget and a generous timeout.
fn with_fuel(body: &str, fuel: u64) -> Function {
    let spec = FunctionSpec {
        fuel: Some(fuel),
        ..spec(10_000)
    };
    Runtime::new(Target::Native)
        .unwrap()
        .load("fuel.wasm", &module(body, ""), spec)
        .unwrap()
}

#[test]
fn a_fuel_budget_stops_a_runaway_loop_long_before_its_timeout() {
    let f = with_fuel("(loop $l (br $l)) (i32.const 0)", 100_000);
    let err = f.new_instance().unwrap().invoke("t", b"").unwrap_err();
    // Stopped by the budget, not the 10 s timeout.
    assert_eq!(err, Failure::OutOfFuel(100_000));
    assert_eq!(err.kind(), "fuel");
}

#[test]
fn fuel_use_is_the_same_for_the_same_input_and_the_budget_is_per_invocation() {
    let f = with_fuel(LOOP_PER_BYTE, 10_000);
    let mut i = f.new_capturing_instance().unwrap();
    let used = |i: &mut Instance, payload: &[u8]| {
        let r = i.invoke_report("t", payload);
        assert!(r.result.is_ok(), "{:?}", r.result);
        r.fuel_used.unwrap()
    };
    let short = used(&mut i, &[0; 10]);
    assert_eq!(used(&mut i, &[0; 10]), short);
    let long = used(&mut i, &[0; 100]);
    assert!(long > short, "{long} <= {short}");
    // Many invocations in a row each get the whole budget again.
    for _ in 0..100 {
        assert_eq!(used(&mut i, &[0; 100]), long);
    }
    // An input that needs more than the budget fails, deterministically.
    for _ in 0..2 {
        let err = f.new_instance().unwrap().invoke("t", &[0; 10_000]);
        assert_eq!(err.unwrap_err(), Failure::OutOfFuel(10_000));
    }
}

#[test]
fn memory_cannot_grow_past_the_limit() {
    // Grows by 32 pages (2 MiB) and traps if growth failed: the limit is 1 MiB.
    let body = "(if (i32.eq (memory.grow (i32.const 32)) (i32.const -1)) (then unreachable)) (i32.const 0)";
    let f = load(&module(body, "")).unwrap();
    let err = f.new_instance().unwrap().invoke("t", b"").unwrap_err();
    assert!(matches!(err, Failure::Trap(_)), "{err}");
    // Within the limit it works.
    let body =
        "(if (i32.eq (memory.grow (i32.const 4)) (i32.const -1)) (then unreachable)) (i32.const 0)";
    let f = load(&module(body, "")).unwrap();
    f.new_instance().unwrap().invoke("t", b"").unwrap();
}

#[test]
fn a_non_zero_return_carries_the_error_message_and_discards_emits() {
    let body = "(drop (call $emit (i32.const 16) (i32.const 9) (local.get $pp) (local.get $pl))) (call $set_error (i32.const 25) (i32.const 4)) (i32.const 7)";
    let f = load(&module(body, "")).unwrap();
    let err = f.new_instance().unwrap().invoke("t", b"x").unwrap_err();
    assert_eq!(
        err,
        Failure::Returned {
            code: 7,
            message: Some("boom".into())
        }
    );
}

#[test]
fn emit_refuses_bad_topics_and_large_payloads_with_codes() {
    // Returns emit's status: topic "out/" + "+" is invalid.
    let body = "(call $emit (local.get $tp) (local.get $tl) (local.get $pp) (local.get $pl)) (i32.const -1) (i32.ne) (if (then (return (i32.const 99)))) (i32.const 0)";
    let f = load(&module(body, "")).unwrap();
    let mut i = f.new_instance().unwrap();
    assert_eq!(i.invoke("a/+", b"x").map(|o| o.records.len()), Ok(0));
    let body = "(call $emit (i32.const 16) (i32.const 9) (local.get $pp) (local.get $pl)) (i32.const -2) (i32.ne) (if (then (return (i32.const 99)))) (i32.const 0)";
    let f = load(&module(body, "")).unwrap();
    let mut i = f.new_instance().unwrap();
    let big = vec![b'x'; 2048];
    assert_eq!(i.invoke("t", &big).map(|o| o.records.len()), Ok(0));
}

#[test]
fn guest_logs_are_captured_for_invoke() {
    let body = "(call $log (i32.const 3) (i32.const 25) (i32.const 4)) (i32.const 0)";
    let f = load(&module(body, "")).unwrap();
    let mut i = f.new_capturing_instance().unwrap();
    let r = i.invoke_report("t", b"");
    assert!(r.result.is_ok());
    assert_eq!(
        r.logs,
        [GuestLog {
            level: LogLevel::Warn,
            stream: "log",
            message: "boom".into()
        }]
    );
}

#[test]
fn the_pulley_interpreter_runs_the_same_module() {
    let rt = Runtime::new(Target::Pulley).unwrap();
    let f = rt.load("echo.wasm", &module(ECHO, ""), spec(1000)).unwrap();
    let out = f
        .new_instance()
        .unwrap()
        .invoke("t", b"via pulley")
        .unwrap();
    assert_eq!(out.records[0].payload, b"via pulley");
}

#[test]
fn a_pool_retries_on_fresh_instances_then_reports_failure() {
    // Fails when the payload is "bad"; succeeds otherwise.
    let body = "(if (i32.eq (i32.load8_u (local.get $pp)) (i32.const 98)) (then unreachable)) (drop (call $emit (i32.const 16) (i32.const 9) (local.get $pp) (local.get $pl))) (i32.const 0)";
    let f = Arc::new(load(&module(body, "")).unwrap());
    let pool = Pool::start(f, 2, 2, Default::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let bad = pool.submit("t".into(), "bad".into()).await.await.unwrap();
        let Outcome::Failed { attempts, failure } = bad else {
            panic!("expected a failure")
        };
        assert_eq!(attempts, 3);
        assert_eq!(failure.kind(), "trap");
        let good = pool.submit("t".into(), "good".into()).await.await.unwrap();
        assert!(matches!(good, Outcome::Ok(o) if o.records.len() == 1));
    });
    let m = pool.metrics().clone();
    assert_eq!(m.failures.load(Ordering::Relaxed), 3);
    assert_eq!(m.dead_letters.load(Ordering::Relaxed), 1);
    pool.shutdown();
}

/// A module whose handler runs `body` with WASI's `poll_oneoff` and
/// `fd_read` imported as `$poll` and `$read`; `init` is the body of its
/// `edgefn_init` (it returns 0 after it). Emits `out/topic` from data at 16.
fn wasi_module(body: &str, init: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "out/topic")
  (func (export "edgefn_abi_version") (result i32) (i32.const 1))
  (func (export "edgefn_alloc") (param $n i32) (result i32) (i32.const 1024))
  (func (export "edgefn_init") (result i32) {init} (i32.const 0))
  (func (export "edgefn_on_message") (param $tp i32) (param $tl i32) (param $pp i32) (param $pl i32) (result i32)
    {body})
)"#
    );
    wat::parse_str(text).expect("valid WAT")
}

/// Subscribes to one clock at 2048 (`flags` 0: relative, 1: absolute;
/// `ns` nanoseconds) and waits in `poll_oneoff`; then emits (so a wait
/// that ends on its own is seen as a success).
fn clock_wait(flags: i32, ns: i64) -> String {
    format!(
        "(i64.store (i32.const 2048) (i64.const 7))
         (i32.store8 (i32.const 2056) (i32.const 0))
         (i32.store (i32.const 2064) (i32.const 1))
         (i64.store (i32.const 2072) (i64.const {ns}))
         (i64.store (i32.const 2080) (i64.const 0))
         (i32.store16 (i32.const 2088) (i32.const {flags}))
         (drop (call $poll (i32.const 2048) (i32.const 2304) (i32.const 1) (i32.const 2400)))"
    )
}

/// An hour, in nanoseconds.
const HOUR_NS: i64 = 3_600_000_000_000;

fn load_wasi(body: &str, init: &str, timeout_ms: u64) -> Result<Function, LoadError> {
    Runtime::new(Target::Native).unwrap().load(
        "wasi.wasm",
        &wasi_module(body, init),
        spec(timeout_ms),
    )
}

#[test]
fn a_guest_sleeping_in_wasi_fails_with_timeout_at_its_limit() {
    // `sleep(3600)` in C or Rust: one relative clock in poll_oneoff.
    let body = format!("{} (i32.const 0)", clock_wait(0, HOUR_NS));
    let f = load_wasi(&body, "", 100).unwrap();
    let mut i = f.new_instance().unwrap();
    assert_eq!(
        i.invoke("t", b"").unwrap_err(),
        Failure::Timeout(Duration::from_millis(100))
    );
    // A fresh instance works as before: the abandoned one held nothing.
    let short = format!(
        "{} (call $emit (i32.const 16) (i32.const 9) (i32.const 16) (i32.const 9)) (drop) (i32.const 0)",
        clock_wait(0, 1_000_000)
    );
    let f = load_wasi(&short, "", 1000).unwrap();
    let out = f.new_instance().unwrap().invoke("t", b"").unwrap();
    assert_eq!(out.records.len(), 1, "a 1 ms sleep ends on its own");
}

#[test]
fn a_guest_waiting_for_a_clock_time_far_ahead_fails_with_timeout() {
    // An absolute monotonic deadline, as a `clock_nanosleep(TIMER_ABSTIME)`.
    let body = format!("{} (i32.const 0)", clock_wait(1, i64::MAX));
    let f = load_wasi(&body, "", 100).unwrap();
    let err = f.new_instance().unwrap().invoke("t", b"").unwrap_err();
    assert_eq!(err.kind(), "timeout", "{err}");
}

#[test]
fn stdin_is_empty_so_reading_it_never_waits() {
    // fd_read(0) into 64 bytes at 3072 (iovec at 2560, count at 2600):
    // emits the count it read as one byte at 2600 (0 = end of input).
    let body = "(i32.store (i32.const 2560) (i32.const 3072))
        (i32.store (i32.const 2564) (i32.const 64))
        (drop (call $read (i32.const 0) (i32.const 2560) (i32.const 1) (i32.const 2600)))
        (drop (call $emit (i32.const 16) (i32.const 9) (i32.const 2600) (i32.const 1)))
        (i32.const 0)";
    let f = load_wasi(body, "", 1000).unwrap();
    let out = f.new_instance().unwrap().invoke("t", b"").unwrap();
    assert_eq!(out.records[0].payload, [0]);
}

#[test]
fn an_instance_whose_init_sleeps_fails_to_start_at_its_timeout() {
    let init = clock_wait(0, HOUR_NS);
    match load_wasi("(i32.const 0)", &init, 100) {
        Err(LoadError::Start { reason, .. }) => {
            assert!(reason.contains("edgefn_init timed out"), "{reason}")
        }
        Err(e) => panic!("expected a start failure, got {e}"),
        Ok(_) => panic!("an init that sleeps an hour started"),
    }
}

#[test]
fn emits_are_bounded_in_bytes_per_invocation_and_topics_by_the_prefix() {
    // Emits the payload three times and returns emit's codes as digits,
    // negated: 0 accepted, 4 for -4, 1 for -1.
    let body = "(global.set $codes (i32.sub (i32.const 0) (call $emit (i32.const 16) (i32.const 9) (local.get $pp) (local.get $pl))))
        (global.set $codes (i32.add (i32.mul (global.get $codes) (i32.const 10)) (i32.sub (i32.const 0) (call $emit (i32.const 16) (i32.const 9) (local.get $pp) (local.get $pl)))))
        (global.set $codes (i32.add (i32.mul (global.get $codes) (i32.const 10)) (i32.sub (i32.const 0) (call $emit (i32.const 16) (i32.const 9) (local.get $pp) (local.get $pl)))))
        (call $set_error (i32.const 16) (i32.const 0))
        (global.get $codes)";
    let codes = "(global $codes (mut i32) (i32.const 0))";
    let bounded = FunctionSpec {
        // Two records of 9 + 91 bytes fit, a third does not.
        max_emit_bytes: 250,
        ..spec(1000)
    };
    let f = Runtime::new(Target::Native)
        .unwrap()
        .load("bytes.wasm", &module(body, codes), bounded)
        .unwrap();
    let err = f
        .new_instance()
        .unwrap()
        .invoke("t", &[b'x'; 91])
        .unwrap_err();
    assert_eq!(
        err,
        Failure::Returned {
            code: 4,
            message: Some(String::new())
        }
    );
    // Each invocation gets the whole allowance again.
    let mut i = f.new_instance().unwrap();
    for _ in 0..3 {
        assert!(i.invoke("t", &[b'x'; 40]).is_ok());
    }
    // With a prefix of 65,530 bytes, "out/topic" (9) no longer fits: -1.
    let prefixed = FunctionSpec {
        max_topic_len: MAX_TOPIC_LEN - 65_530,
        ..spec(1000)
    };
    let f = Runtime::new(Target::Native)
        .unwrap()
        .load("topic.wasm", &module(body, codes), prefixed)
        .unwrap();
    let err = f.new_instance().unwrap().invoke("t", b"x").unwrap_err();
    assert_eq!(
        err,
        Failure::Returned {
            code: 111,
            message: Some(String::new())
        }
    );
}

#[test]
fn log_lines_are_cut_and_a_flood_is_suppressed_with_a_count() {
    // 300 log calls of 8 KiB each (zeros: memory from 8192 on).
    let body = "(local.set $pl (i32.const 300))
        (block $done (loop $l
          (br_if $done (i32.eqz (local.get $pl)))
          (call $log (i32.const 2) (i32.const 8192) (i32.const 8192))
          (local.set $pl (i32.sub (local.get $pl) (i32.const 1)))
          (br $l)))
        (i32.const 0)";
    let limited = FunctionSpec {
        log_rate_limit: 50,
        ..spec(10_000)
    };
    let f = Runtime::new(Target::Native)
        .unwrap()
        .load("flood.wasm", &module(body, ""), limited)
        .unwrap();
    let mut i = f.new_capturing_instance().unwrap();
    let r = i.invoke_report("t", b"");
    assert!(r.result.is_ok(), "{:?}", r.result);
    let lines: Vec<&GuestLog> = r.logs.iter().filter(|l| l.stream == "log").collect();
    // The bucket holds a second's worth, 50 lines; a few more may be
    // refilled while the loop runs, never all 300.
    assert!((50..300).contains(&lines.len()), "{} lines", lines.len());
    assert!(lines.iter().all(|l| l.message.len() <= MAX_LOG_LINE + 40));
    assert!(
        lines[0]
            .message
            .ends_with(&format!(" [{} more bytes cut]", 8192 - MAX_LOG_LINE))
    );
    assert_eq!(f.log_lines_suppressed(), 300 - lines.len() as u64);
    let notices: Vec<&GuestLog> = r.logs.iter().filter(|l| l.stream == "edgefn").collect();
    assert!(!notices.is_empty());
    assert!(notices.iter().all(|n| {
        n.level == LogLevel::Warn
            && n.message
                .ends_with(" log lines suppressed (log_rate_limit is 50 lines per second)")
    }));
}
