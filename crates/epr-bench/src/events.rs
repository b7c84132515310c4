//! The NATS side of the bench: one subscriber on `kaa.v1.events.{instance}.>` that counts
//! the events the server publishes (by type) and, while a latency measurement is armed,
//! decodes each `registered` event and matches it with the HTTP response of its write.
//!
//! The subscriber runs on the bench's own runtime (one thread by default), so its arrival
//! timestamps include any wait for that thread; at the rates measured here that is tens of
//! microseconds, well below the milliseconds being measured.

use anyhow::{Context, Result};
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::Schema;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The server's schema of `endpoint.lifecycle.registered` (9/ELCE), read at build time so
/// the bench decodes exactly what the server encodes.
const REGISTERED_AVSC: &str = include_str!("../../epr-events/avro/0009-ep-registered.avsc");

/// Event counters, shared between the subscriber task and the phases.
pub struct Events {
    /// Reference point of the `*_ns` fields.
    base: Instant,
    pub subject_prefix: String,
    registered: AtomicU64,
    metadata: AtomicU64,
    other: AtomicU64,
    /// `registered` events whose payload did not decode with the schema (latency phase).
    malformed: AtomicU64,
    /// Messages the NATS client dropped because the subscription's buffer was full.
    slow_consumer: AtomicU64,
    /// Arrival of the latest event, ns after `base` (0: none yet).
    last_ns: AtomicU64,
    /// Arrival of the first event since [`Events::reset_first`], ns after `base`.
    first_ns: AtomicU64,
    /// Armed during the latency phase.
    tracker: Mutex<Option<LatencyTracker>>,
    /// Keeps the connection open as long as the counters are in use.
    _client: async_nats::Client,
}

/// A consistent-enough reading of the counters (each is read atomically; the subscriber
/// is quiescent whenever the bench compares them with what it wrote).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Counts {
    pub registered: u64,
    pub metadata: u64,
    pub other: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.registered + self.metadata + self.other
    }

    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            registered: self.registered - earlier.registered,
            metadata: self.metadata - earlier.metadata,
            other: self.other - earlier.other,
        }
    }
}

