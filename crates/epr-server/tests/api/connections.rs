//! Connection limits and timeouts, over raw TCP: the connection limit (idle connections make
//! room, busy ones make the excess get a quick 503), the header, body and idle timeouts,
//! and a server at its open-files limit that still answers.

use crate::child::EprCommand;
use crate::helpers::{poll, spawn_with};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEALTH: &[u8] = b"GET /health/live HTTP/1.1\r\nHost: epr\r\n\r\n";

/// Reads one response (head and content-length body) from `tcp`.
async fn read_response(tcp: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                return (head, body);
            }
        }
        let n = tcp
            .read(&mut chunk)
            .await
            .expect("the response is readable");
        assert!(n > 0, "closed before a whole response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until the server closes `tcp` (EOF or reset); returns how long that took, or
/// panics after `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    let closed = tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection is still open after {within:?}"
    );
    started.elapsed()
}

/// An idle keep-alive connection: one request answered, then nothing.
async fn idle_connection(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(HEALTH).await.unwrap();
    let (head, _) = read_response(&mut tcp).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    tcp
}

/// With every slot taken by a request in progress, a new connection is answered 503 with
/// `Retry-After` and closed at once; once a slot frees, requests are served again.
#[tokio::test]
async fn excess_connection_is_refused_quickly_with_503() {
    let app = spawn_with(|s| s.server.max_connections = 4).await;
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut tcp = idle_connection(app.addr).await;
        // Half a request header: the connection is in use, not idle.
        tcp.write_all(b"GET /health/live HTTP/1.1\r\n")
            .await
            .unwrap();
        busy.push(tcp);
    }
    // Let the server read those bytes (it reads as they arrive).
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let mut extra = TcpStream::connect(app.addr).await.unwrap();
    extra.write_all(HEALTH).await.unwrap();
    let (head, body) = tokio::time::timeout(Duration::from_secs(2), read_response(&mut extra))
        .await
        .expect("the excess connection is answered, not left hanging");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], 503, "{body}");
    assert_eq!(body["rule"], "max-connections", "{body}");
    closed_within(&mut extra, Duration::from_secs(2)).await;

    // The busy connections were kept: each finishes its request.
    let mut first = busy.remove(0);
    first.write_all(b"Host: epr\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut first).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    drop(first);
    let r = app
        .client
        .get(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// More idle connections than the limit: the health check and a registration on fresh
/// connections still answer within a second (idle connections are closed to make room).
#[tokio::test]
async fn idle_connections_at_the_limit_do_not_lock_out_health_or_writes() {
    let app = spawn_with(|s| s.server.max_connections = 8).await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(idle_connection(app.addr).await);
    }
    // And some that connect and send nothing.
    for _ in 0..24 {
        idle.push(TcpStream::connect(app.addr).await.unwrap());
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let r = client.get(app.url("/health/live")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client
        .post(app.url("/api/v1/endpoints"))
        .json(&json!({"endpointId": "conn-1", "appVersion": {"name": "demo-v1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// A keep-alive connection with nothing to do is closed after `idle_timeout_secs`.
#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = spawn_with(|s| {
        s.server.idle_timeout_secs = 1;
        s.server.header_timeout_secs = 10;
    })
    .await;
    let mut tcp = idle_connection(app.addr).await;
    let took = closed_within(&mut tcp, Duration::from_secs(4)).await;
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );
}

/// A header sent a byte at a time is cut off by `header_timeout_secs`, though bytes keep
/// coming (and the idle timeout is far away).
#[tokio::test]
async fn slowly_sent_header_is_cut_off_by_the_header_timeout() {
    let app = spawn_with(|s| {
        s.server.header_timeout_secs = 1;
        s.server.idle_timeout_secs = 60;
    })
    .await;
    let tcp = TcpStream::connect(app.addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let header = format!(
        "GET /health/live HTTP/1.1\r\nHost: epr\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(100)
    );
    let trickle = tokio::spawn(async move {
        for b in header.as_bytes() {
            if wr.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(4), rd.read(&mut chunk))
        .await
        .expect("the connection is closed by the header timeout");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "no response expected: {read:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        !trickle.is_finished() || trickle.await.unwrap(),
        "cut off mid-header"
    );
}

/// A body that never finishes is answered 408 (JSON error naming the rule) after
/// `body_timeout_secs`, and the connection is closed; nothing is registered.
#[tokio::test]
async fn unfinished_body_is_answered_408_by_the_body_timeout() {
    let app = spawn_with(|s| s.server.body_timeout_secs = 1).await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(
        b"POST /api/v1/endpoints HTTP/1.1\r\nHost: epr\r\nContent-Type: application/json\r\n\
          X-Request-Id: slow-req-1\r\nContent-Length: 100\r\n\r\n{\"endpointId\":\"slow-1\",",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let (head, body) = tokio::time::timeout(Duration::from_secs(4), read_response(&mut tcp))
        .await
        .expect("answered by the body timeout");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    // Like every response, it carries the request's ID.
    assert!(head.contains("x-request-id: slow-req-1"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], 408, "{body}");
    assert_eq!(body["field"], "body", "{body}");
    assert_eq!(body["rule"], "body-timeout", "{body}");
    closed_within(&mut tcp, Duration::from_secs(2)).await;
    let r = app.get("/endpoints/slow-1").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// Shutdown closes idle keep-alive connections at once instead of waiting for them (the
/// in-flight case is `ops::graceful_shutdown_finishes_in_flight_batch`).
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let app = spawn_with(|s| s.server.shutdown_timeout_secs = 30).await;
    let mut tcp = idle_connection(app.addr).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), app.stop())
        .await
        .expect("shutdown does not wait for idle connections");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    closed_within(&mut tcp, Duration::from_secs(1)).await;
}

/// A child server whose open-files limit (soft and hard) is 256 gets more idle connections
/// than it has files for: every attempt at the health check ends within a second (200, or
/// 503 with Retry-After / a closed connection while the flood is being sorted out), it is
/// 200 within a few seconds, and a registration goes through.
#[tokio::test]
async fn at_the_open_files_limit_the_server_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = EprCommand::new(dir.path())
        .shell_prelude("ulimit -n 256")
        .env("EPR_APPLICATIONS", "conn:conn-v1")
        .env("EPR__LOG__LEVEL", "error")
        .start()
        .await;
    let addr = server.addr();
    let mut idle = Vec::new();
    for _ in 0..400 {
        let connect = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr));
        idle.push(connect.await.expect("connections are accepted").unwrap());
    }
    let fresh = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    poll(
        Duration::from_secs(3),
        Duration::from_millis(100),
        || async {
            match fresh.get(server.url("/health/live")).send().await {
                Ok(r) if r.status() == StatusCode::OK => return Ok(()),
                Ok(r) => {
                    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                    assert_eq!(r.headers()["retry-after"], "1");
                }
                // Refused while even the refusals were saturated: closed, not left hanging.
                Err(e) => assert!(!e.is_timeout(), "not answered within a second: {e}"),
            }
            Err("still refused after 3 s".to_owned())
        },
    )
    .await;
    let r = fresh
        .post(server.url("/api/v1/endpoints"))
        .json(&json!({"endpointId": "fd-1", "appVersion": {"name": "conn-v1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}
