//! The built-in broker as MQTT clients meet it, case by case beside a
//! private Mosquitto: each case runs against both and expects the same
//! answers.

#![cfg(feature = "embedded-broker")]

use std::time::Duration;

use testkit::pair::*;
use testkit::*;

/// How a client's CONNECT was answered.
#[derive(Debug, Clone, PartialEq)]
enum Connack {
    Success,
    Refused(String),
}

/// `async fn $name(port, client_id) -> Connack`: connects to `port` as
/// `client_id` with rumqttc's client of one protocol version (its types
/// imported by `$imports`), then DISCONNECTs; the CONNACK's answer.
macro_rules! connect_then_disconnect {
    ($(#[$doc:meta])* $name:ident, $($imports:item)*) => {
        $(#[$doc])*
        async fn $name(port: u16, client_id: &str) -> Connack {
            $($imports)*
            use rumqttc::Outgoing;
            let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(30));
            let (client, mut events) = AsyncClient::new(o, 10);
            let answer = tokio::time::timeout(PATIENCE, events.poll())
                .await
                .expect("a CONNACK");
            let answer = match answer {
                Ok(Event::Incoming(Packet::ConnAck(a))) if a.code == ConnectReturnCode::Success => {
                    Connack::Success
                }
                other => return Connack::Refused(format!("{other:?}")),
            };
            client.disconnect().await.unwrap();
            loop {
                match tokio::time::timeout(PATIENCE, events.poll()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) => return answer,
                    Ok(Ok(_)) => {}
                    Err(_) => panic!("the DISCONNECT never went out"),
                }
            }
        }
    };
}

connect_then_disconnect!(
    /// Over MQTT 3.1.1.
    connect_disconnect_v311,
    use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet};
);

connect_then_disconnect!(
    /// Over MQTT 5.
    connect_disconnect_v5,
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
);

