//! edgefn as an MQTT client: the settings its two connections (ingest from
//! an existing broker, [`crate::ingest::mqtt`], and the forwarder,
//! [`crate::forward`]) share.

use rumqttc::v5::MqttOptions;

use crate::config::BrokerClientConfig;

/// Room for the MQTT fixed header, topic and properties on top of the
/// largest payload, so a payload of exactly `max_message_size` fits.
const PACKET_OVERHEAD: usize = 64 * 1024 + 16;

/// The MQTT Maximum Packet Size for payloads up to `max_message_size`.
fn packet_limit(max_message_size: usize) -> u32 {
    u32::try_from(max_message_size.saturating_add(PACKET_OVERHEAD)).unwrap_or(u32::MAX)
}

/// What edgefn's two MQTT clients (ingest and the forwarder) share: the
/// broker `b`, its credentials and TLS, keep-alive, `TCP_NODELAY`, a Maximum
/// Packet Size for payloads up to `max_message_size`, and at most
/// `b.in_flight` unacknowledged QoS 1 publishes of its own.
///
/// The last matters for memory too: rumqttc allocates a slot per packet id
/// up to that limit when the client is created, and without one it takes
/// all 65,535 (13.8 MB, a third of edgefn's resident memory).
pub fn options(b: &BrokerClientConfig, max_message_size: usize) -> MqttOptions {
    let mut o = MqttOptions::new(&b.client_id, &b.host, b.port);
    o.set_keep_alive(b.keep_alive)
        .set_network_options(network_options())
        .set_max_packet_size(Some(packet_limit(max_message_size)))
        .set_outgoing_inflight_upper_limit(b.in_flight);
    if let Some(tls) = &b.tls {
        o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            tls.config.clone(),
        )));
    }
    if let Some(user) = &b.username {
        o.set_credentials(user, b.password.clone().unwrap_or_default());
    }
    o
}

/// `TCP_NODELAY`: a PUBACK or PUBLISH goes out when it is written, instead
/// of waiting under Nagle's algorithm for the previous segment's TCP ack
/// (rumqttc leaves Nagle on by default).
fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_client_bounds_its_own_unacknowledged_publishes_to_its_window() {
        // Unbounded, rumqttc allocates 65,535 in-flight slots per client.
        let b = BrokerClientConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "edgefn-pi-01".into(),
            username: None,
            password: None,
            in_flight: 256,
            session_expiry: Duration::from_secs(3600),
            keep_alive: Duration::from_secs(30),
            tls: None,
        };
        let o = options(&b, 4096);
        assert_eq!(o.get_outgoing_inflight_upper_limit(), Some(256));
        assert_eq!(o.keep_alive(), Duration::from_secs(30));
        assert_eq!(o.client_id(), "edgefn-pi-01");
    }
}
