//! The HTTP/1.1 accept loop: a connection limit, header / body / idle timeouts, and a loop
//! that keeps answering when connections or open files run out.
//!
//! - At most `server.max_connections` connections are served. When a new one arrives at the
//!   limit, idle keep-alive connections (no request in progress, no request bytes waiting)
//!   are closed to make room, and the new one waits up to [`ROOM_WAIT`] for a slot; if
//!   every connection is busy it is answered `503` with `Retry-After` and
//!   `Connection: close`, so a health check never hangs behind idle clients.
//! - A connection's timer covers what hyper does not: the header section must arrive
//!   within `header_timeout_secs` (from the opening for the first request, from its first
//!   byte later on) and an idle keep-alive connection closes after `idle_timeout_secs`.
//!   One timer per connection, re-armed lazily: a request costs a few relaxed atomics and
//!   two clock reads, no timer operation.
//! - A request body that does not finish within `body_timeout_secs` of the server waiting
//!   for it is answered `408` (JSON error body) and the connection closed.
//! - Accept errors (EMFILE when the open-files limit is reached) back off for
//!   [`ACCEPT_BACKOFF`] instead of stalling, and close idle connections to free files.
//! - Shutdown: the listener closes, idle connections close, in-flight requests finish.
//! - TLS (`server.tls`): the handshake runs on the connection's task once it holds a slot
//!   (the connection limit applies), within the header timeout, which counts from the
//!   connection's opening; a failed handshake closes that connection only, counted in
//!   `epr_http_tls_handshake_failures_total` and logged at most every 10 s. Connections
//!   refused at the limit are closed without the plain-text 503.

use anyhow::Context as _;
use bytes::Bytes;
use epr_core::log_gate::{LogGate, DEFAULT_LOG_INTERVAL};
use epr_http::error::ApiError;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::http::{header, HeaderValue, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

/// How long a connection that arrives at the limit waits for idle ones to make room.
pub const ROOM_WAIT: Duration = Duration::from_millis(500);
/// A keep-alive connection idle for less than this is not closed to make room: its client
/// is likely about to send its next request on it.
const RECLAIM_MIN_IDLE: Duration = Duration::from_millis(100);
/// The pause after an accept error such as EMFILE: short, so the loop serves again as soon
/// as a file is free, long enough not to spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Connections over the limit waiting for room or lingering after their 503 (each holds a
/// file); beyond this they are answered 503 and closed at once.
const REFUSE_SLOTS: usize = 64;
/// How long a refused connection is drained so that its 503 is read, not reset.
const REFUSE_LINGER: Duration = Duration::from_millis(200);
/// Minimum interval between two rounds of closing idle connections.
const RECLAIM_EVERY: Duration = Duration::from_millis(50);

/// The connection settings in effect.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl ConnLimits {
    /// The configured limits, with `max_connections` lowered (and a warning logged) when it
    /// does not fit the process's open-files limit.
    pub fn from_settings(s: &crate::config::ServerSettings) -> Self {
        let mut limits = Self {
            header_timeout: Duration::from_secs(s.header_timeout_secs),
            body_timeout: Duration::from_secs(s.body_timeout_secs),
            idle_timeout: Duration::from_secs(s.idle_timeout_secs),
            max_connections: s.max_connections,
        };
        if let Some(soft) = open_files_limit() {
            let fit = connections_within(soft);
            if limits.max_connections > fit {
                tracing::warn!(
                    configured = limits.max_connections,
                    open_files_limit = soft,
                    serving = fit,
                    "server.max_connections does not fit the open-files limit (files are kept \
                     for the store, NATS and refusing excess connections); raise the limit \
                     (ulimit -n, LimitNOFILE=) to serve more"
                );
                limits.max_connections = fit;
            }
        }
        limits
    }
}

/// Files kept for everything but client connections: the store's SQLite files (writer,
/// checkpointer, one reader per thread), NATS, the listener, logs, and the connections
/// being refused.
fn reserved_files(soft: u64) -> u64 {
    (REFUSE_SLOTS as u64 + 192).min(soft / 2)
}

