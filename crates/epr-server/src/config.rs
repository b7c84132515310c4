//! Layered configuration: built-in defaults, then a YAML file (`--config` or `EPR_CONFIG`),
//! then `EPR__SECTION__KEY` environment variables, then command-line flags.
//!
//! Applications use Kaa's key shape, `kaa.applications.<app>.versions.<version>`. Since
//! version names contain `-`, which environment variable names cannot carry portably, the
//! shorthand `EPR_APPLICATIONS="app1:app1-v1,app1-v2;app2:app2-v1"` adds applications too.
//! Likewise `EPR_AUTH_TENANTS="acme=https://issuer-a,beta=https://issuer-b"` adds tenants
//! and their issuers (`auth.tenants` is a list, which `EPR__` variables cannot set), and
//! `EPR_DATABASE_URL` sets `store.postgres.url` (the name hosting platforms give it) unless
//! `EPR__STORE__POSTGRES__URL` is set.

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
    pub service: ServiceSettings,
    pub nats: NatsConfig,
    pub kaa: KaaSettings,
    /// Bearer-token authentication, tenants and their issuers (`auth.*`); off while no
    /// tenant has an issuer and no Tenant Manager is set.
    pub auth: epr_auth::AuthSettings,
    /// Device self-registration (`self_registration.*`, docs/self-registration.md).
    pub self_registration: SelfRegistrationSettings,
}

/// `self_registration.*`: the device routes' limits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelfRegistrationSettings {
    pub rate_limit: SelfRegistrationRateLimit,
}

/// `self_registration.rate_limit.*`: token buckets kept by each process (per replica).
/// A `*_per_minute` of 0 turns that limit off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelfRegistrationRateLimit {
    /// Device requests per client address (the TCP peer).
    pub per_source_per_minute: u32,
    pub per_source_burst: u32,
    /// Attempts per claim token.
    pub per_claim_per_minute: u32,
    pub per_claim_burst: u32,
    /// Most addresses (and, separately, claim tokens) tracked at once.
    pub max_tracked: usize,
}

impl Default for SelfRegistrationRateLimit {
    fn default() -> Self {
        let d = epr_http::self_registration::RateLimits::default();
        Self {
            per_source_per_minute: d.per_source.per_minute,
            per_source_burst: d.per_source.burst,
            per_claim_per_minute: d.per_claim.per_minute,
            per_claim_burst: d.per_claim.burst,
            max_tracked: d.max_keys,
        }
    }
}

impl SelfRegistrationRateLimit {
    pub fn limits(&self) -> epr_http::self_registration::RateLimits {
        use epr_http::rate_limit::Rate;
        epr_http::self_registration::RateLimits {
            per_source: Rate {
                per_minute: self.per_source_per_minute,
                burst: self.per_source_burst,
            },
            per_claim: Rate {
                per_minute: self.per_claim_per_minute,
                burst: self.per_claim_burst,
            },
            max_keys: self.max_tracked,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (key, value, max) in [
            (
                "per_source_per_minute",
                self.per_source_per_minute,
                1_000_000,
            ),
            ("per_source_burst", self.per_source_burst, 1_000_000),
            ("per_claim_per_minute", self.per_claim_per_minute, 1_000_000),
            ("per_claim_burst", self.per_claim_burst, 1_000_000),
        ] {
            if value > max {
                bail!("self_registration.rate_limit.{key} must be at most {max}");
            }
        }
        for (key, burst, rate) in [
            (
                "per_source_burst",
                self.per_source_burst,
                self.per_source_per_minute,
            ),
            (
                "per_claim_burst",
                self.per_claim_burst,
                self.per_claim_per_minute,
            ),
        ] {
            if rate > 0 && burst == 0 {
                bail!(
                    "self_registration.rate_limit.{key} must be at least 1 while its limit is on"
                );
            }
        }
        if !(1_000..=10_000_000).contains(&self.max_tracked) {
            bail!("self_registration.rate_limit.max_tracked must be between 1000 and 10000000");
        }
        Ok(())
    }
}

/// `server.tls.*`: HTTPS on the listener. Both files or neither.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// The certificate chain (PEM), leaf first.
    pub cert_file: String,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

impl TlsSettings {
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty() || !self.key_file.is_empty()
    }
}

