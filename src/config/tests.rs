use super::*;

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("edgefn.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const EXAMPLE: &str = r#"
[gateway]
id = "pi-01"
data_dir = "/var/lib/edgefn"

[local]
url = "mqtt://127.0.0.1:1883"

[upstream]
url = "mqtt://127.0.0.1:1884"
topic_prefix = "site/pi-01/"

[buffer]
max_size = "256MiB"

[[functions]]
name = "clean-temperature"
module = "functions/dist/clean_temperature.wasm"
triggers = ["sensors/+/temperature"]
env = { UNIT = "F" }
memory_limit = "16MiB"
timeout = "100ms"
concurrency = 2
"#;

#[test]
fn the_readme_example_loads() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::load(&write(dir.path(), EXAMPLE)).unwrap();
    assert_eq!(c.gateway.id, "pi-01");
    assert_eq!(c.gateway.data_dir, PathBuf::from("/var/lib/edgefn"));
    let LocalSource::Broker(b) = &c.local.source else {
        panic!("expected an external broker")
    };
    assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 1883));
    assert_eq!(b.client_id, "edgefn-pi-01");
    let up = c.upstream.unwrap();
    assert_eq!(up.broker.port, 1884);
    assert_eq!(up.topic_prefix, "site/pi-01/");
    assert_eq!(c.buffer.max_size, 256 * 1024 * 1024);
    let f = &c.functions[0];
    assert_eq!(f.memory_limit, Some(16 * 1024 * 1024));
    assert_eq!(f.timeout, Duration::from_millis(100));
    assert_eq!(f.concurrency, 2);
    assert_eq!(f.env.get("UNIT").map(String::as_str), Some("F"));
    assert_eq!(
        f.module,
        dir.path().join("functions/dist/clean_temperature.wasm")
    );
}

#[test]
fn a_fuel_budget_is_optional_and_read_as_an_integer() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::load(&write(dir.path(), EXAMPLE)).unwrap();
    assert_eq!(c.functions[0].fuel, None);
    let text = EXAMPLE.replace("concurrency = 2", "concurrency = 2\nfuel = 5_000_000");
    let c = Config::load(&write(dir.path(), &text)).unwrap();
    assert_eq!(c.functions[0].fuel, Some(5_000_000));
}

#[test]
fn an_unknown_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = EXAMPLE.replace("max_size = \"256MiB\"", "max_sise = \"256MiB\"");
    let err = Config::load(&write(dir.path(), &text)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("max_sise"), "{msg}");
}

#[test]
fn malformed_toml_is_reported_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "[gateway\nid = 1");
    let msg = Config::load(&path).unwrap_err().to_string();
    assert!(msg.contains("edgefn.toml"), "{msg}");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = EXAMPLE
        .replace("\"100ms\"", "\"soon\"")
        .replace("\"16MiB\"", "\"lots\"")
        .replace("sensors/+/temperature", "sensors/#/temperature")
        .replace("concurrency = 2", "concurrency = 0\nfuel = 0")
        .replace(
            "max_size = \"256MiB\"",
            "max_size = \"256MiB\"\nfull_policy = \"panic\"",
        );
    let Err(ConfigError::Invalid { problems, .. }) = Config::load(&write(dir.path(), &text)) else {
        panic!("expected semantic problems")
    };
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "buffer.full_policy",
            "functions[0].triggers[0]",
            "functions[0].memory_limit",
            "functions[0].timeout",
            "functions[0].concurrency",
            "functions[0].fuel",
        ]
    );
    assert!(problems[3].message.contains("\"soon\""));
}

