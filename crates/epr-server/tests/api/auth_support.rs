//! Authentication for the black-box tests: an app with tenants and their issuers, requests
//! with a bearer token, the assertions of a refusal (status, body, `WWW-Authenticate`), the
//! real OpenID provider (npm `oidc-provider`) as a child process, and 21/TLE events.

use crate::helpers::{spawn_with, TestApp};
use epr_events::tenant::{encode_tenant_event, TenantEvent, TenantEventKind};
use epr_server::Settings;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A configured tenant with its issuer.
pub fn tenant(id: &str, issuer: &str) -> epr_auth::TenantSettings {
    epr_auth::TenantSettings {
        id: id.into(),
        issuer: issuer.into(),
        ..Default::default()
    }
}

/// Spawns an app with these tenants (id, issuer URL) in `auth.tenants`, then `adjust`.
pub async fn spawn_auth(tenants: &[(&str, &str)], adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let tenants: Vec<_> = tenants.iter().map(|(id, iss)| tenant(id, iss)).collect();
    spawn_with(move |s| {
        s.auth.tenants = tenants;
        adjust(s);
    })
    .await
}

impl TestApp {
    /// A request to an API path under `/api/v1` with `Authorization: Bearer <token>`.
    pub fn api_as(&self, token: &str, method: Method, path: &str) -> RequestBuilder {
        self.api(method, path).bearer_auth(token)
    }

    /// `GET` an API path with the token.
    pub async fn get_as(&self, token: &str, path: &str) -> Response {
        self.api_as(token, Method::GET, path).send().await.unwrap()
    }

    /// Sends a JSON body to an API path with the token.
    pub async fn send_as(&self, token: &str, method: Method, path: &str, body: &Value) -> Response {
        self.api_as(token, method, path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }
}

/// The API's error body of `r`, checked: JSON, `status` and `error` as the status line says,
/// a message, `field` = `Authorization` and this `rule`.
async fn auth_error_body(r: Response, status: StatusCode, rule: &str) -> Value {
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(r.status(), status, "{:?}", r.headers());
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/json"), "{ct}");
    let mut body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(body["error"], status.canonical_reason().unwrap(), "{body}");
    assert_eq!(body["field"], "Authorization", "{body}");
    assert_eq!(body["rule"], rule, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body["www-authenticate"] = www.map_or(Value::Null, Value::String);
    body
}

/// A 401 for a request without `Authorization`.
pub async fn assert_no_token(r: Response) {
    let body = auth_error_body(r, StatusCode::UNAUTHORIZED, "bearer-token").await;
    assert_eq!(body["www-authenticate"], "Bearer realm=\"epr\"", "{body}");
}

/// A 401 for a refused token: the message and the challenge's `error_description` both say
/// `reason`. Returns the body.
pub async fn assert_invalid_token(r: Response, reason: &str) -> Value {
    let body = auth_error_body(r, StatusCode::UNAUTHORIZED, "valid-token").await;
    assert_eq!(
        body["message"],
        format!("the access token is not valid: {reason}"),
        "{body}"
    );
    assert_eq!(
        body["www-authenticate"],
        format!("Bearer realm=\"epr\", error=\"invalid_token\", error_description=\"{reason}\""),
        "{body}"
    );
    body
}

/// A 403 naming the missing `scope`, without a challenge.
pub async fn assert_forbidden(r: Response, scope: &str) -> Value {
    let body = auth_error_body(r, StatusCode::FORBIDDEN, &format!("scope:{scope}")).await;
    assert!(body["message"].as_str().unwrap().contains(scope), "{body}");
    assert_eq!(body["www-authenticate"], Value::Null, "{body}");
    body
}

/// The scopes of Kaa's REST API that `epr-admin` may ask the provider for.
pub const ADMIN_SCOPES: &str = "endpoint:read endpoint:update endpoint:delete \
    application:endpoint:create application:endpoints-metadata-keys:read application:read \
    application:endpoint-filter:read application:endpoint-filter:create \
    application:endpoint-filter:update application:endpoint-filter:delete";

/// The real OpenID provider (`crates/epr-server/tests/oidc/provider.mjs`, run by node) on a
/// loopback port; killed when dropped.
pub struct OidcProvider {
    child: Option<Child>,
    pub port: u16,
    keys_dir: PathBuf,
}

impl OidcProvider {
    /// Starts the provider with these RSA keys (`k1,k2`: the first signs), kept in
    /// `keys_dir` so that a restart with other names rotates them; waits for `READY`.
    pub fn start(keys_dir: &Path, port: u16, keys: &str) -> Self {
        let mut p = Self {
            child: None,
            port,
            keys_dir: keys_dir.to_path_buf(),
        };
        p.restart(keys);
        p
    }

    /// Starts it again on the same port and keys directory with `keys`.
    pub fn restart(&mut self, keys: &str) {
        assert!(self.child.is_none(), "the provider is running");
        let script = std::env::var("EPR_TEST_OIDC_PROVIDER").unwrap_or_else(|_| {
            panic!(
                "EPR_TEST_OIDC_PROVIDER is not set: run `eval \"$(scripts/services-up.sh)\"` \
                 (it installs node and the provider) and export it"
            )
        });
        let mut child = Command::new("node")
            .arg(&script)
            .args(["--port", &self.port.to_string(), "--keys-dir"])
            .arg(&self.keys_dir)
            .args(["--keys", keys])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run node ({e}); scripts/services-up.sh installs it")
            });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Lines after READY are read (and dropped) so the pipe never fills up.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("READY ") {
                    let _ = tx.send(line);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => assert_eq!(line, format!("READY {}", self.issuer_of_port())),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("the OpenID provider did not start ({script}): {err}");
            }
        }
        self.child = Some(child);
    }

    fn issuer_of_port(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The issuer URL (the tokens' `iss`).
    pub fn issuer(&self) -> String {
        self.issuer_of_port()
    }

    /// Stops the provider (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An access token from a client credentials grant (`POST /token`, HTTP basic auth
    /// with the client's secret `<client>-secret`) for these space-separated scopes.
    pub async fn token(&self, client: &str, scopes: &str) -> String {
        let body = format!(
            "grant_type=client_credentials&scope={}",
            scopes.replace(':', "%3A").replace(' ', "+")
        );
        let r = reqwest::Client::new()
            .post(format!("{}/token", self.issuer()))
            .basic_auth(client, Some(format!("{client}-secret")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let json: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::OK, "token grant refused: {json}");
        assert_eq!(json["token_type"], "Bearer", "{json}");
        json["access_token"].as_str().unwrap().to_owned()
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `kid` in a JWT's header.
pub fn kid_of(token: &str) -> String {
    use base64::Engine;
    let head = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

/// Publishes a 21/TLE event (as Kaa's Tenant Manager does) for `tenant`.
pub async fn publish_tenant_event(nats: &async_nats::Client, kind: TenantEventKind, tenant: &str) {
    let ev = TenantEvent {
        correlation_id: format!("tle-{tenant}"),
        timestamp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
        timeout: 0,
        tenant_id: tenant.into(),
        originator_replica_id: "tm-0".into(),
    };
    let subject = format!("kaa.v1.events.tm.tenant.lifecycle.{}", kind.token());
    nats.publish(subject, encode_tenant_event(kind, &ev).unwrap().into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
}
