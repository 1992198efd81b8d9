//! The command line as a user meets it: `edgefn check`, `edgefn run` with
//! bad input, and `edgefn invoke`.

use std::path::Path;

use testkit::*;

/// A config whose one function uses `module`, in `dir`.
fn config_with_module(dir: &Path, module: &Path) -> String {
    let file = ConfigFile {
        gateway: GatewayTable {
            id: "pi-01".into(),
            data_dir: Some("data".into()),
        },
        local: local_table(Local::Broker("mqtt://127.0.0.1:1".into())),
        functions: vec![FunctionManifest {
            name: "f".into(),
            module: Some(module.display().to_string()),
            triggers: vec!["sensors/#".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let path = write_config(dir, &file);
    path.to_str().unwrap().to_owned()
}

#[test]
fn check_accepts_a_good_config_and_summarises_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = standard_config(
        dir.path(),
        Local::Broker("mqtt://127.0.0.1:1883".into()),
        1884,
    );
    let out = edgefn(&["check", "--config", cfg.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("function clean-temperature ok: module"), "{t}");
    assert!(t.contains("function chaos ok: module"), "{t}");
    // Each function's limits, as configured or defaulted, and the memory
    // an instance has once started.
    let line = t
        .lines()
        .find(|l| l.contains("timeout 100ms"))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(line.contains("memory 16.0 MiB ("), "{t}");
    assert!(
        line.contains(
            " MiB in use at start), timeout 100ms, concurrency 2, retries 0, fuel unlimited"
        ),
        "{t}"
    );
    assert!(
        t.contains("timeout 200ms, concurrency 1, retries 1, fuel 2000000"),
        "{t}"
    );
    assert!(t.contains("upstream mqtt://127.0.0.1:1884"), "{t}");
}

#[cfg(feature = "embedded-broker")]
#[test]
fn check_stops_a_built_in_broker_off_loopback_that_takes_nobody_and_warns_of_one_that_takes_anybody()
 {
    let dir = tempfile::tempdir().unwrap();
    let check = |file: &ConfigFile| {
        let cfg = write_config(dir.path(), file);
        let out = edgefn(&["check", "--config", cfg.to_str().unwrap()]);
        (out.status.success(), text(&out))
    };
    let mut file = standard(dir.path(), Local::Embedded(1883), 1884);
    let (ok, t) = check(&file);
    assert!(ok && !t.contains("warning"), "{t}");
    assert!(
        t.contains("local    embedded broker on 127.0.0.1:1883, holding at most 32.0 MiB for subscribers (8.0 MiB per session); no users, anonymous clients, any topic"),
        "{t}"
    );

    file.local.listen = Some("0.0.0.0:1883".into());
    let (ok, t) = check(&file);
    assert!(!ok, "{t}");
    assert!(
        t.contains("local.password_file: is missing: the built-in broker on 0.0.0.0:1883 takes no client without a user name")
            && t.contains("mosquitto_passwd -c FILE USER"),
        "{t}"
    );

    file.local.allow_anonymous = Some(true);
    let (ok, t) = check(&file);
    assert!(ok, "{t}");
    assert!(
        t.contains("warning: local.allow_anonymous: the built-in broker on 0.0.0.0:1883 takes clients without a user name from the network"),
        "{t}"
    );

    let passwd = dir.path().join("passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b", passwd.to_str().unwrap(), "dev1", "s3cret"])
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::write(dir.path().join("acl"), "pattern write sensors/%c/#\n").unwrap();
    file.local.allow_anonymous = None;
    file.local.password_file = Some("passwd".into());
    file.local.acl_file = Some("acl".into());
    let (ok, t) = check(&file);
    assert!(ok && !t.contains("warning"), "{t}");
    assert!(
        t.contains(&format!(
            "users of {}, no anonymous client, rights from {}",
            passwd.display(),
            dir.path().join("acl").display()
        )),
        "{t}"
    );

    // User lines need proven user names.
    file.local.password_file = None;
    file.local.allow_anonymous = Some(true);
    std::fs::write(dir.path().join("acl"), "user dev1\ntopic sensors/#\n").unwrap();
    let (ok, t) = check(&file);
    assert!(
        !ok && t
            .contains("local.acl_file: has user lines or %u patterns, but without password_file"),
        "{t}"
    );
    file.local.password_file = Some("passwd".into());
    file.local.allow_anonymous = None;

    // Wrong lines are named by file and line, all at once.
    std::fs::write(&passwd, "dev1:plain\n").unwrap();
    std::fs::write(dir.path().join("acl"), "topic read a/#/b\n").unwrap();
    let (ok, t) = check(&file);
    assert!(!ok, "{t}");
    assert!(
        t.contains("local.password_file: line 1: user \"dev1\": the password is not hashed"),
        "{t}"
    );
    assert!(t.contains("local.acl_file: line 1: \"a/#/b\""), "{t}");
}

#[test]
fn check_and_run_stop_on_malformed_toml_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_text(dir.path(), "[gateway\nid = ");
    for cmd in ["check", "run"] {
        let out = edgefn(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(text(&out).contains("edgefn.toml"), "{cmd}: {}", text(&out));
    }
}

#[test]
fn an_unknown_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = standard_config(
        dir.path(),
        Local::Broker("mqtt://127.0.0.1:1883".into()),
        1884,
    );
    // A typo no typed config can make: written as text.
    let text_cfg = std::fs::read_to_string(&cfg).unwrap();
    let text_cfg = text_cfg.replacen("[buffer]\n", "[buffer]\nmax_sixe = 3\n", 1);
    assert!(text_cfg.contains("max_sixe"));
    write_config_text(dir.path(), &text_cfg);
    for cmd in ["check", "run"] {
        let out = edgefn(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(text(&out).contains("max_sixe"), "{cmd}: {}", text(&out));
    }
}

#[test]
fn check_reports_every_bad_value_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = standard(
        dir.path(),
        Local::Broker("mqtt://127.0.0.1:1883".into()),
        1884,
    );
    let clean = file.function_mut("clean-temperature");
    clean.timeout = Some("fast".into());
    clean.memory_limit = Some("lots".into());
    let cfg = write_config(dir.path(), &file);
    let out = edgefn(&["check", "--config", cfg.to_str().unwrap()]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("functions[0].timeout: \"fast\" is not a duration"),
        "{t}"
    );
    assert!(
        t.contains("functions[0].memory_limit: \"lots\" is not a size"),
        "{t}"
    );
}

#[test]
fn a_missing_module_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_module(dir.path(), &dir.path().join("nowhere.wasm"));
    for cmd in ["check", "run"] {
        let out = edgefn(&[cmd, "--config", &cfg]);
        assert!(!out.status.success());
        let t = text(&out);
        assert!(
            t.contains("nowhere.wasm") && t.contains("cannot read"),
            "{cmd}: {t}"
        );
    }
}

#[test]
fn a_module_that_is_not_wasm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("notes.wasm");
    std::fs::write(&module, "these are not the bytes you are looking for").unwrap();
    let cfg = config_with_module(dir.path(), &module);
    let out = edgefn(&["check", "--config", &cfg]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("notes.wasm is not a valid WebAssembly module"),
        "{t}"
    );
}

