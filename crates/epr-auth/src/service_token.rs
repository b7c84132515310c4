//! The service's own access tokens, one per tenant issuer: the OAuth 2.0 client
//! credentials grant at the issuer's token endpoint (found through its OpenID
//! configuration), cached until shortly before expiry. Used for calls to other Kaa
//! services on a tenant's behalf (Tekton).

use crate::http::HttpClient;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct ServiceTokens {
    http: HttpClient,
    client_id: String,
    client_secret: String,
    /// Issuer → (token endpoint).
    endpoints: Mutex<HashMap<String, String>>,
    /// Issuer → (token, renew after).
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl ServiceTokens {
    pub fn new(http: HttpClient, client_id: &str, client_secret: &str) -> Self {
        Self {
            http,
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            endpoints: Mutex::default(),
            tokens: Mutex::default(),
        }
    }

    /// A token of `issuer` for this service.
    pub async fn bearer(&self, issuer: &str) -> Result<String, String> {
        if let Some((t, until)) = self.tokens.lock().expect("tokens lock").get(issuer) {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let endpoint = self.token_endpoint(issuer).await?;
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", &self.client_secret)
            .finish();
        let a = self.http.post_form(&endpoint, body).await?;
        if !(200..300).contains(&a.status) {
            return Err(format!(
                "{endpoint}: the client credentials grant failed with HTTP {}",
                a.status
            ));
        }
        let v = a.json?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{endpoint}: no access_token in the answer"))?
            .to_owned();
        let ttl = v.get("expires_in").and_then(Value::as_u64).unwrap_or(60);
        // Renew 30 s (or half the life of a short token) before it expires.
        let until = Instant::now() + Duration::from_secs(ttl - (ttl / 2).min(30));
        self.tokens
            .lock()
            .expect("tokens lock")
            .insert(issuer.to_owned(), (token.clone(), until));
        Ok(token)
    }

    /// Drops the cached token of `issuer` (the callee refused it: get a new one).
    pub fn forget(&self, issuer: &str) {
        self.tokens.lock().expect("tokens lock").remove(issuer);
    }

    async fn token_endpoint(&self, issuer: &str) -> Result<String, String> {
        if let Some(e) = self.endpoints.lock().expect("endpoints lock").get(issuer) {
            return Ok(e.clone());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let doc = self.http.get_json(&url).await?;
        let endpoint = doc
            .get("token_endpoint")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{url}: no token_endpoint"))?
            .to_owned();
        self.endpoints
            .lock()
            .expect("endpoints lock")
            .insert(issuer.to_owned(), endpoint.clone());
        Ok(endpoint)
    }
}
