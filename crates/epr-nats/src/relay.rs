//! The outbox relay: publishes the events that the store committed with each change (9/ELCE,
//! 15/EME and 18/EFE), in commit order, and deletes them from the outbox only once NATS has them.
//!
//! Delivery is at least once. An event is removed from the outbox only after its batch is
//! confirmed: with core NATS, after the client flushed it and a request on the same
//! connection came back from the server (the server handles a connection's messages in
//! order, so every earlier publish reached it); with JetStream, after the stream acked every
//! message. A failed or unconfirmed batch is published again from its first event, so a
//! consumer can see an event twice after a failure, but never a later event of an endpoint
//! before an earlier one on the first delivery. While NATS is down nothing is published:
//! events wait in the outbox and go out, in order, after reconnection.
//!
//! Each event is published under its tenant's service instance name
//! (`kaa.v1.events.<instance>.…`, see [`crate::tenancy`]), so listeners tell tenants apart
//! by subject; with JetStream, streams must capture every tenant's subjects.

use crate::connection::{now_millis, Nats};
use epr_core::auth::TenantNaming;
use epr_core::event::OutboxEvent;
use epr_core::ids::TenantId;
use epr_core::ports::{OutboxEntry, Store, StoreError};
use epr_events::Originator;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// How events leave the outbox.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// The default tenant's originator; every other tenant's events are published under its
    /// own instance name (`<instance_name>-<tenant>`, see [`crate::tenancy`]).
    pub origin: Originator,
    pub default_tenant: TenantId,
    /// Most events read and published per round.
    pub batch: usize,
    /// Publish through JetStream and wait for the stream's acknowledgement.
    pub jetstream: bool,
    /// Longest wait for a batch's confirmation (flush round trip or JetStream acks).
    pub confirm_timeout: Duration,
    /// Longest pause between retries while publishing fails.
    pub max_backoff: Duration,
    /// How often the outbox is read even without a wake-up (covers writes from another
    /// process and any missed signal).
    pub poll_interval: Duration,
}

impl RelaySettings {
    pub fn new(origin: Originator, default_tenant: TenantId) -> Self {
        Self {
            origin,
            default_tenant,
            batch: 1024,
            jetstream: false,
            confirm_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
        }
    }
}

impl RelaySettings {
    /// Who publishes `tenant`'s events: its instance name, this replica.
    fn originator(&self, tenant: &TenantId) -> Cow<'_, Originator> {
        if *tenant == self.default_tenant {
            return Cow::Borrowed(&self.origin);
        }
        let naming = TenantNaming {
            instance_name: self.origin.instance_name.clone(),
            default_tenant: self.default_tenant.clone(),
        };
        Cow::Owned(Originator {
            instance_name: naming.instance_of(tenant),
            replica_id: self.origin.replica_id.clone(),
        })
    }
}

/// Where the relay sends events.
pub enum Sink {
    Nats(Nats),
    /// Events are not published (no NATS configured): events left in the outbox by an
    /// earlier run with NATS are removed and counted, so they do not stay forever. (The
    /// server also stops recording new events in this mode.)
    Discard,
}