/// The most connections that fit in `soft` open files.
fn connections_within(soft: u64) -> usize {
    usize::try_from(soft.saturating_sub(reserved_files(soft)))
        .unwrap_or(usize::MAX)
        .max(1)
}

/// The soft open-files limit (None where there is none to read).
fn open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(soft, _)| soft)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The TLS acceptor of `server.tls`: the ring provider, chosen explicitly (another crate
/// may enable a second one, and then rustls cannot pick a default), TLS 1.2 and 1.3, ALPN
/// `http/1.1`. Errors name the setting and the file.
pub fn tls_acceptor(s: &crate::config::TlsSettings) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&s.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "server.tls.cert_file {}: no PEM certificate could be read: {e}",
                s.cert_file
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "server.tls.cert_file {}: no CERTIFICATE block in it",
            s.cert_file
        );
    }
    let key = PrivateKeyDer::from_pem_file(&s.key_file).map_err(|e| {
        anyhow::anyhow!(
            "server.tls.key_file {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) could be \
             read: {e}",
            s.key_file
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("server.tls: the TLS provider supports no protocol version")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "server.tls: the key in {} does not fit the certificate in {}",
                s.key_file, s.cert_file
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Failed TLS handshakes repeat whenever a scanner or a plain-HTTP client calls.
static HANDSHAKE_LOG: LogGate = LogGate::new(DEFAULT_LOG_INTERVAL);

fn handshake_failed(reason: &'static str, error: &dyn std::fmt::Display) {
    metrics::counter!("epr_http_tls_handshake_failures_total", "reason" => reason).increment(1);
    if let Some(suppressed) = HANDSHAKE_LOG.admit(std::time::Instant::now()) {
        tracing::warn!(
            %error,
            reason,
            suppressed,
            "TLS handshake failed; the connection is closed (logged at most every {}s, \
             repeats counted in `suppressed`)",
            DEFAULT_LOG_INTERVAL.as_secs()
        );
    }
}

/// Raises the soft open-files limit to the hard limit; returns (before, after). Every
/// connection is a file, and the default soft limit (often 1,024) is below what a
/// registry with thousands of devices' services needs.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    #[cfg(unix)]
    {
        let (before, _) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
        let after = rlimit::increase_nofile_limit(u64::MAX)?;
        Ok((before, after))
    }
    #[cfg(not(unix))]
    {
        Ok((0, 0))
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting, closes
/// idle connections and returns once every in-flight request has been answered.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tracing::info!(
        tls = tls.is_some(),
        max_connections = limits.max_connections,
        header_timeout_secs = limits.header_timeout.as_secs(),
        body_timeout_secs = limits.body_timeout.as_secs(),
        idle_timeout_secs = limits.idle_timeout.as_secs(),
        "HTTP connection limits"
    );
    metrics::gauge!("epr_http_connections_max").set(limits.max_connections as f64);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refuse_slots = Arc::new(Semaphore::new(REFUSE_SLOTS));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (reclaim_tx, reclaim_rx) = watch::channel(0u64);
    let plain = tls.is_none();
    let shared = Arc::new(Shared {
        router,
        limits,
        tls,
        reclaim: Reclaim {
            tx: reclaim_tx,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(NONE),
        },
        http: {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.keep_alive(true);
            b
        },
    });
    let tracker = TaskTracker::new();
    let mut accept_errors = ErrorLog::default();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    if is_connection_error(&e) {
                        continue;
                    }
                    metrics::counter!("epr_http_accept_errors_total").increment(1);
                    accept_errors.log(&e);
                    // Out of files: idle connections give theirs back.
                    shared.reclaim.request();
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Responses go out in more than one write; Nagle would delay them by ~40 ms.
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            shared: shared.clone(),
            stop: stop_rx.clone(),
            reclaim: reclaim_rx.clone(),
        };
        if let Ok(permit) = permits.clone().try_acquire_owned() {
            tracker.spawn(conn.run(tcp, permit));
            continue;
        }
        match refuse_slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let permits = permits.clone();
                tracker.spawn(async move {
                    match conn.wait_for_room(&permits).await {
                        Some(permit) => {
                            drop(slot);
                            conn.run(tcp, permit).await;
                        }
                        None => {
                            refuse(tcp, plain).await;
                            drop(slot);
                        }
                    }
                });
            }
            Err(_) => refuse_now(&tcp, plain),
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    tracker.close();
    tracker.wait().await;
}

