//! The built-in broker's bounds on its clients, with real clients:
//! connections in total and per user name, the bytes one session holds,
//! and how fast one connection may publish. docs/DELIVERY.md says what
//! happens at each bound.

#![cfg(feature = "embedded-broker")]

use std::path::Path;

use edgefn::config::file::LocalTable;
use rumqttc::v5::MqttOptions;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use testkit::client::*;
use testkit::*;
use tokio::io::AsyncWriteExt;

/// The built-in broker alone (no upstream), with `limits` set in its
/// `[local]` table: the daemon, the broker's port and the metrics port.
async fn broker(dir: &Path, limits: impl FnOnce(&mut LocalTable)) -> (Daemon, u16, u16) {
    broker_logging(dir, DAEMON_LOG, limits).await
}

/// [`broker`] with the daemon's log filter `filter`.
async fn broker_logging(
    dir: &Path,
    filter: &str,
    limits: impl FnOnce(&mut LocalTable),
) -> (Daemon, u16, u16) {
    let port = free_port();
    let metrics = free_port();
    let mut file = standard(dir, Local::Embedded(port), free_port());
    file.upstream = None;
    limits(&mut file.local);
    file.metrics_on(metrics);
    let daemon = Daemon::start_logging(&write_config(dir, &file), filter);
    port_open(port).await;
    port_open(metrics).await;
    (daemon, port, metrics)
}

/// A counter of the daemon's metrics report now.
fn counter(metrics: u16, name: &str) -> u64 {
    report(metrics)["gateway"]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limits_are_refused_and_a_reconnect_always_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, port, metrics) = broker(dir.path(), |l| {
        l.max_connections = Some(3);
        l.max_connections_per_user = Some(2);
    })
    .await;
    // No password file, on loopback: user names are taken as given.
    let alice = Some(("alice", "-"));
    let mut a1 = connect(port, "alice-1", alice).await.unwrap();
    let a2 = connect(port, "alice-2", alice).await.unwrap();
    let refused = connect(port, "alice-3", alice).await.err();
    assert_eq!(refused.as_deref(), Some("ServerUnavailable"));
    let _b1 = connect(port, "bob-1", Some(("bob", "-"))).await.unwrap();
    let refused = connect(port, "carol-1", Some(("carol", "-"))).await.err();
    assert_eq!(refused.as_deref(), Some("ServerUnavailable"));
    let refused = connect_v311(port, "carol-2", Some(("carol", "-"))).await;
    assert_eq!(refused, "ServiceUnavailable");
    // At both limits, alice-1 comes back while its old connection is still
    // open (a device whose network dropped): it takes its session over,
    // again and again.
    for _ in 0..20 {
        a1 = connect(port, "alice-1", alice).await.unwrap();
    }
    // alice-2 leaves: alice-3 gets its place.
    drop(a2);
    let _a3 = eventually_connects(port, "alice-3", alice).await;
    let refused = connect(port, "carol-1", Some(("carol", "-"))).await.err();
    assert_eq!(refused.as_deref(), Some("ServerUnavailable"));
    assert!(counter(metrics, "broker_refused_user_connections") >= 1);
    assert!(counter(metrics, "broker_refused_connections") >= 3);
    drop(a1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_the_sockets_and_others_still_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, port, metrics) = broker(dir.path(), |l| {
        l.max_connections_per_address = Some(3);
    })
    .await;
    // Three sockets from 127.0.0.1 that never log in (once the probe of
    // `port_open` is gone).
    eventually("no socket open", || counter(metrics, "broker_sockets") == 0).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(from_address("127.0.0.1", port).await);
    }
    eventually("3 sockets open", || counter(metrics, "broker_sockets") == 3).await;
    // A fourth from there is closed as it opens: its CONNECT gets no answer.
    let mut fourth = from_address("127.0.0.1", port).await;
    let _ = fourth.write_all(&raw::connect(5, 30, "fourth")).await;
    assert_eq!(raw::read(&mut fourth).await, None);
    assert!(counter(metrics, "broker_refused_address_connections") >= 1);
    // A device on another address logs in and is answered.
    let mut other = from_address("127.0.0.2", port).await;
    other
        .write_all(&raw::connect(5, 30, "other"))
        .await
        .unwrap();
    let (first, body) = raw::read(&mut other).await.expect("a CONNACK");
    assert_eq!((first, body[1]), (0x20, 0));
    other
        .write_all(&raw::publish(5, "sensors/o/temperature", b"{}"))
        .await
        .unwrap();
    let (first, _) = raw::read(&mut other).await.expect("a PUBACK");
    assert_eq!(first, 0x40);
    // One of the idle sockets goes: 127.0.0.1 may log in again.
    drop(idle.pop());
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let mut again = from_address("127.0.0.1", port).await;
        let _ = again.write_all(&raw::connect(5, 30, "again")).await;
        if let Some((first, body)) = raw::read(&mut again).await {
            assert_eq!((first, body[1]), (0x20, 0));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "127.0.0.1 never got back in"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_straight_to_the_brokers_loopback_port_is_refused() {
    // Devices reach rmqtt through edgefn's listener, which relays them to a
    // loopback port rmqtt announces in its log.
    let dir = tempfile::tempdir().unwrap();
    let (daemon, port, _) = broker_logging(
        dir.path(),
        "info,rmqtt=warn,rmqtt_net::builder=info",
        |_| {},
    )
    .await;
    daemon.wait_for_log("Listening on edgefn/tcp").await;
    let log = daemon.log();
    let inner: u16 = log
        .split("Listening on edgefn/tcp 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("rmqtt's loopback port in the log");
    assert_ne!(inner, port);
    let mut device = connect(port, "dev-1", None).await.unwrap();
    // A local process logging in there straight, as the device, is refused
    // and takes nothing over.
    let refused = connect(inner, "dev-1", None).await.err();
    assert_eq!(refused.as_deref(), Some("NotAuthorized"));
    assert_eq!(
        device
            .publish("sensors/d1/temperature", &reading(1, 20.0))
            .await,
        PubAckReason::Success
    );
}

/// A TCP connection to the broker's `port` from the local address `ip`.
async fn from_address(ip: &str, port: u16) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap()
}

/// Connects `id` as `login`, again while a limit refuses it (a place not
/// given back yet), until it gets in.
async fn eventually_connects(port: u16, id: &str, login: Option<(&str, &str)>) -> Conn {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        match connect(port, id, login).await {
            Ok(conn) => return conn,
            Err(e) if e == "ServerUnavailable" && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{id}: {e}"),
        }
    }
}

