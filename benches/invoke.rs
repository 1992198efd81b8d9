//! Warm-invocation microbenchmarks: the cost of one call into a warm
//! instance, host side included (input copy, guest call, emitted record).
//!
//! `cargo bench --bench invoke` (build the functions first: functions/build.sh).

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use edgefn::runtime::{Function, FunctionSpec, Runtime, Target};

fn spec() -> FunctionSpec {
    FunctionSpec {
        env: vec![("UNIT".into(), "F".into())],
        memory_limit: Some(16 << 20),
        ..FunctionSpec::new("bench")
    }
}

fn warm(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let echo = wat::parse_file(root.join("functions/wat-example/echo.wat")).expect("echo.wat");
    let clean = std::fs::read(root.join("functions/dist/clean_temperature.wasm"))
        .expect("functions/dist/clean_temperature.wasm (run functions/build.sh)");
    let payload = br#"{"seq":12345,"temp_c":21.5,"ts_us":1764000000000000}"#;
    for (target, label) in [(Target::Native, "cranelift"), (Target::Pulley, "pulley")] {
        let rt = Runtime::new(target).unwrap();
        let f = rt.load("echo.wat", &echo, spec()).unwrap();
        let mut i = f.new_instance().unwrap();
        c.bench_function(
            &format!("warm invocation, trivial (echo.wat), {label}"),
            |b| b.iter(|| i.invoke("sensors/d1/temperature", payload).unwrap()),
        );
        let f = rt.load("clean_temperature.wasm", &clean, spec()).unwrap();
        let mut i = f.new_instance().unwrap();
        c.bench_function(
            &format!("warm invocation, clean-temperature, {label}"),
            |b| b.iter(|| i.invoke("sensors/d1/temperature", payload).unwrap()),
        );
    }
    let rt = Runtime::new(Target::Native).unwrap();
    // The same function as components: CPython and SpiderMonkey per call.
    for (file, label) in [
        ("clean_temperature_py.wasm", "Python component"),
        ("clean_temperature_js.wasm", "JavaScript component"),
    ] {
        let bytes = std::fs::read(root.join("functions/dist").join(file))
            .unwrap_or_else(|_| panic!("functions/dist/{file} (run functions/build.sh)"));
        let component = FunctionSpec {
            memory_limit: None,
            ..spec()
        };
        let f = rt.load(file, &bytes, component).unwrap();
        let mut i = f.new_instance().unwrap();
        // Replaced when worn, as the gateway's workers do (an interpreter's
        // heap only grows): that share of a fresh instance is included.
        c.bench_function(
            &format!("warm invocation, clean-temperature, {label}, cranelift"),
            |b| {
                b.iter(|| {
                    if i.worn() {
                        i = f.new_instance().unwrap();
                    }
                    i.invoke("sensors/d1/temperature", payload).unwrap()
                })
            },
        );
        fresh(
            c,
            &format!("fresh instance + invocation, clean-temperature, {label}, cranelift"),
            &f,
            payload,
        );
    }
    let metered = FunctionSpec {
        fuel: Some(10_000_000),
        ..spec()
    };
    let f = rt.load("clean_temperature.wasm", &clean, metered).unwrap();
    let mut i = f.new_instance().unwrap();
    c.bench_function(
        "warm invocation, clean-temperature, cranelift, with a fuel budget",
        |b| b.iter(|| i.invoke("sensors/d1/temperature", payload).unwrap()),
    );
    let f = rt.load("clean_temperature.wasm", &clean, spec()).unwrap();
    fresh(
        c,
        "fresh instance + invocation, clean-temperature, cranelift",
        &f,
        payload,
    );
}

/// Benchmarks starting an instance of `f` and invoking it once.
fn fresh(c: &mut Criterion, name: &str, f: &Function, payload: &[u8]) {
    c.bench_function(name, |b| {
        b.iter(|| {
            f.new_instance()
                .unwrap()
                .invoke("sensors/d1/temperature", payload)
                .unwrap()
        })
    });
}

criterion_group!(benches, warm);
criterion_main!(benches);