#[test]
fn commit_delay_is_off_by_default_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::load(&write(dir.path(), EXAMPLE)).unwrap();
    assert_eq!(c.buffer.commit_delay, Duration::ZERO);
    let with = |v: &str| {
        EXAMPLE.replace(
            "max_size = \"256MiB\"",
            &format!("max_size = \"256MiB\"\ncommit_delay = \"{v}\""),
        )
    };
    let c = Config::load(&write(dir.path(), &with("20ms"))).unwrap();
    assert_eq!(c.buffer.commit_delay, Duration::from_millis(20));
    let c = Config::load(&write(dir.path(), &with("0"))).unwrap();
    assert_eq!(c.buffer.commit_delay, Duration::ZERO);
    for bad in ["2s", "soon"] {
        let Err(ConfigError::Invalid { problems, .. }) =
            Config::load(&write(dir.path(), &with(bad)))
        else {
            panic!("{bad}: expected a problem")
        };
        assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
        assert_eq!(problems[0].key, "buffer.commit_delay");
        assert!(problems[0].message.contains(bad), "{}", problems[0].message);
    }
}

#[test]
fn the_bounds_on_dead_letters_emits_and_logs_have_defaults_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::load(&write(dir.path(), EXAMPLE)).unwrap();
    assert_eq!(
        c.buffer.dead_letters_max_size,
        64 << 20,
        "a quarter of max_size"
    );
    assert_eq!(c.functions[0].max_emit_bytes, 1 << 20);
    assert_eq!(c.functions[0].log_rate_limit, 100);
    let text = EXAMPLE
        .replace(
            "max_size = \"256MiB\"",
            "max_size = \"256MiB\"\ndead_letters_max_size = \"many\"",
        )
        .replace(
            "concurrency = 2",
            "concurrency = 2\nmax_emit_bytes = \"300MiB\"\nlog_rate_limit = 0",
        );
    let Err(ConfigError::Invalid { problems, .. }) = Config::load(&write(dir.path(), &text)) else {
        panic!("expected semantic problems")
    };
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "buffer.dead_letters_max_size",
            "functions[0].max_emit_bytes",
            "functions[0].log_rate_limit",
        ]
    );
}

/// The keys of the semantic problems `text` has.
fn problem_keys(dir: &Path, text: &str) -> Vec<String> {
    match Config::load(&write(dir, text)) {
        Err(ConfigError::Invalid { problems, .. }) => problems.into_iter().map(|p| p.key).collect(),
        other => panic!("expected semantic problems, got {other:?}"),
    }
}

#[test]
fn lambda_controls_are_checked_and_each_problem_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let with =
        |extra: &str| EXAMPLE.replace("concurrency = 2\n", &format!("concurrency = 2\n{extra}\n"));
    let c = Config::load(&write(
        dir.path(),
        &with("schedule = \"cron: 0 */5 * * * *\"\nstate_limit = \"64KiB\"\nemit_allow = [\"clean/#\"]\npublish_allow = [\"devices/+/cmd\"]"),
    ))
    .unwrap();
    let f = &c.functions[0];
    assert!(f.schedule.is_some());
    assert_eq!(f.state_limit, 64 << 10);
    assert_eq!(f.emit_allow.as_ref().unwrap()[0].as_str(), "clean/#");
    assert_eq!(f.publish_allow[0].as_str(), "devices/+/cmd");
    assert_eq!(c.metrics.listen, None);
    for (extra, key) in [
        ("schedule = \"every now and then\"", "functions[0].schedule"),
        ("schedule = \"cron: 0 */5 * * *\"", "functions[0].schedule"),
        ("schedule = \"cron: 0 61 * * * *\"", "functions[0].schedule"),
        ("state_limit = \"lots\"", "functions[0].state_limit"),
        ("emit_allow = [\"a/#/b\"]", "functions[0].emit_allow[0]"),
        (
            "publish_allow = [\"ok\", \"x+\"]",
            "functions[0].publish_allow[1]",
        ),
        (
            "triggers = [\"$edgefn/schedule/x\"]",
            "functions[0].triggers[0]",
        ),
    ] {
        let text = with(extra).replace(
            if extra.starts_with("triggers") {
                "triggers = [\"sensors/+/temperature\"]\n"
            } else {
                "\u{0}"
            },
            "",
        );
        assert_eq!(problem_keys(dir.path(), &text), [key], "{extra}");
    }
    let text = format!("{EXAMPLE}\n[metrics]\nlisten = \"localhost\"\ninterval = \"0s\"\n");
    assert_eq!(
        problem_keys(dir.path(), &text),
        ["metrics.listen", "metrics.interval"]
    );
}