/// Why a batch was not confirmed.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("NATS is not connected")]
    NotConnected,
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("no confirmation within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The running relay. Stops when `stop` turns true, after one last attempt to drain.
pub struct Relay {
    store: Arc<dyn Store>,
    sink: Sink,
    settings: RelaySettings,
    wake: Arc<Notify>,
    depth: Arc<AtomicU64>,
    store_id: String,
    /// Made once: it holds the client's limit of acknowledgements in flight.
    jetstream: Option<async_nats::jetstream::Context>,
}

impl Relay {
    /// Builds the relay and registers its wake-up with the store.
    pub fn new(store: Arc<dyn Store>, sink: Sink, settings: RelaySettings) -> Self {
        let wake = Arc::new(Notify::new());
        let waker = wake.clone();
        store.set_outbox_waker(Arc::new(move || waker.notify_one()));
        let jetstream = match &sink {
            Sink::Nats(n) if settings.jetstream => {
                Some(async_nats::jetstream::new(n.client.clone()))
            }
            _ => None,
        };
        Self {
            jetstream,
            store_id: store.store_id(),
            store,
            sink,
            settings,
            wake,
            depth: Arc::default(),
        }
    }

    /// The outbox depth as last sampled (every 2 s), for health.
    pub fn depth(&self) -> Arc<AtomicU64> {
        self.depth.clone()
    }

    /// Publishes until `stop` is set; then drains what it can within `drain_limit`.
    pub async fn run(self, mut stop: watch::Receiver<bool>, drain_limit: Duration) {
        // Deletions run beside publishing: the next batch goes out as soon as it is
        // committed instead of waiting for the previous batch's delete to commit.
        let (confirmed_tx, confirmed) = watch::channel(0i64);
        let acker = tokio::spawn(acknowledge(self.store.clone(), confirmed));
        let mut cursor = Cursor {
            published: 0,
            confirmed: confirmed_tx,
        };
        self.publish_loop(&mut cursor, &mut stop, drain_limit).await;
        drop(cursor); // the acker commits the last acknowledgement, then ends
        let _ = acker.await;
    }

    async fn publish_loop(
        &self,
        cursor: &mut Cursor,
        stop: &mut watch::Receiver<bool>,
        drain_limit: Duration,
    ) {
        let mut backoff = Duration::ZERO;
        let mut last_depth: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                break;
            }
            if last_depth.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                last_depth = Some(Instant::now());
                if let Ok(depth) = self.store.outbox_depth().await {
                    self.depth.store(depth, Ordering::Relaxed);
                    metrics::gauge!("epr_outbox_depth").set(depth as f64);
                }
            }
            match self.round(cursor).await {
                Ok(n) if n >= self.settings.batch => {
                    backoff = Duration::ZERO;
                    continue; // more are waiting
                }
                Ok(_) => {
                    backoff = Duration::ZERO;
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.settings.poll_interval) => {}
                        _ = stop.changed() => {}
                    }
                }
                Err(e) => {
                    backoff = (backoff * 2)
                        .max(Duration::from_millis(50))
                        .min(self.settings.max_backoff);
                    if !matches!(e, PublishError::NotConnected) {
                        metrics::counter!("epr_events_publish_failures_total").increment(1);
                        tracing::warn!(error = %e, retry_in = ?backoff, "event publishing failed");
                    }
                    let reconnected = async {
                        match &self.sink {
                            Sink::Nats(n) => {
                                n.state.wait_connected(backoff).await;
                                // A fresh connection still gets the rest of the backoff for
                                // non-connection errors, so a failing stream is not hammered.
                                if !matches!(e, PublishError::NotConnected) {
                                    tokio::time::sleep(backoff).await;
                                }
                            }
                            Sink::Discard => tokio::time::sleep(backoff).await,
                        }
                    };
                    tokio::select! {
                        _ = reconnected => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        let deadline = Instant::now() + drain_limit;
        while Instant::now() < deadline {
            match tokio::time::timeout(deadline - Instant::now(), self.round(cursor)).await {
                Ok(Ok(n)) if n >= self.settings.batch => continue,
                Ok(Ok(_)) => break,
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "events left in the outbox for the next start");
                    break;
                }
                Err(_) => break,
            }
        }
    }

    /// Reads the next batch, publishes and confirms it, then hands it to the acker for
    /// deletion. Returns how many events were handled.
    async fn round(&self, cursor: &mut Cursor) -> Result<usize, PublishError> {
        if let Sink::Nats(n) = &self.sink {
            if !n.state.is_connected() {
                return Err(PublishError::NotConnected);
            }
        }
        let batch = self
            .store
            .outbox_pending(cursor.published, self.settings.batch)
            .await?;
        let Some(last) = batch.last().map(|e| e.id) else {
            return Ok(0);
        };
        let handled = batch.len();
        match &self.sink {
            Sink::Discard => {
                metrics::counter!("epr_events_discarded_total").increment(handled as u64);
            }
            Sink::Nats(n) => {
                let sent = self.publish(n, &batch).await?;
                metrics::counter!("epr_events_published_total").increment(sent as u64);
                record_lag(&batch);
            }
        }
        cursor.published = last;
        let _ = cursor.confirmed.send(last);
        Ok(handled)
    }

    /// Publishes the batch in order and waits for its confirmation. Returns the number of
    /// messages published; events that cannot be encoded are logged, counted and skipped
    /// (they would block every later event forever).
    async fn publish(&self, nats: &Nats, batch: &[OutboxEntry]) -> Result<usize, PublishError> {
        let limit = self.settings.confirm_timeout;
        let mut sent = 0;
        let js = self.jetstream.as_ref();
        let mut acks = Vec::new();
        for entry in batch {
            let origin = self.settings.originator(entry.event.tenant());
            let encoded = match epr_events::encode_outbox(&entry.event, &origin) {
                Ok(e) => e,
                Err(e) => {
                    metrics::counter!("epr_events_undeliverable_total").increment(1);
                    tracing::error!(outbox_id = entry.id, error = %e, about = %about(&entry.event),
                        correlation_id = entry.event.correlation_id(),
                        "event cannot be encoded; it is dropped");
                    continue;
                }
            };
            let publish = async {
                match js {
                    // The stream drops a republished event (after a lost ack or a crash
                    // before the outbox was cleared) within its duplicate window.
                    Some(js) => js
                        .send_publish(
                            encoded.subject,
                            async_nats::jetstream::message::PublishMessage::build()
                                .payload(encoded.payload.into())
                                .message_id(format!("{}-{}", self.store_id, entry.id)),
                        )
                        .await
                        .map(|ack| acks.push(ack))
                        .map_err(|e| PublishError::Publish(e.to_string())),
                    None => nats
                        .client
                        .publish(encoded.subject, encoded.payload.into())
                        .await
                        .map_err(|e| PublishError::Publish(e.to_string())),
                }
            };
            // The client's buffer is bounded; if the connection is gone a publish can wait.
            tokio::time::timeout(limit, publish)
                .await
                .map_err(|_| PublishError::Timeout(limit))??;
            sent += 1;
        }
        let confirm = async {
            if js.is_some() {
                for ack in acks {
                    ack.await
                        .map_err(|e| PublishError::Publish(e.to_string()))?;
                }
                Ok(())
            } else {
                confirm_core(nats).await
            }
        };
        tokio::time::timeout(limit, confirm)
            .await
            .map_err(|_| PublishError::Timeout(limit))??;
        Ok(sent)
    }
}

