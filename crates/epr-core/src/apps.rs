//! The catalogue of applications and their versions. Entries come from several sources
//! (the configuration file, the environment, Kaa's Tekton); registration is checked
//! against their union, and each entry remembers where it came from.
//!
//! A version that was known and is no longer in any source is *removed*: registering with
//! it (or moving an endpoint to it) is refused like an unknown version, but its application
//! stays known, so the application's filters, metadata keys and listings keep working.

use crate::ids::{AppName, AppVersionName, TenantId};
use crate::{DomainError, ValidationError};
use std::collections::{BTreeMap, BTreeSet};

/// Where a catalogue entry came from. The order is the precedence when two sources
/// disagree (a version name declared under different applications): the environment
/// overrides the file, which overrides Tekton, so an operator can correct a central
/// entry locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Environment,
    File,
    Tekton,
}

impl Origin {
    pub const ALL: [Origin; 3] = [Origin::Environment, Origin::File, Origin::Tekton];

    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Environment => "environment",
            Origin::File => "file",
            Origin::Tekton => "tekton",
        }
    }
}

/// One source's entries: applications, each with its versions (possibly none).
pub type SourceEntries = BTreeMap<AppName, BTreeSet<AppVersionName>>;

/// Known applications and versions. An application version name is unique within a tenant
/// (Kaa derives it from the application name), so it determines its application.
#[derive(Debug, Clone, Default)]
pub struct AppCatalog {
    versions: BTreeMap<AppVersionName, AppName>,
    apps: BTreeMap<AppName, BTreeSet<AppVersionName>>,
    /// The sources that declare each application (directly or through a version).
    app_origins: BTreeMap<AppName, BTreeSet<Origin>>,
    /// The sources that declare each version.
    version_origins: BTreeMap<AppVersionName, BTreeSet<Origin>>,
    /// Versions known earlier and no longer declared, with their application.
    removed: BTreeMap<AppVersionName, AppName>,
    /// Accept versions missing from the catalogue, deriving the application from Kaa's
    /// naming convention `<application>-<suffix>`.
    allow_unknown: bool,
}

impl AppCatalog {
    pub fn new(allow_unknown: bool) -> Self {
        Self {
            allow_unknown,
            ..Self::default()
        }
    }

    /// The union of `sources` (the order does not matter: precedence is [`Origin`]'s).
    /// `previous` is the catalogue this one replaces: its versions missing here become
    /// removed versions. Returns the catalogue and the conflicts that were settled by
    /// precedence (one message each).
    pub fn merge(
        allow_unknown: bool,
        sources: &[(Origin, &SourceEntries)],
        previous: Option<&AppCatalog>,
    ) -> (AppCatalog, Vec<String>) {
        let mut sorted: Vec<&(Origin, &SourceEntries)> = sources.iter().collect();
        sorted.sort_by_key(|(o, _)| *o);
        let mut c = AppCatalog::new(allow_unknown);
        let mut conflicts = Vec::new();
        for (origin, entries) in sorted {
            for (app, versions) in entries.iter() {
                c.apps.entry(app.clone()).or_default();
                c.app_origins
                    .entry(app.clone())
                    .or_default()
                    .insert(*origin);
                for v in versions {
                    match c.versions.get(v) {
                        Some(owner) if owner != app => conflicts.push(format!(
                            "application version '{v}' is declared under '{owner}' by {} and \
                             under '{app}' by {}; '{owner}' is kept",
                            c.version_origins[v]
                                .iter()
                                .map(|o| o.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            origin.as_str()
                        )),
                        _ => {
                            c.versions.insert(v.clone(), app.clone());
                            c.apps.entry(app.clone()).or_default().insert(v.clone());
                            c.version_origins
                                .entry(v.clone())
                                .or_default()
                                .insert(*origin);
                        }
                    }
                }
            }
        }
        if let Some(prev) = previous {
            let earlier = prev
                .versions
                .iter()
                .chain(prev.removed.iter())
                .filter(|(v, _)| !c.versions.contains_key(*v));
            let earlier: Vec<_> = earlier.map(|(v, a)| (v.clone(), a.clone())).collect();
            c.removed.extend(earlier);
        }
        (c, conflicts)
    }

    /// Adds a version; refuses a version name already owned by another application.
    pub fn add(&mut self, app: AppName, version: AppVersionName) -> Result<(), String> {
        if let Some(owner) = self.versions.get(&version) {
            if owner != &app {
                return Err(format!(
                    "application version '{version}' is declared by both '{owner}' and '{app}'"
                ));
            }
        }
        self.removed.remove(&version);
        self.versions.insert(version.clone(), app.clone());
        self.apps.entry(app).or_default().insert(version);
        Ok(())
    }

    pub fn allows_unknown(&self) -> bool {
        self.allow_unknown
    }

    /// The declared applications (not those known only through removed versions).
    pub fn applications(&self) -> impl Iterator<Item = (&AppName, &BTreeSet<AppVersionName>)> {
        self.apps.iter()
    }

    /// The sources declaring `app` (empty for an application built with [`Self::add`]).
    pub fn app_origins(&self, app: &AppName) -> impl Iterator<Item = Origin> + '_ {
        self.app_origins.get(app).into_iter().flatten().copied()
    }

