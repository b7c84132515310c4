//! 18/EFE, Endpoint Filter Events: EPR publishes them when a filter changes status and when an
//! endpoint starts or stops matching a filter.
//!
//! Subject: `kaa.v1.events.{instance}.endpoint-filter.{filter id}.{event type}`. The filter ID
//! is the *event group* (the 6th token), so it must be one NATS subject token, like the
//! instance name; [`encode_filter_status`] and [`encode_endpoint_filter`] refuse anything else
//! with [`EncodeError::InvalidFilterId`] / [`EncodeError::InvalidInstanceName`].
//!
//! The field order of these records differs from 9/ELCE's (`timestamp, timeout,
//! correlationId, originatorReplicaId` first); as everywhere in this crate it comes from the
//! `0018-*.avsc` files, and every value is mapped to its field by name.

use crate::avro::{self, CompiledSchema, Datum, Fields, Record};
use crate::{
    check_instance_name, event_fields, subject_token_problem, DecodeError, EncodeError, Encoded,
    Originator,
};
use epr_core::event::{FilterEvent, FilterEventKind as DomainKind};

/// The three filter status events, named by their subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterEventKind {
    /// `pending`: the filter was created, or went back from active to pending (e.g. while it
    /// is re-evaluated after an edit).
    Pending,
    /// `activated`: the filter's evaluation finished, it went from pending to active.
    Activated,
    /// `deleted`: the filter was deleted.
    Deleted,
}

impl FilterEventKind {
    /// Every filter status event.
    pub const ALL: [FilterEventKind; 3] = [
        FilterEventKind::Pending,
        FilterEventKind::Activated,
        FilterEventKind::Deleted,
    ];

    /// The `{event-type}` token of the subject: `pending`, `activated` or `deleted`.
    pub fn token(self) -> &'static str {
        match self {
            FilterEventKind::Pending => "pending",
            FilterEventKind::Activated => "activated",
            FilterEventKind::Deleted => "deleted",
        }
    }

    /// The kind whose [`token`](Self::token) is `token`.
    pub fn from_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.token() == token)
    }

    fn schema(self) -> &'static CompiledSchema {
        match self {
            FilterEventKind::Pending => &avro::EFE_PENDING,
            FilterEventKind::Activated => &avro::EFE_ACTIVATED,
            FilterEventKind::Deleted => &avro::EFE_DELETED,
        }
    }
}

/// The `{event-type}` token of an endpoint filter event: `ep-matched` when `matched`, else
/// `ep-unmatched`.
pub fn endpoint_filter_token(matched: bool) -> &'static str {
    if matched {
        "ep-matched"
    } else {
        "ep-unmatched"
    }
}

/// The inverse of [`endpoint_filter_token`]: `Some(true)` for `ep-matched`, `Some(false)` for
/// `ep-unmatched`.
pub fn matched_from_token(token: &str) -> Option<bool> {
    [true, false]
        .into_iter()
        .find(|m| endpoint_filter_token(*m) == token)
}

fn endpoint_filter_schema(matched: bool) -> &'static CompiledSchema {
    if matched {
        &avro::EFE_EP_MATCHED
    } else {
        &avro::EFE_EP_UNMATCHED
    }
}

/// A filter status event: `pending`, `activated` or `deleted` (schemas
/// `0018-epf-{pending,activated,deleted}.avsc`, identical apart from the record name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterStatusEvent {
    /// Tracing ID.
    pub correlation_id: String,
    /// When the event happened, Unix milliseconds.
    pub timestamp: i64,
    /// The filter; also the 6th subject token.
    pub filter_id: String,
    /// The application the filter belongs to (its name, not a version).
    pub application_name: String,
    /// The filter's name, unique within the application; `None` is Avro `null`.
    pub filter_name: Option<String>,
    /// Which of the three events.
    pub kind: FilterEventKind,
}