/// How far the relay has got: the last event confirmed by NATS. Everything up to it may be
/// deleted; after a restart the relay starts again from what is still in the outbox.
struct Cursor {
    published: i64,
    confirmed: watch::Sender<i64>,
}

/// How often confirmed events are deleted. Deleting is not urgent (the relay reads on from
/// its cursor), and each delete is a store write: one per interval keeps it from adding
/// commits of its own under light load, at the price of a few more rows in the outbox.
const DELETE_INTERVAL: Duration = Duration::from_millis(200);

/// Deletes confirmed events, up to the newest confirmation, at most once per
/// [`DELETE_INTERVAL`]. A failed delete is not retried on its own: the next confirmation
/// covers it, and anything left over is republished after a restart (at least once).
async fn acknowledge(store: Arc<dyn Store>, mut confirmed: watch::Receiver<i64>) {
    let mut deleted = 0;
    // A store refusing writes (full disk, damaged file) fails every delete: one line per
    // interval.
    let failure_log = epr_core::log_gate::LogGate::default();
    loop {
        let mut closed = confirmed.changed().await.is_err();
        if !closed {
            // Let confirmations accumulate; the relay's end (sender dropped) cuts it short.
            closed = tokio::time::timeout(DELETE_INTERVAL, async {
                while confirmed.changed().await.is_ok() {}
            })
            .await
            .is_ok();
        }
        let last = *confirmed.borrow_and_update();
        if last > deleted {
            match store.outbox_ack_through(last).await {
                Ok(()) => deleted = last,
                Err(e) => {
                    if let Some(suppressed) = failure_log.admit(Instant::now()) {
                        tracing::warn!(error = %e, suppressed, "deleting published events failed");
                    }
                }
            }
        }
        if closed {
            break;
        }
    }
}