/// Identity on the Kaa message bus (3/ISM).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceSettings {
    /// The service instance name: the `{originator}` token of event subjects, the
    /// `kaa.v1.service.{instance}` request subjects, and the queue group of replicas.
    pub instance_name: String,
    /// This replica's ID (`originatorReplicaId`). Empty: `$HOSTNAME` (the pod name under
    /// Kubernetes), else a random ID chosen at start.
    pub replica_id: String,
}

/// NATS: where events go and where requests come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. Empty: NATS is off, events are neither recorded nor
    /// published, and no requests are served.
    pub url: String,
    /// Publish events through JetStream and drop them from the outbox only on the stream's
    /// acknowledgement (a stream must capture `kaa.v1.events.{instance}.>`).
    pub jetstream: bool,
    /// Most events published per relay round.
    pub publish_batch: usize,
    /// Longest wait for NATS to confirm a batch, in milliseconds.
    pub confirm_timeout_ms: u64,
    /// Longest pause between publish retries and reconnection attempts, in milliseconds.
    pub max_backoff_ms: u64,
    /// Messages a subscription may buffer; beyond it the client drops (slow consumer).
    pub subscription_capacity: usize,
    /// Requests and connected events handled at once.
    pub max_in_flight: usize,
    /// Handle 9/ELCE `connected` events (update app versions).
    pub connected_listener: bool,
    /// Serve 19/EPMMP requests.
    pub epmmp: bool,
    /// Serve 20/EFMP requests (the filters of an endpoint, the endpoints of a filter).
    pub efmp: bool,
    /// Serve 16/ECAP endpoint token requests (validation, status transition).
    pub ecap: bool,
    /// Metadata keys that 19/EPMMP may not create or change (answered with 403).
    pub restricted_metadata_keys: Vec<String>,
    /// The tenant of 9/ELCE `connected` events by their publisher's service instance name
    /// (`{originator instance: tenant}`); other publishers' events belong to
    /// `tenant.default`.
    pub connected_tenants: BTreeMap<String, String>,
    /// Apply 21/TLE tenant lifecycle events (`updated`: re-read the tenants; `unregistered`:
    /// remove the tenant). Only with authentication on.
    pub tenant_lifecycle: bool,
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
    /// Cross-origin requests from browser consoles (`server.cors.*`); off by default.
    pub cors: epr_http::cors::CorsSettings,
    /// Longest time to receive a request's header section, in seconds: counted from the
    /// connection's opening for its first request, else from the request's first byte.
    pub header_timeout_secs: u64,
    /// Longest time to receive a request body once the server waits for it, in seconds
    /// (408 beyond it).
    pub body_timeout_secs: u64,
    /// How long a keep-alive connection may stay idle between requests, in seconds.
    pub idle_timeout_secs: u64,
    /// Most connections served at once; beyond it idle ones are closed to make room, else
    /// the new one is answered 503. Lowered to fit the open-files limit.
    pub max_connections: usize,
    /// HTTPS (`server.tls.cert_file`, `server.tls.key_file`); plain HTTP when both are empty.
    pub tls: TlsSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `embedded` (the zero-setup default: SQLite in `data_dir`) or `postgres` (a database
    /// that several replicas share: `store.postgres.*`).
    pub backend: String,
    pub data_dir: PathBuf,
    /// Most writes committed together in one transaction.
    pub max_group: usize,
    /// Read connections kept open, which is also how many reads (listings, scans) run at
    /// once: more wait for a free connection rather than open one of their own.
    pub readers: usize,
    /// How long batch registration outcomes are kept, in hours.
    pub batch_retention_hours: u64,
    /// Filter back-fill runs when no write is waiting, in steps of at most this long; a
    /// write that arrives meanwhile waits for the step to finish.
    pub backfill_step_ms: u64,
    /// Endpoints read per query of a back-fill step.
    pub backfill_batch: u32,
    /// Rest between back-fill steps (a throttle; 0 = none).
    pub backfill_pause_ms: u64,
    /// The writer's SQLite page cache, in MiB. Small by default (see
    /// `EmbeddedConfig::cache_mib`).
    pub cache_mib: u32,
    /// Check of the database file at start: `quick` (`PRAGMA quick_check`), `full`
    /// (`PRAGMA integrity_check`, also compares indexes with tables) or `off`. A damaged
    /// file refuses the start.
    pub integrity_check: String,
    /// The PostgreSQL backend (`store.backend: postgres`). The back-fill pace
    /// (`backfill_step_ms`, `backfill_batch`, `backfill_pause_ms`) and
    /// `batch_retention_hours` above apply to it too.
    pub postgres: PostgresSettings,
}

