//! Test support (feature `testkit`): fixed keys, a loopback OpenID issuer, a token minter
//! and a loopback Tenant Manager. Real HTTP servers on `127.0.0.1:0`, for the crate's
//! tests, the server's black-box tests and the benchmarks.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

/// The fixed test keys (`testdata/`): two of each kind, for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestKey {
    Rsa1,
    Rsa2,
    Ec1,
    Ec2,
    Ed1,
    Ed2,
}

impl TestKey {
    pub const ALL: [TestKey; 6] = [
        TestKey::Rsa1,
        TestKey::Rsa2,
        TestKey::Ec1,
        TestKey::Ec2,
        TestKey::Ed1,
        TestKey::Ed2,
    ];

    /// The private key (PKCS#8 PEM).
    pub fn private_pem(self) -> &'static str {
        match self {
            TestKey::Rsa1 => include_str!("../testdata/rsa1.pem"),
            TestKey::Rsa2 => include_str!("../testdata/rsa2.pem"),
            TestKey::Ec1 => include_str!("../testdata/ec1.pem"),
            TestKey::Ec2 => include_str!("../testdata/ec2.pem"),
            TestKey::Ed1 => include_str!("../testdata/ed1.pem"),
            TestKey::Ed2 => include_str!("../testdata/ed2.pem"),
        }
    }

    /// The public key (SPKI PEM): what an attacker may use as an HMAC secret.
    pub fn public_pem(self) -> &'static str {
        match self {
            TestKey::Rsa1 => include_str!("../testdata/rsa1.pub.pem"),
            TestKey::Rsa2 => include_str!("../testdata/rsa2.pub.pem"),
            TestKey::Ec1 => include_str!("../testdata/ec1.pub.pem"),
            TestKey::Ec2 => include_str!("../testdata/ec2.pub.pem"),
            TestKey::Ed1 => include_str!("../testdata/ed1.pub.pem"),
            TestKey::Ed2 => include_str!("../testdata/ed2.pub.pem"),
        }
    }

    pub fn alg(self) -> Algorithm {
        match self {
            TestKey::Rsa1 | TestKey::Rsa2 => Algorithm::RS256,
            TestKey::Ec1 | TestKey::Ec2 => Algorithm::ES256,
            TestKey::Ed1 | TestKey::Ed2 => Algorithm::EdDSA,
        }
    }

    /// Its `kid` in the issuer's JWKS and in minted tokens.
    pub fn kid(self) -> &'static str {
        match self {
            TestKey::Rsa1 => "rsa1",
            TestKey::Rsa2 => "rsa2",
            TestKey::Ec1 => "ec1",
            TestKey::Ec2 => "ec2",
            TestKey::Ed1 => "ed1",
            TestKey::Ed2 => "ed2",
        }
    }

    pub fn encoding_key(self) -> EncodingKey {
        let pem = self.private_pem().as_bytes();
        match self.alg() {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
            _ => EncodingKey::from_ed_pem(pem),
        }
        .expect("test key")
    }

    /// The public JWK, with `kid`, `alg` and `use: sig`.
    pub fn jwk(self) -> Value {
        self.jwk_with(true)
    }

    /// The public JWK; `with_kid: false` leaves `kid` out (tokens are then matched by
    /// algorithm).
    pub fn jwk_with(self, with_kid: bool) -> Value {
        let jwk = Jwk::from_encoding_key(&self.encoding_key(), self.alg()).expect("test jwk");
        let mut v = serde_json::to_value(jwk).expect("jwk json");
        let o = v.as_object_mut().expect("jwk object");
        o.insert("use".into(), json!("sig"));
        if with_kid {
            o.insert("kid".into(), json!(self.kid()));
        } else {
            o.remove("kid");
        }
        v
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    crate::verify::now_secs()
}

/// Builds and signs access tokens.
#[derive(Debug, Clone)]
pub struct TokenBuilder {
    key: TestKey,
    header: Map<String, Value>,
    claims: Map<String, Value>,
}