    /// The sources declaring `version`.
    pub fn version_origins(&self, version: &AppVersionName) -> impl Iterator<Item = Origin> + '_ {
        self.version_origins
            .get(version)
            .into_iter()
            .flatten()
            .copied()
    }

    /// The removed versions of `app`.
    pub fn removed_versions<'a>(
        &'a self,
        app: &'a AppName,
    ) -> impl Iterator<Item = &'a AppVersionName> + 'a {
        self.removed
            .iter()
            .filter(move |(_, a)| *a == app)
            .map(|(v, _)| v)
    }

    /// Every removed version with its application.
    pub fn removed(&self) -> impl Iterator<Item = (&AppVersionName, &AppName)> {
        self.removed.iter()
    }

    /// Marks versions as removed (restored from durable state at start), unless declared.
    pub fn add_removed(&mut self, removed: impl IntoIterator<Item = (AppVersionName, AppName)>) {
        for (v, a) in removed {
            if !self.versions.contains_key(&v) {
                self.removed.insert(v, a);
            }
        }
    }

    /// Whether the application is declared, or was (it has removed versions): its
    /// filters and endpoints stay reachable.
    pub fn knows_app(&self, app: &AppName) -> bool {
        self.apps.contains_key(app) || self.removed.values().any(|a| a == app)
    }

    /// Whether `version` was known and has been removed.
    pub fn is_removed(&self, version: &AppVersionName) -> bool {
        self.removed.contains_key(version)
    }

    /// The application an endpoint registering with `version` belongs to.
    pub fn resolve(&self, version: &AppVersionName) -> Result<AppName, DomainError> {
        if let Some(app) = self.versions.get(version) {
            return Ok(app.clone());
        }
        if let Some(app) = self.removed.get(version) {
            // Removed beats `allow_unknown`: a version taken out on purpose stays out.
            return Err(ValidationError::new(
                "appVersion.name",
                "known-app-version",
                format!(
                    "application version '{version}' of application '{app}' has been removed \
                     from the configuration; existing endpoints keep it, but no endpoint can \
                     register with it or move to it"
                ),
            )
            .into());
        }
        if self.allow_unknown {
            if let Some((app, suffix)) = version.as_str().rsplit_once('-') {
                if !app.is_empty() && !suffix.is_empty() {
                    return AppName::parse(app).map_err(|e| e.at("appVersion.name").into());
                }
            }
            return Err(ValidationError::new(
                "appVersion.name",
                "app-version-format",
                format!(
                    "application version '{version}' is not configured and does not follow the \
                     '<application>-<suffix>' naming that unknown versions must use"
                ),
            )
            .into());
        }
        Err(ValidationError::new(
            "appVersion.name",
            "known-app-version",
            format!(
                "application version '{version}' is not configured; declare it under \
                 kaa.applications.<app>.versions.{version} or allow unknown versions"
            ),
        )
        .into())
    }
}