/// `store.postgres.*` (docs/postgres.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database` (libpq URL or `key=value` string).
    /// A secret: printed and logged with the password masked.
    pub url: String,
    /// Pooled connections (reads, filter changes, back-fill, relay), besides the writers'.
    pub pool_size: usize,
    /// Longest wait to connect, or for a free pooled connection, in milliseconds.
    pub connect_timeout_ms: u64,
    /// A statement running longer is cancelled (the request gets 503), in milliseconds.
    pub statement_timeout_ms: u64,
    /// The server ends a session idle inside a transaction this long (a hung process cannot
    /// keep its locks), in milliseconds.
    pub idle_in_transaction_timeout_ms: u64,
    /// Writer tasks, each with its own connection; writes are routed by endpoint ID.
    pub writers: usize,
    /// Most commands committed together in one group transaction of a writer.
    pub max_group: usize,
    /// A back-fill lease not renewed for this long is taken over by another replica, in
    /// seconds.
    pub backfill_lease_secs: u64,
    /// Apply schema migrations at start (under an advisory lock, so replicas starting
    /// together are safe). Off: a database behind this build refuses the start; run
    /// `epr migrate` first.
    pub migrate_on_start: bool,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        let d = epr_store_pg::PgConfig::new("");
        Self {
            url: String::new(),
            pool_size: d.pool_size,
            connect_timeout_ms: d.connect_timeout.as_millis() as u64,
            statement_timeout_ms: d.statement_timeout.as_millis() as u64,
            idle_in_transaction_timeout_ms: d.idle_in_transaction_timeout.as_millis() as u64,
            writers: d.writers,
            max_group: d.max_group,
            backfill_lease_secs: d.backfill_lease.as_secs(),
            migrate_on_start: d.migrate,
        }
    }
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
    /// One `info` line per HTTP request: request ID, method, route template, status,
    /// latency, and the endpoint ID of `/endpoints/{endpointId}` routes.
    pub requests: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KaaSettings {
    pub applications: BTreeMap<String, AppSettings>,
    /// Kaa's Tekton as a source of applications and versions (`kaa.tekton.*`).
    pub tekton: crate::tekton::TektonSettings,
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
            cors: epr_http::cors::CorsSettings::default(),
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            idle_timeout_secs: 60,
            max_connections: 4096,
            tls: TlsSettings::default(),
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
            backfill_step_ms: 5,
            backfill_batch: 512,
            backfill_pause_ms: 0,
            cache_mib: 4,
            integrity_check: "quick".into(),
            postgres: PostgresSettings::default(),
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

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            instance_name: "epr".into(),
            replica_id: String::new(),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            jetstream: false,
            publish_batch: 1024,
            confirm_timeout_ms: 5000,
            max_backoff_ms: 5000,
            subscription_capacity: 1 << 20,
            max_in_flight: 256,
            connected_listener: true,
            epmmp: true,
            efmp: true,
            ecap: true,
            restricted_metadata_keys: Vec::new(),
            connected_tenants: BTreeMap::new(),
            tenant_lifecycle: true,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "human".into(),
            requests: true,
        }
    }
}

impl Settings {
    /// A copy fit to print or log: secrets replaced by `***` (`auth.tenant_manager.
    /// client_secret`) and user information taken out of every URL (`nats.url`, the Tenant
    /// Manager's URLs, issuers and JWKS URIs), e.g. `nats://user:pass@host` →
    /// `nats://***@host`; the database URL keeps its user but not its password
    /// (`store.postgres.url`). What `epr check-config` prints.
    pub fn redacted(&self) -> Settings {
        let mut s = self.clone();
        let url = |u: &mut String| *u = crate::summary::redact_urls(u);
        url(&mut s.nats.url);
        s.store.postgres.url = redact_database_url(&s.store.postgres.url);
        url(&mut s.kaa.tekton.url);
        if !s.kaa.tekton.client_secret.is_empty() {
            s.kaa.tekton.client_secret = "***".into();
        }
        let tm = &mut s.auth.tenant_manager;
        url(&mut tm.url);
        url(&mut tm.token_url);
        if !tm.client_secret.is_empty() {
            tm.client_secret = "***".into();
        }
        for t in &mut s.auth.tenants {
            url(&mut t.issuer);
            url(&mut t.jwks_uri);
        }
        s
    }

