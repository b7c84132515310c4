//! One issuer's signing keys: discovered from its OpenID configuration, fetched as a
//! JWKS, cached by `kid`, re-read periodically and on an unknown `kid` (rate-limited).

use crate::http::HttpClient;
use crate::settings::parse_algorithm;
use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// One usable verification key.
pub struct KeyEntry {
    /// The `kid`, or the key's RFC 7638 thumbprint when it has none: what cached tokens
    /// remember, so that a key's removal invalidates them.
    pub id: String,
    /// The key's `alg`, if the JWK names one: then only that algorithm may use it.
    pub alg: Option<Algorithm>,
    pub family: AlgorithmFamily,
    pub key: DecodingKey,
}

impl KeyEntry {
    /// Whether a token signed with `alg` may be checked with this key.
    pub fn fits(&self, alg: Algorithm) -> bool {
        alg.family() == self.family && self.alg.is_none_or(|a| a == alg)
    }
}

#[derive(Default)]
struct KeyState {
    keys: Arc<HashMap<String, Arc<KeyEntry>>>,
    /// Whether a fetch ever succeeded (an issuer may publish zero usable keys).
    loaded: bool,
    last_attempt: Option<Instant>,
    last_ok: Option<Instant>,
    last_error: Option<String>,
    /// The discovered `jwks_uri` (forgotten when a fetch fails, so it is discovered again).
    discovered: Option<String>,
}

/// Why a key could not be found.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyMiss {
    /// The keys are known and none fits.
    Unknown,
    /// No keys could ever be fetched.
    Unavailable(String),
}

/// The keys of one issuer.
pub struct IssuerKeys {
    issuer: String,
    jwks_uri: Option<String>,
    accepted: Vec<Algorithm>,
    min_refetch: Duration,
    state: RwLock<KeyState>,
    /// Held across a fetch: concurrent misses wait for the one fetch under way instead of
    /// starting their own (the issuer sees one request).
    fetch_gate: tokio::sync::Mutex<()>,
}

