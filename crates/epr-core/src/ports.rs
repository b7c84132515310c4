//! Ports: what the domain needs from the outside world. Adapters implement them; only the
//! server binary names the concrete types.

use crate::command::{Command, Effect, Registration, WriteCtx};
use crate::credentials::{ClaimToken, Rejection, StoredToken, TokenListQuery};
use crate::endpoint::Endpoint;
use crate::endpoint_filter::{EndpointFilter, FilterCommand, FilterId};
use crate::event::OutboxEvent;
use crate::ids::{AppName, AppVersionName, ClaimId, EndpointId, TenantId, TokenHash, TokenId};
use crate::metadata::Metadata;
use crate::query::{EndpointQuery, Page, PageRequest};
use crate::{DomainError, Timestamp};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The domain refused the write (checked inside the transaction); nothing changed.
    #[error(transparent)]
    Rejected(#[from] DomainError),
    /// The backend failed (I/O, corruption, shut down). The write may not have happened.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
}

/// One item of a batch registration, validated up front: either a registration to attempt
/// or the reason it was refused before reaching the store.
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub registration: Result<Registration, String>,
    /// The endpoint ID as given (or generated), for the report.
    pub endpoint_id: Option<String>,
    /// The metadata as given, as JSON text, for the report of failures.
    pub metadata_text: String,
}

#[derive(Debug, Clone)]
pub struct BatchRequest {
    pub task_id: String,
    pub app: AppName,
    pub items: Vec<BatchItem>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchCreated {
    pub index: usize,
    pub endpoint_id: EndpointId,
    pub metadata: Metadata,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchFailed {
    pub index: usize,
    pub endpoint_id: Option<String>,
    pub metadata_text: String,
    pub reason: String,
}

/// The durable record of a batch registration. Tokens are not part of it: they are never
/// stored in plain text (see `Registry`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutcome {
    pub task_id: String,
    pub app: AppName,
    pub created_at: Timestamp,
    pub created: Vec<BatchCreated>,
    pub failed: Vec<BatchFailed>,
}

/// An event waiting in the outbox, in commit order (`id` increases).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    pub id: i64,
    pub event: OutboxEvent,
}

/// One endpoint as exported and imported: the record, its tenant and its token hash. The
/// record's `incarnation` is the exporting store's own (a paging cursor); an import gives the
/// endpoint a fresh one.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointExport {
    pub tenant: TenantId,
    pub endpoint: Endpoint,
    /// The hash of the endpoint's initial token (the one registration issued).
    pub token_hash: TokenHash,
    /// Every token row of the endpoint, with its state. An import of a record without any
    /// (an export made before tokens had states) gives the endpoint one `Inactive` token
    /// from `token_hash`, under a new ID.
    pub tokens: Vec<StoredToken>,
}

/// One record of an import (see [`Store::import`]).
#[derive(Debug, Clone)]
pub enum ImportRecord {
    Endpoint(EndpointExport),
    /// A saved filter's definition; its status and membership are derived again by the
    /// importing store (a back-fill), so `status` and `matched` are ignored.
    Filter {
        tenant: TenantId,
        filter: EndpointFilter,
    },
}

/// What an import did with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    /// Stored.
    Imported,
    /// A record with this ID already exists in the tenant; left as it is (so importing the
    /// same file twice changes nothing).
    Exists,
    /// Refused, nothing stored: it conflicts with a different existing record (a token hash
    /// in use by another endpoint of the application, a filter name taken by another filter).
    Conflict(String),
}

/// Durable storage of endpoints. Every method is scoped by tenant, so a cross-tenant read
/// cannot be written by accident. Writes are atomic with their events: a backend appends
/// the events of a plan to its outbox in the same transaction as the change.
#[async_trait]
pub trait Store: Send + Sync {
    /// Executes one command: loads the current record, calls [`crate::command::plan`],
    /// persists the effect and its events, commits durably, then answers.
    async fn execute(&self, cmd: Command, ctx: WriteCtx) -> Result<Effect, StoreError>;

    /// Registers many endpoints in one durable commit; an item that fails (duplicate ID or
    /// token) is reported and does not affect the others.
    async fn register_batch(
        &self,
        batch: BatchRequest,
        ctx: WriteCtx,
    ) -> Result<BatchOutcome, StoreError>;

    async fn get(&self, tenant: &TenantId, id: &EndpointId)
        -> Result<Option<Endpoint>, StoreError>;

    async fn list(
        &self,
        tenant: &TenantId,
        query: &EndpointQuery,
        page: PageRequest,
    ) -> Result<Page<Endpoint>, StoreError>;

