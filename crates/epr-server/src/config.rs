//! Layered configuration: built-in defaults, then a YAML file (`--config` or `EPR_CONFIG`),
//! then `EPR__SECTION__KEY` environment variables, then command-line flags.
//!
//! Applications use Kaa's key shape, `kaa.applications.<app>.versions.<version>`. Since
//! version names contain `-`, which environment variable names cannot carry portably, the
//! shorthand `EPR_APPLICATIONS="app1:app1-v1,app1-v2;app2:app2-v1"` adds applications too.

use anyhow::{bail, Context};
use epr_core::apps::AppCatalog;
use epr_core::ids::{AppName, AppVersionName, TenantId};
use epr_core::metadata::Limits;
use epr_core::registry::RegistrySettings;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub store: StoreSettings,
    pub limits: LimitSettings,
    pub registration: RegistrationSettings,
    pub tenant: TenantSettings,
    pub log: LogSettings,
    pub kaa: KaaSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address of the REST listener. Loopback by default: authentication is off by default.
    pub listen: String,
    /// Largest request body, in bytes (a batch of 1,000 endpoints fits in the default).
    pub max_body_bytes: usize,
    /// How long shutdown waits for in-flight requests, in seconds.
    pub shutdown_timeout_secs: u64,
    pub page_default: u64,
    pub page_max: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `embedded` (the zero-setup default).
    pub backend: String,
    pub data_dir: PathBuf,
    /// Most writes committed together in one transaction.
    pub max_group: usize,
    pub readers: usize,
    /// How long batch registration outcomes are kept, in hours.
    pub batch_retention_hours: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    pub metadata_max_bytes: usize,
    pub metadata_key_max_length: usize,
    pub metadata_max_depth: usize,
    pub batch_max_items: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationSettings {
    /// Accept application versions that are not configured, deriving the application from
    /// Kaa's `<application>-<suffix>` naming.
    pub allow_unknown_app_versions: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSettings {
    /// The tenant of every request while authentication is off (`kaa`, Kaa's system tenant).
    pub default: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// A tracing filter, e.g. `info` or `epr=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
    /// `human` or `json`.
    pub format: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KaaSettings {
    pub applications: BTreeMap<String, AppSettings>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AppSettings {
    /// Version name → its (currently unused) settings; Kaa's EPR has none per version.
    pub versions: BTreeMap<String, serde_json::Value>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4 * 1024 * 1024,
            shutdown_timeout_secs: 30,
            page_default: 20,
            page_max: 1000,
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            backend: "embedded".into(),
            data_dir: PathBuf::from("./data"),
            max_group: 1024,
            readers: 8,
            batch_retention_hours: 7 * 24,
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            metadata_max_bytes: l.metadata_max_bytes,
            metadata_key_max_length: l.metadata_key_max_len,
            metadata_max_depth: l.metadata_max_depth,
            batch_max_items: 1000,
        }
    }
}

impl Default for TenantSettings {
    fn default() -> Self {
        Self {
            default: "kaa".into(),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "human".into(),
        }
    }
}

impl Settings {
    /// Loads defaults → file → `EPR__*` environment → `EPR_APPLICATIONS`.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let defaults = config::Config::try_from(&Settings::default())?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(file) = file {
            if !file.exists() {
                bail!("configuration file {} does not exist", file.display());
            }
            builder = builder.add_source(
                config::File::from(file.to_path_buf()).format(config::FileFormat::Yaml),
            );
        }
        builder = builder.add_source(
            config::Environment::with_prefix("EPR")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let mut settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("configuration has an invalid value or an unknown key")?;
        if let Ok(spec) = std::env::var("EPR_APPLICATIONS") {
            settings.add_applications(&spec)?;
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Adds `app:ver1,ver2;app2:ver` applications.
    pub fn add_applications(&mut self, spec: &str) -> anyhow::Result<()> {
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((app, versions)) = part.split_once(':') else {
                bail!("EPR_APPLICATIONS: '{part}' is not '<app>:<version>,<version>'");
            };
            let entry = self
                .kaa
                .applications
                .entry(app.trim().to_owned())
                .or_default();
            for v in versions.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                entry.versions.insert(v.to_owned(), serde_json::Value::Null);
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.listen_addr()?;
        self.catalog()?;
        self.tenant()?;
        if self.store.backend != "embedded" {
            bail!(
                "store.backend '{}' is not supported; use 'embedded'",
                self.store.backend
            );
        }
        if !matches!(self.log.format.as_str(), "human" | "json") {
            bail!("log.format must be 'human' or 'json'");
        }
        if self.server.page_default == 0 || self.server.page_default > self.server.page_max {
            bail!("server.page_default must be between 1 and server.page_max");
        }
        if self.limits.batch_max_items == 0 {
            bail!("limits.batch_max_items must be at least 1");
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.server
            .listen
            .parse()
            .with_context(|| format!("server.listen '{}' is not an address", self.server.listen))
    }

    pub fn tenant(&self) -> anyhow::Result<TenantId> {
        TenantId::parse(&self.tenant.default).map_err(|e| anyhow::anyhow!("tenant.default: {e}"))
    }

    pub fn catalog(&self) -> anyhow::Result<AppCatalog> {
        let mut catalog = AppCatalog::new(self.registration.allow_unknown_app_versions);
        for (app, settings) in &self.kaa.applications {
            let name = AppName::parse(app)
                .map_err(|e| anyhow::anyhow!("kaa.applications.{app}: {}", e.message))?;
            for version in settings.versions.keys() {
                let v = AppVersionName::parse(version).map_err(|e| {
                    anyhow::anyhow!("kaa.applications.{app}.versions.{version}: {}", e.message)
                })?;
                catalog.add(name.clone(), v).map_err(anyhow::Error::msg)?;
            }
        }
        Ok(catalog)
    }

    pub fn registry_settings(&self) -> RegistrySettings {
        RegistrySettings {
            limits: Limits {
                metadata_max_bytes: self.limits.metadata_max_bytes,
                metadata_key_max_len: self.limits.metadata_key_max_length,
                metadata_max_depth: self.limits.metadata_max_depth,
            },
            batch_max_items: self.limits.batch_max_items,
            ..RegistrySettings::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_shorthand() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "kaa:\n  applications:\n    demo:\n      versions:\n        demo-v1: {}\nserver:\n  page_max: 50\n",
        )
        .unwrap();
        let mut s = Settings::load(Some(&file)).unwrap();
        assert_eq!(s.server.page_max, 50);
        s.add_applications("other:other-v1,other-v2").unwrap();
        let c = s.catalog().unwrap();
        assert!(c.knows_app(&AppName::parse("demo").unwrap()));
        assert!(c.knows_app(&AppName::parse("other").unwrap()));
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "server:\n  lisen: x\n").unwrap();
        assert!(Settings::load(Some(&file)).is_err());
        std::fs::write(
            &file,
            "kaa:\n  applications:\n    Bad:\n      versions:\n        v: {}\n",
        )
        .unwrap();
        let err = Settings::load(Some(&file)).unwrap_err();
        assert!(
            format!("{err:#}").contains("kaa.applications.Bad"),
            "{err:#}"
        );
    }
}