/// A public key as `edgefn keygen` prints it.
fn key() -> String {
    let k = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    crate::keys::public_key_text(&k.verifying_key())
}

#[test]
fn a_deploy_section_takes_keys_and_groups_and_makes_functions_optional() {
    let dir = tempfile::tempdir().unwrap();
    let functions = EXAMPLE.find("[[functions]]").unwrap();
    let key = key();
    let deploy = format!("[deploy]\ngroups = [\"site-a\"]\ntrusted_keys = [\"{key}\"]\n");
    let text = format!("{}{deploy}", &EXAMPLE[..functions]);
    let c = Config::load(&write(dir.path(), &text)).unwrap();
    assert!(c.functions.is_empty());
    let d = c.deploy.unwrap();
    assert_eq!(d.broker, DeployBroker::Upstream);
    assert_eq!(d.groups, ["site-a"]);
    assert_eq!(d.trusted_keys.len(), 1);
    assert!(!d.allow_unsigned);
    assert_eq!(d.max_bundle_size, 32 << 20);

    let bad = format!(
        "{}[deploy]\nbroker = \"cloud\"\ngroups = [\"a/b\", \"\"]\ntrusted_keys = [\"{key}\", \"ed25519:short\"]\nmax_bundle_size = \"1TiB\"\n",
        &EXAMPLE[..functions]
    );
    assert_eq!(
        problem_keys(dir.path(), &bad),
        [
            "deploy.broker",
            "deploy.groups[0]",
            "deploy.groups[1]",
            "deploy.trusted_keys[1]",
            "deploy.max_bundle_size",
        ]
    );
    // No key, no upstream; and without [deploy], functions are needed.
    let upstream = EXAMPLE.find("[upstream]").unwrap();
    let buffer = EXAMPLE.find("[buffer]").unwrap();
    let bare = format!(
        "{}{}[deploy]\n",
        &EXAMPLE[..upstream],
        &EXAMPLE[buffer..functions]
    );
    assert_eq!(
        problem_keys(dir.path(), &bare),
        ["deploy.broker", "deploy.trusted_keys"]
    );
    assert_eq!(
        problem_keys(dir.path(), &EXAMPLE[..functions]),
        ["functions"]
    );
    // The control topics on the embedded broker: refused, it keeps
    // no retained messages.
    const EMBEDDED: &str = "embedded = true\nlisten = \"127.0.0.1:1883\"";
    let embedded = format!(
        "{}[deploy]\nbroker = \"local\"\ntrusted_keys = [\"{key}\"]\n",
        &EXAMPLE[..functions].replace("url = \"mqtt://127.0.0.1:1883\"", EMBEDDED)
    );
    assert_eq!(problem_keys(dir.path(), &embedded), ["deploy.broker"]);
    let external = embedded.replace(EMBEDDED, "url = \"mqtt://127.0.0.1:1883\"");
    let c = Config::load(&write(dir.path(), &external)).unwrap();
    assert_eq!(c.deploy.unwrap().broker, DeployBroker::Local);
    // Unsigned bundles: allowed when asked, with a warning.
    let lax = format!("{}[deploy]\nallow_unsigned = true\n", &EXAMPLE[..functions]);
    let c = Config::load(&write(dir.path(), &lax)).unwrap();
    assert_eq!(c.warnings[0].key, "deploy.allow_unsigned");
}