/// How much of the central configuration to read again (a 17/SCMP message's scope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshScope {
    /// Every tenant.
    All,
    Tenant(TenantId),
    App(TenantId, AppName),
    Version(TenantId, AppName, AppVersionName),
}

impl RefreshScope {
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            RefreshScope::All => None,
            RefreshScope::Tenant(t) | RefreshScope::App(t, _) | RefreshScope::Version(t, ..) => {
                Some(t)
            }
        }
    }
}

/// Notices that central configuration changed (17/SCMP over NATS), for whatever keeps the
/// catalogue: it re-reads the scope in the background; the caller never waits.
pub trait CatalogControl: Send + Sync {
    fn refresh(&self, scope: RefreshScope, correlation_id: &str);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_and_refuses() {
        let mut c = AppCatalog::new(false);
        c.add(
            AppName::parse("demo").unwrap(),
            AppVersionName::parse("demo-v1").unwrap(),
        )
        .unwrap();
        let v1 = AppVersionName::parse("demo-v1").unwrap();
        assert_eq!(c.resolve(&v1).unwrap().as_str(), "demo");
        let other = AppVersionName::parse("x-v1").unwrap();
        assert!(c.resolve(&other).is_err());
        assert!(c
            .add(AppName::parse("x").unwrap(), v1.clone())
            .unwrap_err()
            .contains("both"));
        let open = AppCatalog::new(true);
        assert_eq!(open.resolve(&other).unwrap().as_str(), "x");
        assert!(open
            .resolve(&AppVersionName::parse("nodash").unwrap())
            .is_err());
    }

    fn entries(spec: &[(&str, &[&str])]) -> SourceEntries {
        spec.iter()
            .map(|(a, vs)| {
                (
                    AppName::parse(a).unwrap(),
                    vs.iter()
                        .map(|v| AppVersionName::parse(v).unwrap())
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn merge_keeps_origins_precedence_and_removed_versions() {
        let file = entries(&[("demo", &["demo-v1", "demo-v2"])]);
        let tekton = entries(&[
            ("demo", &["demo-v2", "demo-v3"]),
            ("x", &["x-v1", "demo-v1"]),
        ]);
        let (c, conflicts) = AppCatalog::merge(
            false,
            &[(Origin::Tekton, &tekton), (Origin::File, &file)],
            None,
        );
        // `demo-v1` is the file's under `demo`; Tekton's claim under `x` loses.
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(conflicts[0].contains("'demo' is kept"), "{conflicts:?}");
        let v = |s: &str| AppVersionName::parse(s).unwrap();
        let a = |s: &str| AppName::parse(s).unwrap();
        assert_eq!(c.resolve(&v("demo-v1")).unwrap(), a("demo"));
        assert_eq!(
            c.version_origins(&v("demo-v2")).collect::<Vec<_>>(),
            vec![Origin::File, Origin::Tekton]
        );
        assert_eq!(
            c.app_origins(&a("x")).collect::<Vec<_>>(),
            vec![Origin::Tekton]
        );
        // Tekton drops `demo-v3` and the whole of `x`: both are removed, `x` stays known.
        let tekton2 = entries(&[("demo", &["demo-v2"])]);
        let (c2, _) = AppCatalog::merge(
            true,
            &[(Origin::File, &file), (Origin::Tekton, &tekton2)],
            Some(&c),
        );
        let err = c2.resolve(&v("demo-v3")).unwrap_err().to_string();
        assert!(err.contains("removed"), "{err}");
        assert!(c2.is_removed(&v("x-v1")));
        assert!(c2.knows_app(&a("x")));
        assert!(c2.applications().all(|(app, _)| app != &a("x")));
        // Declared again: no longer removed.
        let (c3, _) = AppCatalog::merge(false, &[(Origin::Tekton, &tekton)], Some(&c2));
        assert_eq!(c3.resolve(&v("demo-v3")).unwrap(), a("demo"));
        // Without the file, Tekton's claim on `demo-v1` stands.
        assert_eq!(c3.resolve(&v("demo-v1")).unwrap(), a("x"));
    }
}