#[test]
fn a_module_with_the_wrong_abi_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("v2.wasm");
    let wasm = wat::parse_str(
        r#"(module
            (memory (export "memory") 1)
            (func (export "edgefn_abi_version") (result i32) (i32.const 2))
            (func (export "edgefn_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32) (i32.const 0)))"#,
    )
    .unwrap();
    std::fs::write(&module, wasm).unwrap();
    let cfg = config_with_module(dir.path(), &module);
    for cmd in ["check", "run"] {
        let out = edgefn(&[cmd, "--config", &cfg]);
        assert!(!out.status.success());
        let t = text(&out);
        assert!(
            t.contains("v2.wasm") && t.contains("returned 2"),
            "{cmd}: {t}"
        );
    }
}

#[test]
fn a_module_missing_an_export_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("partial.wasm");
    let wasm = wat::parse_str(
        r#"(module
            (memory (export "memory") 1)
            (func (export "edgefn_abi_version") (result i32) (i32.const 1))
            (func (export "edgefn_alloc") (param i32) (result i32) (i32.const 0)))"#,
    )
    .unwrap();
    std::fs::write(&module, wasm).unwrap();
    let cfg = config_with_module(dir.path(), &module);
    let out = edgefn(&["check", "--config", &cfg]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("missing export `edgefn_on_message`"),
        "{}",
        text(&out)
    );
}