#[test]
fn a_bundle_manifest_is_checked_like_a_functions_table_without_a_module() {
    let manifest = FunctionManifest {
        name: "clean".into(),
        triggers: vec!["sensors/+/temperature".into()],
        timeout: Some("100ms".into()),
        ..Default::default()
    };
    let f = manifest.clone().check().unwrap();
    assert_eq!(f.timeout, Duration::from_millis(100));
    assert_eq!(f.module, PathBuf::new());
    let bad = FunctionManifest {
        module: Some("x.wasm".into()),
        timeout: Some("soon".into()),
        triggers: vec![],
        ..manifest
    };
    let keys: Vec<String> = bad
        .check()
        .unwrap_err()
        .into_iter()
        .map(|p| p.key)
        .collect();
    assert_eq!(
        keys,
        ["manifest.module", "manifest.triggers", "manifest.timeout"]
    );
    // In the file, the module is required.
    let dir = tempfile::tempdir().unwrap();
    let text = EXAMPLE.replace("module = \"functions/dist/clean_temperature.wasm\"\n", "");
    assert_eq!(problem_keys(dir.path(), &text), ["functions[0].module"]);
}

#[test]
fn embedded_broker_and_url_are_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let text = EXAMPLE.replace(
        "url = \"mqtt://127.0.0.1:1883\"",
        "url = \"mqtt://127.0.0.1:1883\"\nembedded = true",
    );
    let msg = Config::load(&write(dir.path(), &text))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("local.url"), "{msg}");
}

#[test]
fn environment_overrides_name_a_section() {
    // Both variables are read by this test only.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), EXAMPLE);
    // SAFETY: tests in this module do not read these variables concurrently.
    unsafe {
        std::env::set_var("EDGEFN_UPSTREAM__PASSWORD", "s3cret");
        std::env::set_var("EDGEFN_UNRELATED", "1");
    }
    let c = Config::load(&path).unwrap();
    unsafe {
        std::env::remove_var("EDGEFN_UPSTREAM__PASSWORD");
        std::env::remove_var("EDGEFN_UNRELATED");
    }
    assert_eq!(
        c.upstream.unwrap().broker.password.as_deref(),
        Some("s3cret")
    );
}

#[test]
fn a_keep_alive_below_five_seconds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = EXAMPLE.replace(
        "topic_prefix = \"site/pi-01/\"",
        "topic_prefix = \"site/pi-01/\"\nkeep_alive = \"2s\"",
    );
    let msg = Config::load(&write(dir.path(), &text))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("upstream.keep_alive: 2s is too short"),
        "{msg}"
    );
}

#[test]
fn urls_are_parsed() {
    let mut p = Checker::default();
    let mut parse = |url: &str| parse_mqtt_url(&mut p, "k", url).map(|u| (u.host, u.port, u.tls));
    assert_eq!(
        parse("mqtt://broker.local"),
        Some(("broker.local".into(), 1883, false))
    );
    assert_eq!(
        parse("mqtt://[::1]:1884"),
        Some(("::1".into(), 1884, false))
    );
    assert_eq!(parse("mqtt://[::1]"), Some(("::1".into(), 1883, false)));
    assert_eq!(
        parse("mqtts://cloud.example"),
        Some(("cloud.example".into(), 8883, true))
    );
    assert_eq!(
        parse("mqtts://cloud.example:443"),
        Some(("cloud.example".into(), 443, true))
    );
    assert_eq!(parse("http://x:1"), None);
    assert_eq!(parse("mqtt://x:0"), None);
    assert_eq!(p.problems.len(), 2);
}

#[test]
fn a_password_sent_unencrypted_across_the_network_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let load = |local: &str, upstream: &str| {
        let text = EXAMPLE
            .replace("url = \"mqtt://127.0.0.1:1883\"", local)
            .replace("url = \"mqtt://127.0.0.1:1884\"", upstream);
        Config::load(&write(dir.path(), &text)).unwrap().warnings
    };
    let warnings = load(
        "url = \"mqtt://localhost:1883\"\nusername = \"edgefn\"",
        "url = \"mqtt://cloud.example:1883\"\nusername = \"pi-01\"",
    );
    assert_eq!(
        warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "upstream.url: the username and password go to cloud.example unencrypted; use mqtts:// (TLS)"
        ]
    );
    // Without credentials there is nothing to leak.
    assert!(load("url = \"mqtt://[::1]\"", "url = \"mqtt://cloud.example\"").is_empty());
}

