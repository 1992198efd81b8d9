//! Gateway configurations, typed: a [`ConfigFile`] is the file as the
//! gateway reads it (edgefn's own definition, unknown keys impossible),
//! built here and written as TOML. Tests change what they need as fields
//! (`file.upstream_mut().refused_topic_timeout = Some("2s".into())`), never
//! by editing text; [`write_config_text`] is for files that are meant to be
//! malformed.

use std::path::{Path, PathBuf};

pub use edgefn::config::FunctionManifest;
pub use edgefn::config::file::{
    BufferTable, ConfigFile, DeployTable, GatewayTable, LocalTable, MetricsTable, UpstreamTable,
};

use crate::module;

/// Where the gateway takes device messages from.
#[derive(Debug, Clone)]
pub enum Local {
    /// Its built-in broker, listening on this port of 127.0.0.1.
    Embedded(u16),
    /// An existing broker at this URL.
    Broker(String),
}

/// The standard test config in `dir` (data in `dir/data`): gateway
/// `pi-01`; device messages from `local` (at most 4 KiB); upstream at
/// `upstream_port` with prefix `site/pi-01/`; a 64 MiB buffer;
/// [`clean_temperature`] and [`chaos`].
pub fn standard(dir: &Path, local: Local, upstream_port: u16) -> ConfigFile {
    ConfigFile {
        gateway: GatewayTable {
            id: "pi-01".into(),
            data_dir: Some(dir.join("data").display().to_string()),
        },
        local: local_table(local),
        upstream: Some(upstream(upstream_port)),
        buffer: BufferTable {
            max_size: Some("64MiB".into()),
            ..Default::default()
        },
        functions: vec![clean_temperature(), chaos()],
        ..Default::default()
    }
}

/// A gateway `pi-01` in `dir` (data in `dir/data`) with the built-in
/// broker on `port` and its defaults, upstream at `upstream_port` with
/// prefix `site/pi-01/`, running `functions`.
pub fn embedded_gateway(
    dir: &Path,
    port: u16,
    upstream_port: u16,
    functions: Vec<FunctionManifest>,
) -> ConfigFile {
    ConfigFile {
        gateway: GatewayTable {
            id: "pi-01".into(),
            data_dir: Some(dir.join("data").display().to_string()),
        },
        local: LocalTable {
            embedded: Some(true),
            listen: Some(format!("127.0.0.1:{port}")),
            ..Default::default()
        },
        upstream: Some(upstream(upstream_port)),
        functions,
        ..Default::default()
    }
}

/// `[local]` for `local`, messages of at most 4 KiB.
pub fn local_table(local: Local) -> LocalTable {
    let mut table = LocalTable {
        max_message_size: Some("4KiB".into()),
        ..Default::default()
    };
    match local {
        Local::Embedded(port) => {
            table.embedded = Some(true);
            table.listen = Some(format!("127.0.0.1:{port}"));
        }
        Local::Broker(url) => {
            table.url = Some(url);
            table.client_id = Some(format!("edgefn-test-{}", crate::free_port()));
        }
    }
    table
}

/// `[upstream]`: the broker at `port` of 127.0.0.1, prefix `site/pi-01/`.
pub fn upstream(port: u16) -> UpstreamTable {
    UpstreamTable {
        url: format!("mqtt://127.0.0.1:{port}"),
        topic_prefix: Some("site/pi-01/".into()),
        ..Default::default()
    }
}

/// `name`, running the example module `module_name` on `triggers`.
pub fn function(name: &str, module_name: &str, triggers: &[&str]) -> FunctionManifest {
    FunctionManifest {
        name: name.into(),
        module: Some(module(module_name).display().to_string()),
        triggers: triggers.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

/// clean-temperature on `sensors/+/temperature`, in Fahrenheit (`UNIT =
/// "F"`), 16 MiB, 100 ms, concurrency 2.
pub fn clean_temperature() -> FunctionManifest {
    FunctionManifest {
        env: [("UNIT".to_owned(), "F".to_owned())].into(),
        memory_limit: Some("16MiB".into()),
        timeout: Some("100ms".into()),
        concurrency: Some(2),
        ..function(
            "clean-temperature",
            "clean_temperature",
            &["sensors/+/temperature"],
        )
    }
}

/// chaos on `chaos/#` (`GREETING = "hi"`), 200 ms, a fuel budget of
/// 2,000,000, one retry, publishing to `devices/chaos/cmd`.
pub fn chaos() -> FunctionManifest {
    FunctionManifest {
        env: [("GREETING".to_owned(), "hi".to_owned())].into(),
        timeout: Some("200ms".into()),
        fuel: Some(2_000_000),
        retries: Some(1),
        publish_allow: Some(vec!["devices/chaos/cmd".into()]),
        ..function("chaos", "chaos", &["chaos/#"])
    }
}

/// Changes to a [`ConfigFile`] that tests make often.
pub trait ConfigFileExt {
    /// `[upstream]`, which must be there.
    fn upstream_mut(&mut self) -> &mut UpstreamTable;
    /// The function called `name`, which must be there.
    fn function_mut(&mut self, name: &str) -> &mut FunctionManifest;
    /// Without the function called `name`.
    fn without_function(&mut self, name: &str) -> &mut Self;
    /// `[metrics] listen` on `port` of 127.0.0.1.
    fn metrics_on(&mut self, port: u16) -> &mut Self;
    /// `[deploy]` trusting `keys` (as `deploy.trusted_keys` writes them).
    fn trusting(&mut self, keys: &[String]) -> &mut Self;
}

impl ConfigFileExt for ConfigFile {
    fn upstream_mut(&mut self) -> &mut UpstreamTable {
        self.upstream.as_mut().expect("an [upstream] table")
    }

    fn function_mut(&mut self, name: &str) -> &mut FunctionManifest {
        self.functions
            .iter_mut()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no function {name} in the config"))
    }

    fn without_function(&mut self, name: &str) -> &mut Self {
        let before = self.functions.len();
        self.functions.retain(|f| f.name != name);
        assert_eq!(self.functions.len() + 1, before, "no function {name}");
        self
    }

    fn metrics_on(&mut self, port: u16) -> &mut Self {
        self.metrics.get_or_insert_default().listen = Some(format!("127.0.0.1:{port}"));
        self
    }

    fn trusting(&mut self, keys: &[String]) -> &mut Self {
        self.deploy.get_or_insert_default().trusted_keys = keys.to_vec();
        self
    }
}

/// Writes `config` into `dir` as `edgefn.toml` and returns its path.
pub fn write_config(dir: &Path, config: &ConfigFile) -> PathBuf {
    write_config_text(
        dir,
        &toml::to_string(config).expect("a config file as TOML"),
    )
}

/// Writes `text` into `dir` as `edgefn.toml` and returns its path: for a
/// file meant to be malformed.
pub fn write_config_text(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("edgefn.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// [`standard`], written into `dir`.
pub fn standard_config(dir: &Path, local: Local, upstream_port: u16) -> PathBuf {
    write_config(dir, &standard(dir, local, upstream_port))
}