/// Connection errors of one pending connection (it went away): nothing to back off from.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Logs accept errors at most every 5 s, with the count of those not logged.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn log(&mut self, e: &std::io::Error) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            error = %e,
            suppressed = self.suppressed,
            "accepting an HTTP connection failed (retrying in {} ms)",
            ACCEPT_BACKOFF.as_millis()
        );
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

const REFUSAL: &str = concat!(
    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n",
    "retry-after: 1\r\nconnection: close\r\ncontent-length: 134\r\n\r\n",
    r#"{"status":503,"error":"Service Unavailable","message":"the server is at its connection limit; retry shortly","rule":"max-connections"}"#
);

/// Answers a connection over the limit with 503 if its request has arrived, without
/// waiting; otherwise closes it (an answer before the request confuses HTTP clients, a
/// closed connection they retry). Over TLS it is only closed: no handshake is spent on a
/// refusal.
fn refuse_now(tcp: &TcpStream, plain: bool) {
    metrics::counter!("epr_http_connections_refused_total").increment(1);
    let mut sink = [0u8; 1024];
    if plain && tcp.try_read(&mut sink).is_ok_and(|n| n > 0) {
        // A new connection's send buffer is empty: the whole answer fits at once.
        let _ = tcp.try_write(REFUSAL.as_bytes());
    }
}

