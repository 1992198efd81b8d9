//! The configuration file as written: every table and key, with sizes
//! and durations as text. Loading deserialises the file into a
//! [`ConfigFile`] (unknown keys refused) and then checks it into a
//! [`Config`](super::Config); tests and tools build a [`ConfigFile`] and
//! serialise it, so every key they write is one the gateway knows.

use serde::{Deserialize, Serialize};

use super::FunctionManifest;

/// The file as written; strings for sizes and durations are parsed later.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[gateway]`
    pub gateway: GatewayTable,
    /// `[local]`
    #[serde(default)]
    pub local: LocalTable,
    /// `[upstream]`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamTable>,
    /// `[buffer]`
    #[serde(default)]
    pub buffer: BufferTable,
    /// `[deploy]`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployTable>,
    /// `[metrics]`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsTable>,
    /// `[[functions]]`
    #[serde(default)]
    pub functions: Vec<FunctionManifest>,
}

/// `[metrics]`: the metrics listener and report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsTable {
    /// `metrics.listen`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// `metrics.interval`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// `[deploy]`: signed bundles from the control broker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployTable {
    /// `deploy.broker`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// `deploy.groups`
    #[serde(default)]
    pub groups: Vec<String>,
    /// `deploy.trusted_keys`
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// `deploy.allow_unsigned`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_unsigned: Option<bool>,
    /// `deploy.max_bundle_size`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bundle_size: Option<String>,
}

/// `[gateway]`: who this gateway is and where it keeps its data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayTable {
    /// `gateway.id`
    pub id: String,
    /// `gateway.data_dir`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
}

/// `[local]`: where device messages come from (a broker, or the built-in one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTable {
    /// `local.url`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `local.embedded`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded: Option<bool>,
    /// `local.listen`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// `local.client_id`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// `local.username`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// `local.password`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// `local.in_flight`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<i64>,
    /// `local.session_expiry`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_expiry: Option<String>,
    /// `local.keep_alive`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<String>,
    /// `local.memory_limit`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<String>,
    /// `local.max_message_size`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_size: Option<String>,
    /// `local.max_queued_messages`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_messages: Option<i64>,
    /// `local.max_queued_bytes`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_bytes: Option<String>,
    /// `local.max_connections`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    /// `local.max_connections_per_user`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_user: Option<i64>,
    /// `local.max_connections_per_address`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_address: Option<i64>,
    /// `local.max_publish_rate`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_publish_rate: Option<i64>,
    /// `local.max_keepalive`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_keepalive: Option<String>,
    /// `local.password_file`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// `local.acl_file`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl_file: Option<String>,
    /// `local.allow_anonymous`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// `local.tls_listen`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<String>,
    /// `local.require_certificate`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_certificate: Option<bool>,
    /// `local.use_identity_as_username`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_identity_as_username: Option<bool>,
    /// `local.ca_file` (Mosquitto's `cafile` too)
    #[serde(skip_serializing_if = "Option::is_none", alias = "cafile")]
    pub ca_file: Option<String>,
    /// `local.cert_file` (Mosquitto's `certfile` too)
    #[serde(skip_serializing_if = "Option::is_none", alias = "certfile")]
    pub cert_file: Option<String>,
    /// `local.key_file` (Mosquitto's `keyfile` too)
    #[serde(skip_serializing_if = "Option::is_none", alias = "keyfile")]
    pub key_file: Option<String>,
}

/// `[upstream]`: the cloud broker records are forwarded to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTable {
    /// `upstream.url`
    pub url: String,
    /// `upstream.topic_prefix`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_prefix: Option<String>,
    /// `upstream.client_id`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// `upstream.username`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// `upstream.password`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// `upstream.in_flight`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<i64>,
    /// `upstream.keep_alive`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<String>,
    /// `upstream.max_message_size`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_size: Option<String>,
    /// `upstream.refused_topic_timeout`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_topic_timeout: Option<String>,
    /// `upstream.ca_file`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// `upstream.cert_file`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// `upstream.key_file`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// `[buffer]`: the SQLite outbox and its bounds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferTable {
    /// `buffer.max_size`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<String>,
    /// `buffer.full_policy`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_policy: Option<String>,
    /// `buffer.durability`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durability: Option<String>,
    /// `buffer.max_batch`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<i64>,
    /// `buffer.dead_letters_max_size`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letters_max_size: Option<String>,
    /// `buffer.commit_delay`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_delay: Option<String>,
}
