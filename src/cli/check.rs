//! `edgefn check`: the configuration's problems, all at once, then every
//! module it names, loaded as the daemon would.

use std::process::ExitCode;

use edgefn::config::{BrokerClientConfig, Config, EmbeddedConfig, LocalSource};
use edgefn::runtime::{Runtime, Target};

/// `edgefn check`: every problem in the config, then every module.
/// Who the built-in broker lets in, in a few words.
fn who_may_connect(access: &edgefn::access::AccessFiles) -> String {
    let users = match &access.password_file {
        Some(f) => format!("users of {}", f.display()),
        None => "no users".to_owned(),
    };
    let anonymous = if access.allow_anonymous {
        "anonymous clients"
    } else {
        "no anonymous client"
    };
    let acl = match &access.acl_file {
        Some(f) => format!("rights from {}", f.display()),
        None => "any topic".to_owned(),
    };
    format!("{users}, {anonymous}, {acl}")
}

pub fn run(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let runtime = Runtime::new(Target::for_host())?;
    let mut failed = 0;
    println!(
        "gateway  {} (data in {})",
        config.gateway.id,
        config.gateway.data_dir.display()
    );
    // `, TLS, CA /etc/edgefn/ca.pem, client certificate …` for mqtts://.
    let tls = |b: &BrokerClientConfig| {
        b.tls
            .as_ref()
            .map(|t| format!(", {}", t.summary))
            .unwrap_or_default()
    };
    match &config.local.source {
        LocalSource::Broker(b) => println!(
            "local    {} as {:?}, {} in flight{}",
            b.url(),
            b.client_id,
            b.in_flight,
            tls(b)
        ),
        LocalSource::Embedded(EmbeddedConfig {
            listen,
            tls,
            access,
            limits,
        }) => {
            println!(
                "local    embedded broker on {listen}, holding at most {} for subscribers ({} per session); {}",
                bytesize::ByteSize(limits.memory_limit as u64),
                bytesize::ByteSize(limits.max_queued_bytes as u64),
                who_may_connect(access)
            );
            if let Some(tls) = tls {
                println!(
                    "         and on {} ({}{})",
                    tls.listen,
                    tls.summary,
                    if tls.use_identity_as_username {
                        ", the certificate's common name as user name"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    match &config.upstream {
        Some(u) => println!(
            "upstream {} prefix {:?}{}",
            u.broker.url(),
            u.topic_prefix,
            tls(&u.broker)
        ),
        None => println!("upstream none (records stay buffered)"),
    }
    if let Some(listen) = config.metrics.listen {
        println!("metrics  http://{listen}/metrics (and /metrics.json)");
    }
    for w in &config.warnings {
        println!("warning: {w}");
    }
    for f in &config.functions {
        let prefix = config
            .upstream
            .as_ref()
            .map_or("", |u| u.topic_prefix.as_str());
        match runtime.load_file(&f.module, edgefn::registry::function_spec(f, prefix)) {
            Ok(function) => {
                println!(
                    "function {} ok: {} {} <- {}",
                    f.name,
                    if function.is_component() {
                        "component"
                    } else {
                        "module"
                    },
                    f.module.display(),
                    f.triggers
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!(
                    "         memory {} ({} in use at start), timeout {}, concurrency {}, retries {}, fuel {}",
                    bytesize::ByteSize(function.memory_limit() as u64),
                    bytesize::ByteSize(function.memory_at_start() as u64),
                    humantime::format_duration(f.timeout),
                    f.concurrency,
                    f.retries,
                    f.fuel.map_or("unlimited".to_owned(), |n| n.to_string())
                );
                let filters = |list: &[edgefn::route::TopicFilter]| {
                    list.iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!(
                    "         state limit {}, emits to {}, publishes to {}{}",
                    bytesize::ByteSize(f.state_limit as u64),
                    f.emit_allow
                        .as_deref()
                        .map_or("any topic".to_owned(), filters),
                    if f.publish_allow.is_empty() {
                        "nothing".to_owned()
                    } else {
                        filters(&f.publish_allow)
                    },
                    match &f.schedule {
                        Some(s) => format!(", runs {s}"),
                        None => String::new(),
                    }
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: function {:?}: {e}", f.name);
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} function(s) failed to load");
        return Ok(ExitCode::FAILURE);
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
}