    /// The embedded store's configuration for `data_dir` (the server's `store.data_dir`, or
    /// a directory an operator command works on).
    pub fn embedded_config(&self, data_dir: &Path) -> epr_store::EmbeddedConfig {
        let mut cfg = epr_store::EmbeddedConfig::new(data_dir);
        cfg.max_group = self.store.max_group;
        cfg.readers = self.store.readers;
        cfg.batch_retention_ms = self.store.batch_retention_hours as i64 * 3_600_000;
        cfg.record_events = !self.nats.url.is_empty();
        cfg.cache_mib = self.store.cache_mib;
        cfg.integrity_check =
            epr_store::IntegrityCheck::parse(&self.store.integrity_check).unwrap_or_default();
        cfg.backfill = self.backfill_pace();
        cfg
    }

    /// Whether the store is PostgreSQL (`store.backend: postgres`).
    pub fn is_postgres(&self) -> bool {
        self.store.backend == "postgres"
    }

    /// The PostgreSQL store's configuration (`store.postgres.*`, with the back-fill pace
    /// and batch retention of `store.*`).
    pub fn postgres_config(&self) -> epr_store_pg::PgConfig {
        let p = &self.store.postgres;
        let mut cfg = epr_store_pg::PgConfig::new(p.url.clone());
        cfg.pool_size = p.pool_size;
        cfg.connect_timeout = std::time::Duration::from_millis(p.connect_timeout_ms);
        cfg.statement_timeout = std::time::Duration::from_millis(p.statement_timeout_ms);
        cfg.idle_in_transaction_timeout =
            std::time::Duration::from_millis(p.idle_in_transaction_timeout_ms);
        cfg.writers = p.writers;
        cfg.max_group = p.max_group;
        // As embedded: without NATS nothing would ever publish (and delete) the events.
        cfg.record_events = !self.nats.url.is_empty();
        cfg.backfill = self.backfill_pace();
        cfg.backfill_lease = std::time::Duration::from_secs(p.backfill_lease_secs);
        cfg.batch_retention_ms = self.store.batch_retention_hours as i64 * 3_600_000;
        cfg.migrate = p.migrate_on_start;
        cfg
    }