/// An endpoint started (`ep-matched`) or stopped (`ep-unmatched`) matching a filter (schemas
/// `0018-epf-ep-{matched,unmatched}.avsc`, identical apart from the record name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFilterEvent {
    /// Tracing ID.
    pub correlation_id: String,
    /// When the event happened, Unix milliseconds.
    pub timestamp: i64,
    /// The filter; also the 6th subject token.
    pub filter_id: String,
    /// The application the filter belongs to (its name, not a version).
    pub application_name: String,
    /// The endpoint's application version.
    pub app_version_name: String,
    /// The filter's name, unique within the application; `None` is Avro `null`.
    pub filter_name: Option<String>,
    /// The endpoint.
    pub endpoint_id: String,
    /// `true`: `ep-matched`; `false`: `ep-unmatched`.
    pub matched: bool,
}

/// The [`Common`] part of a [`FilterStatusEvent`] or an [`EndpointFilterEvent`] (same field
/// names, different types).
macro_rules! common {
    ($ev:expr) => {
        Common {
            correlation_id: &$ev.correlation_id,
            timestamp: $ev.timestamp,
            filter_id: &$ev.filter_id,
            application_name: &$ev.application_name,
            filter_name: $ev.filter_name.as_deref(),
        }
    };
}

/// Encodes a filter status event published by `origin`, on
/// `kaa.v1.events.{instance}.endpoint-filter.{filter_id}.{pending|activated|deleted}`.
pub fn encode_filter_status(
    ev: &FilterStatusEvent,
    origin: &Originator,
) -> Result<Encoded, EncodeError> {
    common!(ev).encode(ev.kind.schema(), ev.kind.token(), origin, Fields::new())
}

/// Encodes an endpoint filter event published by `origin`, on
/// `kaa.v1.events.{instance}.endpoint-filter.{filter_id}.{ep-matched|ep-unmatched}`.
pub fn encode_endpoint_filter(
    ev: &EndpointFilterEvent,
    origin: &Originator,
) -> Result<Encoded, EncodeError> {
    let endpoint = Fields::from([
        ("appVersionName", Datum::String(ev.app_version_name.clone())),
        ("endpointId", Datum::String(ev.endpoint_id.clone())),
    ]);
    common!(ev).encode(
        endpoint_filter_schema(ev.matched),
        endpoint_filter_token(ev.matched),
        origin,
        endpoint,
    )
}

/// Encodes a domain [`FilterEvent`] as the 18/EFE event it stands for: status changes with
/// [`encode_filter_status`], membership changes with [`encode_endpoint_filter`].
///
/// `filterName` is always given (EPR's filters always have a name), `applicationName` is the
/// filter's application, and `appVersionName` (ep-matched / ep-unmatched) the endpoint's
/// version when its membership changed.
pub fn encode_filter_event(ev: &FilterEvent, origin: &Originator) -> Result<Encoded, EncodeError> {
    let status = |kind| FilterStatusEvent {
        correlation_id: ev.correlation_id.clone(),
        timestamp: ev.timestamp.millis(),
        filter_id: ev.filter_id.as_str().to_owned(),
        application_name: ev.app.as_str().to_owned(),
        filter_name: Some(ev.filter_name.clone()),
        kind,
    };
    let endpoint = |endpoint_id: &epr_core::ids::EndpointId,
                    app_version: &epr_core::ids::AppVersionName,
                    matched| EndpointFilterEvent {
        correlation_id: ev.correlation_id.clone(),
        timestamp: ev.timestamp.millis(),
        filter_id: ev.filter_id.as_str().to_owned(),
        application_name: ev.app.as_str().to_owned(),
        app_version_name: app_version.as_str().to_owned(),
        filter_name: Some(ev.filter_name.clone()),
        endpoint_id: endpoint_id.as_str().to_owned(),
        matched,
    };
    match &ev.kind {
        DomainKind::Pending => encode_filter_status(&status(FilterEventKind::Pending), origin),
        DomainKind::Activated => encode_filter_status(&status(FilterEventKind::Activated), origin),
        DomainKind::Deleted => encode_filter_status(&status(FilterEventKind::Deleted), origin),
        DomainKind::EndpointMatched {
            endpoint_id,
            app_version,
        } => encode_endpoint_filter(&endpoint(endpoint_id, app_version, true), origin),
        DomainKind::EndpointUnmatched {
            endpoint_id,
            app_version,
        } => encode_endpoint_filter(&endpoint(endpoint_id, app_version, false), origin),
    }
}

