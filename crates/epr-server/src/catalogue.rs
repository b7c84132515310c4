//! The application catalogue's sources and the catalogues they make.
//!
//! Every source keeps its own entries: the configuration file, the environment
//! (`EPR__KAA__…` variables and the `EPR_APPLICATIONS` shorthand) and, per tenant, Kaa's
//! Tekton. The catalogue in effect for a tenant is the union of the local sources and that
//! tenant's Tekton entries (precedence on conflicts: environment, file, Tekton; see
//! [`Origin`]); tenants without Tekton entries share the local catalogue. Any change
//! rebuilds every catalogue and swaps them into the registry at once, so a request sees
//! either the old catalogue or the new one, never a mix.

use crate::config::{KaaSettings, Settings};
use epr_core::apps::{AppCatalog, Origin, SourceEntries};
use epr_core::ids::{AppName, AppVersionName, TenantId};
use epr_core::registry::{Catalogs, Registry};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One tenant's Tekton entries, and the versions Tekton removed (kept so that a removed
/// version stays refused, not unknown, after a restart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TektonEntries {
    pub entries: SourceEntries,
    pub removed: BTreeMap<AppVersionName, AppName>,
}

#[derive(Default)]
struct Sources {
    allow_unknown: bool,
    file: SourceEntries,
    environment: SourceEntries,
    tekton: BTreeMap<TenantId, TektonEntries>,
}

/// The sources, and the registry whose catalogues they make.
pub struct CatalogueSources {
    registry: Arc<Registry>,
    sources: Mutex<Sources>,
}

impl CatalogueSources {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            sources: Mutex::default(),
        }
    }

    /// Replaces the local entries (start, reload) and publishes.
    pub fn set_local(&self, allow_unknown: bool, file: SourceEntries, environment: SourceEntries) {
        let mut s = self.lock();
        s.allow_unknown = allow_unknown;
        s.file = file;
        s.environment = environment;
        self.publish(&s);
    }

    /// Replaces one tenant's Tekton entries and publishes.
    pub fn set_tekton(&self, tenant: TenantId, entries: TektonEntries) {
        let mut s = self.lock();
        if s.tekton.get(&tenant) == Some(&entries) {
            return;
        }
        s.tekton.insert(tenant, entries);
        self.publish(&s);
    }

    /// Forgets a tenant's Tekton entries (the tenant is no longer served).
    pub fn drop_tekton(&self, tenant: &TenantId) {
        let mut s = self.lock();
        if s.tekton.remove(tenant).is_some() {
            self.publish(&s);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds every catalogue from the sources; the previous ones tell which versions
    /// were removed. Called with the sources locked, so publications do not interleave.
    fn publish(&self, s: &Sources) {
        let previous = self.registry.catalogs();
        let local = [
            (Origin::File, &s.file),
            (Origin::Environment, &s.environment),
        ];
        let (shared, conflicts) =
            AppCatalog::merge(s.allow_unknown, &local, Some(&previous.shared));
        warn_conflicts(None, &conflicts);
        let mut tenants = HashMap::new();
        for (tenant, t) in &s.tekton {
            let mut all = local.to_vec();
            all.push((Origin::Tekton, &t.entries));
            let (mut c, conflicts) =
                AppCatalog::merge(s.allow_unknown, &all, Some(previous.of(tenant)));
            warn_conflicts(Some(tenant), &conflicts);
            c.add_removed(t.removed.iter().map(|(v, a)| (v.clone(), a.clone())));
            tenants.insert(tenant.clone(), Arc::new(c));
        }
        let catalogs = Catalogs {
            shared: Arc::new(shared),
            tenants,
        };
        for origin in Origin::ALL {
            let n: usize = std::iter::once(&catalogs.shared)
                .chain(catalogs.tenants.values())
                .map(|c| {
                    c.applications()
                        .flat_map(|(_, vs)| vs.iter())
                        .filter(|v| c.version_origins(v).any(|o| o == origin))
                        .count()
                })
                .sum();
            metrics::gauge!("epr_config_versions", "origin" => origin.as_str()).set(n as f64);
        }
        self.registry.set_catalogs(catalogs);
    }
}

fn warn_conflicts(tenant: Option<&TenantId>, conflicts: &[String]) {
    for c in conflicts {
        match tenant {
            Some(t) => tracing::warn!(tenant = %t, "application catalogue conflict: {c}"),
            None => tracing::warn!("application catalogue conflict: {c}"),
        }
    }
}

/// The entries of `kaa.applications` as [`SourceEntries`], checked.
fn entries_of(kaa: &KaaSettings) -> anyhow::Result<SourceEntries> {
    let mut out = SourceEntries::new();
    for (app, settings) in &kaa.applications {
        let name = AppName::parse(app)
            .map_err(|e| anyhow::anyhow!("kaa.applications.{app}: {}", e.message))?;
        let versions = out.entry(name).or_default();
        for v in settings.versions.keys() {
            versions.insert(AppVersionName::parse(v).map_err(|e| {
                anyhow::anyhow!("kaa.applications.{app}.versions.{v}: {}", e.message)
            })?);
        }
    }
    Ok(out)
}

/// The local entries of `settings` split by origin: what the configuration `file`
/// declares, and the rest, which came from the environment (or, in tests and tools, was
/// added to the settings directly).
pub fn local_entries(
    settings: &Settings,
    file: Option<&Path>,
) -> anyhow::Result<(SourceEntries, SourceEntries)> {
    let effective = entries_of(&settings.kaa)?;
    let from_file = match file {
        Some(f) if f.exists() => {
            let raw = config::Config::builder()
                .add_source(config::File::from(f.to_path_buf()).format(config::FileFormat::Yaml))
                .build()?;
            match raw.get::<KaaSettings>("kaa") {
                Ok(kaa) => entries_of(&kaa)?,
                Err(config::ConfigError::NotFound(_)) => SourceEntries::new(),
                Err(e) => return Err(e.into()),
            }
        }
        _ => SourceEntries::new(),
    };
    let mut file_entries = SourceEntries::new();
    let mut env_entries = SourceEntries::new();
    for (app, versions) in effective {
        let declared = from_file.get(&app);
        if declared.is_some() {
            file_entries.entry(app.clone()).or_default();
        }
        for v in versions {
            if declared.is_some_and(|d| d.contains(&v)) {
                file_entries.entry(app.clone()).or_default().insert(v);
            } else {
                env_entries.entry(app.clone()).or_default().insert(v);
            }
        }
    }
    Ok((file_entries, env_entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_environment_entries_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "kaa:\n  applications:\n    demo:\n      versions:\n        demo-v1: {}\n",
        )
        .unwrap();
        let mut s = Settings::load(Some(&file)).unwrap();
        s.add_applications("demo:demo-v2;env:env-v1").unwrap();
        let (f, e) = local_entries(&s, Some(&file)).unwrap();
        let a = |n: &str| AppName::parse(n).unwrap();
        let v = |n: &str| AppVersionName::parse(n).unwrap();
        assert_eq!(f[&a("demo")].iter().collect::<Vec<_>>(), [&v("demo-v1")]);
        assert_eq!(e[&a("demo")].iter().collect::<Vec<_>>(), [&v("demo-v2")]);
        assert!(e.contains_key(&a("env")) && !f.contains_key(&a("env")));
    }
}