impl TokenBuilder {
    /// A token of `iss`, audience `kaa-rest-api`, subject `tester`, valid for 5 minutes,
    /// signed by `key` with its `kid`.
    pub fn new(key: TestKey, iss: &str) -> Self {
        let mut header = Map::new();
        header.insert("alg".into(), json!(format!("{:?}", key.alg())));
        header.insert("typ".into(), json!("JWT"));
        header.insert("kid".into(), json!(key.kid()));
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(iss));
        claims.insert("aud".into(), json!("kaa-rest-api"));
        claims.insert("sub".into(), json!("tester"));
        claims.insert("iat".into(), json!(now()));
        claims.insert("exp".into(), json!(now() + 300));
        Self {
            key,
            header,
            claims,
        }
    }

    pub fn iss(self, iss: &str) -> Self {
        self.claim("iss", json!(iss))
    }
    /// A string, or a JSON array for several audiences.
    pub fn aud(self, aud: Value) -> Self {
        self.claim("aud", aud)
    }
    pub fn subject(self, sub: &str) -> Self {
        self.claim("sub", json!(sub))
    }
    /// `exp` = now + `secs` (negative: in the past).
    pub fn exp_in(self, secs: i64) -> Self {
        self.claim("exp", json!(now() + secs))
    }
    /// `nbf` = now + `secs`.
    pub fn nbf_in(self, secs: i64) -> Self {
        self.claim("nbf", json!(now() + secs))
    }
    /// The space-separated `scope` claim.
    pub fn scope(self, scope: &str) -> Self {
        self.claim("scope", json!(scope))
    }
    /// `realm_access.roles`.
    pub fn roles(self, roles: &[&str]) -> Self {
        self.claim("realm_access", json!({ "roles": roles }))
    }
    /// Any claim, replaced or added.
    pub fn claim(mut self, name: &str, value: Value) -> Self {
        self.claims.insert(name.into(), value);
        self
    }
    /// Leave a claim out.
    pub fn without(mut self, name: &str) -> Self {
        self.claims.remove(name);
        self
    }
    /// The header's `kid`; `None` leaves it out.
    pub fn kid(mut self, kid: Option<&str>) -> Self {
        match kid {
            Some(k) => self.header.insert("kid".into(), json!(k)),
            None => self.header.remove("kid"),
        };
        self
    }
    /// Any header field, replaced or added (e.g. `alg`).
    pub fn header(mut self, name: &str, value: Value) -> Self {
        self.header.insert(name.into(), value);
        self
    }

    /// Signed with the key (the header's `alg` must be the key's for a valid signature).
    pub fn sign(&self) -> String {
        let header: Header =
            serde_json::from_value(Value::Object(self.header.clone())).expect("jwt header");
        jsonwebtoken::encode(&header, &self.claims, &self.key.encoding_key()).expect("sign")
    }

    /// `alg: none`, no signature: what a forger sends.
    pub fn sign_none(&self) -> String {
        let mut h = self.header.clone();
        h.insert("alg".into(), json!("none"));
        format!(
            "{}.{}.",
            b64(&Value::Object(h)),
            b64(&Value::Object(self.claims.clone()))
        )
    }

    /// `alg: HS256` with `secret` as the HMAC key (e.g. the issuer's public key PEM: the
    /// classic algorithm-confusion forgery).
    pub fn sign_hs256(&self, secret: &[u8]) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = self
            .header
            .get("kid")
            .and_then(Value::as_str)
            .map(str::to_owned);
        jsonwebtoken::encode(&header, &self.claims, &EncodingKey::from_secret(secret))
            .expect("sign hs256")
    }
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

/// A running loopback HTTP server; stopped when dropped.
struct Served {
    url: String,
    task: JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(router: Router) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let url = format!("http://{}", listener.local_addr().expect("local addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Served { url, task }
}

#[derive(Default)]
struct IssuerState {
    url: Mutex<String>,
    keys: Mutex<Vec<Value>>,
    down: AtomicBool,
    jwks_requests: AtomicUsize,
    discovery_requests: AtomicUsize,
    token_requests: AtomicUsize,
    token_ttl: AtomicUsize,
}

/// A loopback OpenID provider: `/.well-known/openid-configuration`, `/jwks` and a
/// client-credentials `/token` endpoint. Its URL is the issuer (`iss`).
pub struct TestIssuer {
    state: Arc<IssuerState>,
    served: Served,
}

impl TestIssuer {
    /// Serving the JWKs of `keys`.
    pub async fn start(keys: &[TestKey]) -> TestIssuer {
        let state = Arc::new(IssuerState::default());
        state.token_ttl.store(300, Ordering::Relaxed);
        *state.keys.lock().unwrap() = keys.iter().map(|k| k.jwk()).collect();
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/token", post(token))
            .with_state(state.clone());
        let served = serve(router).await;
        *state.url.lock().unwrap() = served.url.clone();
        TestIssuer { state, served }
    }

    /// The issuer URL (no trailing slash).
    pub fn url(&self) -> &str {
        &self.served.url
    }
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.served.url)
    }
    pub fn token_url(&self) -> String {
        format!("{}/token", self.served.url)
    }

    /// Rotate: publish these keys from now on.
    pub fn set_keys(&self, keys: &[TestKey]) {
        self.set_jwks(keys.iter().map(|k| k.jwk()).collect());
    }
    /// Publish these JWKs as they are.
    pub fn set_jwks(&self, jwks: Vec<Value>) {
        *self.state.keys.lock().unwrap() = jwks;
    }
    /// `false`: every endpoint answers 503.
    pub fn set_available(&self, up: bool) {
        self.state.down.store(!up, Ordering::SeqCst);
    }
    /// `expires_in` of the tokens `/token` hands out.
    pub fn set_token_ttl(&self, secs: usize) {
        self.state.token_ttl.store(secs, Ordering::SeqCst);
    }
    pub fn jwks_requests(&self) -> usize {
        self.state.jwks_requests.load(Ordering::SeqCst)
    }
    pub fn discovery_requests(&self) -> usize {
        self.state.discovery_requests.load(Ordering::SeqCst)
    }
    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// A token of this issuer signed by `key`.
    pub fn token(&self, key: TestKey) -> TokenBuilder {
        TokenBuilder::new(key, self.url())
    }
}

