//! MQTT clients of the tests: devices that publish and wait for each
//! PUBACK, a subscriber standing in for the cloud, a fleet engineer's
//! retained publish, and a watch on a Mosquitto's subscriptions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use crate::{PATIENCE, free_port};

/// A message seen by an [`Upstream`] subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// Topic.
    pub topic: String,
    /// Payload as text.
    pub payload: String,
    /// The `edgefn-id` user property.
    pub id: Option<String>,
}

impl Seen {
    /// The payload parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload).unwrap_or_else(|e| panic!("{}: {e}", self.payload))
    }

    /// The cleaned reading it carries: (`device`, `seq`).
    pub fn reading(&self) -> (String, u64) {
        let v = self.json();
        (
            v["device"].as_str().expect("a device").to_owned(),
            v["seq"].as_u64().expect("a seq"),
        )
    }
}

/// A subscriber standing in for the cloud: collects everything under a
/// filter, acknowledging each message.
pub struct Upstream {
    /// Everything received, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The client task.
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Subscribes to `filter` on the broker at `port`; returns once the
    /// subscription is acknowledged.
    pub async fn subscribe(port: u16, filter: &str) -> Upstream {
        let mut o = MqttOptions::new(format!("cloud-{}", free_port()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        // A persistent session: on a persistent broker nothing published
        // while this subscriber reconnects is lost.
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        o.set_max_packet_size(Some(1 << 20));
        let (client, mut events) = AsyncClient::new(o, 100);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let filter = filter.to_owned();
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            client
                                .subscribe(filter.clone(), QoS::AtLeastOnce)
                                .await
                                .unwrap();
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let id = p.properties.as_ref().and_then(|props| {
                                props
                                    .user_properties
                                    .iter()
                                    .find(|(k, _)| k == "edgefn-id")
                                    .map(|(_, v)| v.clone())
                            });
                            seen.lock().unwrap().push(Seen {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: String::from_utf8_lossy(&p.payload).into_owned(),
                                id,
                            });
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        tokio::time::timeout(PATIENCE, ready_rx)
            .await
            .expect("upstream subscription")
            .unwrap();
        Upstream { seen, task }
    }

    /// Waits until `pred` holds for what was received; panics after [`PATIENCE`].
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            {
                let seen = self.seen.lock().unwrap();
                if pred(&seen) {
                    return seen.clone();
                }
                if Instant::now() > deadline {
                    panic!(
                        "timed out waiting for {what}; received {} messages",
                        seen.len()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until at least `n` messages arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Seen> {
        self.wait_until(&format!("{n} messages upstream"), |s| s.len() >= n)
            .await
    }

    /// The distinct messages on `topic`, in order of first arrival.
    pub fn on(seen: &[Seen], topic: &str) -> Vec<Seen> {
        Self::distinct(seen)
            .into_iter()
            .filter(|s| s.topic == topic)
            .collect()
    }

    /// Distinct messages by id (duplicates after reconnects collapse).
    pub fn distinct(seen: &[Seen]) -> Vec<Seen> {
        let mut ids = std::collections::HashSet::new();
        seen.iter()
            .filter(|s| ids.insert(s.id.clone().expect("every record has an id")))
            .cloned()
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A device publishing QoS 1 messages one at a time, each waiting for its
/// PUBACK. Every connection gets a fresh client, so a PUBACK is attributed
/// to exactly the message it acknowledges: nothing queued on a dead
/// connection is sent (and acknowledged) later in another's name.
pub struct Device {
    /// Client id.
    id: String,
    /// Broker port.
    port: u16,
    /// MQTT keep-alive.
    keep_alive: Duration,
    /// The current connection, if any.
    conn: Option<DeviceConn>,
    /// Connections made so far.
    pub connections: usize,
}

/// What a device's event loop reports.
enum DeviceEvent {
    /// CONNACK.
    Connected,
    /// A publish went out with this packet id.
    Sent(u16),
    /// PUBACK for this packet id.
    Acked(u16),
    /// The connection is gone.
    Lost,
}

/// One connection of a [`Device`].
struct DeviceConn {
    /// The client.
    client: AsyncClient,
    /// Its events.
    events: tokio::sync::mpsc::UnboundedReceiver<DeviceEvent>,
    /// The event loop task.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DeviceConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Device {
    /// A device with `client_id` for the broker at `port` (connects lazily).
    pub async fn connect(client_id: &str, port: u16) -> Device {
        Self::with_keep_alive(client_id, port, Duration::from_secs(30))
    }

    /// [`Device::connect`] with MQTT keep-alive `keep_alive`.
    pub fn with_keep_alive(client_id: &str, port: u16, keep_alive: Duration) -> Device {
        Device {
            id: client_id.to_owned(),
            port,
            keep_alive,
            conn: None,
            connections: 0,
        }
    }

    async fn connection(&mut self) -> Option<&mut DeviceConn> {
        if self.conn.is_none() {
            let mut o = MqttOptions::new(&self.id, "127.0.0.1", self.port);
            o.set_keep_alive(self.keep_alive);
            o.set_clean_start(true);
            let (client, mut events) = AsyncClient::new(o, 10);
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                loop {
                    let e = match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => DeviceEvent::Connected,
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => DeviceEvent::Sent(pkid),
                        Ok(Event::Incoming(Packet::PubAck(a))) => DeviceEvent::Acked(a.pkid),
                        Ok(_) => continue,
                        Err(_) => {
                            let _ = tx.send(DeviceEvent::Lost);
                            return;
                        }
                    };
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            });
            match rx.recv().await {
                Some(DeviceEvent::Connected) => {
                    self.connections += 1;
                    self.conn = Some(DeviceConn {
                        client,
                        events: rx,
                        task,
                    })
                }
                _ => {
                    task.abort();
                    // Broker not (yet) there: a short pause before the next try.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    /// Publishes at QoS 1 and waits for its PUBACK. Returns false if the
    /// connection was lost first, could not be made, or nothing came
    /// within `wait`.
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        wait: Duration,
    ) -> bool {
        let payload: Vec<u8> = payload.into();
        let Some(conn) = self.connection().await else {
            return false;
        };
        if conn
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            self.conn = None;
            return false;
        }
        let acked = tokio::time::timeout(wait, async {
            let mut pkid = None;
            while let Some(e) = conn.events.recv().await {
                match e {
                    DeviceEvent::Sent(p) => pkid = Some(p),
                    DeviceEvent::Acked(p) if Some(p) == pkid => return true,
                    DeviceEvent::Lost => return false,
                    _ => {}
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !acked {
            self.conn = None;
        }
        acked
    }
}

/// Publishes `payload` retained, QoS 1, on the broker at `port`, as a
/// fleet engineer's tool would; returns once the broker acknowledged it.
pub async fn publish_retained(port: u16, topic: &str, payload: Vec<u8>) {
    let mut o = MqttOptions::new(format!("fleet-{}", free_port()), "127.0.0.1", port);
    o.set_max_packet_size(Some(16 << 20));
    let (client, mut events) = AsyncClient::new(o, 10);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("publishing {topic}: {e}"),
            }
        }
    })
    .await
    .expect("the broker acknowledged the retained message");
    let _ = client.disconnect().await;
}

/// A watch on how many subscriptions a Mosquitto holds, offline sessions'
/// included, this watcher's own among them. The broker must publish its
/// `$SYS` tree every second (`sys_interval 1`).
pub struct Subscriptions(Upstream);

impl Subscriptions {
    /// Subscribes to the count of the Mosquitto on `port`.
    pub async fn watch(port: u16) -> Subscriptions {
        Subscriptions(Upstream::subscribe(port, "$SYS/broker/subscriptions/count").await)
    }

    /// Waits until the last count published is `want`.
    pub async fn wait_for(&self, want: &str) {
        self.0
            .wait_until(&format!("{want} subscriptions on the local broker"), |s| {
                s.last().is_some_and(|c| c.payload == want)
            })
            .await;
    }
}

/// An MQTT 5 session of `client_id` on `port`: connects (`clean_start` or
/// resuming, kept an hour after it goes), subscribes to `filter` if given,
/// and DISCONNECTs.
pub async fn session_v5(port: u16, client_id: &str, clean_start: bool, filter: Option<&str>) {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_start(clean_start);
    o.set_session_expiry_interval(Some(3600));
    let (client, mut events) = AsyncClient::new(o, 10);
    if let Some(filter) = filter {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    }
    loop {
        match tokio::time::timeout(PATIENCE, events.poll()).await.unwrap() {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(Event::Incoming(Packet::ConnAck(_))) if filter.is_none() => break,
            Ok(_) => {}
            Err(e) => panic!("{client_id}: {e}"),
        }
    }
    client.disconnect().await.unwrap();
    loop {
        match tokio::time::timeout(PATIENCE, events.poll()).await.unwrap() {
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
