//! The small HTTP client for issuers and the Tenant Manager: hyper with rustls on the ring
//! provider (named explicitly, so nothing depends on a process-wide default provider) and
//! the platform's trust store. JSON answers only, bounded in size, with a timeout.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Largest answer read (a JWKS is a few KiB; a Tenant Manager page of 1000 tenants less
/// than 1 MiB).
const MAX_BODY: usize = 4 << 20;

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

/// An answer: status and, when the body is JSON, its value.
pub struct Answer {
    pub status: u16,
    pub json: Result<Value, String>,
}

impl HttpClient {
    pub fn new(timeout: Duration) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_provider_and_native_roots(provider.clone()) {
            Ok(b) => b,
            Err(e) => {
                // No trust store: plain http issuers still work; https ones fail to
                // connect, with this reason in health and logs.
                tracing::warn!(error = %e, "no trusted root certificates found; https issuers cannot be reached");
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        // No connect timeout of its own: the overall timeout of `send` covers connecting.
        let connector = builder.https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { client, timeout }
    }

    pub async fn get(&self, url: &str, bearer: Option<&str>) -> Result<Answer, String> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(parse(url)?)
            .header("accept", "application/json")
            .header("user-agent", concat!("epr/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("{url}: {e}"))?;
        self.send(url, req).await
    }

    pub async fn post_form(&self, url: &str, form: String) -> Result<Answer, String> {
        let req = Request::builder()
            .method(Method::POST)
            .uri(parse(url)?)
            .header("accept", "application/json")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("user-agent", concat!("epr/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| format!("{url}: {e}"))?;
        self.send(url, req).await
    }

    async fn send(&self, url: &str, req: Request<Full<Bytes>>) -> Result<Answer, String> {
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{url}: {}", chain(&e)))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("{url}: reading the answer failed: {e}"))?
                .to_bytes();
            let json = serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON ({e})"));
            Ok(Answer { status, json })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("{url}: no answer within {} ms", self.timeout.as_millis()))?
    }

    /// GET a JSON document that must answer 2xx.
    pub async fn get_json(&self, url: &str) -> Result<Value, String> {
        let a = self.get(url, None).await?;
        if !(200..300).contains(&a.status) {
            return Err(format!("{url}: HTTP {}", a.status));
        }
        a.json
    }
}

/// An absolute http(s) URL, or why not.
pub fn parse(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{url}` must be an http or https URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    Ok(uri)
}

/// An error with its causes (the outer message is often just "client error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
