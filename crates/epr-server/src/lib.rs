//! The Endpoint Register server: the one place that names concrete adapter types and wires
//! them together. `main.rs` is a thin shell around [`Application`].

pub mod admin;
pub mod catalogue;
pub mod config;
pub mod export_format;
pub mod log_writer;
pub mod metric_help;
pub mod process_metrics;
pub mod purge;
pub mod reload;
pub mod serve;
pub mod summary;
pub mod tekton;
pub mod telemetry;

use anyhow::Context;
use epr_auth::Auth;
use epr_core::auth::{Authenticator, Principal};
use epr_core::ports::{Clock, IdSource, Store};
use epr_core::registry::Registry;
use epr_core::Timestamp;
use epr_http::{AppState, ComponentHealth, HealthComponent, HttpSettings};
use epr_nats::{ConnectionState, Nats, NatsSettings, Relay, RelaySettings, Sink};
use epr_store::EmbeddedStore;
use epr_store_pg::PgStore;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use config::Settings;

pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// UUIDv4 for IDs and secrets: Kaa's endpoint IDs are UUIDs, and 122 random bits make a
/// token. Token IDs are the exception (below).
pub(crate) struct UuidIds;

impl IdSource for UuidIds {
    fn endpoint_id(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }
    fn token(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }
    fn task_id(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }
    fn filter_id(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }
    /// UUIDv7 (time-ordered): every registration stores a token, and a random ID would land
    /// each one on a random page of the token-ID index, which a group commit then writes out
    /// whole; time-ordered IDs append. A token ID is a handle, not a secret, and its token's
    /// `createdDate` already tells the time it carries.
    fn token_id(&self) -> String {
        uuid::Uuid::now_v7().to_string()
    }
}

/// Health of the NATS connection, with the outbox depth (events not yet published).
struct NatsHealth {
    url: String,
    state: Option<Arc<ConnectionState>>,
    outbox_depth: Arc<AtomicU64>,
}

impl HealthComponent for NatsHealth {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn check(&self) -> ComponentHealth {
        let depth = self.outbox_depth.load(Ordering::Relaxed);
        match &self.state {
            None => ComponentHealth {
                status: "DISABLED",
                details: serde_json::json!({
                    "reason": "nats.url is not set: events are not published",
                }),
            },
            Some(state) => ComponentHealth {
                status: if state.is_connected() { "UP" } else { "DOWN" },
                details: serde_json::json!({
                    "url": self.url,
                    "outboxDepth": depth,
                    "lastError": state.last_error(),
                    "slowConsumerEvents": state.slow_consumer_events(),
                }),
            },
        }
    }
}

/// Authentication's state for health: issuers and their keys, the Tenant Manager.
struct AuthHealth(Arc<Auth>);

impl HealthComponent for AuthHealth {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn check(&self) -> ComponentHealth {
        let (status, details) = self.0.health();
        ComponentHealth { status, details }
    }
}

/// Runs a NATS front-end and reports at once if it cannot start (it then stays off).
async fn logged(
    what: &'static str,
    run: impl Future<Output = Result<(), async_nats::SubscribeError>>,
) -> Result<(), async_nats::SubscribeError> {
    let result = run.await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "{what} could not subscribe; it is not running");
    }
    result
}

/// How long shutdown keeps publishing queued events before leaving them for the next start.
const RELAY_DRAIN_LIMIT: Duration = Duration::from_secs(3);

/// A built, bound, not yet running server.
pub struct Application {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    /// Either backend (`store.backend`); everything past `build` sees only the trait.
    store: Arc<dyn Store>,
    relay: Relay,
    /// NATS front-ends (connected listener, 19/EPMMP, 20/EFMP), started by
    /// `run_until_stopped`.
    listeners: Vec<Listener>,
    ready: Arc<AtomicBool>,
    shutdown_timeout: Duration,
    connections: serve::ConnLimits,
    registry: Arc<Registry>,
    /// The authenticator and tenant directory; its background work runs with the server.
    auth: Arc<Auth>,
    /// Removed tenants' data being deleted (`auth.removed_tenant_data: purge`).
    purge: Option<Arc<purge::PurgeJobs>>,
    /// HTTPS on the listener (`server.tls`).
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Central configuration: the catalogue's sources, Tekton, reload.
    central: Central,
}

/// The application catalogue's sources and what keeps them current.
struct Central {
    /// The settings the application was built with (what a reload compares against).
    settings: Settings,
    catalogue: Arc<catalogue::CatalogueSources>,
    /// Kaa's Tekton, when `kaa.tekton.enabled`.
    tekton: Option<Arc<tekton::Tekton>>,
    /// Set by [`Application::with_reload`].
    reloader: Option<Arc<reload::Reloader>>,
}

