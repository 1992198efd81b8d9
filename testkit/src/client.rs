//! MQTT 5 (and 3.1.1) clients for tests that look at what a broker
//! answers: CONNACK, PUBACK and SUBACK reason codes, and the messages that
//! arrive, packet by packet.

use std::time::Duration;

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAckProperties, ConnectReturnCode, Filter, Packet, PubAckReason, Publish, PublishProperties,
    SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use crate::PATIENCE;

/// An MQTT 5 connection and what arrives on it.
pub struct Conn {
    /// The client.
    pub client: AsyncClient,
    /// Packets in; an error when the connection ended.
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<Result<Packet, String>>,
    /// Messages that arrived while an acknowledgement was awaited.
    pub early: std::collections::VecDeque<Packet>,
    /// Whether the CONNACK said the broker had a session for this client id.
    pub session_present: bool,
    /// The CONNACK's properties.
    pub connack: Option<ConnAckProperties>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects over MQTT 5 as `id`, logging in with `login`; the connection, or
/// the CONNACK's refusal.
pub async fn connect(port: u16, id: &str, login: Option<(&str, &str)>) -> Result<Conn, String> {
    connect_with(port, id, login, None).await
}

/// [`connect`] with a will on `will`, if given.
pub async fn connect_with(
    port: u16,
    id: &str,
    login: Option<(&str, &str)>,
    will: Option<&str>,
) -> Result<Conn, String> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    if let Some(topic) = will {
        o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            topic,
            "gone",
            QoS::AtLeastOnce,
            false,
            None,
        ));
    }
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    open(o).await
}

/// Opens the connection `o` describes: it, or why it was refused (the
/// CONNACK's reason, or the error that ended it before one).
pub async fn open(o: MqttOptions) -> Result<Conn, String> {
    let (client, mut events) = AsyncClient::new(o, 10);
    let connack = match tokio::time::timeout(PATIENCE, events.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) if a.code == ConnectReturnCode::Success => a,
        Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => return Err(format!("{:?}", a.code)),
        Ok(Err(rumqttc::v5::ConnectionError::ConnectionRefused(code))) => {
            return Err(format!("{code:?}"));
        }
        Ok(Err(e)) => return Err(format!("no CONNACK: {e}")),
        other => panic!("no CONNACK: {other:?}"),
    };
    let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    let _ = tx.send(Err("DISCONNECT sent".into()));
                    return;
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    Ok(Conn {
        client,
        incoming,
        early: Default::default(),
        session_present: connack.session_present,
        connack: connack.properties,
        task,
    })
}

impl Conn {
    /// The next packet, within [`PATIENCE`].
    pub async fn next(&mut self, what: &str) -> Packet {
        match tokio::time::timeout(PATIENCE, self.incoming.recv()).await {
            Ok(Some(Ok(packet))) => packet,
            Ok(Some(Err(e))) => panic!("connection gone waiting for {what}: {e}"),
            Ok(None) => panic!("connection gone waiting for {what}"),
            Err(_) => panic!("no {what}"),
        }
    }

    /// Waits until the broker closes the connection (with a DISCONNECT or without).
    pub async fn closed(&mut self) {
        loop {
            match tokio::time::timeout(PATIENCE, self.incoming.recv()).await {
                Ok(Some(Ok(Packet::Disconnect(_))) | Some(Err(_)) | None) => return,
                Ok(Some(Ok(_))) => {}
                Err(_) => panic!("the connection stayed open"),
            }
        }
    }

    /// Publishes at QoS 1; the PUBACK's reason.
    pub async fn publish(&mut self, topic: &str, payload: &str) -> PubAckReason {
        self.publish_with(topic, payload, false).await
    }

    /// [`Conn::publish`], retained if `retain`.
    pub async fn publish_with(&mut self, topic: &str, payload: &str, retain: bool) -> PubAckReason {
        self.publish_props(topic, payload, retain, PublishProperties::default())
            .await
    }

    /// [`Conn::publish_with`], with `properties` (a topic alias, say).
    pub async fn publish_props(
        &mut self,
        topic: &str,
        payload: &str,
        retain: bool,
        properties: PublishProperties,
    ) -> PubAckReason {
        let payload = payload.to_owned();
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, properties)
            .await
            .unwrap();
        loop {
            match self.next("PUBACK").await {
                Packet::PubAck(ack) => return ack.reason,
                p @ Packet::Publish(_) => self.early.push_back(p),
                _ => {}
            }
        }
    }

    /// Publishes at `qos`, and waits for the end of its flow: nothing at
    /// QoS 0, the PUBACK at 1, the PUBCOMP at 2 (each reason's name).
    pub async fn publish_at(&mut self, qos: QoS, topic: &str, payload: &str) -> String {
        self.client
            .publish(topic, qos, false, payload.to_owned())
            .await
            .unwrap();
        loop {
            if qos == QoS::AtMostOnce {
                return "sent".into();
            }
            match self.next("the end of a publish flow").await {
                Packet::PubAck(ack) if qos == QoS::AtLeastOnce => {
                    return format!("{:?}", ack.reason);
                }
                Packet::PubComp(comp) if qos == QoS::ExactlyOnce => {
                    return format!("{:?}", comp.reason);
                }
                p @ Packet::Publish(_) => self.early.push_back(p),
                _ => {}
            }
        }
    }

    /// Subscribes at QoS 1; the SUBACK's reason.
    pub async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.subscribe_to(Filter::new(filter, QoS::AtLeastOnce))
            .await
    }

    /// Subscribes with `filter`'s options; the SUBACK's reason.
    pub async fn subscribe_to(&mut self, filter: Filter) -> SubscribeReasonCode {
        self.client.subscribe_many([filter]).await.unwrap();
        loop {
            match self.next("SUBACK").await {
                Packet::SubAck(ack) => return ack.return_codes[0],
                p @ Packet::Publish(_) => self.early.push_back(p),
                _ => {}
            }
        }
    }

    /// Sends DISCONNECT and waits until it went out.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        loop {
            match tokio::time::timeout(PATIENCE, self.incoming.recv()).await {
                Ok(Some(Err(_)) | None) => return,
                Ok(Some(Ok(_))) => {}
                Err(_) => panic!("the DISCONNECT never went out"),
            }
        }
    }

    /// The next message.
    pub async fn next_publish(&mut self) -> Publish {
        loop {
            let next = match self.early.pop_front() {
                Some(p) => p,
                None => self.next("a message").await,
            };
            if let Packet::Publish(p) = next {
                return p;
            }
        }
    }

    /// The topics and payloads of the next `n` messages.
    pub async fn messages(&mut self, n: usize) -> Vec<(String, String)> {
        let mut got = Vec::new();
        while got.len() < n {
            let p = self.next_publish().await;
            got.push((
                String::from_utf8_lossy(&p.topic).into_owned(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            ));
        }
        got
    }

    /// The payloads of the next `n` messages.
    pub async fn payloads(&mut self, n: usize) -> Vec<String> {
        self.messages(n).await.into_iter().map(|m| m.1).collect()
    }
}