    fn backfill_pace(&self) -> epr_store::BackfillPace {
        epr_store::BackfillPace {
            step: std::time::Duration::from_millis(self.store.backfill_step_ms),
            batch: self.store.backfill_batch,
            pause: std::time::Duration::from_millis(self.store.backfill_pause_ms),
        }
    }

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
        if let Ok(spec) = std::env::var("EPR_AUTH_TENANTS") {
            settings.add_tenants(&spec)?;
        }
        settings.database_url_shorthand(
            std::env::var_os("EPR__STORE__POSTGRES__URL").is_some(),
            std::env::var("EPR_DATABASE_URL").ok(),
        );
        settings.kaa.tekton.apply_kaa_env()?;
        settings.validate()?;
        Ok(settings)
    }

    /// `EPR_DATABASE_URL` sets `store.postgres.url`, unless `EPR__STORE__POSTGRES__URL` is
    /// set: the explicit key wins over the conventional shorthand.
    fn database_url_shorthand(&mut self, explicit_set: bool, shorthand: Option<String>) {
        if let (false, Some(url)) = (explicit_set, shorthand) {
            self.store.postgres.url = url;
        }
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

    /// Adds `tenant=issuer,tenant2=issuer2` tenants (a tenant already listed gets the
    /// issuer).
    pub fn add_tenants(&mut self, spec: &str) -> anyhow::Result<()> {
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((id, issuer)) = part.split_once('=') else {
                bail!("EPR_AUTH_TENANTS: '{part}' is not '<tenant>=<issuer URL>'");
            };
            let (id, issuer) = (id.trim(), issuer.trim());
            if id.is_empty() || issuer.is_empty() {
                bail!("EPR_AUTH_TENANTS: '{part}' needs both a tenant and an issuer URL");
            }
            match self.auth.tenants.iter_mut().find(|t| t.id == id) {
                Some(t) => t.issuer = issuer.to_owned(),
                None => self.auth.tenants.push(epr_auth::TenantSettings {
                    id: id.to_owned(),
                    issuer: issuer.to_owned(),
                    ..Default::default()
                }),
            }
        }
        Ok(())
    }

    /// Whether the listener at `addr` may run with the authentication in effect: without
    /// authentication only a loopback address is allowed, unless
    /// `auth.insecure_allow_remote`. `Ok(Some(warning))` when it runs insecurely.
    pub fn listener_security(&self, addr: SocketAddr) -> anyhow::Result<Option<String>> {
        if self.auth.enabled() {
            return Ok(None);
        }
        let tenant = &self.tenant.default;
        let off = format!(
            "authentication is OFF: every caller has every right in tenant '{tenant}' \
             (set auth.tenants[].issuer or auth.tenant_manager.url to turn it on)"
        );
        if is_loopback(addr.ip()) {
            return Ok(Some(off));
        }
        if self.auth.insecure_allow_remote {
            return Ok(Some(format!(
                "{off}; server.listen {addr} is reachable from other hosts because \
                 auth.insecure_allow_remote is true"
            )));
        }
        bail!(
            "server.listen {addr} is not a loopback address and authentication is off: \
             anyone who reaches it could read and change every endpoint. Turn \
             authentication on (auth.tenants[].issuer or auth.tenant_manager.url), listen on \
             127.0.0.1 or [::1], or set auth.insecure_allow_remote: true to accept the risk"
        )
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.listen_addr()?;
        self.catalog()?;
        self.kaa.tekton.validate()?;
        self.tenant()?;
        match self.store.backend.as_str() {
            "embedded" => {}
            "postgres" => self.validate_postgres()?,
            other => bail!("store.backend '{other}' is not one of embedded, postgres"),
        }
        if self.store.backfill_step_ms > 1_000 {
            bail!("store.backfill_step_ms must be at most 1000 (writes wait up to one step)");
        }
        if !(1..=100_000).contains(&self.store.backfill_batch) {
            bail!("store.backfill_batch must be between 1 and 100000");
        }
        if !(1..=16_384).contains(&self.store.cache_mib) {
            bail!("store.cache_mib must be between 1 and 16384");
        }
        if epr_store::IntegrityCheck::parse(&self.store.integrity_check).is_none() {
            bail!(
                "store.integrity_check '{}' is not one of quick, full, off",
                self.store.integrity_check
            );
        }
        if self.store.backfill_pause_ms > 60_000 {
            bail!("store.backfill_pause_ms must be at most 60000");
        }
        if !matches!(self.log.format.as_str(), "human" | "json") {
            bail!("log.format must be 'human' or 'json'");
        }
        if self.server.page_default == 0 || self.server.page_default > self.server.page_max {
            bail!("server.page_default must be between 1 and server.page_max");
        }
        self.server.cors.layer().map_err(anyhow::Error::msg)?;
        for (key, value) in [
            (
                "server.header_timeout_secs",
                self.server.header_timeout_secs,
            ),
            ("server.body_timeout_secs", self.server.body_timeout_secs),
            ("server.idle_timeout_secs", self.server.idle_timeout_secs),
        ] {
            if !(1..=3600).contains(&value) {
                bail!("{key} must be between 1 and 3600");
            }
        }
        if !(1..=1_000_000).contains(&self.server.max_connections) {
            bail!("server.max_connections must be between 1 and 1000000");
        }
        if self.server.tls.enabled() {
            for (key, value) in [
                ("server.tls.cert_file", &self.server.tls.cert_file),
                ("server.tls.key_file", &self.server.tls.key_file),
            ] {
                if value.is_empty() {
                    bail!(
                        "{key} is empty: server.tls needs both cert_file and key_file (or neither)"
                    );
                }
            }
        }
        self.auth.validate().map_err(anyhow::Error::msg)?;
        if self.limits.batch_max_items == 0 {
            bail!("limits.batch_max_items must be at least 1");
        }
        subject_token("service.instance_name", &self.service.instance_name)?;
        if !self.service.replica_id.is_empty() {
            subject_token("service.replica_id", &self.service.replica_id)?;
        }
        if self.nats.publish_batch == 0 || self.nats.max_in_flight == 0 {
            bail!("nats.publish_batch and nats.max_in_flight must be at least 1");
        }
        // A batch's JetStream acks are awaited together, and the client allows 5,000 in
        // flight: a bigger batch would wait for itself.
        if self.nats.publish_batch > 5000 {
            bail!("nats.publish_batch must be at most 5000");
        }
        if self.nats.subscription_capacity < 1024 {
            bail!("nats.subscription_capacity must be at least 1024");
        }
        self.connected_tenants()?;
        crate::purge::RemovedTenantData::parse(&self.auth.removed_tenant_data)?;
        self.self_registration.rate_limit.validate()?;
        Ok(())
    }

    /// `store.postgres.*`, checked when the backend is PostgreSQL.
    fn validate_postgres(&self) -> anyhow::Result<()> {
        let p = &self.store.postgres;
        if p.url.trim().is_empty() {
            bail!(
                "store.postgres.url is empty: store.backend 'postgres' needs the database URL \
                 (postgres://user:password@host:5432/database; or EPR_DATABASE_URL)"
            );
        }
        // Parsed now so that a typo stops the start with the key's name, not a pool error.
        if let Err(e) = p.url.parse::<tokio_postgres::Config>() {
            bail!(
                "store.postgres.url '{}' cannot be parsed: {e}",
                redact_database_url(&p.url)
            );
        }
        let ranges: [(&str, u64, u64, u64); 7] = [
            ("store.postgres.pool_size", p.pool_size as u64, 1, 1000),
            (
                "store.postgres.connect_timeout_ms",
                p.connect_timeout_ms,
                100,
                600_000,
            ),
            (
                "store.postgres.statement_timeout_ms",
                p.statement_timeout_ms,
                100,
                3_600_000,
            ),
            (
                "store.postgres.idle_in_transaction_timeout_ms",
                p.idle_in_transaction_timeout_ms,
                100,
                3_600_000,
            ),
            ("store.postgres.writers", p.writers as u64, 1, 64),
            ("store.postgres.max_group", p.max_group as u64, 1, 10_000),
            (
                "store.postgres.backfill_lease_secs",
                p.backfill_lease_secs,
                1,
                3600,
            ),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                bail!("{key} must be between {min} and {max} (it is {value})");
            }
        }
        // A back-fill step runs inside its lease: a lease shorter than a step would be
        // taken over while its owner still works.
        if p.backfill_lease_secs * 1000 <= self.store.backfill_step_ms * 2 {
            bail!("store.postgres.backfill_lease_secs must be longer than two back-fill steps");
        }
        Ok(())
    }

    /// The replica ID in effect: configured, else `$HOSTNAME`, else random (chosen once).
    pub fn replica_id(&self) -> String {
        static RANDOM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        if !self.service.replica_id.is_empty() {
            return self.service.replica_id.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| subject_token("HOSTNAME", h).is_ok())
            .unwrap_or_else(|| {
                RANDOM
                    .get_or_init(|| {
                        let id = uuid::Uuid::new_v4().simple().to_string();
                        format!("{}-{}", self.service.instance_name, &id[..12])
                    })
                    .clone()
            })
    }

    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.server
            .listen
            .parse()
            .with_context(|| format!("server.listen '{}' is not an address", self.server.listen))
    }

    /// `nats.connected_tenants`, checked: keys are subject tokens, values tenant IDs.
    pub fn connected_tenants(&self) -> anyhow::Result<BTreeMap<String, TenantId>> {
        let mut out = BTreeMap::new();
        for (originator, tenant) in &self.nats.connected_tenants {
            subject_token("nats.connected_tenants key", originator)?;
            let id = TenantId::parse(tenant)
                .map_err(|e| anyhow::anyhow!("nats.connected_tenants.{originator}: {e}"))?;
            out.insert(originator.clone(), id);
        }
        Ok(out)
    }

    /// The service instance name of each tenant on NATS.
    pub fn tenant_naming(&self) -> anyhow::Result<epr_core::auth::TenantNaming> {
        Ok(epr_core::auth::TenantNaming {
            instance_name: self.service.instance_name.clone(),
            default_tenant: self.tenant()?,
        })
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

/// A database URL fit to print: the password masked, the user kept (`postgres://epr:***@db/epr`);
/// also `password=…` in a `key=value` string or a URL's query.
pub fn redact_database_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://").map(|i| i + 3) {
        let host_end = out[scheme_end..]
            .find(['/', '?'])
            .map_or(out.len(), |i| scheme_end + i);
        if let Some(at) = out[scheme_end..host_end].rfind('@') {
            let userinfo = &out[scheme_end..scheme_end + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(scheme_end + colon + 1..scheme_end + at, "***");
            }
        }
    }
    // `password=secret` (key=value form, or `?password=` in a URL), quoted or not.
    let lower = out.to_ascii_lowercase();
    let mut result = String::with_capacity(out.len());
    let mut rest = 0;
    let mut search = 0;
    while let Some(i) = lower[search..].find("password=").map(|i| search + i) {
        let at_boundary = i == 0 || matches!(lower.as_bytes()[i - 1], b' ' | b'?' | b'&');
        let start = i + "password=".len();
        if !at_boundary {
            search = start;
            continue;
        }
        let end = if out[start..].starts_with('\'') {
            out[start + 1..]
                .find('\'')
                .map_or(out.len(), |j| start + 1 + j + 1)
        } else {
            out[start..]
                .find([' ', '&'])
                .map_or(out.len(), |j| start + j)
        };
        result.push_str(&out[rest..start]);
        result.push_str("***");
        rest = end;
        search = end;
    }
    result.push_str(&out[rest..]);
    result
}

