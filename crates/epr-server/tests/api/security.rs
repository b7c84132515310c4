//! The listener's security: HTTPS with `server.tls` (a real TLS client over loopback), and
//! the safe default (no authentication: loopback only).

use crate::helpers::{spawn_with, test_settings};
use epr_server::Application;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

fn tls_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls")
}

fn client_config() -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(tls_dir().join("ca.pem")).unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One `GET` over a new TLS connection; the raw response and the negotiated ALPN protocol.
async fn tls_get(addr: SocketAddr, path: &str) -> (String, Option<Vec<u8>>) {
    let connector = tokio_rustls::TlsConnector::from(client_config());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    // The server closes after its answer (Connection: close); a missing close_notify is
    // not this test's concern.
    let _ = tls.read_to_end(&mut out).await;
    (String::from_utf8_lossy(&out).into_owned(), alpn)
}

#[tokio::test]
async fn https_serves_and_survives_bad_clients() {
    let app = spawn_with(|s| {
        s.server.tls.cert_file = tls_dir().join("cert.pem").display().to_string();
        s.server.tls.key_file = tls_dir().join("key.pem").display().to_string();
    })
    .await;
    let (resp, alpn) = tls_get(app.addr, "/health/live").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"status\":\"UP\""), "{resp}");
    assert_eq!(
        alpn.as_deref(),
        Some(&b"http/1.1"[..]),
        "ALPN offers http/1.1 only"
    );

    // Plain HTTP to the TLS port fails, cleanly: no HTTP answer, the connection closes.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/health/live", app.addr))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");
    // A client that opens and sends garbage, then one that closes at once.
    let mut raw = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0])
        .await
        .unwrap();
    drop(raw);
    drop(tokio::net::TcpStream::connect(app.addr).await.unwrap());

    // Still serving, and the failures are counted.
    let (resp, _) = tls_get(app.addr, "/api/v1/applications").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"demo\""), "{resp}");
    let metrics = crate::helpers::poll(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(50),
        || async {
            let (m, _) = tls_get(app.addr, "/metrics").await;
            if m.contains("epr_http_tls_handshake_failures_total{reason=\"error\"}") {
                Ok(m)
            } else {
                Err("no handshake failure counted".to_owned())
            }
        },
    )
    .await;
    assert!(metrics.contains("# HELP epr_http_tls_handshake_failures_total"));
    app.stop().await;
}

#[tokio::test]
async fn tls_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    s.server.tls.cert_file = dir.path().join("missing.pem").display().to_string();
    s.server.tls.key_file = tls_dir().join("key.pem").display().to_string();
    let err = Application::build(&s).await.err().expect("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("server.tls.cert_file") && text.contains("missing.pem"),
        "{text}"
    );

    // A key file holding no key.
    let other_key = dir.path().join("other.pem");
    std::fs::write(&other_key, include_str!("../data/tls/ca.pem")).unwrap();
    s.server.tls.cert_file = tls_dir().join("cert.pem").display().to_string();
    s.server.tls.key_file = other_key.display().to_string();
    let err = Application::build(&s).await.err().expect("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("server.tls.key_file") && text.contains("other.pem"),
        "{text}"
    );
}

#[tokio::test]
async fn without_authentication_only_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    s.server.listen = "0.0.0.0:0".into();
    let err = Application::build(&s).await.err().expect("refused");
    let text = format!("{err:#}");
    assert!(text.contains("auth.insecure_allow_remote"), "{text}");
    assert!(text.contains("0.0.0.0"), "{text}");

    // The explicit opt-in starts (with a warning).
    s.auth.insecure_allow_remote = true;
    let app = Application::build(&s).await.expect("opted in");
    assert!(app.addr().ip().is_unspecified());
    drop(app);

    // IPv6 loopback is loopback.
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    s.server.listen = "[::1]:0".into();
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let app = Application::build(&s).await.expect("[::1] is loopback");
        assert!(app.addr().ip().is_loopback());
    }
}