#[test]
fn invoke_shows_what_a_function_emitted() {
    let m = module("clean_temperature");
    let out = edgefn(&[
        "invoke",
        m.to_str().unwrap(),
        "--topic",
        "sensors/pi-7/temperature",
        "--payload",
        r#"{"temp_c":25,"seq":3}"#,
        "--env",
        "UNIT=F",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(r#"emit    telemetry/pi-7/temperature {"temp_c":25,"seq":3,"temp_f":77,"device":"pi-7"}"#),
        "{t}"
    );
    assert!(t.contains("ok      1 record(s)"), "{t}");
}

#[test]
fn invoke_starts_from_a_given_state_and_prints_the_state_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(
        &state,
        r#"{"devices": "[\"pi-7\"]", "window/pi-7": "{\"count\":1,\"min\":20,\"max\":20,\"sum\":20,\"from_ms\":1000}"}"#,
    )
    .unwrap();
    let m = module("aggregate");
    let run = |topic: &str, payload: &str| {
        let out = edgefn(&[
            "invoke",
            m.to_str().unwrap(),
            "--topic",
            topic,
            "--payload",
            payload,
            "--state",
            state.to_str().unwrap(),
        ]);
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        t
    };
    let t = run("sensors/pi-7/temperature", r#"{"temp_c":22}"#);
    assert!(t.contains("ok      0 record(s)"), "{t}");
    assert!(
        t.contains(
            r#""window/pi-7": "{\"count\":2,\"min\":20,\"max\":22,\"sum\":42,\"from_ms\":1000}""#
        ),
        "{t}"
    );
    // A scheduled run, from the same state: the summary, the window closed.
    let t = run(
        "$edgefn/schedule/aggregate",
        r#"{"scheduled_ms":61000,"now_ms":61001}"#,
    );
    assert!(
        t.contains(r#"emit    summary/pi-7/temperature {"device":"pi-7","count":1,"min":20,"max":20,"mean":20,"from_ms":1000,"to_ms":61000}"#),
        "{t}"
    );
    assert!(!t.contains("window/pi-7"), "{t}");
    // Not a JSON object: the error says what is expected.
    std::fs::write(&state, "[1, 2]").unwrap();
    let out = edgefn(&[
        "invoke",
        m.to_str().unwrap(),
        "--topic",
        "t",
        "--state",
        state.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is not a JSON object of state keys and values"),
        "{}",
        text(&out)
    );
}

#[test]
fn invoke_reads_a_payload_file_and_shows_logs() {
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("reading.json");
    std::fs::write(&payload, r#"{"temp_c":300}"#).unwrap();
    let m = module("clean_temperature");
    let out = edgefn(&[
        "invoke",
        m.to_str().unwrap(),
        "-t",
        "sensors/x/temperature",
        "-p",
        &format!("@{}", payload.display()),
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("WARN") && t.contains("outside -40..=85"), "{t}");
    assert!(t.contains("ok      0 record(s)"), "{t}");
}

#[test]
fn invoke_reports_a_failing_function_with_a_non_zero_exit() {
    let m = module("chaos");
    let short: &[&str] = &["--timeout", "100ms"];
    // A fuel budget stops a runaway loop, deterministically, long before
    // its (here absurd) timeout.
    let fuel: &[&str] = &["--timeout", "1h", "--fuel", "1000000"];
    for (payload, limits, expect) in [
        ("trap", short, "trapped"),
        ("spin", short, "timed out"),
        ("spin", fuel, "ran out of fuel (budget is 1000000)"),
        ("badptr", short, "out-of-bounds"),
        ("fail", short, "returned 1: asked to fail"),
        // An hour asleep in WASI poll_oneoff: stopped at the timeout.
        ("sleep", short, "timed out (timeout is 100ms)"),
    ] {
        let mut args = vec![
            "invoke",
            m.to_str().unwrap(),
            "--topic",
            "chaos/t",
            "--payload",
            payload,
        ];
        args.extend_from_slice(limits);
        let out = edgefn(&args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{payload}: {t}");
        assert!(
            t.contains(expect) && t.contains("nothing it emitted is kept"),
            "{payload}: {t}"
        );
    }
}

#[test]
fn invoke_runs_on_the_pulley_interpreter_too() {
    let m = module("clean_temperature");
    let out = edgefn(&[
        "invoke",
        m.to_str().unwrap(),
        "--topic",
        "sensors/pz/temperature",
        "--payload",
        r#"{"temp_c":-5}"#,
        "--pulley",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(r#"{"temp_c":-5,"device":"pz"}"#), "{t}");
}

#[test]
fn invoke_shows_the_fuel_used_and_that_budget_is_exactly_enough() {
    let m = module("clean_temperature");
    let run = |fuel: Option<u64>| {
        let mut args = vec![
            "invoke".to_owned(),
            m.to_str().unwrap().to_owned(),
            "--topic".into(),
            "sensors/pi-7/temperature".into(),
            "--payload".into(),
            r#"{"temp_c":25}"#.into(),
        ];
        if let Some(f) = fuel {
            args.extend(["--fuel".to_owned(), f.to_string()]);
        }
        let out = edgefn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        (out.status.code(), text(&out))
    };
    let (code, t) = run(None);
    assert_eq!(code, Some(0), "{t}");
    let used: u64 = t
        .lines()
        .find_map(|l| l.strip_prefix("fuel    "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fuel line: {t}"));
    assert!(used > 0, "{t}");

    let (code, t) = run(Some(used));
    assert_eq!(code, Some(0), "{t}");
    assert!(
        t.contains(&format!("fuel    {used} of a budget of {used}")),
        "{t}"
    );

    let (code, t) = run(Some(used - 1));
    assert_eq!(code, Some(1), "{t}");
    assert!(
        t.contains(&format!("ran out of fuel (budget is {})", used - 1)),
        "{t}"
    );
}

#[test]
fn invoke_applies_the_gateways_bounds_on_bytes_emitted_and_log_lines() {
    let m = module("chaos");
    let m = m.to_str().unwrap();
    // What `edgefn invoke` printed, without the (long) emitted payloads.
    let run = |payload: &str| {
        let out = edgefn(&["invoke", m, "--topic", "chaos/t", "--payload", payload]);
        let t = text(&out);
        let short: Vec<&str> = t.lines().map(|l| &l[..l.len().min(120)]).collect();
        assert_eq!(out.status.code(), Some(0), "{payload}: {short:?}");
        t
    };
    // 32 records of 65,000 bytes tried; 1 MiB (the default
    // max_emit_bytes, topics counted) holds 16.
    let bulk = run("bulk");
    assert!(bulk.contains("ok      16 record(s)"), "{bulk}");
    assert!(
        bulk.contains("record 16 refused: too many bytes emitted in this invocation (code -4)"),
        "{bulk}"
    );
    // 1000 lines of 10,000 bytes: cut to 4096 bytes each, and beyond the
    // default 100 lines per second suppressed, with a count.
    let chatty = run("chatty");
    let lines: Vec<&str> = chatty
        .lines()
        .filter(|l| l.contains("chaos chatty"))
        .collect();
    assert!((100..1000).contains(&lines.len()), "{} lines", lines.len());
    assert!(lines.iter().all(|l| l.ends_with("more bytes cut]")));
    assert!(chatty.contains("log lines suppressed (log_rate_limit is 100 lines per second)"));
    // stdin is empty: a read ends at once.
    assert!(run("stdin").contains("emit    chaos/stdin 0"));
}

#[test]
fn keygen_writes_a_key_only_its_owner_reads_and_never_overwrites_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fleet.key");
    let out = edgefn(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let public = String::from_utf8(out.stdout).unwrap();
    assert!(
        edgefn::keys::parse_public_key(public.trim()).is_ok(),
        "{public}"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let before = std::fs::read(&key).unwrap();
    let again = edgefn(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(text(&again).contains("File exists"), "{}", text(&again));
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn deploy_seals_a_bundle_a_gateway_accepts_and_refuses_what_a_gateway_would() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let out = edgefn(&["keygen", "--out", &path("fleet.key")]);
    let public = String::from_utf8(out.stdout).unwrap();
    let clean = module("clean_temperature");
    let clean = clean.to_str().unwrap();
    let out = edgefn(&[
        "deploy",
        clean,
        "--name",
        "clean-temperature",
        "--trigger",
        "sensors/+/temperature",
        "--env",
        "UNIT=F",
        "--timeout",
        "100ms",
        "--version",
        "7",
        "--min-version",
        "5",
        "--expires",
        "1h",
        "--rollback",
        "never",
        "--group",
        "site-a",
        "--signing-key",
        &path("fleet.key"),
        "--output",
        &path("b.cbor"),
    ]);
    let signed_at = edgefn::clock::now_ms();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("clean-temperature v7"),
        "{}",
        text(&out)
    );
    let verifier = edgefn::bundle::Verifier {
        trusted_keys: vec![edgefn::keys::parse_public_key(public.trim()).unwrap()],
        allow_unsigned: false,
        gateway_id: "pi-01".into(),
        groups: vec!["site-a".into()],
        max_size: 1 << 20,
    };
    let body = edgefn::bundle::open(&std::fs::read(path("b.cbor")).unwrap(), &verifier).unwrap();
    assert_eq!((body.name(), body.version), ("clean-temperature", 7));
    assert_eq!(body.min_version, Some(5));
    let end = body.expires_ms.unwrap();
    assert!(
        (signed_at - 60_000 + 3_600_000..=signed_at + 3_600_000).contains(&end),
        "{end} is not an hour after {signed_at}"
    );
    let edgefn::bundle::Change::Deploy {
        manifest, module, ..
    } = body.change
    else {
        panic!("a deploy")
    };
    assert_eq!(manifest.env.get("UNIT").map(String::as_str), Some("F"));
    assert_eq!(manifest.rollback.as_deref(), Some("never"));
    assert_eq!(module, std::fs::read(clean).unwrap());

    // A manifest file holding a [[functions]] table, its module relative to it.
    std::fs::copy(clean, dir.path().join("f.wasm")).unwrap();
    std::fs::write(
        dir.path().join("f.toml"),
        "[[functions]]\nname = \"f\"\nmodule = \"f.wasm\"\ntriggers = [\"a/#\"]\nconcurrency = 2\n",
    )
    .unwrap();
    let out = edgefn(&[
        "deploy",
        "--manifest",
        &path("f.toml"),
        "--concurrency",
        "3",
        "--gateway",
        "pi-01",
        "--unsigned",
        "--output",
        &path("f.cbor"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let lax = edgefn::bundle::Verifier {
        allow_unsigned: true,
        ..verifier
    };
    let body = edgefn::bundle::open(&std::fs::read(path("f.cbor")).unwrap(), &lax).unwrap();
    let edgefn::bundle::Change::Deploy { manifest, .. } = body.change else {
        panic!("a deploy")
    };
    assert_eq!((manifest.concurrency, manifest.module), (Some(3), None));

    // Refused before anything is written: bad keys, a module that is not
    // one, no target.
    std::fs::write(dir.path().join("bad.wasm"), "garbage").unwrap();
    let bad = path("bad.wasm");
    // A valid deploy of module `c` to gateway `g`, for the cases below to extend.
    let to_g = [
        "deploy",
        clean,
        "--name",
        "c",
        "--trigger",
        "a",
        "--gateway",
        "g",
    ];
    let refused = [
        (
            [&to_g[..], &["--timeout", "soon"]].concat(),
            "manifest.timeout",
        ),
        (
            vec![
                "deploy",
                &bad,
                "--name",
                "c",
                "--trigger",
                "a",
                "--gateway",
                "g",
            ],
            "not a valid WebAssembly module",
        ),
        (
            vec!["deploy", clean, "--name", "c", "--trigger", "a"],
            "no target",
        ),
        (
            [&to_g[..], &["--version", "9223372036854775808"]].concat(),
            "above 9223372036854775807",
        ),
        (
            [&to_g[..], &["--version", "7", "--min-version", "8"]].concat(),
            "min_version 8 is above",
        ),
        (
            [&to_g[..], &["--expires", "soon"]].concat(),
            "expected a duration",
        ),
        (
            [&to_g[..], &["--rollback", "sometimes"]].concat(),
            "rollback",
        ),
    ];
    for (mut args, reason) in refused {
        args.extend(["--unsigned", "--output"]);
        let out_file = path("refused.cbor");
        args.push(&out_file);
        let out = edgefn(&args);
        assert!(!out.status.success());
        assert!(text(&out).contains(reason), "{reason}: {}", text(&out));
        assert!(!dir.path().join("refused.cbor").exists());
    }
}

/// `edgefn demo`, as the README's first command runs it: version 1 of the
/// function deployed through the stand-in cloud before the devices start,
/// version 2 pushed while they publish, and the table showing which runs.
#[cfg(feature = "embedded-broker")]
#[test]
fn the_demo_deploys_the_function_and_upgrades_it_while_readings_flow() {
    let dir = tempfile::tempdir().unwrap();
    let out = edgefn(&[
        "demo",
        "--module",
        module("clean_temperature").to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--devices",
        "2",
        "--outage-after",
        "0s",
        "--upgrade-after",
        "2s",
        "--duration",
        "4s",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("clean-temperature v1 deployed through the cloud broker, signed: running"),
        "{t}"
    );
    assert!(t.contains("v2 runs on demo-pi"), "{t}");
    assert!(
        t.lines().any(|l| l.split_whitespace().last() == Some("v1")),
        "a row with v1 running:\n{t}"
    );
    // Counts go on: acknowledged readings in every row, growing.
    let acked: Vec<u64> = t
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && l.contains("s  "))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert!(acked.len() >= 3, "{t}");
    assert!(acked.windows(2).all(|w| w[0] <= w[1]), "{t}");
    assert!(*acked.last().unwrap() > 0, "{t}");
}