/// Decodes a filter status event of `kind` (known from the subject's last token). Returns the
/// event and the publisher's `originatorReplicaId`. The `timeout` field is not returned (EPR
/// always writes 0).
pub fn decode_filter_status(
    kind: FilterEventKind,
    payload: &[u8],
) -> Result<(FilterStatusEvent, String), DecodeError> {
    let mut r = kind.schema().decode(payload)?;
    let c = Decoded::read(&mut r)?;
    let ev = FilterStatusEvent {
        correlation_id: c.correlation_id,
        timestamp: c.timestamp,
        filter_id: c.filter_id,
        application_name: c.application_name,
        filter_name: c.filter_name,
        kind,
    };
    Ok((ev, c.replica_id))
}

/// Decodes an `ep-matched` (`matched`) or `ep-unmatched` event. Returns the event and the
/// publisher's `originatorReplicaId`. The `timeout` field is not returned.
pub fn decode_endpoint_filter(
    matched: bool,
    payload: &[u8],
) -> Result<(EndpointFilterEvent, String), DecodeError> {
    let mut r = endpoint_filter_schema(matched).decode(payload)?;
    let c = Decoded::read(&mut r)?;
    let ev = EndpointFilterEvent {
        correlation_id: c.correlation_id,
        timestamp: c.timestamp,
        filter_id: c.filter_id,
        application_name: c.application_name,
        app_version_name: r.string("appVersionName")?,
        filter_name: c.filter_name,
        endpoint_id: r.string("endpointId")?,
        matched,
    };
    Ok((ev, c.replica_id))
}

/// What all five events carry, borrowed for encoding.
struct Common<'a> {
    correlation_id: &'a str,
    timestamp: i64,
    filter_id: &'a str,
    application_name: &'a str,
    filter_name: Option<&'a str>,
}

impl Common<'_> {
    /// Checks both subject tokens, then encodes these values plus `extra` with `schema`.
    /// `timeout` is left to the schema default (0).
    fn encode(
        self,
        schema: &CompiledSchema,
        event_type: &str,
        origin: &Originator,
        mut extra: Fields,
    ) -> Result<Encoded, EncodeError> {
        check_instance_name(&origin.instance_name)?;
        if let Some(reason) = subject_token_problem(self.filter_id) {
            return Err(EncodeError::InvalidFilterId {
                id: self.filter_id.to_owned(),
                reason,
            });
        }
        let mut f = event_fields(self.correlation_id, self.timestamp, origin);
        f.insert("filterId", Datum::String(self.filter_id.to_owned()));
        f.insert(
            "applicationName",
            Datum::String(self.application_name.to_owned()),
        );
        // A union without a default: always written, `null` branch for no name.
        f.insert(
            "filterName",
            Datum::optional(self.filter_name, |n| Datum::String(n.to_owned())),
        );
        f.append(&mut extra);
        Ok(Encoded {
            subject: format!(
                "kaa.v1.events.{}.endpoint-filter.{}.{event_type}",
                origin.instance_name, self.filter_id
            ),
            payload: schema.encode(f)?,
        })
    }
}

/// What all five events carry, decoded, plus the publisher's replica ID.
struct Decoded {
    correlation_id: String,
    timestamp: i64,
    filter_id: String,
    application_name: String,
    filter_name: Option<String>,
    replica_id: String,
}

impl Decoded {
    fn read(r: &mut Record) -> Result<Self, DecodeError> {
        Ok(Decoded {
            correlation_id: r.string("correlationId")?,
            timestamp: r.long("timestamp")?,
            filter_id: r.string("filterId")?,
            application_name: r.string("applicationName")?,
            filter_name: r.opt_string("filterName")?,
            replica_id: r.string("originatorReplicaId")?,
        })
    }
}