async fn discovery(State(s): State<Arc<IssuerState>>) -> Response {
    s.discovery_requests.fetch_add(1, Ordering::SeqCst);
    if s.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let url = s.url.lock().unwrap().clone();
    Json(json!({
        "issuer": url,
        "jwks_uri": format!("{url}/jwks"),
        "token_endpoint": format!("{url}/token"),
        "grant_types_supported": ["client_credentials"],
    }))
    .into_response()
}

async fn jwks(State(s): State<Arc<IssuerState>>) -> Response {
    s.jwks_requests.fetch_add(1, Ordering::SeqCst);
    if s.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let keys = s.keys.lock().unwrap().clone();
    Json(json!({ "keys": keys })).into_response()
}

/// Client credentials grant: any client; the access token is `svc-<n>`.
async fn token(State(s): State<Arc<IssuerState>>, body: String) -> Response {
    let n = s.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
    if s.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    Json(json!({
        "access_token": format!("svc-{n}"),
        "token_type": "Bearer",
        "expires_in": s.token_ttl.load(Ordering::SeqCst),
    }))
    .into_response()
}

#[derive(Default)]
struct TmState {
    tenants: Mutex<Vec<Value>>,
    down: AtomicBool,
    requests: AtomicUsize,
    /// Required `Authorization` value prefix (`Bearer svc-`), if any.
    bearer_prefix: Mutex<Option<String>>,
    /// `limit`s asked for.
    limits: Mutex<Vec<u64>>,
    /// Delay before answering, to race reads against notices.
    delay_ms: AtomicUsize,
}

/// A loopback Kaa Tenant Manager: `GET /api/v1/tenants?offset=&limit=`.
pub struct TestTenantManager {
    state: Arc<TmState>,
    served: Served,
}

/// One tenant as the Tenant Manager lists it.
pub fn tm_tenant(id: &str, issuer: &str, status: &str) -> Value {
    json!({
        "id": id,
        "realm_name": id,
        "issuer": issuer,
        "status": status,
        "idp_enabled": false,
        "created": "2026-01-01T00:00:00Z",
    })
}

#[derive(serde::Deserialize)]
struct Paging {
    offset: Option<u64>,
    limit: Option<u64>,
}

impl TestTenantManager {
    pub async fn start() -> TestTenantManager {
        let state = Arc::new(TmState::default());
        let router = Router::new()
            .route("/api/v1/tenants", get(tm_tenants))
            .with_state(state.clone());
        let served = serve(router).await;
        TestTenantManager { state, served }
    }

    /// The base URL for `auth.tenant_manager.url`.
    pub fn url(&self) -> String {
        format!("{}/api/v1", self.served.url)
    }
    pub fn set_tenants(&self, tenants: Vec<Value>) {
        *self.state.tenants.lock().unwrap() = tenants;
    }
    /// `false`: every request answers 503.
    pub fn set_available(&self, up: bool) {
        self.state.down.store(!up, Ordering::SeqCst);
    }
    /// Require `Authorization: <prefix>…` (else 401).
    pub fn require_bearer_prefix(&self, prefix: Option<&str>) {
        *self.state.bearer_prefix.lock().unwrap() = prefix.map(str::to_owned);
    }
    /// Answer each request after this delay.
    pub fn set_delay_ms(&self, ms: usize) {
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
    pub fn limits_seen(&self) -> Vec<u64> {
        self.state.limits.lock().unwrap().clone()
    }
}

async fn tm_tenants(
    State(s): State<Arc<TmState>>,
    Query(p): Query<Paging>,
    headers: HeaderMap,
) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay as u64)).await;
    }
    if s.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let required = s.bearer_prefix.lock().unwrap().clone();
    if let Some(prefix) = required {
        let ok = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(&prefix));
        if !ok {
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }
    let all = s.tenants.lock().unwrap().clone();
    let offset = p.offset.unwrap_or(0) as usize;
    let limit = p.limit.unwrap_or(50);
    s.limits.lock().unwrap().push(limit);
    // Kaa: limit 0 means all.
    let end = if limit == 0 {
        all.len()
    } else {
        (offset + limit as usize).min(all.len())
    };
    let page: Vec<Value> = all
        .get(offset.min(all.len())..end)
        .unwrap_or_default()
        .to_vec();
    Json(json!({ "count": all.len(), "results": page })).into_response()
}
