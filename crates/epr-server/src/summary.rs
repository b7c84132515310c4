//! The start-up summary: one log line naming what this process runs with, so an operator
//! reading the log knows which build, configuration, address, store and NATS server it is.

use crate::telemetry::{GIT_COMMIT, VERSION};
use crate::Settings;
use std::net::SocketAddr;
use std::path::Path;

/// The summary's fields, as logged.
#[derive(Debug, Clone, PartialEq)]
pub struct StartupSummary {
    pub version: &'static str,
    pub git_commit: &'static str,
    /// The configuration file, or `defaults` when none was given.
    pub config: String,
    /// The bound address (the real port when port 0 was asked for).
    pub listen: SocketAddr,
    /// The store's data directory, absolute where it can be resolved, or the database URL
    /// with its password masked (PostgreSQL).
    pub store: String,
    /// `off`, or the NATS URL(s) without credentials (and whether JetStream is used).
    pub nats: String,
    /// `app: version, version; app: version`, or `none`.
    pub applications: String,
    /// `off (...)`, or `on` with the configured tenants and the Tenant Manager.
    pub auth: String,
    /// `off`, or the certificate file served.
    pub tls: String,
}

impl StartupSummary {
    pub fn new(settings: &Settings, config_file: Option<&Path>, listen: SocketAddr) -> Self {
        let dir = &settings.store.data_dir;
        let store = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
        let nats = if settings.nats.url.is_empty() {
            "off".to_owned()
        } else {
            let mode = if settings.nats.jetstream {
                " (JetStream)"
            } else {
                ""
            };
            format!("{}{mode}", redact_urls(&settings.nats.url))
        };
        let mut apps: Vec<String> = settings
            .kaa
            .applications
            .iter()
            .map(|(app, s)| {
                let versions: Vec<&str> = s.versions.keys().map(String::as_str).collect();
                format!("{app}: {}", versions.join(", "))
            })
            .collect();
        if apps.is_empty() {
            apps.push("none".to_owned());
        }
        let mut applications = apps.join("; ");
        if settings.registration.allow_unknown_app_versions {
            applications.push_str(" (unknown versions accepted)");
        }
        let auth = &settings.auth;
        let auth_mode = if auth.enabled() {
            let tenants: Vec<&str> = auth.tenants.iter().map(|t| t.id.as_str()).collect();
            let mut mode = format!("on: tenants {}", tenants.join(", "));
            if tenants.is_empty() {
                mode = "on".to_owned();
            }
            if !auth.tenant_manager.url.is_empty() {
                mode.push_str(&format!(
                    "; Tenant Manager {}",
                    redact(&auth.tenant_manager.url)
                ));
            }
            mode
        } else if auth.insecure_allow_remote && !listen.ip().to_canonical().is_loopback() {
            format!(
                "OFF (tenant {}, remote callers allowed)",
                settings.tenant.default
            )
        } else {
            format!("OFF (tenant {}, loopback only)", settings.tenant.default)
        };
        let tls = if settings.server.tls.enabled() {
            settings.server.tls.cert_file.clone()
        } else {
            "off".to_owned()
        };
        Self {
            auth: auth_mode,
            tls,
            version: VERSION,
            git_commit: GIT_COMMIT,
            config: config_file.map_or_else(|| "defaults".to_owned(), |p| p.display().to_string()),
            listen,
            store: if settings.is_postgres() {
                format!(
                    "{} (postgres)",
                    crate::config::redact_database_url(&settings.store.postgres.url)
                )
            } else {
                format!("{} ({})", store.display(), settings.store.backend)
            },
            nats,
            applications,
        }
    }

    /// Logs the summary as one `info` line.
    pub fn log(&self) {
        tracing::info!(
            version = %self.version,
            git_commit = %self.git_commit,
            config = %self.config,
            listen = %self.listen,
            store = %self.store,
            nats = %self.nats,
            applications = %self.applications,
            auth = %self.auth,
            tls = %self.tls,
            "EPR starting"
        );
    }
}

/// A comma-separated list of URLs, each without its user information.
pub(crate) fn redact_urls(urls: &str) -> String {
    if urls.is_empty() {
        return String::new();
    }
    urls.split(',').map(redact).collect::<Vec<_>>().join(",")
}