#[test]
fn tls_files_belong_to_mqtts_urls_and_are_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("f.wasm");
    std::fs::write(&module, b"").unwrap();
    let load = |upstream: &str, local: &str| {
        let path = write(
            dir.path(),
            &format!(
                "[gateway]\nid = \"pi-01\"\n[local]\n{local}\n[upstream]\n{upstream}\n\
                 [[functions]]\nname = \"f\"\nmodule = \"f.wasm\"\ntriggers = [\"a/#\"]\n"
            ),
        );
        Config::load(&path)
    };
    // TLS files with a plain URL, or with an embedded broker without a TLS listener.
    let err = load(
        "url = \"mqtt://cloud:1883\"\nca_file = \"ca.pem\"",
        "embedded = true\nlisten = \"127.0.0.1:1883\"\ncert_file = \"c.pem\"",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("upstream.ca_file: only applies to TLS: use an mqtts:// URL"),
        "{err}"
    );
    assert!(
        err.contains(
            "local.cert_file: belongs to the built-in broker's TLS listener: set tls_listen"
        ),
        "{err}"
    );
    // A URL that is wrong does not hide the files' problems; a host
    // that no certificate can name is refused.
    let err = load(
        "url = \"mqtts://cloud:0\"\nca_file = \"ca.pem\"",
        "url = \"mqtts://[fe80::1%eth0]\"",
    )
    .unwrap_err()
    .to_string();
    for needle in [
        "upstream.url: \"mqtts://cloud:0\" has an invalid port",
        "upstream.ca_file: ",
        "local.url: \"fe80::1%eth0\" cannot be checked against a TLS certificate",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    // Missing files are named with their key and resolved path.
    let err = load(
        "url = \"mqtts://cloud\"\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"",
        "url = \"mqtts://127.0.0.1\"\nkey_file = \"k.pem\"",
    )
    .unwrap_err()
    .to_string();
    for needle in [
        format!("upstream.ca_file: {}", dir.path().join("ca.pem").display()),
        format!("upstream.cert_file: {}", dir.path().join("c.pem").display()),
        format!("upstream.key_file: {}", dir.path().join("c.key").display()),
        "local.cert_file: is missing".to_owned(),
    ] {
        assert!(err.contains(&needle), "{needle:?} not in {err}");
    }
}

#[test]
fn the_built_in_brokers_tls_listener_needs_its_files_and_its_flags_go_together() {
    let dir = tempfile::tempdir().unwrap();
    let pem = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    pem("broker");
    pem("other");
    let local = |keys: &str| {
        EXAMPLE.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            &format!("embedded = true\nlisten = \"127.0.0.1:1883\"\n{keys}"),
        )
    };
    let good =
        "tls_listen = \"127.0.0.1:8883\"\ncert_file = \"broker.pem\"\nkey_file = \"broker.key\"\n";
    let c = Config::load(&write(dir.path(), &local(good))).unwrap();
    let LocalSource::Embedded(EmbeddedConfig { tls: Some(tls), .. }) = c.local.source else {
        panic!("no TLS listener");
    };
    assert_eq!(tls.listen.port(), 8883);
    assert!(!tls.require_certificate);
    // Mosquitto's spellings, a CA for client certificates, and identities.
    let mosquitto = "tls_listen = \"127.0.0.1:8883\"\ncertfile = \"broker.pem\"\nkeyfile = \"broker.key\"\ncafile = \"other.pem\"\nrequire_certificate = true\nuse_identity_as_username = true\n";
    let c = Config::load(&write(dir.path(), &local(mosquitto))).unwrap();
    let LocalSource::Embedded(EmbeddedConfig { tls: Some(tls), .. }) = c.local.source else {
        panic!("no TLS listener");
    };
    assert!(tls.require_certificate && tls.use_identity_as_username);
    assert!(
        tls.summary.contains("client certificates from"),
        "{}",
        tls.summary
    );

    for (keys, expected) in [
        (
            "tls_listen = \"127.0.0.1:8883\"\n",
            &["local.cert_file", "local.key_file"][..],
        ),
        (
            "cert_file = \"broker.pem\"\nrequire_certificate = true\n",
            &["local.cert_file", "local.require_certificate"],
        ),
        (
            &format!("{good}require_certificate = true\n"),
            &["local.ca_file"],
        ),
        (
            &format!("{good}use_identity_as_username = true\n"),
            &["local.use_identity_as_username"],
        ),
        (
            "tls_listen = \"127.0.0.1:1883\"\ncert_file = \"broker.pem\"\nkey_file = \"other.key\"\n",
            &["local.tls_listen", "local.key_file"],
        ),
        ("tls_listen = \"8883\"\n", &["local.tls_listen"]),
    ] {
        assert_eq!(problem_keys(dir.path(), &local(keys)), expected, "{keys}");
    }
    // Off loopback, certificates can be the logins: no password file needed.
    let exposed = local(&format!(
        "{}require_certificate = true\nuse_identity_as_username = true\nca_file = \"other.pem\"\n",
        good.replace("127.0.0.1:8883", "0.0.0.0:8883")
    ));
    let c = Config::load(&write(dir.path(), &exposed)).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let exposed = local(&good.replace("127.0.0.1:8883", "0.0.0.0:8883"));
    assert_eq!(problem_keys(dir.path(), &exposed), ["local.password_file"]);
}

