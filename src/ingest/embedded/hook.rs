//! The publish hook: where a device's message becomes a delivery, and its
//! PUBACK waits for the commit (the module doc's "How the acknowledgement
//! waits for the commit"); and the relay of edgefn's own publishes on
//! trigger topics.

use super::*;

/// A device's message in the pipeline, before its commit.
pub(super) struct Handed {
    /// Its commit.
    waiter: AckWaiter,
    /// What tells that the device stopped waiting for it.
    device: DeviceWait,
    /// Counts it in flight.
    in_flight: InFlight,
}

impl Inner {
    /// Resolves once the broker reached `phase` (or its handle is gone).
    pub(super) async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.clone();
        // An error means the sender (the EmbeddedBroker) was dropped: as good as stopped.
        let _ = rx.wait_for(|now| *now >= phase).await;
    }

    /// A sender into the pipeline, unless shutdown has begun.
    pub(super) fn sender(&self) -> Option<mpsc::Sender<Delivery>> {
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Drops the broker's own sender into the pipeline (see [`Inner::deliveries`]).
    pub(super) fn close_deliveries(&self) {
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Sends `delivery` into the pipeline, waiting for capacity until shutdown begins.
    pub(super) async fn hand_over(&self, delivery: Delivery) -> Result<(), Refusal> {
        let sender = self.sender().ok_or(Refusal::ShuttingDown)?;
        tokio::select! {
            biased;
            () = self.reached(Phase::Closing) => Err(Refusal::ShuttingDown),
            sent = sender.send(delivery) => sent.map_err(|_| Refusal::PipelineClosed),
        }
    }

    /// Sends a device's message into the pipeline and waits until its outcome is committed.
    ///
    /// Gives the message up ([`Refusal::GaveUp`]) when, before it is committed, the device
    /// no longer waits for it: the device connects again with the same client id, or its
    /// keep-alive passes with no answer from us (`give_up_after`: by then the device, and
    /// rmqtt too if it could look, takes the connection for dead). Given up, it leaves the
    /// pipeline uncommitted (see [`crate::ingest::AckWaiter::abandon`]): the device sends it
    /// again and that copy is the only one. See [`Inner::linger`] for when the hook then
    /// returns.
    pub(super) async fn deliver_and_wait(
        self: &Arc<Self>,
        client: &Id,
        give_up_after: Option<Duration>,
        topic: &str,
        payload: Bytes,
    ) -> Result<(), Refusal> {
        let Handed {
            mut waiter,
            mut device,
            in_flight: _in_flight,
        } = self.deliver(client, give_up_after, topic, payload).await?;
        match self.commit_of(&mut waiter, &mut device).await {
            Ok(()) => Ok(()),
            Err(Unwaited::Dropped) => Err(Refusal::Dropped),
            Err(Unwaited::Stopped) => Err(Refusal::ShuttingDown),
            Err(Unwaited::GaveUp(why)) => Err(self.linger(why, &mut device).await),
        }
    }

    /// Waits for the commit of a message whose device is watched by `device`. Ends early
    /// when the broker stops, or when the device gave up while no commit had the message yet:
    /// then it is taken out of the pipeline and counted in `abandoned`. A message a commit
    /// already has is waited for, whatever the device does.
    pub(super) async fn commit_of(
        &self,
        waiter: &mut AckWaiter,
        device: &mut DeviceWait,
    ) -> Result<(), Unwaited> {
        let mut watching = true;
        loop {
            tokio::select! {
                biased;
                committed = &mut *waiter => return committed.map_err(|_| Unwaited::Dropped),
                () = self.reached(Phase::Stopped) => return Err(Unwaited::Stopped),
                why = device.gave_up(), if watching => {
                    if waiter.abandon() {
                        Metrics::add(&self.metrics.abandoned, 1);
                        return Err(Unwaited::GaveUp(why));
                    }
                    // A commit has it: it is acknowledged in a moment.
                    watching = false;
                }
            }
        }
    }

    /// Sends a device's message into the pipeline, once its client has a permit and the
    /// pipeline room, unless the device stops waiting first (as in
    /// [`Inner::deliver_and_wait`]).
    pub(super) async fn deliver(
        self: &Arc<Self>,
        client: &Id,
        give_up_after: Option<Duration>,
        topic: &str,
        payload: Bytes,
    ) -> Result<Handed, Refusal> {
        let in_flight = InFlight::enter(self);
        let me = ClientRef::enter(&self.clients, &client.client_id);
        let mut device = DeviceWait {
            deadline: give_up_after.map(|d| tokio::time::Instant::now() + d),
            connects: me.slot().connects.subscribe(),
            sessions: me.slot().sessions.subscribe(),
        };
        let permit = tokio::select! {
            biased;
            permit = me.slot().permits.clone().acquire_owned() => {
                permit.map_err(|_| Refusal::ShuttingDown)?
            }
            why = device.gave_up() => return Err(self.linger(why, &mut device).await),
        };
        let hold = Hold::new(ClientPermit {
            _permit: permit,
            _client: ClientRef::enter(&self.clients, &client.client_id),
        });
        let (ack, waiter) = Ack::waiter_holding(Some(hold));
        let delivery = Delivery {
            topic: topic.to_owned(),
            payload,
            ack,
            replay: None,
        };
        tokio::select! {
            biased;
            handed = self.hand_over(delivery) => handed?,
            // Not handed over: dropped here with its ack, never committed.
            why = device.gave_up() => return Err(self.linger(why, &mut device).await),
        }
        Ok(Handed {
            waiter,
            device,
            in_flight,
        })
    }

    /// After a message was given up: returns [`Refusal::GaveUp`], which ends this session.
    /// If the device is connecting again, not before its new session exists (or the
    /// keep-alive passed): rmqtt asks the old session to step aside during that CONNECT and
    /// waits for the answer, which a session that ended meanwhile can never give, and the
    /// CONNECT would be refused.
    pub(super) async fn linger(&self, why: GaveUp, device: &mut DeviceWait) -> Refusal {
        if why == GaveUp::Reconnecting {
            tokio::select! {
                _ = device.sessions.changed() => {}
                () = until(device.deadline) => {}
                () = self.reached(Phase::Stopped) => {}
            }
        }
        Refusal::GaveUp
    }

    /// Sends a message nobody acknowledges (last will, edgefn's own publish) into the pipeline,
    /// waiting for capacity but not for the commit; a later loss is counted and logged.
    pub(super) async fn deliver_unacked(
        self: &Arc<Self>,
        topic: String,
        payload: Bytes,
        origin: Origin,
    ) {
        let (ack, waiter) = Ack::waiter();
        let delivery = Delivery {
            topic: topic.clone(),
            payload,
            ack,
            replay: None,
        };
        match self.hand_over(delivery).await {
            Ok(()) => {
                let inner = Arc::clone(self);
                tokio::spawn(async move {
                    if waiter.await.is_err() {
                        inner.lost_internal(&topic, origin, Refusal::Dropped);
                    }
                });
            }
            Err(refusal) => self.lost_internal(&topic, origin, refusal),
        }
    }

    /// Counts and logs a last will or own publish that the pipeline will never commit.
    pub(super) fn lost_internal(&self, topic: &str, origin: Origin, refusal: Refusal) {
        let total = self
            .metrics
            .broker_lost_internal
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let reason = refusal.as_str();
        if matches!(refusal, Refusal::ShuttingDown) {
            // Expected at shutdown (kicked clients' wills, for one); `shutdown` logs the total.
            debug!(
                topic,
                ?origin,
                reason,
                total,
                "message on a trigger topic lost before commit"
            );
        } else {
            warn!(
                topic,
                ?origin,
                reason,
                total,
                "message on a trigger topic lost before commit"
            );
        }
    }

    /// Dispatches one hook event.
    pub(super) async fn on_hook(
        self: &Arc<Self>,
        param: &Parameter<'_>,
        acc: Option<HookResult>,
    ) -> ReturnType {
        match param {
            Parameter::MessagePublishCheckAcl(session, publish) => {
                self.on_client_publish(session, publish, acc).await
            }
            Parameter::ClientAuthenticate(info) => {
                if !self.peers.relays_login(info.id()) {
                    debug!(
                        client_id = %info.client_id(),
                        "refused a login on the broker's loopback port that no relay made"
                    );
                    let refusal = HookResult::AuthResult(AuthResult::NotAuthorized);
                    return (false, Some(refusal));
                }
                let verdict = self.gate.authenticate(info).await;
                let Some(HookResult::AuthResult(AuthResult::Allow(..))) = &verdict.1 else {
                    return verdict;
                };
                if let Err(over) = self.limits.admit(info).await {
                    // Refused as rmqtt locks the session table for this login.
                    let id = info.id();
                    let user = id.username.as_deref();
                    let why = access::Refused::from(over);
                    self.gate
                        .refused(why, &id.client_id, self.peers.device_addr(id), user, None);
                }
                verdict
            }
            Parameter::ClientConnected(session) => {
                self.limits.connected(session).await;
                (true, acc)
            }
            Parameter::ClientDisconnected(session, _) => {
                self.limits.disconnected(session).await;
                (true, acc)
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                self.gate.check_subscribe(session, subscribe, acc)
            }
            Parameter::SessionCreated(session) => {
                self.bump(&session.id.client_id, |slot| &slot.sessions);
                (true, acc)
            }
            Parameter::ClientConnect(info) => {
                self.bump(info.client_id(), |slot| &slot.connects);
                (true, acc)
            }
            Parameter::MessagePublish(_, from, publish)
                if matches!(from.typ(), FromType::LastWill) =>
            {
                // Routed after this hook; `Sessions::forwards` drops it there too.
                let allowed = self.gate.may_publish_will(&from.id, &publish.topic, true);
                if allowed && self.functions.matches_any(&publish.topic) {
                    let (topic, payload) = (publish.topic.to_string(), publish.payload.clone());
                    self.deliver_unacked(topic, payload, Origin::LastWill).await;
                }
                (true, acc)
            }
            Parameter::MessageDropped(to, from, publish, reason) => {
                self.on_dropped(to.as_ref(), from, publish, reason);
                (true, acc)
            }
            _ => (true, acc),
        }
    }

    /// Counts a CONNECT or a new session of `client_id` in `which` of its slot, if it has
    /// one (then messages of its earlier connections are waiting: see
    /// [`Inner::deliver_and_wait`]).
    pub(super) fn bump(&self, client_id: &ClientId, which: fn(&ClientSlot) -> &watch::Sender<u64>) {
        let map = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get(client_id) {
            which(slot).send_modify(|n| *n += 1);
        }
    }

    /// The ack-after-commit path for a client's PUBLISH (see the module docs).
    pub(super) async fn on_client_publish(
        self: &Arc<Self>,
        session: &rmqtt::session::Session,
        publish: &Publish,
        acc: Option<HookResult>,
    ) -> ReturnType {
        let client = &session.id;
        self.limits.pace(&client.client_id).await;
        // A handler of higher priority already refused the message: leave it refused.
        if let Some(HookResult::PublishAclResult(verdict)) = &acc
            && verdict.is_rejected()
        {
            return (true, acc);
        }
        if !self.gate.may_publish(session, &publish.topic) {
            // Not routed, not committed; MQTT 5 gets PUBACK 0x87, 3.1.1 a plain PUBACK.
            let refusal = PublishAclResult::rejected(false, Some("not authorized".into()));
            return (false, Some(HookResult::PublishAclResult(refusal)));
        }
        if !self.functions.matches_any(&publish.topic) {
            return (true, acc);
        }
        // What rmqtt's own loop would allow the device between packets before it closed the
        // connection, were it not waiting for us.
        let give_up_after = match session.connect_info().await {
            Ok(info) => {
                let mut keep_alive = info.keep_alive();
                session
                    .fitter
                    .keep_alive(&mut keep_alive)
                    .ok()
                    .filter(|secs| *secs > 0)
                    .map(|secs| Duration::from_secs(u64::from(secs)))
            }
            Err(_) => None,
        };
        let (topic, payload) = (&publish.topic, publish.payload.clone());
        let outcome = match self.peers.relayed(client) {
            // Behind the relay: the acknowledgement waits there, the connection goes on.
            front::Relayed::Holding(peer) => self
                .deliver(client, give_up_after, topic, payload)
                .await
                .map(|handed| {
                    // QoS 0 has no packet id and no acknowledgement to hold.
                    if let Some(packet_id) = publish.packet_id {
                        peer.hold(front::Held {
                            packet_id: packet_id.get(),
                            waiter: handed.waiter,
                            device: handed.device,
                            client_id: client.client_id.clone(),
                            topic: topic.clone(),
                            in_flight: handed.in_flight,
                            settled: false,
                        });
                    }
                }),
            // Its relay ended: nobody could receive the acknowledgement.
            front::Relayed::Gone => Err(Refusal::GaveUp),
            front::Relayed::Waiting => {
                self.deliver_and_wait(client, give_up_after, topic, payload)
                    .await
            }
        };
        let Err(refusal) = outcome else {
            // Proceed without a verdict: rmqtt allows the message, routes it and acknowledges.
            return (true, acc);
        };
        if publish.qos == QoS::AtMostOnce {
            debug!(
                client_id = %client.client_id,
                topic = %publish.topic,
                reason = refusal.as_str(),
                "QoS 0 message not committed"
            );
            return (true, acc);
        }
        self.not_acknowledged(&client.client_id, &publish.topic, refusal);
        let verdict = PublishResult::reason_code(
            PublishAckReason::ImplementationSpecificError,
            Some(refusal.as_str().into()),
            // Disconnect: the only way to withhold the acknowledgement (see the module docs).
            true,
        );
        (
            false,
            Some(HookResult::PublishAclResult(PublishAclResult(verdict))),
        )
    }

    /// Counts and logs a device's QoS 1/2 message that is not acknowledged: its connection
    /// closes and the device sends it again.
    pub(super) fn not_acknowledged(&self, client_id: &ClientId, topic: &str, refusal: Refusal) {
        let total = self.metrics.broker_refused.fetch_add(1, Ordering::Relaxed) + 1;
        if matches!(refusal, Refusal::ShuttingDown | Refusal::GaveUp) {
            debug!(
                %client_id,
                topic,
                reason = refusal.as_str(),
                total,
                "closing the connection without acknowledging"
            );
        } else {
            warn!(
                %client_id,
                topic,
                reason = refusal.as_str(),
                total,
                "message not committed: closing the connection without acknowledging, \
                 the device will resend"
            );
        }
    }

    /// Counts and logs (rate-limited) a message rmqtt dropped.
    pub(super) fn on_dropped(
        &self,
        to: Option<&Id>,
        from: &MsgFrom,
        publish: &Publish,
        reason: &Reason,
    ) {
        // rmqtt reports our own refusals here too (a refused ACL verdict as a dropped
        // message with `Reason::PublishResult`); they are counted and logged where they are
        // decided.
        if matches!(reason, Reason::PublishResult(_)) {
            return;
        }
        let total = self
            .metrics
            .broker_dropped_to_subscribers
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let to = to.map(|id| id.client_id.to_string());
        if let Some(not_logged) = self.drop_warnings.admit() {
            warn!(
                to = to.as_deref(),
                from = %from.client_id,
                topic = %publish.topic,
                %reason,
                total,
                not_logged,
                "embedded broker dropped a message (more drops: debug level for 10 s)"
            );
        } else {
            debug!(
                to = to.as_deref(),
                from = %from.client_id,
                topic = %publish.topic,
                %reason,
                total,
                "embedded broker dropped a message"
            );
        }
    }
}

// `rmqtt::hook::Handler` is declared with `#[async_trait]`; this is that macro's expansion of
// the method, written out so that edgefn needs no `async-trait` dependency of its own.
impl Handler for EdgefnHook {
    fn hook<'life0, 'life1, 'async_trait>(
        &'life0 self,
        param: &'life1 Parameter<'_>,
        acc: Option<HookResult>,
    ) -> Pin<Box<dyn Future<Output = ReturnType> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.0.on_hook(param, acc))
    }
}

/// Moves edgefn's own publishes on trigger topics into `deliveries`, so that `publish`
/// never waits on the pipeline. Ends when shutdown begins, counting what it still held.
pub(super) async fn relay_chained(inner: Arc<Inner>, mut queue: mpsc::Receiver<Chained>) {
    loop {
        let next = tokio::select! {
            biased;
            () = inner.reached(Phase::Closing) => None,
            next = queue.recv() => next,
        };
        let Some(Chained { topic, payload }) = next else {
            break;
        };
        inner.deliver_unacked(topic, payload, Origin::Chained).await;
    }
    queue.close();
    while let Ok(Chained { topic, .. }) = queue.try_recv() {
        inner.lost_internal(&topic, Origin::Chained, Refusal::ShuttingDown);
    }
}