/// Connects over MQTT 3.1.1; the CONNACK's answer.
pub async fn connect_v311(port: u16, id: &str, login: Option<(&str, &str)>) -> String {
    use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet};
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    let (_client, mut events) = AsyncClient::new(o, 10);
    match tokio::time::timeout(PATIENCE, events.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => format!("{:?}", a.code),
        Ok(Err(ConnectionError::ConnectionRefused(code))) => format!("{code:?}"),
        other => panic!("{id}: no CONNACK: {other:?}"),
    }
}

/// MQTT spoken byte by byte, for what a client library will not send: a
/// keep-alive of 0, a packet larger than the broker's maximum.
pub mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use crate::PATIENCE;

    /// MQTT's variable byte integer.
    fn varint(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                return;
            }
        }
    }

    /// A string with its 2-byte length.
    fn string(s: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// A packet of type `first` (its first byte) around `body`.
    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        varint(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    /// A clean-start CONNECT of `version` (4: 3.1.1, 5) with `keep_alive`.
    pub fn connect(version: u8, keep_alive: u16, client_id: &str) -> Vec<u8> {
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.extend_from_slice(&[version, 0x02]);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        if version == 5 {
            body.push(0); // no properties
        }
        string(client_id.as_bytes(), &mut body);
        packet(0x10, &body)
    }

    /// A QoS 1 PUBLISH (packet id 1) of `payload` on `topic`.
    pub fn publish(version: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
        publish_id(version, topic, payload, 1)
    }

    /// A QoS 1 PUBLISH of `payload` on `topic` with packet id `id`.
    pub fn publish_id(version: u8, topic: &str, payload: &[u8], id: u16) -> Vec<u8> {
        let mut body = Vec::new();
        string(topic.as_bytes(), &mut body);
        body.extend_from_slice(&id.to_be_bytes());
        if version == 5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        packet(0x32, &body)
    }

    /// One packet: its first byte and its body; `None` once the broker closed
    /// the connection.
    pub async fn read(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let read = async {
            let first = stream.read_u8().await.ok()?;
            let (mut len, mut shift) = (0usize, 0);
            loop {
                let b = stream.read_u8().await.ok()?;
                len |= usize::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0; len];
            stream.read_exact(&mut body).await.ok()?;
            Some((first, body))
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("the broker answered or closed the connection")
    }

    /// What these tests read of a CONNACK.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Connack {
        /// The reason (return) code.
        pub code: u8,
        /// Server Keep Alive (property 0x13), if given.
        pub server_keep_alive: Option<u16>,
    }

    /// Connects to `port` with `version` and `keep_alive` as `client_id`;
    /// the open connection and its CONNACK.
    pub async fn connack(
        port: u16,
        version: u8,
        keep_alive: u16,
        client_id: &str,
    ) -> (TcpStream, Connack) {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream
            .write_all(&connect(version, keep_alive, client_id))
            .await
            .unwrap();
        let (first, body) = read(&mut stream).await.expect("a CONNACK");
        assert_eq!(first, 0x20, "not a CONNACK: {body:?}");
        let code = body[1];
        let mut server_keep_alive = None;
        if version == 5 {
            // Properties: their length (one byte, as they are short here),
            // then identifier and value, each.
            assert!(
                body[2] < 0x80,
                "CONNACK properties too long for this reader"
            );
            let props = &body[3..];
            let mut i = 0;
            while i < props.len() {
                let id = props[i];
                let text =
                    |at: usize| 2 + usize::from(u16::from_be_bytes([props[at], props[at + 1]]));
                let len = match id {
                    0x13 | 0x21 | 0x22 => 2,
                    0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
                    0x11 | 0x27 => 4,
                    // Strings: assigned client id, response information,
                    // server reference, reason string, authentication method.
                    0x12 | 0x1a | 0x1c | 0x1f | 0x15 | 0x16 => text(i + 1),
                    // User property: two strings.
                    0x26 => {
                        let key = text(i + 1);
                        key + text(i + 1 + key)
                    }
                    other => panic!("CONNACK property {other:#x}"),
                };
                if id == 0x13 {
                    server_keep_alive = Some(u16::from_be_bytes([props[i + 1], props[i + 2]]));
                }
                i += 1 + len;
            }
        }
        (
            stream,
            Connack {
                code,
                server_keep_alive,
            },
        )
    }
}
