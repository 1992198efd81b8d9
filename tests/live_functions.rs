//! Functions installed, replaced and removed in a running gateway while
//! readings flow, over a real Mosquitto on each side.

use edgefn::config::Config;
use edgefn::gateway::Gateway;
use edgefn::registry::Origin;
use testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_installed_replaced_and_removed_while_readings_flow_lose_and_duplicate_nothing() {
    // Mosquitto publishes how many subscriptions it holds every second,
    // and queues without a limit (its stock limit drops messages under a
    // flood, which is not what this test is about).
    let local = Mosquitto::start_with_extra("sys_interval 1\nmax_queued_messages 0\n").await;
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let path = standard_config(dir.path(), Local::Broker(local.url()), cloud.port);
    let full = Config::load(&path).unwrap();
    let chaos = full.functions[1].clone();
    let mut celsius = full.functions[0].clone();
    celsius.env.clear();
    let mut config = full.clone();
    config.functions.truncate(1);

    let subscriptions = Subscriptions::watch(local.port).await;
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let gateway = Gateway::start(config).await.unwrap();
    // edgefn's `sensors/+/temperature` and $SYS drop counter, and the
    // counting subscriber's.
    subscriptions.wait_for("3").await;

    // A device publishes readings until told to stop, throughout.
    let port = local.port;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let device = tokio::spawn(async move {
        let mut dev = Device::connect("sensor-live", port).await;
        let mut sent = 0;
        while !*stopped.borrow() {
            assert!(
                dev.publish_acked("sensors/d1/temperature", reading(sent, 20.0), PATIENCE)
                    .await
            );
            sent += 1;
        }
        sent
    });
    let readings = |s: &[Seen]| -> Vec<Seen> {
        s.iter()
            .filter(|m| m.topic == "site/pi-01/telemetry/d1/temperature")
            .cloned()
            .collect()
    };
    upstream
        .wait_until("50 readings", |s| readings(s).len() >= 50)
        .await;

    // A new function: subscribed to while connected, and it runs.
    gateway.install(&chaos, Origin::Deployed).await.unwrap();
    subscriptions.wait_for("4").await;
    let mut other = Device::connect("chaos-dev", local.port).await;
    assert!(other.publish_acked("chaos/x", "hello", PATIENCE).await);
    upstream
        .wait_until("chaos's echo", |s| {
            s.iter().any(|m| m.topic == "site/pi-01/echo/chaos/x")
        })
        .await;

    // A new version of clean-temperature, without UNIT=F, mid-stream.
    let before = readings(&upstream.wait_until("readings", |_| true).await).len();
    gateway.install(&celsius, Origin::Deployed).await.unwrap();
    upstream
        .wait_until("50 readings after the swap", |s| {
            readings(s).len() >= before + 50
        })
        .await;
    stop.send(true).unwrap();
    let sent = device.await.unwrap();
    let seen = upstream
        .wait_until("every reading", |s| readings(s).len() as u64 >= sent)
        .await;
    let seen = readings(&seen);
    let seqs: Vec<u64> = seen.iter().map(|m| m.reading().1).collect();
    assert_eq!(seqs, (0..sent).collect::<Vec<_>>(), "in order, each once");
    // Up to the swap in Fahrenheit too, from it on in Celsius only.
    let fahrenheit: Vec<bool> = seen
        .iter()
        .map(|m| m.json().get("temp_f").is_some())
        .collect();
    let swap = fahrenheit
        .iter()
        .position(|f| !f)
        .expect("a reading after the swap");
    assert!(
        swap >= before,
        "the swap came after reading {before}, not at {swap}"
    );
    assert!(fahrenheit[swap..].iter().all(|f| !f), "{fahrenheit:?}");

    // Removed: unsubscribed from the session.
    assert!(gateway.remove("chaos"));
    assert!(!gateway.remove("chaos"));
    subscriptions.wait_for("3").await;
    let m = gateway.metrics();
    assert_eq!((m.dead_letters, m.broker_dropped), (0, 0));
    gateway.shutdown().await;
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_routes_to_functions_installed_and_removed_while_it_runs() {
    let cloud = Mosquitto::cloud().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = standard_config(dir.path(), Local::Embedded(port), cloud.port);
    let mut config = Config::load(&path).unwrap();
    let chaos = config.functions.pop().unwrap();
    let upstream = Upstream::subscribe(cloud.port, "site/#").await;
    let gateway = Gateway::start(config).await.unwrap();
    let mut dev = Device::connect("chaos-dev", port).await;
    let echoes = |s: &[Seen]| {
        s.iter()
            .filter(|m| m.topic == "site/pi-01/echo/chaos/x")
            .count()
    };

    // No function on chaos/#: the broker takes it, nothing is stored.
    assert!(dev.publish_acked("chaos/x", "before", PATIENCE).await);
    gateway.install(&chaos, Origin::Deployed).await.unwrap();
    assert!(dev.publish_acked("chaos/x", "during", PATIENCE).await);
    upstream.wait_until("an echo", |s| echoes(s) == 1).await;
    assert!(gateway.remove("chaos"));
    assert!(dev.publish_acked("chaos/x", "after", PATIENCE).await);
    // A reading behind it still reaches the upstream, and nothing of
    // chaos's besides the one echo did.
    assert!(
        dev.publish_acked("sensors/d1/temperature", reading(1, 20.0), PATIENCE)
            .await
    );
    let seen = upstream
        .wait_until("the reading", |s| {
            s.iter()
                .any(|m| m.topic.ends_with("telemetry/d1/temperature"))
        })
        .await;
    assert_eq!(echoes(&seen), 1, "{seen:?}");
    let echo = seen.iter().find(|m| m.topic == "site/pi-01/echo/chaos/x");
    assert_eq!(echo.unwrap().payload, "during");
    let m = gateway.metrics();
    assert_eq!((m.received, m.unrouted), (2, 0), "{m:?}");
    gateway.shutdown().await;
}