/// Confirms that the server has read everything published so far on this connection: a
/// request to a subject nobody serves comes back as "no responders" from the server itself,
/// and the server processes a connection's messages in order.
async fn confirm_core(nats: &Nats) -> Result<(), PublishError> {
    use async_nats::RequestErrorKind;
    let inbox = nats.client.new_inbox();
    match nats.client.request(inbox, bytes::Bytes::new()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(PublishError::Publish(format!("confirmation failed: {e}"))),
    }
}

/// What an event is about, for logs: `endpoint {id}` or `filter {id}`.
fn about(event: &OutboxEvent) -> String {
    match event {
        OutboxEvent::Endpoint(e) => format!("endpoint {}", e.endpoint_id),
        OutboxEvent::Filter(e) => format!("filter {}", e.filter_id),
        OutboxEvent::Token(e) => format!("tokens of endpoint {}", e.endpoint_id),
    }
}

fn record_lag(batch: &[OutboxEntry]) {
    let now = now_millis();
    for e in batch {
        let lag = (now - e.event.timestamp().millis()).max(0) as f64 / 1000.0;
        metrics::histogram!("epr_events_publish_lag_seconds").record(lag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epr_core::command::{Command, Registration, WriteCtx};
    use epr_core::ids::{AppName, AppVersionName, EndpointId, EndpointToken, TenantId};
    use epr_core::metadata::Metadata;
    use epr_store::{EmbeddedConfig, EmbeddedStore};

    async fn register(store: &EmbeddedStore, id: &str) {
        let app = AppName::parse("app").unwrap();
        let reg = Registration {
            id: EndpointId::parse(id).unwrap(),
            app: app.clone(),
            app_version: AppVersionName::parse("app-v1").unwrap(),
            metadata: Metadata::empty(),
            token_hash: EndpointToken::parse(id).unwrap().hash(&app),
            token_id: epr_core::ids::TokenId::parse(&format!("tid-{id}")).unwrap(),
        };
        let ctx = WriteCtx {
            tenant: TenantId::parse("t").unwrap(),
            now: epr_core::Timestamp(1),
            correlation_id: "c".into(),
            limits: Default::default(),
        };
        store.execute(Command::Register(reg), ctx).await.unwrap();
    }

    /// Without NATS the outbox is emptied (bounded), and the store's wake-up, not polling,
    /// makes the relay act at once.
    #[tokio::test]
    async fn discard_sink_empties_the_outbox_on_wake_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap());
        register(&store, "before-start").await;
        let mut settings = RelaySettings::new(
            Originator {
                instance_name: "epr".into(),
                replica_id: "r".into(),
            },
            TenantId::parse("t").unwrap(),
        );
        settings.poll_interval = Duration::from_secs(3600);
        let relay = Relay::new(store.clone() as Arc<dyn Store>, Sink::Discard, settings);
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(relay.run(stop, Duration::from_secs(1)));
        for i in 0..3 {
            register(&store, &format!("ep-{i}")).await;
            let deadline = Instant::now() + Duration::from_secs(2);
            while store.outbox_depth().await.unwrap() > 0 {
                assert!(Instant::now() < deadline, "the relay was not woken");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        store.shutdown().await;
    }
}