/// Answers a connection over the limit with 503 once its request has started to arrive,
/// and closes it once the client has read the answer.
async fn refuse(mut tcp: TcpStream, plain: bool) {
    metrics::counter!("epr_http_connections_refused_total").increment(1);
    if !plain {
        return;
    }
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(REFUSE_LINGER, tcp.readable()).await;
    let _ = tcp.try_read(&mut sink);
    let _ = tcp.try_write(REFUSAL.as_bytes());
    let _ = tcp.shutdown().await;
    // Closing with unread request bytes would reset the connection, and the client could
    // lose the 503 before reading it: read until the client closes, briefly.
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

struct Shared {
    router: axum::Router,
    limits: ConnLimits,
    tls: Option<TlsAcceptor>,
    http: hyper::server::conn::http1::Builder,
    reclaim: Reclaim,
}

/// Rounds of closing idle connections to make room: every connection looks at each round.
struct Reclaim {
    tx: watch::Sender<u64>,
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Reclaim {
    /// Starts a round unless one started within [`RECLAIM_EVERY`]: every connection wakes
    /// for a round, so a flood of new connections costs little.
    fn request(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_ms.load(Relaxed);
        if last != NONE && now.saturating_sub(last) < RECLAIM_EVERY.as_millis() as u64 {
            return;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
        {
            self.tx.send_modify(|round| *round += 1);
        }
    }
}

/// A connection about to be served.
struct Conn {
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    reclaim: watch::Receiver<u64>,
}

#[derive(Clone, Copy)]
enum Timeout {
    Header,
    Idle,
}

impl Conn {
    /// Asks idle connections to make room, round after round, for up to [`ROOM_WAIT`].
    async fn wait_for_room(
        &self,
        permits: &Arc<Semaphore>,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let until = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            self.shared.reclaim.request();
            let round = (tokio::time::Instant::now() + RECLAIM_EVERY).min(until);
            if let Ok(Ok(permit)) =
                tokio::time::timeout_at(round, permits.clone().acquire_owned()).await
            {
                return Some(permit);
            }
            if tokio::time::Instant::now() >= until {
                return None;
            }
        }
    }

    async fn run(self, tcp: TcpStream, permit: tokio::sync::OwnedSemaphorePermit) {
        let _open = OpenGauge::new();
        let start = tokio::time::Instant::now();
        let peer = tcp.peer_addr().ok();
        match self.shared.tls.clone() {
            None => self.serve_io(tcp, start, peer).await,
            Some(acceptor) => {
                let mut stop = self.stop.clone();
                let stopping = async move {
                    let _ = stop.wait_for(|v| *v).await;
                };
                let handshake = tokio::time::timeout_at(
                    start + self.shared.limits.header_timeout,
                    acceptor.accept(tcp),
                );
                tokio::select! {
                    done = handshake => match done {
                        Ok(Ok(stream)) => self.serve_io(stream, start, peer).await,
                        Ok(Err(e)) => handshake_failed("error", &e),
                        Err(_) => handshake_failed("timeout", &"no handshake within the header timeout"),
                    },
                    // Shutting down: a connection without a request yet has nothing to finish.
                    _ = stopping => {}
                }
            }
        }
        drop(permit);
    }

    /// Serves HTTP/1.1 on an open (and, with TLS, handshaken) connection until it closes.
    async fn serve_io<S>(
        self,
        stream: S,
        start: tokio::time::Instant,
        peer: Option<std::net::SocketAddr>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = self.shared.limits;
        // The timer never sleeps past the shortest timeout, so no deadline set meanwhile
        // (a request finishing, a header starting) is missed.
        let recheck = limits.header_timeout.min(limits.idle_timeout);
        let activity = Arc::new(Activity::new(start));
        let io = TokioIo::new(WatchedIo {
            tcp: stream,
            activity: activity.clone(),
        });
        let service = ConnService {
            peer,
            router: self.shared.router.clone(),
            activity: activity.clone(),
            body_timeout: limits.body_timeout,
        };
        let mut signals = control(self.stop, self.reclaim, activity.clone());
        let conn = self.shared.http.serve_connection(io, service);
        tokio::pin!(conn);
        let timer = tokio::time::sleep(recheck);
        tokio::pin!(timer);
        let mut draining = false;
        loop {
            tokio::select! {
                _ = conn.as_mut() => break,
                _ = timer.as_mut() => {
                    let (deadline, kind) = activity.deadline(&limits);
                    match kind {
                        Some(kind) if deadline <= tokio::time::Instant::now() => {
                            let kind = match kind {
                                Timeout::Header => "header",
                                Timeout::Idle => "idle",
                            };
                            metrics::counter!("epr_http_connection_timeouts_total", "kind" => kind)
                                .increment(1);
                            break;
                        }
                        _ => timer
                            .as_mut()
                            .reset(deadline.min(tokio::time::Instant::now() + recheck)),
                    }
                }
                signal = signals.recv(), if !draining => match signal {
                    // Idle connections close now, busy ones after their response.
                    Some(Signal::Drain) | None => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    // Checked again: a request may have come since the controller looked.
                    Some(Signal::Close) if activity.is_idle_for(RECLAIM_MIN_IDLE) => {
                        metrics::counter!("epr_http_connections_reclaimed_total").increment(1);
                        break;
                    }
                    Some(Signal::Close) => {}
                },
            }
        }
    }
}

/// What a connection's controller tells it.
enum Signal {
    /// Shutting down: finish the request in progress, then close.
    Drain,
    /// A reclaim round found the connection idle: close it to make room.
    Close,
}

/// Watches the server-wide shutdown and reclaim signals for one connection, on a task of its
/// own: the connection's task then polls only its own channel on each wake-up (the shared
/// signals' waiter lists are locked on every poll, which would put a global lock on every
/// request).
fn control(
    mut stop: watch::Receiver<bool>,
    mut reclaim: watch::Receiver<u64>,
    activity: Arc<Activity>,
) -> tokio::sync::mpsc::Receiver<Signal> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    // Rounds before this connection started are not for it.
    reclaim.borrow_and_update();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = stop.changed() => {
                    let _ = tx.send(Signal::Drain).await;
                    return;
                }
                changed = reclaim.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if activity.is_idle_for(RECLAIM_MIN_IDLE) {
                        let _ = tx.try_send(Signal::Close);
                    }
                }
            }
        }
    });
    rx
}