/// A NATS front-end, started with a stop signal.
type Listener = Box<
    dyn FnOnce(
            tokio::sync::watch::Receiver<bool>,
        ) -> tokio::task::JoinHandle<Result<(), async_nats::SubscribeError>>
        + Send,
>;

impl Application {
    /// Opens the store, builds the registry and router, binds the listener (port 0 picks a
    /// free port, see [`Application::addr`]).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let listen = settings.listen_addr()?;
        // The safe default: without authentication, loopback only (or a loud opt-in).
        if let Some(warning) = settings.listener_security(listen)? {
            tracing::warn!("{warning}");
        }
        let tls = if settings.server.tls.enabled() {
            Some(serve::tls_acceptor(&settings.server.tls)?)
        } else {
            None
        };
        let default_tenant = settings.tenant()?;
        let auth =
            Auth::new(settings.auth.clone(), default_tenant.clone()).map_err(anyhow::Error::msg)?;
        let catalog = settings.catalog()?;
        if catalog.applications().next().is_none() && !catalog.allows_unknown() {
            tracing::warn!(
                "no applications are configured and unknown versions are refused: \
                 every registration will fail; see kaa.applications in the README"
            );
        }
        // Installed before the store opens, so gauges the store sets at open are recorded.
        let metrics_renderer = telemetry::metrics_renderer();
        let store = open_store(settings).await?;
        let registry = Arc::new(Registry::new(
            store.clone(),
            catalog,
            settings.registry_settings(),
            Arc::new(SystemClock),
            Arc::new(UuidIds),
        ));
        // Every source keeps its entries; until `with_reload` names the file, local entries
        // count as the environment's.
        let catalogue = Arc::new(catalogue::CatalogueSources::new(registry.clone()));
        let (file_entries, env_entries) = catalogue::local_entries(settings, None)?;
        catalogue.set_local(
            settings.registration.allow_unknown_app_versions,
            file_entries,
            env_entries,
        );
        let tekton = if settings.kaa.tekton.enabled {
            let t = tekton::Tekton::new(
                &settings.kaa.tekton,
                &settings.auth,
                catalogue.clone(),
                store.clone() as Arc<dyn Store>,
                auth.tenants(),
            );
            // Before serving: registrations are checked against Tekton's versions at once.
            t.start().await;
            Some(t)
        } else {
            None
        };
        let nats = if settings.nats.url.is_empty() {
            tracing::warn!(
                "nats.url is not set: events are not published and no NATS requests are served"
            );
            None
        } else {
            let nats_settings = NatsSettings {
                url: settings.nats.url.clone(),
                client_name: format!(
                    "{}/{}",
                    settings.service.instance_name,
                    settings.replica_id()
                ),
                subscription_capacity: settings.nats.subscription_capacity,
                max_reconnect_delay: Duration::from_millis(settings.nats.max_backoff_ms),
            };
            Some(
                Nats::connect(&nats_settings)
                    .await
                    .with_context(|| format!("nats.url '{}'", settings.nats.url))?,
            )
        };
        // NATS messages carry no tenant: each tenant is served under its own instance name.
        let tenancy = epr_nats::Tenancy {
            naming: settings.tenant_naming()?,
            tenants: auth.tenants(),
        };
        let purge = match purge::RemovedTenantData::parse(&settings.auth.removed_tenant_data)? {
            purge::RemovedTenantData::Purge => Some(Arc::new(purge::PurgeJobs::new(
                registry.clone(),
                auth.tenants(),
                purge::PurgePace::default(),
            ))),
            purge::RemovedTenantData::Keep => None,
        };
        let mut relay_settings = RelaySettings::new(
            epr_events::Originator {
                instance_name: settings.service.instance_name.clone(),
                replica_id: settings.replica_id(),
            },
            settings.tenant()?,
        );
        relay_settings.batch = settings.nats.publish_batch;
        relay_settings.jetstream = settings.nats.jetstream;
        relay_settings.confirm_timeout = Duration::from_millis(settings.nats.confirm_timeout_ms);
        relay_settings.max_backoff = Duration::from_millis(settings.nats.max_backoff_ms);
        let sink = match &nats {
            Some(n) => Sink::Nats(n.clone()),
            None => Sink::Discard,
        };
        let relay = Relay::new(store.clone(), sink, relay_settings);
        let nats_health = NatsHealth {
            // Each URL of the list: `/health` is an open route.
            url: summary::redact_urls(&settings.nats.url),
            state: nats.as_ref().map(|n| n.state.clone()),
            outbox_depth: relay.depth(),
        };
        let mut listeners: Vec<Listener> = Vec::new();
        if let Some(nats) = &nats {
            if settings.nats.connected_listener {
                let (nats, registry) = (nats.clone(), registry.clone());
                let tenancy = tenancy.clone();
                let cfg = epr_nats::connected::ConnectedSettings {
                    shards: 16,
                    tenants_by_originator: settings.connected_tenants()?,
                };
                listeners.push(Box::new(move |stop| {
                    tokio::spawn(logged(
                        "9/ELCE connected listener",
                        epr_nats::connected::listen(nats, registry, tenancy, cfg, stop),
                    ))
                }));
            }
            // Without authentication there is one tenant, which no Tenant Manager manages.
            if settings.nats.tenant_lifecycle && settings.auth.enabled() {
                let nats = nats.clone();
                let control: Arc<dyn epr_core::auth::TenantControl> =
                    Arc::new(purge::ServerTenantControl {
                        auth: auth.clone(),
                        purge: purge.clone(),
                    });
                listeners.push(Box::new(move |stop| {
                    tokio::spawn(logged(
                        "21/TLE tenant lifecycle listener",
                        epr_nats::tenant_lifecycle::listen(nats, control, stop),
                    ))
                }));
            }
            if let Some(t) = &tekton {
                let (nats, control, tenancy) = (nats.clone(), t.control(), tenancy.clone());
                listeners.push(Box::new(move |stop| {
                    tokio::spawn(logged(
                        "17/SCMP configuration listener",
                        epr_nats::scmp::listen(nats, control, tenancy, stop),
                    ))
                }));
            }
            if settings.nats.epmmp {
                let (nats, registry) = (nats.clone(), registry.clone());
                let tenancy = tenancy.clone();
                let cfg = epr_nats::epmmp::EpmmpSettings {
                    restricted_keys: settings
                        .nats
                        .restricted_metadata_keys
                        .iter()
                        .cloned()
                        .collect(),
                    max_in_flight: settings.nats.max_in_flight,
                    max_endpoint_ids: 10_000,
                };
                listeners.push(Box::new(move |stop| {
                    tokio::spawn(logged(
                        "19/EPMMP server",
                        epr_nats::epmmp::serve(nats, registry, tenancy, cfg, stop),
                    ))
                }));
            }
            if settings.nats.efmp {
                let (nats, registry) = (nats.clone(), registry.clone());
                let tenancy = tenancy.clone();
                let cfg = epr_nats::efmp::EfmpSettings {
                    max_in_flight: settings.nats.max_in_flight,
                };
                listeners.push(Box::new(move |stop| {
                    tokio::spawn(logged(
                        "20/EFMP server",
                        epr_nats::efmp::serve(nats, registry, tenancy, cfg, stop),
                    ))
                }));
            }
            if settings.nats.ecap {
                let (nats, registry) = (nats.clone(), registry.clone());
                let tenancy = tenancy.clone();
                let cfg = epr_nats::ecap::EcapSettings {
                    max_in_flight: settings.nats.max_in_flight,
                };
                listeners.push(Box::new(move |stop| {
                    tokio::spawn(logged(
                        "16/ECAP token server",
                        epr_nats::ecap::serve(nats, registry, tenancy, cfg, stop),
                    ))
                }));
            }
        }
        let ready = Arc::new(AtomicBool::new(false));
        let state = AppState {
            registry: registry.clone(),
            auth: auth.clone() as Arc<dyn Authenticator>,
            anonymous: Arc::new(Principal::anonymous(default_tenant)),
            open_routes: settings.auth.open_routes.clone().into(),
            settings: HttpSettings {
                page_default: settings.server.page_default,
                page_max: settings.server.page_max,
                max_body_bytes: settings.server.max_body_bytes,
                log_requests: settings.log.requests,
            },
            ready: ready.clone(),
            metrics: Some(metrics_renderer),
            components: {
                let mut c: Vec<Arc<dyn HealthComponent>> =
                    vec![Arc::new(nats_health), Arc::new(AuthHealth(auth.clone()))];
                if let Some(t) = &tekton {
                    c.push(Arc::new(tekton::TektonHealth(t.clone())));
                    if settings.nats.url.is_empty() {
                        tracing::warn!(
                            "kaa.tekton is enabled without nats.url: 17/SCMP updates are not \
                             received; Tekton is read every kaa.tekton.refresh_secs"
                        );
                    }
                }
                c.into()
            },
            device: Arc::new(epr_http::self_registration::DeviceState::new(
                settings.self_registration.rate_limit.limits(),
                Some(auth.tenants()),
            )),
        };
        let router = epr_http::cors::with_cors(epr_http::router(state), &settings.server.cors)
            .map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {}", settings.server.listen))?;
        let addr = listener.local_addr()?;
        Ok(Self {
            listener,
            addr,
            router,
            store,
            relay,
            listeners,
            ready,
            shutdown_timeout: Duration::from_secs(settings.server.shutdown_timeout_secs),
            connections: serve::ConnLimits::from_settings(&settings.server),
            registry,
            auth,
            purge,
            tls,
            central: Central {
                settings: settings.clone(),
                catalogue,
                tekton,
                reloader: None,
            },
        })
    }

    /// Reloads the configuration from `source` on SIGHUP and when its file changes (see
    /// [`reload`]); entries of the file are told apart from the environment's from now on.
    pub fn with_reload(mut self, source: reload::ReloadSource) -> anyhow::Result<Self> {
        let reloader = Arc::new(reload::Reloader::new(
            source,
            self.central.settings.clone(),
            self.registry.clone(),
            self.central.catalogue.clone(),
        ));
        reloader.classify_local()?;
        self.central.reloader = Some(reloader);
        Ok(self)
    }

    /// The reloader, when [`Application::with_reload`] set one (tools and tests).
    pub fn reloader(&self) -> Option<Arc<reload::Reloader>> {
        self.central.reloader.clone()
    }

    /// The authenticator and tenant directory (its tenant set, its `TenantControl`).
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The use cases, for tools and tests that act in any tenant without a token.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Serves until `shutdown` completes, then: readiness goes down, the listener closes,
    /// in-flight requests finish (up to the shutdown timeout), the store commits what is
    /// queued and stops.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let ready = self.ready.clone();
        let auth_stop = tokio_util::sync::CancellationToken::new();
        let auth_task = tokio::spawn(self.auth.clone().run(auth_stop.clone()));
        let (relay_stop_tx, relay_stop) = tokio::sync::watch::channel(false);
        let relay = tokio::spawn(self.relay.run(relay_stop, RELAY_DRAIN_LIMIT));
        let (listeners_stop_tx, listeners_stop) = tokio::sync::watch::channel(false);
        let mut central_tasks = Vec::new();
        if let Some(t) = self.central.tekton.clone() {
            central_tasks.push(tokio::spawn(t.run(listeners_stop.clone())));
        }
        if let Some(r) = self.central.reloader.clone() {
            central_tasks.push(tokio::spawn(r.run(listeners_stop.clone())));
        }
        let listeners: Vec<_> = self
            .listeners
            .into_iter()
            .map(|start| start(listeners_stop.clone()))
            .collect();
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let signal = async move {
            shutdown.await;
            ready.store(false, Ordering::Release);
            tracing::info!("shutting down: draining in-flight requests");
            let _ = stop_tx.send(true);
        };
        self.ready.store(true, Ordering::Release);
        tracing::info!(addr = %self.addr, "EPR listening");
        let server = serve::serve(
            self.listener,
            self.router,
            self.connections,
            self.tls,
            signal,
        );
        let timeout = self.shutdown_timeout;
        let result = tokio::select! {
            _ = server => Ok(()),
            _ = async move {
                let _ = stop_rx.wait_for(|v| *v).await;
                tokio::time::sleep(timeout).await;
            } => {
                tracing::warn!("in-flight requests did not finish within the shutdown timeout");
                Ok(())
            }
        };
        // No request needs a token checked any more.
        auth_stop.cancel();
        let _ = auth_task.await;
        // NATS front-ends stop taking work and finish what they hold.
        let _ = listeners_stop_tx.send(true);
        for l in listeners {
            if let Err(e) = l.await {
                tracing::error!(error = %e, "a NATS listener panicked");
            }
        }
        for t in central_tasks {
            let _ = t.await;
        }
        // Purges stop after their current step; `epr purge-tenant` finishes them.
        if let Some(purge) = &self.purge {
            purge.shutdown().await;
        }
        // Publish what the last requests committed while the store can still acknowledge;
        // anything left goes out at the next start.
        let _ = relay_stop_tx.send(true);
        let _ = relay.await;
        self.store.shutdown().await;
        tracing::info!("stopped");
        result
    }
}

/// Opens the configured store (`store.backend`).
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    if settings.is_postgres() {
        let cfg = settings.postgres_config();
        let store = PgStore::open(cfg).await.map_err(|e| {
            anyhow::anyhow!(
                "opening the PostgreSQL store at {}: {e}",
                config::redact_database_url(&settings.store.postgres.url)
            )
        })?;
        Ok(Arc::new(store))
    } else {
        let cfg = settings.embedded_config(&settings.store.data_dir);
        let store = EmbeddedStore::open(cfg).with_context(|| {
            format!("opening the store in {}", settings.store.data_dir.display())
        })?;
        Ok(Arc::new(store))
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
