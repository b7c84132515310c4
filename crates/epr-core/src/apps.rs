//! The catalogue of applications and their versions. It comes from configuration (Kaa's
//! `kaa.applications.<app>.versions.<ver>`), later from Tekton; registration is checked
//! against it.

use crate::ids::{AppName, AppVersionName};
use crate::{DomainError, ValidationError};
use std::collections::{BTreeMap, BTreeSet};

/// Known applications and versions. An application version name is unique within a tenant
/// (Kaa derives it from the application name), so it determines its application.
#[derive(Debug, Clone, Default)]
pub struct AppCatalog {
    versions: BTreeMap<AppVersionName, AppName>,
    apps: BTreeMap<AppName, BTreeSet<AppVersionName>>,
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

    /// Adds a version; refuses a version name already owned by another application.
    pub fn add(&mut self, app: AppName, version: AppVersionName) -> Result<(), String> {
        if let Some(owner) = self.versions.get(&version) {
            if owner != &app {
                return Err(format!(
                    "application version '{version}' is declared by both '{owner}' and '{app}'"
                ));
            }
        }
        self.versions.insert(version.clone(), app.clone());
        self.apps.entry(app).or_default().insert(version);
        Ok(())
    }

    pub fn allows_unknown(&self) -> bool {
        self.allow_unknown
    }

    pub fn applications(&self) -> impl Iterator<Item = (&AppName, &BTreeSet<AppVersionName>)> {
        self.apps.iter()
    }

    pub fn knows_app(&self, app: &AppName) -> bool {
        self.apps.contains_key(app)
    }

    /// The application an endpoint registering with `version` belongs to.
    pub fn resolve(&self, version: &AppVersionName) -> Result<AppName, DomainError> {
        if let Some(app) = self.versions.get(version) {
            return Ok(app.clone());
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
}