/// Keeps `epr_http_connections_open` while a connection is served.
struct OpenGauge;

impl OpenGauge {
    fn new() -> Self {
        metrics::gauge!("epr_http_connections_open").increment(1.0);
        Self
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!("epr_http_connections_open").decrement(1.0);
    }
}

const NONE: u64 = u64::MAX;

/// What a connection is doing, for its timer. Everything of a connection runs on its one
/// task, so relaxed atomics suffice (they are only there to be `Sync`).
struct Activity {
    start: tokio::time::Instant,
    /// Requests handed to the router whose response body is not finished (0 or 1: HTTP/1.1
    /// serves one at a time).
    in_flight: AtomicU32,
    /// When the first byte of the next request arrived (ms since `start`), or NONE.
    head_at: AtomicU64,
    /// When the last response finished (ms since `start`), or NONE before the first.
    done_at: AtomicU64,
    /// The current request's body timed out: its response becomes a 408.
    body_timed_out: AtomicBool,
    /// A write to the socket is waiting for the client to read: hyper drops a response's
    /// body once its last chunk is queued, so without this a slow reader's connection
    /// would look idle (and be reclaimed) while its response is still going out.
    write_blocked: AtomicBool,
}

impl Activity {
    /// `start`: when the connection opened (before a TLS handshake, which the header
    /// timeout covers).
    fn new(start: tokio::time::Instant) -> Self {
        Self {
            start,
            in_flight: AtomicU32::new(0),
            head_at: AtomicU64::new(NONE),
            done_at: AtomicU64::new(NONE),
            body_timed_out: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> tokio::time::Instant {
        self.start + Duration::from_millis(ms)
    }

    /// No request in progress or arriving for at least `min`: closing loses nothing.
    fn is_idle_for(&self, min: Duration) -> bool {
        if self.in_flight.load(Relaxed) > 0
            || self.head_at.load(Relaxed) != NONE
            || self.write_blocked.load(Relaxed)
        {
            return false;
        }
        let since = match self.done_at.load(Relaxed) {
            NONE => 0,
            done => done,
        };
        self.now_ms().saturating_sub(since) >= min.as_millis() as u64
    }

    /// Tracks whether a response is still going out (see `write_blocked`); progress after
    /// the response's body was handed over counts as activity for the idle timeout.
    fn note_write(&self, polled: &Poll<std::io::Result<usize>>) {
        match polled {
            Poll::Pending => self.write_blocked.store(true, Relaxed),
            Poll::Ready(result) => {
                self.write_blocked.store(false, Relaxed);
                if matches!(result, Ok(n) if *n > 0)
                    && self.in_flight.load(Relaxed) == 0
                    && self.done_at.load(Relaxed) != NONE
                {
                    self.done_at.store(self.now_ms(), Relaxed);
                }
            }
        }
    }

    /// When the connection times out, and why; `None` while a request is being served (then
    /// the deadline is only when to look again).
    fn deadline(&self, limits: &ConnLimits) -> (tokio::time::Instant, Option<Timeout>) {
        if self.in_flight.load(Relaxed) > 0 {
            return (tokio::time::Instant::now() + limits.idle_timeout, None);
        }
        let done = self.done_at.load(Relaxed);
        let head = self.head_at.load(Relaxed);
        if done == NONE {
            (self.start + limits.header_timeout, Some(Timeout::Header))
        } else if head != NONE {
            (self.at(head) + limits.header_timeout, Some(Timeout::Header))
        } else {
            (self.at(done) + limits.idle_timeout, Some(Timeout::Idle))
        }
    }
}

/// The socket (or its TLS stream), noting when a request's first byte arrives.
struct WatchedIo<S> {
    tcp: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.tcp).poll_read(cx, buf))?;
        let a = &self.activity;
        if buf.filled().len() > before
            && a.in_flight.load(Relaxed) == 0
            && a.head_at.load(Relaxed) == NONE
        {
            a.head_at.store(a.now_ms(), Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.activity.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.activity.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Marks a request in progress until its response body is finished (or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Relaxed);
        activity.head_at.store(NONE, Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.done_at.store(self.0.now_ms(), Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Hands each request to the router, with the body timeout and in-progress tracking.
struct ConnService {
    /// The client's address, handed to handlers as axum's `ConnectInfo` (the device
    /// routes' rate limit).
    peer: Option<std::net::SocketAddr>,
    router: axum::Router,
    activity: Arc<Activity>,
    body_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        use tower::Service;
        let guard = InFlight::begin(&self.activity);
        let mut req = req;
        if let Some(peer) = self.peer {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        let req = if req.body().is_end_stream() {
            req.map(axum::body::Body::new)
        } else {
            self.activity.body_timed_out.store(false, Relaxed);
            let (activity, timeout) = (self.activity.clone(), self.body_timeout);
            req.map(|inner| {
                axum::body::Body::new(TimedBody {
                    inner,
                    timeout,
                    timer: None,
                    activity,
                })
            })
        };
        ResponseFuture {
            inner: self.router.clone().call(req),
            guard: Some(guard),
            body_timeout: self.body_timeout,
        }
    }
}

pin_project_lite::pin_project! {
    struct ResponseFuture {
        #[pin]
        inner: axum::routing::future::RouteFuture<Infallible>,
        guard: Option<InFlight>,
        body_timeout: Duration,
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        let guard = this.guard.take().expect("polled after completion");
        if guard.0.body_timed_out.load(Relaxed) {
            guard.0.body_timed_out.store(false, Relaxed);
            metrics::counter!("epr_http_connection_timeouts_total", "kind" => "body").increment(1);
            let mut timed_out = body_timeout_response(*this.body_timeout);
            // The router's answer went through the request-ID and CORS layers; the 408
            // replacing it keeps what they added.
            for (name, value) in response.headers() {
                let name_str = name.as_str();
                if name_str == "x-request-id"
                    || name_str == "vary"
                    || name_str.starts_with("access-control-")
                {
                    timed_out.headers_mut().append(name.clone(), value.clone());
                }
            }
            response = timed_out;
        }
        Poll::Ready(Ok(response.map(|inner| TrackedBody {
            inner,
            _guard: guard,
        })))
    }
}

fn body_timeout_response(timeout: Duration) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the request body did not arrive within {} s",
            timeout.as_secs()
        ),
    )
    .with("body", "body-timeout")
    .into_response();
    // The rest of the body may still come: the connection cannot carry another request.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A response body that keeps its request in progress until it is finished.
pub struct TrackedBody {
    inner: axum::body::Body,
    _guard: InFlight,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body failed: it did not arrive within `server.body_timeout_secs`.
#[derive(Debug)]
struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimedOut {}

/// A request body with a deadline, armed only when the body is first waited for (a body
/// that came with its header costs no timer).
struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    activity: Arc<Activity>,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(timer.as_mut().poll(cx));
        self.activity.body_timed_out.store(true, Relaxed);
        Poll::Ready(Some(Err(Box::new(BodyTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_is_well_formed() {
        let (head, body) = REFUSAL.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["status"], 503);
    }

    #[test]
    fn connections_fit_below_the_open_files_limit() {
        assert_eq!(connections_within(1_048_576), 1_048_576 - 256);
        assert_eq!(connections_within(1024), 768);
        assert_eq!(connections_within(256), 128);
        assert_eq!(connections_within(1), 1);
    }
}
