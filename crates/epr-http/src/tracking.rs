//! Per-request tracking: the request ID, metrics by route template, and the request log.
//!
//! Every response carries `X-Request-Id`: the caller's when it is sane (1 to 128 visible
//! ASCII characters), else a new UUID. The middleware writes the ID it settled on back into
//! the request's headers, so the handlers' correlation ID (`extract::correlation_id`), and
//! with it the `correlationId` of every event the request causes, is that same ID.

use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use axum::RequestExt;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Instant;

/// The request ID header, in requests and responses.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request ID taken from a caller.
pub const REQUEST_ID_MAX_LEN: usize = 128;

/// Whether a caller's request ID is kept: 1 to 128 visible ASCII characters (no spaces or
/// control characters, so it is safe in logs and event fields).
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= REQUEST_ID_MAX_LEN && v.iter().all(u8::is_ascii_graphic)
}

thread_local! {
    /// SplitMix64 state per thread, seeded once from the OS generator: a request ID costs
    /// a few nanoseconds instead of a `getrandom` call on every request.
    static ID_STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

fn splitmix64(state: &Cell<u64>) -> u64 {
    let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
    state.set(s);
    let mut z = s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A new request ID: a random (version 4) UUID. Unique, not secret: it is never a token.
pub fn new_request_id() -> HeaderValue {
    let bytes = ID_STATE.with(|s| {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&splitmix64(s).to_le_bytes());
        b[8..].copy_from_slice(&splitmix64(s).to_le_bytes());
        b
    });
    let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .expect("a UUID is a valid header value")
}

/// Request metrics by route template and status, the request ID, and (when `log_requests`)
/// one `info` line per request.
pub(crate) async fn track(
    State(log_requests): State<bool>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = match req.headers().get(&X_REQUEST_ID) {
        Some(v) if valid_request_id(v.as_bytes()) => v.clone(),
        // Absent or not sane: replaced, never echoed; handlers see the replacement.
        _ => {
            let id = new_request_id();
            req.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
            id
        }
    };
    // A label from a fixed set: hyper accepts any token as a method, and every new label
    // value would be a new series kept for the life of the process.
    let method = match *req.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    // `MatchedPath` shares its text: a clone is a reference count, not a copy.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", |p| p.as_str());
    // Checked per request (the level can be changed at run time): below `info`, the line
    // and the endpoint ID it needs cost nothing.
    let log = log_requests && tracing::enabled!(tracing::Level::INFO);
    let endpoint_id = if log && route.contains("{endpointId}") {
        endpoint_param(&mut req).await
    } else {
        None
    };
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    record(method, route, status, elapsed.as_secs_f64());
    if log {
        let id = request_id.to_str().unwrap_or_default();
        let latency_us = elapsed.as_micros() as u64;
        match endpoint_id {
            // Only IDs of the endpoint ID alphabet are written raw; anything else is quoted
            // and escaped, so a crafted path cannot forge log lines.
            Some(ep) if ep.bytes().all(plain_id_byte) => tracing::info!(
                request_id = %id, method = %method, route = %route, status, latency_us,
                endpoint_id = %ep, "request"
            ),
            Some(ep) => tracing::info!(
                request_id = %id, method = %method, route = %route, status, latency_us,
                endpoint_id = ?ep, "request"
            ),
            None => tracing::info!(
                request_id = %id, method = %method, route = %route, status, latency_us,
                "request"
            ),
        }
    }
    resp
}

/// The two request metrics of one (method, route, status).
struct RouteMetrics {
    method: &'static str,
    status: u16,
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

thread_local! {
    /// Metric handles per route template, then (method, status), on each worker thread:
    /// resolving a labelled metric in the recorder allocates its three labels and hashes
    /// and compares them, a sizeable share of a get by id; a handle is used directly. The
    /// keys are bounded: route templates, the fixed methods, HTTP statuses.
    static ROUTE_METRICS: RefCell<HashMap<String, Vec<RouteMetrics>>> = RefCell::new(HashMap::new());
}

/// Counts a request and records its duration under its method, route and status.
fn record(method: &'static str, route: &str, status: u16, seconds: f64) {
    ROUTE_METRICS.with(|cell| {
        let mut routes = cell.borrow_mut();
        let entries = match routes.get_mut(route) {
            Some(entries) => entries,
            None => routes.entry(route.to_owned()).or_default(),
        };
        let i = match entries
            .iter()
            .position(|m| m.method == method && m.status == status)
        {
            Some(i) => i,
            None => {
                let labels = [
                    ("method", method.to_owned()),
                    ("route", route.to_owned()),
                    ("status", status.to_string()),
                ];
                entries.push(RouteMetrics {
                    method,
                    status,
                    requests: metrics::counter!("epr_http_requests_total", &labels),
                    duration: metrics::histogram!("epr_http_request_duration_seconds", &labels),
                });
                entries.len() - 1
            }
        };
        let m = &entries[i];
        m.requests.increment(1);
        m.duration.record(seconds);
    });
}

fn plain_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-')
}

/// The `{endpointId}` path parameter, percent-decoded.
async fn endpoint_param(req: &mut Request) -> Option<String> {
    let params = req.extract_parts::<RawPathParams>().await.ok()?;
    params
        .iter()
        .find(|(k, _)| *k == "endpointId")
        .map(|(_, v)| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_distinct_v4_uuids() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        for v in [a, b] {
            let u = uuid::Uuid::parse_str(v.to_str().unwrap()).unwrap();
            assert_eq!(u.get_version_num(), 4);
            assert!(valid_request_id(v.as_bytes()));
        }
    }

    #[test]
    fn caller_ids_are_bounded_visible_ascii() {
        assert!(valid_request_id(b"req-1"));
        assert!(valid_request_id(&[b'x'; 128]));
        assert!(!valid_request_id(&[b'x'; 129]));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(b"a\tb"));
        assert!(!valid_request_id("é".as_bytes()));
    }
}