impl Events {
    /// Connects to `url`, subscribes to every event of `instance` and starts counting.
    /// Returns once the server has the subscription (so no event published afterwards is
    /// missed).
    pub async fn subscribe(url: &str, instance: &str) -> Result<Arc<Events>> {
        let slow = Arc::new(AtomicU64::new(0));
        let slow_cb = slow.clone();
        let client = async_nats::ConnectOptions::new()
            .name("epr-bench")
            // The default capacity (2048) drops messages under a burst of events.
            .subscription_capacity(1 << 20)
            .event_callback(move |e| {
                let slow = slow_cb.clone();
                async move {
                    match e {
                        async_nats::Event::SlowConsumer(_) => {
                            slow.fetch_add(1, Ordering::Relaxed);
                        }
                        async_nats::Event::Connected => {}
                        other => eprintln!("bench NATS client: {other}"),
                    }
                }
            })
            .connect(url)
            .await
            .with_context(|| format!("connect to NATS at {url}"))?;
        let subject_prefix = format!("kaa.v1.events.{instance}.");
        let mut sub = client.subscribe(format!("{subject_prefix}>")).await?;
        client.flush().await.context("NATS flush after subscribe")?;
        let schema = Schema::parse_str(REGISTERED_AVSC).context("parse registered .avsc")?;
        let events = Arc::new(Events {
            base: Instant::now(),
            subject_prefix,
            registered: AtomicU64::new(0),
            metadata: AtomicU64::new(0),
            other: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            slow_consumer: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            tracker: Mutex::new(None),
            _client: client,
        });
        let ev = events.clone();
        tokio::spawn(async move {
            let reader = match GenericDatumReader::builder(&schema).build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("bench: cannot build the Avro reader: {e}");
                    return;
                }
            };
            while let Some(msg) = sub.next().await {
                let now = Instant::now();
                ev.slow_consumer
                    .store(slow.load(Ordering::Relaxed), Ordering::Relaxed);
                let ns = (now - ev.base).as_nanos() as u64;
                ev.last_ns.store(ns, Ordering::Relaxed);
                ev.first_ns.fetch_min(ns, Ordering::Relaxed);
                let kind = msg
                    .subject
                    .strip_prefix(ev.subject_prefix.as_str())
                    .unwrap_or_default();
                match kind {
                    "endpoint.lifecycle.registered" => {
                        ev.registered.fetch_add(1, Ordering::Relaxed);
                        let mut guard = ev.tracker.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(t) = guard.as_mut() {
                            match decode_registered(&reader, &msg.payload) {
                                Some((corr, id)) => t.on_event(id, &corr, now),
                                None => {
                                    ev.malformed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    "endpoint.metadata.updated" => {
                        ev.metadata.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        ev.other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            eprintln!("bench: NATS subscription ended");
        });
        Ok(events)
    }

    pub fn counts(&self) -> Counts {
        Counts {
            registered: self.registered.load(Ordering::Relaxed),
            metadata: self.metadata.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }

    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    pub fn slow_consumer(&self) -> u64 {
        self.slow_consumer.load(Ordering::Relaxed)
    }

    /// Arrival of the latest event so far.
    pub fn last_arrival(&self) -> Option<Instant> {
        match self.last_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    /// Forgets the first arrival, so [`Events::first_arrival`] reports the next event.
    pub fn reset_first(&self) {
        self.first_ns.store(u64::MAX, Ordering::Relaxed);
    }

    pub fn first_arrival(&self) -> Option<Instant> {
        match self.first_ns.load(Ordering::Relaxed) {
            u64::MAX => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    /// Waits until `done(counts)` holds, or until no new event arrived for `idle`.
    /// Returns whether `done` held.
    pub async fn wait_for(&self, idle: Duration, done: impl Fn(&Counts) -> bool) -> bool {
        let mut last = self.counts();
        let mut last_change = Instant::now();
        loop {
            let c = self.counts();
            if done(&c) {
                return true;
            }
            if c != last {
                last = c;
                last_change = Instant::now();
            } else if last_change.elapsed() >= idle {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts matching `registered` events with responses.
    pub fn arm(&self) {
        *self.tracker.lock().unwrap_or_else(|p| p.into_inner()) = Some(LatencyTracker::new());
    }

    /// Runs `f` on the armed tracker.
    pub fn with_tracker<R>(&self, f: impl FnOnce(&mut LatencyTracker) -> R) -> Option<R> {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .map(f)
    }

    /// Stops matching and returns the tracker.
    pub fn disarm(&self) -> Option<LatencyTracker> {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Decodes a raw Avro `RegisteredEvent`; returns (correlationId, endpointId). `None` when
/// the datum does not match the schema, is cut short or has trailing bytes.
fn decode_registered(reader: &GenericDatumReader<'_>, payload: &[u8]) -> Option<(String, String)> {
    let mut rest = payload;
    let value = reader.read_value(&mut rest).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let Value::Record(fields) = value else {
        return None;
    };
    let (mut corr, mut id) = (None, None);
    for (name, v) in fields {
        match (name.as_str(), v) {
            ("correlationId", Value::String(s)) => corr = Some(s),
            ("endpointId", Value::String(s)) => id = Some(s),
            _ => {}
        }
    }
    Some((corr?, id?))
}

enum Pending {
    /// The write's 201 arrived first; `recorded` says it is inside the measured window.
    Response { at: Instant, recorded: bool },
    /// The event arrived first.
    Event(Instant),
}

/// Pairs each write's response with its `registered` event, keyed by endpoint ID.
pub struct LatencyTracker {
    pending: HashMap<String, Pending>,
    /// Event arrival − response arrival, µs (0 when the event came first).
    pub hist: Histogram<u64>,
    /// Recorded writes whose event arrived before their response.
    pub early: u64,
    /// Largest lead of such an event over its response, µs.
    pub early_max_us: u64,
    /// Events whose correlationId is not the X-Request-Id of their write.
    pub corr_mismatch: u64,
    /// Recorded responses still waiting for their event.
    pub awaiting: u64,
}

impl LatencyTracker {
    pub fn new() -> Self {
        Self {
            pending: HashMap::with_capacity(1 << 16),
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            early: 0,
            early_max_us: 0,
            corr_mismatch: 0,
            awaiting: 0,
        }
    }

    pub fn on_response(&mut self, id: String, at: Instant, recorded: bool) {
        match self.pending.remove(&id) {
            Some(Pending::Event(ev)) => {
                if recorded {
                    self.early += 1;
                    self.early_max_us = self.early_max_us.max((at - ev).as_micros() as u64);
                    self.hist.saturating_record(0);
                }
            }
            Some(other) => {
                // Two responses for one ID cannot happen (IDs are unique); keep the first.
                self.pending.insert(id, other);
            }
            None => {
                self.awaiting += recorded as u64;
                self.pending.insert(id, Pending::Response { at, recorded });
            }
        }
    }

    fn on_event(&mut self, id: String, correlation_id: &str, at: Instant) {
        if correlation_id != id {
            self.corr_mismatch += 1;
        }
        match self.pending.remove(&id) {
            Some(Pending::Response { at: resp, recorded }) => {
                if recorded {
                    self.awaiting -= 1;
                    self.hist
                        .saturating_record(at.saturating_duration_since(resp).as_micros() as u64);
                }
            }
            // A duplicate event, or an event for an ID this run never wrote.
            Some(Pending::Event(_)) | None => {
                self.pending.insert(id, Pending::Event(at));
            }
        }
    }

    /// Events that matched no response (duplicates, or writes that failed on the wire).
    pub fn unmatched_events(&self) -> u64 {
        self.pending
            .values()
            .filter(|p| matches!(p, Pending::Event(_)))
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::writer::datum::GenericDatumWriter;

    #[test]
    fn decodes_the_servers_registered_schema() {
        let schema = Schema::parse_str(REGISTERED_AVSC).unwrap();
        let record = Value::Record(vec![
            ("correlationId".into(), Value::String("c-1".into())),
            ("timestamp".into(), Value::Long(1)),
            ("timeout".into(), Value::Long(0)),
            ("appVersionName".into(), Value::String("bench-v1".into())),
            ("endpointId".into(), Value::String("ep-1".into())),
            ("originatorReplicaId".into(), Value::String("bench".into())),
        ]);
        let writer = GenericDatumWriter::builder(&schema).build().unwrap();
        let bytes = writer.write_value_to_vec(record).unwrap();
        let reader = GenericDatumReader::builder(&schema).build().unwrap();
        assert_eq!(
            decode_registered(&reader, &bytes),
            Some(("c-1".into(), "ep-1".into()))
        );
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode_registered(&reader, &long), None);
    }

    #[test]
    fn tracker_pairs_both_orders() {
        let mut t = LatencyTracker::new();
        let t0 = Instant::now();
        t.on_response("a".into(), t0, true);
        assert_eq!(t.awaiting, 1);
        t.on_event("a".into(), "a", t0 + Duration::from_millis(2));
        assert_eq!((t.awaiting, t.hist.len()), (0, 1));
        assert!(t.hist.max() >= 1_999);
        t.on_event("b".into(), "x", t0);
        t.on_response("b".into(), t0 + Duration::from_micros(300), true);
        assert_eq!((t.early, t.corr_mismatch, t.hist.len()), (1, 1, 2));
        assert!(t.early_max_us >= 299);
        t.on_event("b".into(), "b", t0);
        assert_eq!(t.unmatched_events(), 1);
    }
}