#[test]
fn the_built_in_brokers_bounds_have_defaults_and_each_problem_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let local = |keys: &str| {
        EXAMPLE.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            &format!("embedded = true\nlisten = \"127.0.0.1:1883\"\n{keys}"),
        )
    };
    let limits = |keys: &str| {
        let c = Config::load(&write(dir.path(), &local(keys))).unwrap();
        let LocalSource::Embedded(embedded) = c.local.source else {
            panic!("not the built-in broker");
        };
        embedded.limits
    };
    assert_eq!(limits(""), BrokerLimits::default());
    let set = limits(
        "max_queued_bytes = \"2MiB\"\nmax_queued_messages = 50\nmax_connections = 100\nmax_connections_per_user = 4\nmax_connections_per_address = 8\nmax_publish_rate = 200\nmax_keepalive = \"1min\"\n",
    );
    assert_eq!(
        (
            set.max_queued_bytes,
            set.max_queued_messages,
            set.max_connections.get(),
            set.max_connections_per_user.map(|n| n.get()),
            set.max_connections_per_address.get(),
            set.max_publish_rate.map(|n| n.get()),
            set.max_keepalive,
        ),
        (2 << 20, 50, 100, Some(4), 8, Some(200), 60)
    );
    for (keys, expected) in [
        ("max_queued_bytes = \"64KiB\"", "local.max_queued_bytes"),
        ("max_queued_bytes = \"lots\"", "local.max_queued_bytes"),
        ("max_queued_messages = 0", "local.max_queued_messages"),
        ("max_connections = 0", "local.max_connections"),
        ("max_connections = 100000", "local.max_connections"),
        (
            "max_connections_per_user = 0",
            "local.max_connections_per_user",
        ),
        (
            "max_connections_per_address = 0",
            "local.max_connections_per_address",
        ),
        ("max_publish_rate = -1", "local.max_publish_rate"),
        ("max_keepalive = \"2s\"", "local.max_keepalive"),
        ("max_keepalive = \"1day\"", "local.max_keepalive"),
    ] {
        assert_eq!(problem_keys(dir.path(), &local(keys)), [expected], "{keys}");
    }
    // With an external broker, none of them applies.
    let external = EXAMPLE.replace(
        "url = \"mqtt://127.0.0.1:1883\"",
        "url = \"mqtt://127.0.0.1:1883\"\nmax_connections = 10\nmax_queued_bytes = \"1MiB\"",
    );
    assert_eq!(
        problem_keys(dir.path(), &external),
        ["local.max_queued_bytes", "local.max_connections"]
    );
}
