//! rmqtt's fitter (what is settled with each client at CONNECT), with the
//! server keep-alive of `[local] max_keepalive`, as Mosquitto 2.0 settles
//! it: an MQTT 5 client that asks for no keep-alive, or a longer one, is
//! given `max_keepalive` in its CONNACK (Server Keep Alive) and held to it;
//! an MQTT 3.1.1 client, which cannot be told, keeps what it asked for.
//! rmqtt alone would let an MQTT 5 client go without keep-alive and refuse
//! a 3.1.1 client that asks for more (CONNACK Server unavailable).
//!
//! The keep-alive matters to edgefn beyond idle clients: a device's
//! message waiting for its commit is given up once its keep-alive passes
//! (see the module docs of `embedded`).

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use rmqtt::Result;
use rmqtt::codec::types::{MQTT_LEVEL_5, Publish};
use rmqtt::fitter::{DefaultFitter, Fitter, FitterManager};
use rmqtt::types::{ConnectInfo, Disconnect, FitterType, Id, ListenerConfig};

/// Makes each connection's [`KeepAlive`] fitter.
pub(super) struct Fitters {
    /// `max_keepalive`, in seconds.
    pub(super) max_keepalive: u16,
}

impl FitterManager for Fitters {
    fn create(&self, info: Arc<ConnectInfo>, id: Id, cfg: ListenerConfig) -> FitterType {
        Arc::new(KeepAlive {
            v5: info.proto_ver() == MQTT_LEVEL_5,
            max: self.max_keepalive,
            inner: DefaultFitter::new(info, id, cfg),
        })
    }
}

/// rmqtt's own fitter, but for the keep-alive.
struct KeepAlive {
    /// Whether the client speaks MQTT 5 (and so can be told).
    v5: bool,
    /// `max_keepalive`, in seconds.
    max: u16,
    /// rmqtt's.
    inner: DefaultFitter,
}

impl Fitter for KeepAlive {
    /// Sets `keep_alive` to what the client is held to (the CONNACK's
    /// Server Keep Alive for MQTT 5), and returns after how many seconds
    /// without a packet the connection is taken for dead. The listeners
    /// allow any keep-alive, so rmqtt refuses none.
    fn keep_alive(&self, keep_alive: &mut u16) -> Result<u16> {
        if self.v5 && (*keep_alive == 0 || *keep_alive > self.max) {
            *keep_alive = self.max;
        }
        self.inner.keep_alive(keep_alive)
    }

    fn max_mqueue_len(&self) -> usize {
        self.inner.max_mqueue_len()
    }

    fn mqueue_rate_limit(&self) -> (NonZeroU32, Duration) {
        self.inner.mqueue_rate_limit()
    }

    fn max_inflight(&self) -> NonZeroU16 {
        self.inner.max_inflight()
    }

    fn session_expiry_interval(&self, d: Option<&Disconnect>) -> Duration {
        self.inner.session_expiry_interval(d)
    }

    fn message_expiry_interval(&self, publish: &Publish) -> Duration {
        self.inner.message_expiry_interval(publish)
    }

    fn max_client_topic_aliases(&self) -> u16 {
        self.inner.max_client_topic_aliases()
    }

    fn max_server_topic_aliases(&self) -> u16 {
        self.inner.max_server_topic_aliases()
    }
}