/// Cycles of connect, DISCONNECT, connect again with the same client id.
const CYCLES: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_reconnects_with_its_client_id_is_always_let_back_in() {
    for broker in brokers().await {
        for (version, v5) in [("3.1.1", false), ("5", true)] {
            let mut refused = Vec::new();
            for i in 0..CYCLES {
                let answer = if v5 {
                    connect_disconnect_v5(broker.port, "device-again").await
                } else {
                    connect_disconnect_v311(broker.port, "device-again").await
                };
                if let Connack::Refused(why) = answer {
                    refused.push(format!("cycle {i}: {why}"));
                }
            }
            assert!(
                refused.is_empty(),
                "{} on MQTT {version} refused {} of {CYCLES} reconnects: {:?}",
                broker.name,
                refused.len(),
                &refused[..refused.len().min(5)]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_gives_each_message_to_one_member_of_its_group() {
    for broker in brokers().await {
        let members = [
            Upstream::subscribe(broker.port, "$share/workers/jobs/#").await,
            Upstream::subscribe(broker.port, "$share/workers/jobs/#").await,
        ];
        let everything = Upstream::subscribe(broker.port, "jobs/#").await;
        let mut dev = Device::connect("dispatcher", broker.port).await;
        let n = 20;
        for i in 0..n {
            assert!(dev.publish_acked("jobs/x", i.to_string(), PATIENCE).await);
        }
        everything.wait_for(n).await;
        eventually("every job at a member", || {
            members
                .iter()
                .map(|m| m.seen.lock().unwrap().len())
                .sum::<usize>()
                >= n
        })
        .await;
        let got: Vec<Vec<String>> = members
            .iter()
            .map(|m| {
                m.seen
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|s| s.payload.clone())
                    .collect()
            })
            .collect();
        let mut all: Vec<u64> = got.iter().flatten().map(|p| p.parse().unwrap()).collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..n as u64).collect::<Vec<_>>(),
            "{}: each job to exactly one member: {got:?}",
            broker.name
        );
        assert!(
            got.iter().all(|g| !g.is_empty()),
            "{}: both members take jobs: {got:?}",
            broker.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_without_disconnect_has_its_will_published() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    for broker in brokers().await {
        let watcher = Upstream::subscribe(broker.port, "wills/#").await;
        let mut o = MqttOptions::new("mortal", "127.0.0.1", broker.port);
        o.set_last_will(LastWill::new(
            "wills/mortal",
            "gone",
            QoS::AtLeastOnce,
            false,
            None,
        ));
        let (client, mut events) = AsyncClient::new(o, 10);
        loop {
            match tokio::time::timeout(PATIENCE, events.poll()).await.unwrap() {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("{}: {e}", broker.name),
            }
        }
        // The connection goes without a DISCONNECT.
        drop(events);
        drop(client);
        let seen = watcher
            .wait_until(&format!("{}: the will", broker.name), |s| !s.is_empty())
            .await;
        assert_eq!(
            (seen[0].topic.as_str(), seen[0].payload.as_str()),
            ("wills/mortal", "gone"),
            "{}",
            broker.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_gets_what_was_published_while_it_was_away() {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    for broker in brokers().await {
        // Subscribed, then away.
        session_v5(broker.port, "commuter", true, Some("commands/commuter")).await;
        // Three commands while it is away.
        let mut sender = Device::connect("commander", broker.port).await;
        for i in 0..3 {
            assert!(
                sender
                    .publish_acked("commands/commuter", format!("cmd {i}"), PATIENCE)
                    .await
            );
        }
        // Back, resuming its session: all three, in order.
        let mut o = MqttOptions::new("commuter", "127.0.0.1", broker.port);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        let (_client, mut events) = AsyncClient::new(o, 10);
        let mut got = Vec::new();
        while got.len() < 3 {
            match tokio::time::timeout(PATIENCE, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    assert!(ack.session_present, "{}: no session", broker.name)
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    got.push(String::from_utf8_lossy(&p.payload).into_owned())
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{}: {e}", broker.name),
                Err(_) => panic!("{}: only {got:?} arrived", broker.name),
            }
        }
        assert_eq!(got, ["cmd 0", "cmd 1", "cmd 2"], "{}", broker.name);
    }
}

/// The topics and payloads of `seen`, sorted.
fn messages(seen: &[Seen]) -> Vec<(String, String)> {
    let mut m: Vec<_> = seen
        .iter()
        .map(|s| (s.topic.clone(), s.payload.clone()))
        .collect();
    m.sort();
    m
}

/// Subscribes to `filter` on `port`, then publishes a message on
/// `marker`, which `filter` matches: once it arrives, every retained
/// message the subscription brought has arrived before it. What arrived,
/// sorted, without the marker.
async fn retained_for(port: u16, filter: &str, marker: &str) -> Vec<(String, String)> {
    let subscriber = Upstream::subscribe(port, filter).await;
    let mut dev = Device::connect("marker", port).await;
    assert!(dev.publish_acked(marker, "marker", PATIENCE).await);
    let seen = subscriber
        .wait_until("the marker", |s| s.iter().any(|m| m.topic == marker))
        .await;
    let mut got = messages(&seen);
    got.retain(|(topic, _)| topic != marker);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_greets_each_new_subscriber_until_it_is_cleared() {
    for broker in brokers().await {
        let port = broker.port;
        publish_retained(port, "dev/config/x", b"hello".to_vec()).await;
        publish_retained(port, "dev/config/y", b"world".to_vec()).await;
        publish_retained(port, "dev/state/y", b"other".to_vec()).await;
        let pair = |t: &str, p: &str| (t.to_owned(), p.to_owned());
        assert_eq!(
            retained_for(port, "dev/config/#", "dev/config/marker").await,
            [pair("dev/config/x", "hello"), pair("dev/config/y", "world")],
            "{}",
            broker.name
        );
        assert_eq!(
            retained_for(port, "dev/+/y", "dev/marker/y").await,
            [pair("dev/config/y", "world"), pair("dev/state/y", "other")],
            "{}",
            broker.name
        );
        // A newer one replaces it; an empty one clears it.
        publish_retained(port, "dev/config/y", b"again".to_vec()).await;
        publish_retained(port, "dev/config/x", Vec::new()).await;
        assert_eq!(
            retained_for(port, "dev/config/#", "dev/config/marker").await,
            [pair("dev/config/y", "again")],
            "{}",
            broker.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_outlive_a_restart_of_the_built_in_broker() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut file = standard(dir.path(), Local::Embedded(port), free_port());
    file.upstream = None;
    let config = write_config(dir.path(), &file);
    let mut daemon = Daemon::start(&config);
    port_open(port).await;
    publish_retained(port, "dev/config/kept", b"kept".to_vec()).await;
    publish_retained(port, "dev/config/gone", b"soon cleared".to_vec()).await;
    publish_retained(port, "dev/config/gone", Vec::new()).await;
    assert!(daemon.terminate().success());

    let _daemon = Daemon::start(&config);
    port_open(port).await;
    assert_eq!(
        retained_for(port, "dev/config/#", "dev/config/marker").await,
        [("dev/config/kept".to_owned(), "kept".to_owned())]
    );
}
