//! The Endpoint Register server: the one place that names concrete adapter types and wires
//! them together. `main.rs` is a thin shell around [`Application`].

pub mod config;
pub mod telemetry;

use anyhow::Context;
use epr_core::ports::{Clock, IdSource, Store};
use epr_core::registry::Registry;
use epr_core::Timestamp;
use epr_http::{AppState, HttpSettings};
use epr_store::{EmbeddedConfig, EmbeddedStore};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use config::Settings;

struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// UUIDv4 everywhere: Kaa's endpoint IDs are UUIDs, and 122 random bits make a token.
struct UuidIds;

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
}

/// A built, bound, not yet running server.
pub struct Application {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    store: Arc<EmbeddedStore>,
    ready: Arc<AtomicBool>,
    shutdown_timeout: Duration,
}

impl Application {
    /// Opens the store, builds the registry and router, binds the listener (port 0 picks a
    /// free port, see [`Application::addr`]).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let catalog = settings.catalog()?;
        if catalog.applications().next().is_none() && !catalog.allows_unknown() {
            tracing::warn!(
                "no applications are configured and unknown versions are refused: \
                 every registration will fail; see kaa.applications in the README"
            );
        }
        let mut store_cfg = EmbeddedConfig::new(&settings.store.data_dir);
        store_cfg.max_group = settings.store.max_group;
        store_cfg.readers = settings.store.readers;
        store_cfg.batch_retention_ms = settings.store.batch_retention_hours as i64 * 3_600_000;
        let store = Arc::new(EmbeddedStore::open(store_cfg).with_context(|| {
            format!("opening the store in {}", settings.store.data_dir.display())
        })?);
        let registry = Arc::new(Registry::new(
            store.clone() as Arc<dyn Store>,
            catalog,
            settings.registry_settings(),
            Arc::new(SystemClock),
            Arc::new(UuidIds),
        ));
        let ready = Arc::new(AtomicBool::new(false));
        let state = AppState {
            registry,
            tenant: settings.tenant()?,
            settings: HttpSettings {
                page_default: settings.server.page_default,
                page_max: settings.server.page_max,
                max_body_bytes: settings.server.max_body_bytes,
            },
            ready: ready.clone(),
            metrics: Some(telemetry::metrics_renderer()),
        };
        let router = epr_http::router(state);
        let listener = tokio::net::TcpListener::bind(settings.listen_addr()?)
            .await
            .with_context(|| format!("binding {}", settings.server.listen))?;
        let addr = listener.local_addr()?;
        Ok(Self {
            listener,
            addr,
            router,
            store,
            ready,
            shutdown_timeout: Duration::from_secs(settings.server.shutdown_timeout_secs),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then: readiness goes down, the listener closes,
    /// in-flight requests finish (up to the shutdown timeout), the store commits what is
    /// queued and stops.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        use axum::serve::ListenerExt;
        let listener = self.listener.tap_io(|tcp| {
            // Responses go out in more than one write; Nagle would delay them by ~40 ms.
            let _ = tcp.set_nodelay(true);
        });
        let ready = self.ready.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let signal = async move {
            shutdown.await;
            ready.store(false, Ordering::Release);
            tracing::info!("shutting down: draining in-flight requests");
            let _ = stop_tx.send(true);
        };
        self.ready.store(true, Ordering::Release);
        tracing::info!(addr = %self.addr, "EPR listening");
        let server = axum::serve(listener, self.router).with_graceful_shutdown(signal);
        let timeout = self.shutdown_timeout;
        let result = tokio::select! {
            r = server => r.context("HTTP server failed"),
            _ = async move {
                let _ = stop_rx.wait_for(|v| *v).await;
                tokio::time::sleep(timeout).await;
            } => {
                tracing::warn!("in-flight requests did not finish within the shutdown timeout");
                Ok(())
            }
        };
        self.store.shutdown().await;
        tracing::info!("stopped");
        result
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
