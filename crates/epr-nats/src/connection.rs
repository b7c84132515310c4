//! The NATS connection: created at start whether or not the server is reachable, reconnects
//! by itself, and tells the rest of the service (relay, health) its state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Wall-clock Unix milliseconds, for message timestamps and expiry checks.
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// Client name shown by the server's monitoring (`connz`).
    pub client_name: String,
    /// Messages a subscription may buffer before the client drops them (slow consumer).
    pub subscription_capacity: usize,
    /// Longest wait between reconnection attempts.
    pub max_reconnect_delay: Duration,
}

/// What the service knows about its NATS connection; shared by the relay, the listeners
/// and health.
#[derive(Debug, Default)]
pub struct ConnectionState {
    connected: AtomicBool,
    /// Messages the client dropped because a subscription's buffer was full.
    slow_consumer_events: AtomicU64,
    last_error: Mutex<Option<String>>,
    changed: Notify,
}

impl ConnectionState {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn slow_consumer_events(&self) -> u64 {
        self.slow_consumer_events.load(Ordering::Relaxed)
    }

    /// Waits until connected, or until `limit` passes; returns whether connected.
    pub async fn wait_connected(&self, limit: Duration) -> bool {
        if self.is_connected() {
            return true;
        }
        let _ = tokio::time::timeout(limit, async {
            loop {
                let changed = self.changed.notified();
                if self.is_connected() {
                    return;
                }
                changed.await;
            }
        })
        .await;
        self.is_connected()
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        metrics::gauge!("epr_nats_connected").set(if up { 1.0 } else { 0.0 });
        self.changed.notify_waiters();
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

/// A client plus its observed state.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub state: Arc<ConnectionState>,
}

impl Nats {
    /// Creates the client. Never fails because the server is down: the connection is made
    /// (and remade) in the background, and `state` tells when it is up. Fails only on a
    /// malformed URL or option.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, async_nats::ConnectError> {
        let state = Arc::new(ConnectionState::default());
        state.set_connected(false);
        let events = state.clone();
        let max_delay = settings.max_reconnect_delay;
        let client = async_nats::ConnectOptions::new()
            .name(&settings.client_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .subscription_capacity(settings.subscription_capacity)
            .connection_timeout(Duration::from_secs(2))
            // Quick first retries (a restarted broker is back within a second), capped so a
            // long outage costs few attempts.
            .reconnect_delay_callback(move |attempts| {
                let exp = attempts.min(10) as u32;
                (Duration::from_millis(50) * 2u32.pow(exp)).min(max_delay)
            })
            .event_callback(move |event| {
                let state = events.clone();
                async move {
                    use async_nats::Event;
                    match event {
                        Event::Connected => {
                            tracing::info!("NATS connected");
                            state.set_connected(true);
                        }
                        Event::Disconnected => {
                            tracing::warn!("NATS disconnected; events wait in the outbox");
                            state.set_connected(false);
                        }
                        Event::Closed => state.set_connected(false),
                        Event::SlowConsumer(sid) => {
                            state.slow_consumer_events.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("epr_nats_slow_consumer_total").increment(1);
                            tracing::error!(
                                sid,
                                "NATS subscription fell behind; messages were dropped"
                            );
                        }
                        Event::ServerError(e) => {
                            tracing::warn!(error = %e, "NATS server error");
                            state.set_error(e.to_string());
                        }
                        Event::ClientError(e) => {
                            tracing::warn!(error = %e, "NATS client error");
                            state.set_error(e.to_string());
                        }
                        Event::LameDuckMode | Event::Draining => {}
                    }
                }
            })
            .connect(settings.url.as_str())
            .await?;
        Ok(Self { client, state })
    }
}
