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
        memory_limit: 1 << 20,
        timeout: Duration::from_millis(timeout_ms),
        max_record_size: 1024,
        fuel: None,
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
    let pool = Pool::start(f, 2, 2).unwrap();
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