/// Connects as `id` taking messages up to 1 MiB, resuming its session
/// (kept an hour) unless `clean_start`.
async fn subscriber(port: u16, id: &str, clean_start: bool) -> Conn {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_start(clean_start);
    o.set_session_expiry_interval(Some(3600));
    o.set_max_packet_size(Some(1 << 20));
    open(o).await.unwrap_or_else(|e| panic!("{id}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holds_at_most_max_queued_bytes_and_other_subscribers_get_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, port, metrics) = broker(dir.path(), |l| {
        l.max_queued_bytes = Some("1MiB".into());
        l.max_message_size = Some("512KiB".into());
    })
    .await;
    // A persistent session subscribed to flood/#, its client away.
    session_v5(port, "sleeper", false, Some("flood/#")).await;
    let mut awake = subscriber(port, "awake", true).await;
    assert!(matches!(
        awake.subscribe("flood/#").await,
        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
    ));
    let mut flooder = connect(port, "flooder", None).await.unwrap();
    let big = "x".repeat(256 * 1024);
    for i in 0..10 {
        let topic = format!("flood/{i}");
        assert_eq!(flooder.publish(&topic, &big).await, PubAckReason::Success);
        // The awake subscriber takes each before the next is sent: its
        // session holds one or two at a time, and gets all ten.
        assert_eq!(awake.messages(1).await[0].0, topic);
    }
    // The sleeper's session took the first four (1 MiB), not the six after.
    wait_for_counter(metrics, "broker_dropped_session_limit", 6).await;
    assert_eq!(counter(metrics, "broker_dropped_session_limit"), 6);
    // Back, the sleeper gets those four in order, then what comes next.
    let mut sleeper = subscriber(port, "sleeper", false).await;
    assert!(sleeper.session_present);
    let topics: Vec<String> = sleeper.messages(4).await.into_iter().map(|m| m.0).collect();
    assert_eq!(topics, ["flood/0", "flood/1", "flood/2", "flood/3"]);
    assert_eq!(
        flooder.publish("flood/end", "end").await,
        PubAckReason::Success
    );
    assert_eq!(sleeper.messages(1).await[0].0, "flood/end");
    // Nothing is held for anyone once every message is taken.
    wait_for_report(metrics, "nothing held", |r| {
        r["gateway"]["counters"]["broker_held_bytes"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_max_publish_rate_waits_and_every_publish_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, port, metrics) = broker(dir.path(), |l| {
        l.max_publish_rate = Some(20);
    })
    .await;
    // 60 publishes as fast as PUBACKs come: a second's worth (20) passes at
    // once, the rest wait their turn; none is refused or lost.
    let mut watcher = connect(port, "watcher", None).await.unwrap();
    watcher.subscribe("chatter/#").await;
    let mut chatty = connect(port, "chatty", None).await.unwrap();
    for i in 0..60 {
        let reason = chatty.publish("chatter/x", &i.to_string()).await;
        assert_eq!(reason, PubAckReason::Success, "publish {i}");
    }
    let got = watcher.payloads(60).await;
    let want: Vec<String> = (0..60).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    assert!(counter(metrics, "broker_publish_waits") > 0);
    // Readings on trigger topics are paced the same way and committed.
    let mut dev = Device::connect("sensor-r", port).await;
    for i in 0..30 {
        assert!(
            dev.publish_acked("sensors/r1/temperature", reading(i, 21.0), PATIENCE)
                .await
        );
    }
    wait_for_counter(metrics, "committed", 30).await;
}