/// 127.0.0.0/8, ::1, and IPv4 loopback written as an IPv4-mapped IPv6 address.
fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Names that become one NATS subject token (or a queue group) must not split or widen
/// the subject.
fn subject_token(key: &str, value: &str) -> anyhow::Result<()> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace())
    {
        bail!("{key} '{value}' must be one NATS subject token: non-empty, without '.', '*', '>' or spaces");
    }
    Ok(())
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
    fn tenants_shorthand() {
        let mut s = Settings::default();
        assert!(!s.auth.enabled());
        s.add_tenants("acme=https://a.example/realms/acme, beta=https://b.example")
            .unwrap();
        assert!(s.auth.enabled());
        assert_eq!(s.auth.tenants.len(), 2);
        assert_eq!(s.auth.tenants[1].id, "beta");
        assert_eq!(s.auth.tenants[1].issuer, "https://b.example");
        s.add_tenants("acme=https://a2.example").unwrap();
        assert_eq!(s.auth.tenants.len(), 2);
        assert_eq!(s.auth.tenants[0].issuer, "https://a2.example");
        for bad in ["acme", "=https://x", "acme="] {
            let e = s.add_tenants(bad).unwrap_err().to_string();
            assert!(e.contains("EPR_AUTH_TENANTS"), "{e}");
        }
    }

    #[test]
    fn without_authentication_only_loopback() {
        let mut s = Settings::default();
        for ok in [
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
        ] {
            let w = s.listener_security(ok.parse().unwrap()).unwrap().unwrap();
            assert!(
                w.contains("authentication is OFF") && w.contains("'kaa'"),
                "{w}"
            );
        }
        for bad in [
            "0.0.0.0:8080",
            "[::]:8080",
            "10.0.0.1:80",
            "[::ffff:10.0.0.1]:80",
        ] {
            let e = s.listener_security(bad.parse().unwrap()).unwrap_err();
            assert!(e.to_string().contains("auth.insecure_allow_remote"), "{e}");
        }
        s.auth.insecure_allow_remote = true;
        let w = s
            .listener_security("0.0.0.0:8080".parse().unwrap())
            .unwrap()
            .unwrap();
        assert!(w.contains("insecure_allow_remote"), "{w}");
        s.auth.insecure_allow_remote = false;
        s.add_tenants("acme=https://issuer.example").unwrap();
        assert_eq!(
            s.listener_security("0.0.0.0:8080".parse().unwrap())
                .unwrap(),
            None
        );
    }

    #[test]
    fn tls_needs_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "server:\n  tls:\n    cert_file: /x/cert.pem\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err();
        assert!(
            format!("{err:#}").contains("server.tls.key_file"),
            "{err:#}"
        );
        std::fs::write(&file, "server:\n  tls:\n    key_file: /x/key.pem\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err();
        assert!(
            format!("{err:#}").contains("server.tls.cert_file"),
            "{err:#}"
        );
        std::fs::write(&file, "auth:\n  tenantz: []\n").unwrap();
        assert!(Settings::load(Some(&file)).is_err());
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
        std::fs::write(&file, "nats:\n  publish_batch: 5001\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err();
        assert!(format!("{err:#}").contains("publish_batch"), "{err:#}");
        std::fs::write(&file, "server:\n  idle_timeout_secs: 0\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err();
        assert!(format!("{err:#}").contains("idle_timeout_secs"), "{err:#}");
        std::fs::write(&file, "server:\n  max_connections: 0\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err();
        assert!(format!("{err:#}").contains("max_connections"), "{err:#}");
        std::fs::write(&file, "service:\n  instance_name: a.b\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err();
        assert!(
            format!("{err:#}").contains("service.instance_name"),
            "{err:#}"
        );
    }

    #[test]
    fn postgres_backend_settings() {
        let mut s = Settings::default();
        s.store.backend = "mysql".into();
        let err = format!("{:#}", s.validate().unwrap_err());
        assert!(
            err.contains("store.backend 'mysql'") && err.contains("postgres"),
            "{err}"
        );
        s.store.backend = "postgres".into();
        let err = format!("{:#}", s.validate().unwrap_err());
        assert!(err.contains("store.postgres.url is empty"), "{err}");
        s.database_url_shorthand(true, Some("postgres://ignored@h/db".into()));
        assert!(s.store.postgres.url.is_empty(), "the explicit key wins");
        s.database_url_shorthand(false, Some("postgres://epr:s3cret@db:5432/epr".into()));
        s.validate().unwrap();
        let cfg = s.postgres_config();
        assert_eq!(cfg.url, "postgres://epr:s3cret@db:5432/epr");
        assert!(cfg.migrate);
        assert!(!cfg.record_events, "no NATS: nothing would publish events");
        assert_eq!(cfg.backfill.batch, s.store.backfill_batch);
        assert_eq!(cfg.batch_retention_ms, 7 * 24 * 3_600_000);
        let shown = serde_json::to_string(&s.redacted()).unwrap();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("postgres://epr:***@db:5432/epr"), "{shown}");
        for (key, yaml) in [
            ("store.postgres.pool_size", "pool_size: 0"),
            ("store.postgres.writers", "writers: 0"),
            ("store.postgres.max_group", "max_group: 0"),
            ("store.postgres.connect_timeout_ms", "connect_timeout_ms: 5"),
            (
                "store.postgres.statement_timeout_ms",
                "statement_timeout_ms: 0",
            ),
            (
                "store.postgres.idle_in_transaction_timeout_ms",
                "idle_in_transaction_timeout_ms: 0",
            ),
            (
                "store.postgres.backfill_lease_secs",
                "backfill_lease_secs: 0",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("c.yaml");
            std::fs::write(
                &file,
                format!(
                    "store:\n  backend: postgres\n  postgres:\n    url: postgres://h/db\n    {yaml}\n"
                ),
            )
            .unwrap();
            let err = format!("{:#}", Settings::load(Some(&file)).unwrap_err());
            assert!(err.contains(key), "{yaml}: {err}");
        }
        s.store.postgres.url = "postgres://h:notaport/db".into();
        let err = format!("{:#}", s.validate().unwrap_err());
        assert!(err.contains("store.postgres.url"), "{err}");
    }

    #[test]
    fn database_passwords_are_masked() {
        for (url, shown) in [
            (
                "postgres://epr:pw@h:5432/db",
                "postgres://epr:***@h:5432/db",
            ),
            ("postgres://epr@h/db", "postgres://epr@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            (
                "postgres://epr:p@ss@h/db?sslmode=disable",
                "postgres://epr:***@h/db?sslmode=disable",
            ),
            (
                "postgres://h/db?user=epr&password=pw&sslmode=disable",
                "postgres://h/db?user=epr&password=***&sslmode=disable",
            ),
            (
                "host=h user=epr password=pw dbname=db",
                "host=h user=epr password=*** dbname=db",
            ),
            (
                "host=h password='a b' dbname=db",
                "host=h password=*** dbname=db",
            ),
            ("host=h mypassword=x", "host=h mypassword=x"),
        ] {
            assert_eq!(redact_database_url(url), shown, "{url}");
        }
    }

    #[test]
    fn tenancy_settings_name_the_key_and_rule() {
        let mut s = Settings::default();
        s.nats
            .connected_tenants
            .insert("kpc.a".into(), "acme".into());
        let err = format!("{:#}", s.validate().unwrap_err());
        assert!(err.contains("nats.connected_tenants key 'kpc.a'"), "{err}");
        s.nats.connected_tenants.clear();
        s.nats.connected_tenants.insert("kpc".into(), "a b".into());
        let err = format!("{:#}", s.validate().unwrap_err());
        assert!(err.contains("nats.connected_tenants.kpc"), "{err}");
        s.nats.connected_tenants.clear();
        s.auth.removed_tenant_data = "drop".into();
        let err = format!("{:#}", s.validate().unwrap_err());
        assert!(
            err.contains("auth.removed_tenant_data") && err.contains("keep or purge"),
            "{err}"
        );
        s.auth.removed_tenant_data = "purge".into();
        s.validate().unwrap();
    }
}