    /// Metadata key names in use in an application, grouped by application version.
    async fn metadata_keys(
        &self,
        tenant: &TenantId,
        app: &AppName,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError>;

    async fn batch_outcome(
        &self,
        tenant: &TenantId,
        app: &AppName,
        task_id: &str,
    ) -> Result<Option<BatchOutcome>, StoreError>;

    /// Creates, changes or deletes a saved filter (see
    /// [`crate::endpoint_filter::plan_filter`]); answers the filter after the command (before
    /// it, for a deletion). Filter names are unique within an application (`409`, field
    /// `name`). A new filter, or a changed query, starts a back-fill that the backend runs in
    /// the background and resumes after a restart; when it completes the filter turns
    /// `active` and `activated` is emitted. Membership is kept by every endpoint write in the
    /// same transaction, with `ep-matched` / `ep-unmatched` for active filters.
    async fn execute_filter(
        &self,
        cmd: FilterCommand,
        ctx: WriteCtx,
    ) -> Result<EndpointFilter, StoreError>;

    async fn get_filter(
        &self,
        tenant: &TenantId,
        id: &FilterId,
    ) -> Result<Option<EndpointFilter>, StoreError>;

    /// The filters of an application, oldest first, optionally only those with this exact
    /// name.
    async fn list_filters(
        &self,
        tenant: &TenantId,
        app: &AppName,
        name: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<EndpointFilter>, StoreError>;

    /// The active filters each of these endpoints matches (endpoints matching none are
    /// absent from the answer). Pending filters are left out: their membership is
    /// incomplete.
    async fn matched_filters(
        &self,
        tenant: &TenantId,
        endpoints: &[EndpointId],
    ) -> Result<BTreeMap<EndpointId, Vec<FilterId>>, StoreError>;

    /// Every endpoint in a filter's stored membership with its application version, in
    /// registration order (20/EFMP list by filter). Callers check the filter is active.
    async fn filter_members(
        &self,
        tenant: &TenantId,
        id: &FilterId,
    ) -> Result<Vec<(AppVersionName, EndpointId)>, StoreError>;

    /// The oldest events with an ID above `after`, in ID (commit) order, at most `limit`.
    /// A relay passes the last ID it has published, so it can go on while its
    /// acknowledgements are still being committed.
    async fn outbox_pending(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Marks every event up to and including `last_id` delivered; they are deleted. The
    /// outbox is delivered in order, so a prefix is all a relay ever acknowledges.
    async fn outbox_ack_through(&self, last_id: i64) -> Result<(), StoreError>;

    /// Number of undelivered events (for metrics and health; may be approximate).
    async fn outbox_depth(&self) -> Result<u64, StoreError>;

    /// A stable identity of this store's data (made once, kept across restarts). With an
    /// outbox ID it names one event for consumers that deduplicate (JetStream `Nats-Msg-Id`).
    fn store_id(&self) -> String;

    /// Registers a callback run after every commit that appended events, so a relay can
    /// publish at once instead of polling. Replaces any earlier waker. Backends that cannot
    /// tell keep the default (no call): the relay's polling still finds the events.
    fn set_outbox_waker(&self, waker: OutboxWaker) {
        let _ = waker;
    }

    /// The tenants that hold endpoints or filters (for a full export).
    async fn export_tenants(&self) -> Result<Vec<TenantId>, StoreError>;

    /// A page of a tenant's endpoints with their token hashes, in registration order: those
    /// with an incarnation above `after`, at most `limit`. Pass the last incarnation of a
    /// page to get the next one (start with 0).
    async fn export_endpoints(
        &self,
        tenant: &TenantId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EndpointExport>, StoreError>;

    /// Every saved filter of a tenant, by application, oldest first.
    async fn export_filters(&self, tenant: &TenantId) -> Result<Vec<EndpointFilter>, StoreError>;

    /// Imports records in one durable transaction, each one all or nothing, answering one
    /// outcome per record in order. An import is a restore, not new activity: it emits no
    /// lifecycle or membership events. Endpoints keep their ID, application (version),
    /// timestamps, versions, metadata, token hash and token rows (see
    /// [`EndpointExport::tokens`]; a token hash held by another endpoint of the application,
    /// or a token ID in use in the tenant, is an [`ImportOutcome::Conflict`]), and are
    /// matched against the application's filters; an imported filter starts pending and its
    /// back-fill derives its membership (`activated` is then emitted as for any filter whose
    /// back-fill completes).
    /// Records whose ID exists are skipped ([`ImportOutcome::Exists`]), so a re-import is a
    /// no-op. The caller validates the records (they are domain values).
    async fn import(&self, records: Vec<ImportRecord>) -> Result<Vec<ImportOutcome>, StoreError>;

    /// Readiness probe: the store can serve reads and writes.
    async fn ping(&self) -> Result<(), StoreError>;

    /// A small durable setting by key (e.g. the last configuration read from a central
    /// source, kept for a start while that source is unreachable).
    async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Stores a setting durably (replacing any earlier value) before answering.
    async fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError>;

    /// Finishes accepted writes and stops background work; later calls fail. The default
    /// does nothing (for stores without background work).
    async fn shutdown(&self) {}

    // --- Credentials (token rows change only through endpoint commands: `execute`) ---

    /// One token of an endpoint, by ID.
    async fn get_token(
        &self,
        tenant: &TenantId,
        endpoint: &EndpointId,
        id: &TokenId,
    ) -> Result<Option<StoredToken>, StoreError>;

    /// The token with this hash in an application (16/ECAP validation), whatever its state.
    async fn find_token(
        &self,
        tenant: &TenantId,
        app: &AppName,
        hash: &TokenHash,
    ) -> Result<Option<StoredToken>, StoreError>;

    /// An endpoint's tokens in creation order (newest first unless `query.ascending`; ties
    /// by token ID), only those in `query.statuses` when it is not empty. `total` counts
    /// every match. An unknown endpoint has no tokens (callers check it exists).
    async fn list_tokens(
        &self,
        tenant: &TenantId,
        endpoint: &EndpointId,
        query: &TokenListQuery,
        page: PageRequest,
    ) -> Result<Page<StoredToken>, StoreError>;

    /// Stores new claim tokens in one durable transaction, all or nothing: a hash already
    /// held by a claim token of the application refuses the lot (`409`, field
    /// `claimToken`), as does an ID in use in the tenant (field `claimTokenId`).
    async fn create_claims(
        &self,
        tenant: &TenantId,
        claims: Vec<ClaimToken>,
    ) -> Result<(), StoreError>;

    /// One claim token by ID.
    async fn get_claim(
        &self,
        tenant: &TenantId,
        app: &AppName,
        id: &ClaimId,
    ) -> Result<Option<ClaimToken>, StoreError>;

    /// The claim token with this hash in an application ([`crate::credentials::claim_hash`]),
    /// used or not. Self-registration checks it before the application's rules (so a caller
    /// without a valid credential learns nothing about them); the store's transaction checks
    /// it again when it uses it up.
    async fn find_claim(
        &self,
        tenant: &TenantId,
        app: &AppName,
        hash: &TokenHash,
    ) -> Result<Option<ClaimToken>, StoreError>;

    /// An application's claim tokens, oldest first (ties by ID).
    async fn list_claims(
        &self,
        tenant: &TenantId,
        app: &AppName,
        page: PageRequest,
    ) -> Result<Page<ClaimToken>, StoreError>;

    /// Deletes a claim token (used or not); `false` when there was none.
    async fn delete_claim(
        &self,
        tenant: &TenantId,
        app: &AppName,
        id: &ClaimId,
    ) -> Result<bool, StoreError>;

    /// Records a refused self-registration durably, keeping the latest
    /// [`crate::credentials::REJECTIONS_KEPT`] of the application.
    async fn record_rejection(
        &self,
        tenant: &TenantId,
        rejection: Rejection,
    ) -> Result<(), StoreError>;

    /// Deletes what a tenant holds besides endpoints and filters: its claim tokens, its
    /// rejections, and the settings whose key starts with `setting_prefix` (the tenant's
    /// self-registration policies). One durable transaction; part of purging a tenant.
    async fn purge_tenant_credentials(
        &self,
        tenant: &TenantId,
        setting_prefix: &str,
    ) -> Result<(), StoreError>;

    /// An application's recorded rejections, newest first.
    async fn list_rejections(
        &self,
        tenant: &TenantId,
        app: &AppName,
        page: PageRequest,
    ) -> Result<Page<Rejection>, StoreError>;
}

/// Called by a store after a commit appended events. Must be cheap and must not block: it runs
/// on the store's commit path.
pub type OutboxWaker = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Wall-clock time, injected so tests control it.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// Sources of fresh identifiers and secrets.
pub trait IdSource: Send + Sync {
    /// A new endpoint ID (Kaa uses UUIDs).
    fn endpoint_id(&self) -> String;
    /// A new endpoint token with enough entropy to be a credential.
    fn token(&self) -> String;
    /// A new batch task ID.
    fn task_id(&self) -> String;
    /// A new filter ID; it must be a valid [`FilterId`] (Kaa uses UUIDs).
    fn filter_id(&self) -> String;
    /// A new token or claim token ID; it must be a valid [`crate::ids::TokenId`].
    fn token_id(&self) -> String {
        self.filter_id()
    }
}

impl From<crate::ValidationError> for StoreError {
    fn from(e: crate::ValidationError) -> Self {
        Self::Rejected(e.into())
    }
}