impl IssuerKeys {
    pub fn new(
        issuer: String,
        jwks_uri: Option<String>,
        accepted: Vec<Algorithm>,
        min_refetch: Duration,
    ) -> Self {
        Self {
            issuer,
            jwks_uri,
            accepted,
            min_refetch,
            state: RwLock::default(),
            fetch_gate: tokio::sync::Mutex::new(()),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn jwks_uri_setting(&self) -> Option<&str> {
        self.jwks_uri.as_deref()
    }

    fn keys(&self) -> Arc<HashMap<String, Arc<KeyEntry>>> {
        self.state.read().expect("key state lock").keys.clone()
    }

    /// Whether the key a cached token was checked with is still published.
    pub fn contains(&self, id: &str) -> bool {
        self.state
            .read()
            .expect("key state lock")
            .keys
            .contains_key(id)
    }

    pub fn ever_attempted(&self) -> bool {
        self.state
            .read()
            .expect("key state lock")
            .last_attempt
            .is_some()
    }

    /// Keys that may check a token of `alg` with `kid` (all fitting keys when the token has
    /// no `kid`).
    fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<Arc<KeyEntry>> {
        let keys = self.keys();
        match kid {
            Some(kid) => keys
                .get(kid)
                .filter(|k| k.fits(alg))
                .cloned()
                .into_iter()
                .collect(),
            None => keys.values().filter(|k| k.fits(alg)).cloned().collect(),
        }
    }

    /// The keys for a token; an unknown `kid` makes the keys be re-read, at most once per
    /// `jwks_min_refetch_secs`.
    pub async fn find(
        &self,
        http: &HttpClient,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<Arc<KeyEntry>>, KeyMiss> {
        let found = self.candidates(kid, alg);
        if !found.is_empty() {
            return Ok(found);
        }
        {
            let _gate = self.fetch_gate.lock().await;
            // Another caller may have fetched while this one waited.
            let found = self.candidates(kid, alg);
            if !found.is_empty() {
                return Ok(found);
            }
            let recent = self
                .state
                .read()
                .expect("key state lock")
                .last_attempt
                .is_some_and(|t| t.elapsed() < self.min_refetch);
            if !recent {
                // A failure is logged and kept in the state; the miss is reported below.
                let _ = self.fetch_locked(http).await;
            }
        }
        let found = self.candidates(kid, alg);
        if !found.is_empty() {
            return Ok(found);
        }
        let st = self.state.read().expect("key state lock");
        if st.loaded {
            Err(KeyMiss::Unknown)
        } else {
            Err(KeyMiss::Unavailable(format!(
                "the signing keys of the issuer cannot be fetched now ({})",
                st.last_error.as_deref().unwrap_or("no fetch yet")
            )))
        }
    }

    /// Re-read the keys now (periodic refresh). A failure keeps the old keys.
    pub async fn refresh(&self, http: &HttpClient) -> Result<(), String> {
        let _gate = self.fetch_gate.lock().await;
        self.fetch_locked(http).await
    }

    async fn fetch_locked(&self, http: &HttpClient) -> Result<(), String> {
        self.state.write().expect("key state lock").last_attempt = Some(Instant::now());
        let result = self.fetch(http).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("epr_auth_jwks_fetches_total", "outcome" => outcome).increment(1);
        let mut st = self.state.write().expect("key state lock");
        match result {
            Ok((keys, uri)) => {
                let before: Vec<&String> = st.keys.keys().collect();
                let removed = before.iter().filter(|k| !keys.contains_key(**k)).count();
                if removed > 0 || keys.len() != st.keys.len() {
                    tracing::info!(issuer = %self.issuer, keys = keys.len(), removed, "issuer keys changed");
                }
                st.keys = Arc::new(keys);
                st.loaded = true;
                st.last_ok = Some(Instant::now());
                st.last_error = None;
                if self.jwks_uri.is_none() {
                    st.discovered = Some(uri);
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, keys_kept = st.keys.len(), "fetching the issuer's keys failed");
                st.last_error = Some(e.clone());
                st.discovered = None;
                Err(e)
            }
        }
    }

    async fn fetch(
        &self,
        http: &HttpClient,
    ) -> Result<(HashMap<String, Arc<KeyEntry>>, String), String> {
        let discovered = self
            .state
            .read()
            .expect("key state lock")
            .discovered
            .clone();
        let uri = match (&self.jwks_uri, discovered) {
            (Some(u), _) => u.clone(),
            (None, Some(u)) => u,
            (None, None) => self.discover(http).await?,
        };
        let body: Value = http.get_json(&uri).await?;
        let keys = body
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{uri}: not a JWKS (no `keys` array)"))?;
        let mut out = HashMap::new();
        for k in keys {
            match self.parse_key(k) {
                Ok(Some(e)) => {
                    out.insert(e.id.clone(), Arc::new(e));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(issuer = %self.issuer, error = %e, "a key of the JWKS is skipped")
                }
            }
        }
        Ok((out, uri))
    }

    async fn discover(&self, http: &HttpClient) -> Result<String, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let doc = http.get_json(&url).await?;
        doc.get("jwks_uri")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("{url}: no jwks_uri"))
    }

    /// A signing key of an accepted algorithm, or `None` for keys of other uses.
    fn parse_key(&self, k: &Value) -> Result<Option<KeyEntry>, String> {
        if k.get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            return Ok(None);
        }
        let alg = match k.get("alg").and_then(Value::as_str) {
            None => None,
            Some(a) => match parse_algorithm(a) {
                Some(a) if self.accepted.contains(&a) => Some(a),
                // Encryption keys (RSA-OAEP) and algorithms not accepted.
                _ => return Ok(None),
            },
        };
        let jwk: Jwk = serde_json::from_value(k.clone()).map_err(|e| e.to_string())?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
        let family = key.family();
        if family == AlgorithmFamily::Hmac {
            // A symmetric key in a public key set: never usable.
            return Ok(None);
        }
        let id = match &jwk.common.key_id {
            Some(kid) => kid.clone(),
            None => jwk
                .thumbprint(ThumbprintHash::SHA256)
                .map_err(|e| e.to_string())?,
        };
        Ok(Some(KeyEntry {
            id,
            alg,
            family,
            key,
        }))
    }

    /// For health: keys loaded, last fetch outcome, age of the keys.
    pub fn health(&self) -> Value {
        let st = self.state.read().expect("key state lock");
        serde_json::json!({
            "issuer": self.issuer,
            "keys": st.keys.len(),
            "loaded": st.loaded,
            "last_fetch": match (&st.last_attempt, &st.last_error) {
                (None, _) => "none",
                (Some(_), None) => "ok",
                (Some(_), Some(_)) => "error",
            },
            "last_error": st.last_error,
            "keys_age_secs": st.last_ok.map(|t| t.elapsed().as_secs()),
        })
    }

    /// Usable: keys were loaded once (a later failed refresh keeps them).
    pub fn is_loaded(&self) -> bool {
        self.state.read().expect("key state lock").loaded
    }
}
