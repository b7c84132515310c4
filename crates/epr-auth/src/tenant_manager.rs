//! Kaa's Tenant Manager: `GET <url>/tenants?offset=&limit=` → `{count, results}`, read page
//! by page, with an optional service-account token (client credentials grant).

use crate::directory::TenantSpec;
use crate::http::HttpClient;
use crate::settings::TenantManagerSettings;
use epr_core::ids::TenantId;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Statuses of a usable tenant. Kaa creates tenants asynchronously (`CREATING` →
/// `AVAILABLE`); any other status (creating, deleting, failed) means its realm may not be
/// ready to issue or check tokens. A tenant without a status is taken as usable (older
/// Tenant Managers).
const READY: [&str; 1] = ["AVAILABLE"];

/// Pages read at most per listing, so a Tenant Manager that keeps answering cannot keep the
/// reader busy forever.
const MAX_PAGES: u64 = 10_000;

pub struct TenantManager {
    url: String,
    page_size: u32,
    audiences: Vec<String>,
    token_url: String,
    client_id: String,
    client_secret: String,
    token: Mutex<Option<(String, Instant)>>,
    status: Mutex<TmStatus>,
}

#[derive(Default)]
struct TmStatus {
    last_ok: Option<Instant>,
    last_error: Option<String>,
    tenants: usize,
}

impl TenantManager {
    pub fn new(s: &TenantManagerSettings, audiences: Vec<String>) -> Self {
        Self {
            url: s.url.trim_end_matches('/').to_owned(),
            page_size: s.page_size,
            audiences,
            token_url: s.token_url.clone(),
            client_id: s.client_id.clone(),
            client_secret: s.client_secret.clone(),
            token: Mutex::new(None),
            status: Mutex::default(),
        }
    }

    /// Every usable tenant; an error if any page could not be read (the caller keeps the
    /// last list).
    pub async fn list(&self, http: &HttpClient) -> Result<Vec<TenantSpec>, String> {
        let result = self.list_inner(http).await;
        let mut st = self.status.lock().expect("tm status lock");
        match &result {
            Ok(l) => {
                st.last_ok = Some(Instant::now());
                st.last_error = None;
                st.tenants = l.len();
            }
            Err(e) => st.last_error = Some(e.clone()),
        }
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("epr_auth_tenant_manager_reads_total", "outcome" => outcome).increment(1);
        result
    }

    async fn list_inner(&self, http: &HttpClient) -> Result<Vec<TenantSpec>, String> {
        let mut raw = Vec::new();
        let mut offset: u64 = 0;
        for _ in 0..MAX_PAGES {
            let url = format!(
                "{}/tenants?offset={offset}&limit={}",
                self.url, self.page_size
            );
            let page = self.get_page(http, &url).await?;
            let count = page
                .get("count")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("{url}: no numeric `count`"))?;
            let results = page
                .get("results")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("{url}: no `results` array"))?;
            let n = results.len() as u64;
            raw.extend(results.iter().cloned());
            offset += n;
            if n == 0 || offset >= count {
                return Ok(self.usable(raw));
            }
        }
        Err(format!("{}/tenants: more than {MAX_PAGES} pages", self.url))
    }

    async fn get_page(&self, http: &HttpClient, url: &str) -> Result<Value, String> {
        for attempt in 0..2 {
            let bearer = self.bearer(http).await?;
            let a = http.get(url, bearer.as_deref()).await?;
            if a.status == 401 && attempt == 0 && !self.token_url.is_empty() {
                // The service-account token may have been revoked early: get a new one once.
                *self.token.lock().expect("token lock") = None;
                continue;
            }
            if !(200..300).contains(&a.status) {
                return Err(format!("{url}: HTTP {}", a.status));
            }
            return a.json;
        }
        Err(format!(
            "{url}: HTTP 401 with a fresh service-account token"
        ))
    }

    /// The service-account token, cached until shortly before it expires.
    async fn bearer(&self, http: &HttpClient) -> Result<Option<String>, String> {
        if self.token_url.is_empty() {
            return Ok(None);
        }
        if let Some((t, until)) = &*self.token.lock().expect("token lock") {
            if Instant::now() < *until {
                return Ok(Some(t.clone()));
            }
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", &self.client_secret)
            .finish();
        let url = &self.token_url;
        let a = http.post_form(url, body).await?;
        if !(200..300).contains(&a.status) {
            return Err(format!(
                "{url}: the client credentials grant failed with HTTP {}",
                a.status
            ));
        }
        let v = a.json?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{url}: no access_token in the answer"))?
            .to_owned();
        let ttl = v.get("expires_in").and_then(Value::as_u64).unwrap_or(60);
        // Renew 30 s (or half the life of a short token) before it expires.
        let margin = (ttl / 2).min(30);
        let until = Instant::now() + Duration::from_secs(ttl - margin);
        *self.token.lock().expect("token lock") = Some((token.clone(), until));
        Ok(Some(token))
    }

    /// The usable tenants of a complete listing.
    fn usable(&self, raw: Vec<Value>) -> Vec<TenantSpec> {
        let mut specs = Vec::new();
        for t in raw {
            let Some(id) = t.get("id").and_then(Value::as_str) else {
                tracing::warn!("the Tenant Manager lists a tenant without an id; skipped");
                continue;
            };
            let id = match TenantId::parse(id) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(tenant = id, error = %e, "the Tenant Manager lists a tenant id this service cannot use; skipped");
                    continue;
                }
            };
            if let Some(status) = t.get("status").and_then(Value::as_str) {
                if !READY.iter().any(|r| r.eq_ignore_ascii_case(status)) {
                    tracing::debug!(tenant = %id, status, "tenant not ready yet");
                    continue;
                }
            }
            let issuer = t.get("issuer").and_then(Value::as_str).unwrap_or_default();
            if issuer.is_empty() {
                tracing::debug!(tenant = %id, "tenant without an issuer yet");
                continue;
            }
            if crate::http::parse(issuer).is_err() {
                tracing::warn!(tenant = %id, issuer, "the tenant's issuer is not a URL; skipped");
                continue;
            }
            specs.push(TenantSpec {
                id,
                issuer: issuer.to_owned(),
                audiences: self.audiences.clone(),
                jwks_uri: None,
            });
        }
        let mut per_issuer: HashMap<String, Vec<String>> = HashMap::new();
        for s in &specs {
            per_issuer
                .entry(s.issuer.clone())
                .or_default()
                .push(s.id.as_str().to_owned());
        }
        specs.retain(|s| {
            let ids = &per_issuer[&s.issuer];
            if ids.len() > 1 {
                tracing::error!(issuer = %s.issuer, tenant = %s.id, tenants = ?ids,
                    "the Tenant Manager lists one issuer for several tenants; all of them are left out");
                false
            } else {
                true
            }
        });
        specs
    }

    pub fn health(&self) -> Value {
        let st = self.status.lock().expect("tm status lock");
        serde_json::json!({
            "url": self.url,
            "tenants": st.tenants,
            "last_read": match (&st.last_ok, &st.last_error) {
                (_, Some(_)) => "error",
                (Some(_), None) => "ok",
                (None, None) => "none",
            },
            "last_error": st.last_error,
            "last_ok_age_secs": st.last_ok.map(|t| t.elapsed().as_secs()),
        })
    }

    /// A list was read at least once.
    pub fn ever_read(&self) -> bool {
        self.status
            .lock()
            .expect("tm status lock")
            .last_ok
            .is_some()
    }
}
