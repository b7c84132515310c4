//! Configuration reload without a restart: on SIGHUP, or when the configuration file's
//! modification time changes (checked every [`POLL`]), the configuration is read again
//! exactly as at start (file, `EPR__*` environment, command-line overrides) and validated.
//!
//! Applied at once, without dropping a request: the applications and versions (file and
//! environment entries, `registration.allow_unknown_app_versions`), `limits.*` and
//! `log.level`. Catalogues and limits are swapped whole; a request already running keeps
//! what it started with. Every other setting (listen address, TLS, store, NATS, service
//! identity, authentication, Tekton, …) cannot change while running: a changed one is named
//! in a warning and the running value is kept until the next restart. An invalid file
//! changes nothing (logged, counted as a refresh failure).

use crate::catalogue::{local_entries, CatalogueSources};
use crate::config::Settings;
use epr_core::registry::Registry;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// How often the configuration file's modification time is checked.
pub const POLL: Duration = Duration::from_secs(2);

/// Settings that a reload applies (key prefixes); everything else is kept.
const RELOADABLE: [&str; 4] = [
    "kaa.applications",
    "registration.allow_unknown_app_versions",
    "limits",
    "log.level",
];

/// Where the configuration comes from: the file and the command-line overrides applied
/// after loading it.
#[derive(Clone)]
pub struct ReloadSource {
    pub file: Option<PathBuf>,
    pub overrides: Arc<dyn Fn(&mut Settings) + Send + Sync>,
}

impl ReloadSource {
    fn load(&self) -> anyhow::Result<Settings> {
        let mut s = Settings::load(self.file.as_deref())?;
        (self.overrides)(&mut s);
        s.validate()?;
        Ok(s)
    }
}

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Changed settings that cannot change at run time and were kept.
    pub kept: Vec<String>,
}

pub struct Reloader {
    source: ReloadSource,
    /// Installed when the reloader is made, so a SIGHUP from then on is caught (not the
    /// default action, which ends the process) even before `run` starts.
    #[cfg(unix)]
    hangup: Mutex<Option<tokio::signal::unix::Signal>>,
    /// The settings in effect.
    current: Mutex<Settings>,
    registry: Arc<Registry>,
    catalogue: Arc<CatalogueSources>,
}

impl Reloader {
    /// Must be called within a Tokio runtime: the SIGHUP handler is installed here.
    pub fn new(
        source: ReloadSource,
        running: Settings,
        registry: Arc<Registry>,
        catalogue: Arc<CatalogueSources>,
    ) -> Self {
        #[cfg(unix)]
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP cannot be handled; reload on file change only");
                None
            }
        };
        Self {
            source,
            #[cfg(unix)]
            hangup: Mutex::new(hangup),
            current: Mutex::new(running),
            registry,
            catalogue,
        }
    }

    /// Tells the file's entries from the environment's, against the running settings.
    pub fn classify_local(&self) -> anyhow::Result<()> {
        let current = self.lock().clone();
        let (file, env) = local_entries(&current, self.source.file.as_deref())?;
        self.catalogue
            .set_local(current.registration.allow_unknown_app_versions, file, env);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the configuration again and applies what can change; `trigger` names why
    /// (`sighup`, `file`), for the log and metrics.
    pub fn reload(&self, trigger: &'static str) -> anyhow::Result<ReloadOutcome> {
        let result = self.try_reload();
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("epr_config_reloads_total", "trigger" => trigger, "outcome" => outcome)
            .increment(1);
        match &result {
            Ok(o) => {
                metrics::gauge!("epr_config_last_refresh_timestamp_seconds", "source" => "local")
                    .set(unix_secs());
                let apps = self.lock().kaa.applications.len();
                tracing::info!(trigger, applications = apps, "configuration reloaded");
                if !o.kept.is_empty() {
                    tracing::warn!(
                        trigger,
                        "configuration reload: these settings cannot change while the service \
                         runs and keep their running values until a restart: {}",
                        o.kept.join(", ")
                    );
                }
            }
            Err(e) => {
                metrics::counter!("epr_config_refresh_failures_total", "source" => "local")
                    .increment(1);
                tracing::error!(
                    trigger,
                    error = format!("{e:#}"),
                    "configuration reload failed; the running configuration is unchanged"
                );
            }
        }
        result
    }

    fn try_reload(&self) -> anyhow::Result<ReloadOutcome> {
        let new = self.source.load()?;
        let (file, env) = local_entries(&new, self.source.file.as_deref())?;
        let mut current = self.lock();
        let kept: Vec<String> = changed_keys(
            &serde_json::to_value(&*current)?,
            &serde_json::to_value(&new)?,
        )
        .into_iter()
        .filter(|k| {
            !RELOADABLE
                .iter()
                .any(|r| k == r || k.starts_with(&format!("{r}.")))
        })
        .collect();
        // The level first: it is the one step that can still fail.
        if new.log.level != current.log.level {
            crate::telemetry::set_log_level(&new.log.level).map_err(anyhow::Error::msg)?;
        }
        self.registry.set_settings(new.registry_settings());
        self.catalogue
            .set_local(new.registration.allow_unknown_app_versions, file, env);
        current.kaa.applications = new.kaa.applications;
        current.registration = new.registration;
        current.limits = new.limits;
        current.log.level = new.log.level;
        Ok(ReloadOutcome { kept })
    }

    /// Reloads on SIGHUP and on a change of the file's modification time, until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        #[cfg(unix)]
        let mut hup = self.hangup.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mtime = |f: &PathBuf| std::fs::metadata(f).and_then(|m| m.modified()).ok();
        let mut seen: Option<SystemTime> = self.source.file.as_ref().and_then(mtime);
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let signal = async {
                match &mut hup {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signal = std::future::pending::<Option<()>>();
            tokio::select! {
                // The guard `wait_for` returns is not `Send`: dropped inside.
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                Some(()) = signal => {
                    seen = self.source.file.as_ref().and_then(mtime);
                    let _ = self.reload("sighup");
                }
                _ = poll.tick() => {
                    let now = self.source.file.as_ref().and_then(mtime);
                    if now.is_some() && now != seen {
                        seen = now;
                        let _ = self.reload("file");
                    }
                }
            }
        }
    }
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The dotted paths of the leaves that differ between `a` and `b` (objects are walked,
/// anything else compared whole). Only names: values may be secrets.
pub fn changed_keys(a: &Value, b: &Value) -> Vec<String> {
    fn walk(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        &p,
                        out,
                    );
                }
            }
            _ if a != b => out.push(path.to_owned()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(a, b, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_keys_names_leaves() {
        let a = json!({"server": {"listen": "a", "tls": {"cert_file": ""}}, "x": [1]});
        let b = json!({"server": {"listen": "b", "tls": {"cert_file": ""}}, "x": [2], "y": 1});
        assert_eq!(changed_keys(&a, &b), ["server.listen", "x", "y"]);
    }
}
