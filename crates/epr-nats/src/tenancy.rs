//! Which tenants the NATS front-ends serve, and under which service instance names.
//!
//! Kaa's 19/EPMMP, 20/EFMP, 9/ELCE and 15/EME/18/EFE messages carry no tenant, so every
//! tenant has its own service instance name ([`TenantNaming::instance_of`]): the default
//! tenant the configured `service.instance_name`, every other tenant
//! `<instance_name>-<tenant>`. Request servers subscribe once per current tenant and follow
//! the tenant snapshot; the relay publishes each event under its tenant's instance name.

use epr_core::auth::{TenantNaming, TenantSnapshot};
use epr_core::ids::TenantId;
use std::sync::Arc;
use tokio::sync::watch;

/// The tenant naming rule and the current tenants (updated whenever they change).
#[derive(Debug, Clone)]
pub struct Tenancy {
    pub naming: TenantNaming,
    pub tenants: watch::Receiver<Arc<TenantSnapshot>>,
}

impl Tenancy {
    /// One tenant that never changes (tests, tools).
    pub fn fixed(instance_name: &str, tenant: TenantId) -> Self {
        let (tx, tenants) = watch::channel(Arc::new(TenantSnapshot::single(tenant.clone())));
        // The receiver keeps the last value after the sender is gone.
        drop(tx);
        Self {
            naming: TenantNaming {
                instance_name: instance_name.to_owned(),
                default_tenant: tenant,
            },
            tenants,
        }
    }

    /// The tenants current now.
    pub fn current(&self) -> Arc<TenantSnapshot> {
        self.tenants.borrow().clone()
    }
}
