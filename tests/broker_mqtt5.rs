//! What MQTT devices rely on, beyond connect and publish, put to a private
//! Mosquitto and to edgefn's built-in broker alike, with the same answers
//! expected from both: QoS flows, MQTT 5 session expiry, topic aliases,
//! subscription options, maximum packet sizes and the server keep-alive.

#![cfg(feature = "embedded-broker")]

use std::time::Duration;

use rumqttc::v5::MqttOptions;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, PubAckReason, PublishProperties, RetainForwardRule};
use testkit::PATIENCE;
use testkit::client::*;
use testkit::pair::*;

/// Options for `id` on `port`: MQTT 5, clean start, rumqttc's defaults.
fn options(port: u16, id: &str) -> MqttOptions {
    MqttOptions::new(id, "127.0.0.1", port)
}

/// Connects with `o`; panics if refused.
async fn client(o: MqttOptions) -> Conn {
    let id = o.client_id();
    open(o).await.unwrap_or_else(|e| panic!("{id}: {e}"))
}

/// A filter at QoS 1 with `options` applied.
fn filter(path: &str, options: impl FnOnce(&mut Filter)) -> Filter {
    let mut f = Filter::new(path, QoS::AtLeastOnce);
    options(&mut f);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_subscriber_gets_a_message_at_the_lower_of_the_publish_and_subscription_qos() {
    for broker in brokers().await {
        let port = broker.port;
        let mut at_two = client(options(port, "sub-2")).await;
        at_two
            .subscribe_to(Filter::new("qos/#", QoS::ExactlyOnce))
            .await;
        let mut at_one = client(options(port, "sub-1")).await;
        at_one.subscribe("qos/#").await;
        let mut publisher = client(options(port, "pub")).await;
        let flows = [
            publisher.publish_at(QoS::AtMostOnce, "qos/0", "zero").await,
            publisher.publish_at(QoS::AtLeastOnce, "qos/1", "one").await,
            publisher.publish_at(QoS::ExactlyOnce, "qos/2", "two").await,
            // A reading on a trigger topic: edgefn answers PUBREC after its commit.
            publisher
                .publish_at(QoS::ExactlyOnce, "sensors/q2/temperature", "{}")
                .await,
        ];
        assert_eq!(
            flows,
            ["sent", "Success", "Success", "Success"],
            "{}",
            broker.name
        );
        for (sub, want) in [(&mut at_two, [0, 1, 2]), (&mut at_one, [0, 1, 1])] {
            let mut got = Vec::new();
            for _ in 0..3 {
                let p = sub.next_publish().await;
                got.push((String::from_utf8_lossy(&p.topic).into_owned(), p.qos as u8));
            }
            let want: Vec<(String, u8)> = ["qos/0", "qos/1", "qos/2"]
                .iter()
                .zip(want)
                .map(|(t, q)| (t.to_string(), q))
                .collect();
            assert_eq!(got, want, "{}", broker.name);
        }
    }
}

/// A session of `id` that asks to be kept `expiry` seconds (none: 0).
fn session(port: u16, id: &str, expiry: Option<u32>) -> MqttOptions {
    let mut o = options(port, id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(expiry);
    o
}

/// Sessions with no expiry interval, an hour's and two seconds', on `broker`.
async fn sessions_expire(broker: Broker) {
    let port = broker.port;
    let name = broker.name;
    // No expiry interval: the session ends with the connection, once the
    // broker handled its DISCONNECT (a CONNECT racing ahead of that takes
    // the session over, on rmqtt): connect again until it has.
    client(session(port, "none", None)).await.disconnect().await;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let back = client(session(port, "none", None)).await;
        if !back.session_present {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} keeps the session"
        );
        back.disconnect().await;
    }
    // An hour: kept.
    client(session(port, "hour", Some(3600)))
        .await
        .disconnect()
        .await;
    let back = client(session(port, "hour", Some(3600))).await;
    assert!(back.session_present, "{name}");
    // Two seconds: kept for a reconnect at once, gone after a while.
    client(session(port, "brief", Some(2)))
        .await
        .disconnect()
        .await;
    let back = client(session(port, "brief", Some(2))).await;
    assert!(back.session_present, "{name}");
    back.disconnect().await;
    // The interval itself is what is tried here: time must pass.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let back = client(session(port, "brief", Some(2))).await;
    assert!(!back.session_present, "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_session_is_kept_as_long_as_its_expiry_interval_says() {
    let [mosquitto, edgefn] = brokers().await;
    tokio::join!(sessions_expire(mosquitto), sessions_expire(edgefn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_topic_alias_stands_for_the_topic_it_was_last_set_with() {
    for broker in brokers().await {
        let port = broker.port;
        let mut watcher = client(options(port, "watcher")).await;
        watcher.subscribe("alias/#").await;
        let mut device = client(options(port, "device")).await;
        assert!(
            device.connack.as_ref().and_then(|c| c.topic_alias_max) >= Some(1),
            "{}: {:?}",
            broker.name,
            device.connack
        );
        let alias = PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        };
        for (topic, payload) in [("alias/one", "1"), ("", "2"), ("alias/two", "3"), ("", "4")] {
            let reason = device
                .publish_props(topic, payload, false, alias.clone())
                .await;
            assert_eq!(reason, PubAckReason::Success, "{}", broker.name);
        }
        let got = watcher.messages(4).await;
        let want: Vec<(String, String)> = [
            ("alias/one", "1"),
            ("alias/one", "2"),
            ("alias/two", "3"),
            ("alias/two", "4"),
        ]
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect();
        assert_eq!(got, want, "{}", broker.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_subscription_options_no_local_retain_as_published_and_retain_handling() {
    for broker in brokers().await {
        let port = broker.port;
        let name = broker.name;
        // No local: a client does not get back what it publishes itself.
        let mut echo = client(options(port, "echo")).await;
        echo.subscribe_to(filter("opts/chat", |f| f.nolocal = true))
            .await;
        let mut other = client(options(port, "other")).await;
        other.subscribe("opts/chat").await;
        echo.publish("opts/chat", "from echo").await;
        other.publish("opts/chat", "from other").await;
        assert_eq!(echo.payloads(1).await, ["from other"], "{name}");
        let heard = other.payloads(2).await;
        assert_eq!(heard, ["from echo", "from other"], "{name}");

        // Retain as published: the retain flag kept on live delivery, or not.
        let mut keeps = client(options(port, "keeps")).await;
        keeps
            .subscribe_to(filter("opts/state", |f| f.preserve_retain = true))
            .await;
        let mut plain = client(options(port, "plain")).await;
        plain.subscribe("opts/state").await;
        let mut owner = client(options(port, "owner")).await;
        owner.publish_with("opts/state", "on", true).await;
        assert!(keeps.next_publish().await.retain, "{name}");
        assert!(!plain.next_publish().await.retain, "{name}");

        // Retain handling, with "on" retained now. Each subscriber's first
        // message after its subscriptions tells what they brought.
        let mut never = client(options(port, "never")).await;
        never
            .subscribe_to(filter("opts/state", |f| {
                f.retain_forward_rule = RetainForwardRule::Never
            }))
            .await;
        let new_only = |f: &mut Filter| f.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
        let mut once = client(options(port, "once")).await;
        once.subscribe_to(filter("opts/state", new_only)).await;
        once.subscribe_to(filter("opts/state", new_only)).await;
        let mut every = client(options(port, "every")).await;
        every.subscribe("opts/state").await;
        every.subscribe("opts/state").await;
        owner.publish("opts/state", "live").await;
        assert_eq!(never.payloads(1).await, ["live"], "{name}");
        assert_eq!(once.payloads(2).await, ["on", "live"], "{name}");
        assert_eq!(every.payloads(3).await, ["on", "on", "live"], "{name}");
    }
}

/// What arrives on a raw connection until the broker closes it: each
/// packet's type and first byte (a DISCONNECT's reason, for one).
async fn until_closed(stream: &mut tokio::net::TcpStream) -> Vec<(u8, Option<u8>)> {
    let mut seen = Vec::new();
    while let Some((first, body)) = raw::read(stream).await {
        seen.push((first >> 4, body.first().copied()));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maximum_packet_size_is_announced_enforced_and_respected() {
    // edgefn takes a payload of max_message_size with any topic: 64 KiB,
    // plus 69,635 bytes of room; Mosquitto is given the same bound.
    let max = 65_536 + 69_635;
    let brokers = brokers_with(&format!("max_packet_size {max}\n"), |l| {
        l.max_message_size = Some("64KiB".into())
    })
    .await;
    for broker in brokers {
        let port = broker.port;
        let name = broker.name;
        let told = client(options(port, "told")).await;
        let announced = told.connack.as_ref().and_then(|c| c.max_packet_size);
        assert_eq!(announced, Some(max), "{name}");
        // A larger PUBLISH ends the connection, unacknowledged. Mosquitto
        // tells an MQTT 5 client why first (DISCONNECT 0x95 Packet too
        // large); rmqtt closes the connection without a word.
        for version in [4, 5] {
            let (mut stream, connack) = raw::connack(port, version, 30, "too-big").await;
            assert_eq!(connack.code, 0, "{name}");
            let publish = raw::publish(version, "big/x", &vec![b'x'; max as usize]);
            use tokio::io::AsyncWriteExt;
            // The broker may close before it read everything.
            let _ = stream.write_all(&publish).await;
            let seen = until_closed(&mut stream).await;
            let why = match (name, version) {
                ("mosquitto", 5) => vec![(14, Some(0x95))],
                _ => vec![],
            };
            assert_eq!(seen, why, "{name} MQTT {version}");
        }
        // A client's own maximum: what is larger is not sent to it.
        let mut small = options(port, "small");
        small.set_max_packet_size(Some(1024));
        let mut small = client(small).await;
        small.subscribe("size/#").await;
        let mut publisher = client(options(port, "sizer")).await;
        publisher.publish("size/big", &"b".repeat(2000)).await;
        publisher.publish("size/small", "s").await;
        assert_eq!(small.messages(1).await[0].0, "size/small", "{name}");
    }
}

/// For raw CONNECTs of each MQTT version and keep-alive: (version,
/// keep-alive asked, CONNACK reason code, keep-alive the client is held
/// to). An MQTT 5 client is held to the CONNACK's Server Keep Alive if it
/// has one (rmqtt always sends it, Mosquitto when it differs), else to
/// what it asked; an MQTT 3.1.1 client to what it asked.
async fn keep_alive_answers(port: u16) -> Vec<(u8, u16, u8, u16)> {
    let mut answers = Vec::new();
    for version in [4, 5] {
        for keep_alive in [0, 30, 300] {
            let id = format!("ka-{version}-{keep_alive}");
            let (_stream, c) = raw::connack(port, version, keep_alive, &id).await;
            let held = c.server_keep_alive.unwrap_or(keep_alive);
            answers.push((version, keep_alive, c.code, held));
        }
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keep_alive_holds_mqtt5_clients_to_max_keepalive() {
    let configured = brokers_with("max_keepalive 60\n", |l| {
        l.max_keepalive = Some("60s".into())
    })
    .await;
    for broker in configured {
        // MQTT 5 clients asking for none or more are told 60; MQTT 3.1.1
        // ones cannot be told, and are let in with what they asked.
        let want = vec![
            (4, 0, 0, 0),
            (4, 30, 0, 30),
            (4, 300, 0, 300),
            (5, 0, 0, 60),
            (5, 30, 0, 30),
            (5, 300, 0, 60),
        ];
        assert_eq!(
            keep_alive_answers(broker.port).await,
            want,
            "{}",
            broker.name
        );
    }
    // By default, MQTT's longest: only a client asking for none is told.
    for broker in brokers().await {
        let answers = keep_alive_answers(broker.port).await;
        assert_eq!(answers[3], (5, 0, 0, 65535), "{}", broker.name);
        assert_eq!(answers[5], (5, 300, 0, 300), "{}", broker.name);
    }
}

/// A client that asks for no keep-alive, is told 10 s, and sends nothing
/// more: both brokers close the connection, without a DISCONNECT.
async fn silent(broker: Broker) {
    let (mut stream, connack) = raw::connack(broker.port, 5, 0, "silent").await;
    assert_eq!(connack.server_keep_alive, Some(10), "{}", broker.name);
    assert_eq!(until_closed(&mut stream).await, [], "{}", broker.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_past_its_server_keep_alive_is_disconnected() {
    // Mosquitto takes no max_keepalive below 10.
    let [mosquitto, edgefn] = brokers_with("max_keepalive 10\n", |l| {
        l.max_keepalive = Some("10s".into())
    })
    .await;
    tokio::join!(silent(mosquitto), silent(edgefn));
}