/// A URL without its user information (`nats://user:secret@host` → `nats://***@host`).
pub(crate) fn redact(url: &str) -> String {
    let url = url.trim();
    let start = url.find("://").map_or(0, |i| i + 3);
    let host_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..host_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_not_logged() {
        assert_eq!(redact("nats://a:b@h:4222"), "nats://***@h:4222");
        assert_eq!(redact(" nats://tok@h"), "nats://***@h");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact("h:4222"), "h:4222");
        // Every URL of a list: `redact` alone would see one host and miss the second.
        assert_eq!(
            redact_urls("nats://a:b@h1,nats://c:d@h2:4222"),
            "nats://***@h1,nats://***@h2:4222"
        );
        assert_eq!(redact_urls(""), "");
    }

    #[test]
    fn redacted_settings_hide_every_secret() {
        let mut s = Settings::default();
        s.nats.url = "nats://n1:npass@h1,nats://n2:npass2@h2".into();
        s.auth.tenant_manager.url = "https://tm:tmpass@tm.example/api/v1".into();
        s.auth.tenant_manager.token_url = "https://kc:kcpass@kc.example/token".into();
        s.auth.tenant_manager.client_id = "epr".into();
        s.auth.tenant_manager.client_secret = "s3cret-value".into();
        s.add_tenants("acme=https://u:ipass@issuer.example")
            .unwrap();
        s.auth.tenants[0].jwks_uri = "https://u:jpass@issuer.example/jwks".into();
        let text = serde_json::to_string(&s.redacted()).unwrap();
        for secret in [
            "npass",
            "tmpass",
            "kcpass",
            "s3cret-value",
            "ipass",
            "jpass",
        ] {
            assert!(!text.contains(secret), "{secret} printed: {text}");
        }
        let r = s.redacted();
        assert_eq!(r.auth.tenant_manager.client_secret, "***");
        assert_eq!(r.auth.tenant_manager.client_id, "epr");
        assert_eq!(r.nats.url, "nats://***@h1,nats://***@h2");
        assert_eq!(r.auth.tenants[0].issuer, "https://***@issuer.example");
        // `Debug` (what a `{:?}` in a log line shows) hides the client secret too.
        assert!(!format!("{s:?}").contains("s3cret-value"));
        // Nothing else changes.
        assert_eq!(
            r.auth.tenant_manager.refresh_secs,
            s.auth.tenant_manager.refresh_secs
        );
        assert_eq!(
            Settings::default()
                .redacted()
                .auth
                .tenant_manager
                .client_secret,
            ""
        );
    }

    #[test]
    fn names_everything() {
        let mut s = Settings::default();
        s.add_applications("b:b-v2,b-v1;a:a-v1").unwrap();
        s.nats.url = "nats://u:p@127.0.0.1:4222,nats://127.0.0.1:4223".into();
        s.nats.jetstream = true;
        s.store.data_dir = "/nonexistent/epr".into();
        let addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let sum = StartupSummary::new(&s, Some(Path::new("c.yaml")), addr);
        assert_eq!(sum.config, "c.yaml");
        assert_eq!(sum.store, "/nonexistent/epr (embedded)");
        assert_eq!(
            sum.nats,
            "nats://***@127.0.0.1:4222,nats://127.0.0.1:4223 (JetStream)"
        );
        assert_eq!(sum.applications, "a: a-v1; b: b-v1, b-v2");
        let sum = StartupSummary::new(&Settings::default(), None, addr);
        assert_eq!(
            (sum.config.as_str(), sum.nats.as_str()),
            ("defaults", "off")
        );
        assert_eq!(sum.applications, "none");
        assert_eq!(sum.auth, "OFF (tenant kaa, loopback only)");
        assert_eq!(sum.tls, "off");
        let mut s = Settings::default();
        s.add_tenants("acme=https://a.example,beta=https://b.example")
            .unwrap();
        s.server.tls.cert_file = "/etc/epr/cert.pem".into();
        s.server.tls.key_file = "/etc/epr/key.pem".into();
        let sum = StartupSummary::new(&s, None, addr);
        assert_eq!(sum.auth, "on: tenants acme, beta");
        assert_eq!(sum.tls, "/etc/epr/cert.pem");
    }
}
