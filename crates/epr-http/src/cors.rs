//! Cross-origin resource sharing, for browser consoles served from another origin. Off
//! unless origins are configured (`server.cors.allowed_origins`).

use axum::http::{HeaderName, HeaderValue, Method};
use axum::Router;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// `server.cors.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsSettings {
    /// Origins allowed to call the API (`https://console.example.com`), or `["*"]` for
    /// any. Empty: CORS is off (no CORS headers; preflights are `405`).
    pub allowed_origins: Vec<String>,
    /// Methods a cross-origin request may use.
    pub allowed_methods: Vec<String>,
    /// Request headers a cross-origin request may send.
    pub allowed_headers: Vec<String>,
    /// Response headers the browser lets the calling script read.
    pub exposed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer, in seconds.
    pub max_age_secs: u64,
}

impl Default for CorsSettings {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        Self {
            allowed_origins: Vec::new(),
            allowed_methods: strings(&["GET", "POST", "PUT", "PATCH", "DELETE"]),
            allowed_headers: strings(&[
                "Authorization",
                "Content-Type",
                "If-Match",
                "If-None-Match",
                "X-Request-Id",
            ]),
            exposed_headers: strings(&["ETag", "Location", "X-Request-Id"]),
            max_age_secs: 600,
        }
    }
}

impl CorsSettings {
    /// The layer these settings describe; `None` when CORS is off. Errors name the setting.
    pub fn layer(&self) -> Result<Option<CorsLayer>, String> {
        if self.allowed_origins.is_empty() {
            return Ok(None);
        }
        let origin = if self.allowed_origins.iter().any(|o| o == "*") {
            if self.allowed_origins.len() > 1 {
                return Err(
                    "server.cors.allowed_origins: '*' allows every origin; list it alone".into(),
                );
            }
            AllowOrigin::any()
        } else {
            let origins = self
                .allowed_origins
                .iter()
                .map(|o| parse_origin(o))
                .collect::<Result<Vec<_>, _>>()?;
            AllowOrigin::list(origins)
        };
        let methods = self
            .allowed_methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("server.cors.allowed_methods: '{m}' is not a method"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let headers = |setting: &str, list: &[String]| {
            list.iter()
                .map(|h| {
                    HeaderName::from_bytes(h.trim().as_bytes())
                        .map_err(|_| format!("server.cors.{setting}: '{h}' is not a header name"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Some(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods(methods)
                .allow_headers(headers("allowed_headers", &self.allowed_headers)?)
                .expose_headers(headers("exposed_headers", &self.exposed_headers)?)
                .max_age(Duration::from_secs(self.max_age_secs)),
        ))
    }
}

/// An origin is `scheme://host[:port]`, nothing more (browsers send exactly that).
fn parse_origin(o: &str) -> Result<HeaderValue, String> {
    let bad =
        || format!("server.cors.allowed_origins: '{o}' is not an origin like https://host[:port]");
    let rest = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
        .ok_or_else(bad)?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '*']) {
        return Err(bad());
    }
    HeaderValue::from_str(o).map_err(|_| bad())
}

/// `router` with CORS applied when the settings turn it on. Outermost, so preflight
/// `OPTIONS` requests are answered before routing refuses the method.
pub fn with_cors(router: Router, settings: &CorsSettings) -> Result<Router, String> {
    Ok(match settings.layer()? {
        Some(layer) => router.layer(layer),
        None => router,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_checked() {
        assert!(CorsSettings::default().layer().unwrap().is_none());
        let with = |origins: &[&str]| CorsSettings {
            allowed_origins: origins.iter().map(|s| (*s).to_owned()).collect(),
            ..CorsSettings::default()
        };
        assert!(with(&["*"]).layer().unwrap().is_some());
        assert!(with(&["https://a.example", "http://localhost:3000"])
            .layer()
            .unwrap()
            .is_some());
        for bad in [&["*", "https://a"][..], &["a.example"], &["https://a/path"]] {
            let e = with(bad).layer().unwrap_err();
            assert!(e.contains("allowed_origins"), "{e}");
        }
        let mut s = with(&["*"]);
        s.allowed_headers = vec!["bad header".into()];
        assert!(s.layer().unwrap_err().contains("allowed_headers"));
    }
}
