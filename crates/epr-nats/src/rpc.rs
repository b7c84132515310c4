//! The request/reply server that 19/EPMMP, 20/EFMP and 16/ECAP share (3/ISM): for every current
//! tenant, one queue subscription per request type on the tenant's instance name, in that
//! instance's queue group; at most `max_in_flight` requests at once,
//! and the same reply rules for both protocols.
//!
//! Every request gets a reply on its reply subject unless it has none or has expired (both are
//! dropped, logged and counted): an undecodable request gets `400` with the decoder's message
//! and, if its envelope decodes, its `correlationId`; never silence. What a protocol answers is
//! its [`Protocol::answer`].

use crate::connection::{now_millis, Nats};
use crate::tenancy::Tenancy;
use epr_core::ids::TenantId;
use epr_core::ports::StoreError;
use epr_core::DomainError;
use epr_events::epmmp::{Envelope, Status};
use epr_events::{DecodeError, EncodeError};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

/// One request/reply protocol: its wire API (from `epr_events`) and its use cases.
pub(crate) trait Protocol: Send + Sync + 'static {
    /// For logs, e.g. `19/EPMMP`.
    const NAME: &'static str;
    /// `{prefix}_requests_total{type,status}`, `{prefix}_request_duration_seconds{type}`,
    /// `{prefix}_dropped_total{type,reason}`.
    const REQUESTS_METRIC: &'static str;
    const DURATION_METRIC: &'static str;
    const DROPPED_METRIC: &'static str;

    type Type: Copy + Send + Sync + 'static;
    type Request: Send;
    type Response: Send;

    /// Every request type (one subscription each).
    fn types() -> Vec<Self::Type>;
    /// The request type's subject token, also the `type` label of the metrics.
    fn token(t: Self::Type) -> &'static str;
    fn subject(instance: &str, t: Self::Type) -> String;
    fn decode_request(
        t: Self::Type,
        payload: &[u8],
    ) -> Result<(Envelope, Self::Request), DecodeError>;
    fn decode_envelope(t: Self::Type, payload: &[u8]) -> Result<Envelope, DecodeError>;
    fn encode_response(
        env: &Envelope,
        status: &Status,
        body: &Self::Response,
    ) -> Result<Vec<u8>, EncodeError>;
    /// The body of a reply to a request that could not be decoded.
    fn empty(t: Self::Type) -> Self::Response;

    /// The reply to a decoded, unexpired request to `tenant`'s instance; `corr` is its
    /// `correlationId`.
    fn answer(
        &self,
        tenant: &TenantId,
        req: Self::Request,
        corr: &str,
    ) -> impl Future<Output = (Status, Self::Response)> + Send;
}

/// The wire half of a [`Protocol`] impl, for a protocol module of `epr_events` that has the
/// shared request/reply API (`epmmp`, `efmp`, `ecap`): its types, subjects and codecs, and metrics
/// named `epr_{module}_*`.
macro_rules! wire {
    ($name:literal, $module:ident) => {
        const NAME: &'static str = $name;
        const REQUESTS_METRIC: &'static str =
            concat!("epr_", stringify!($module), "_requests_total");
        const DURATION_METRIC: &'static str =
            concat!("epr_", stringify!($module), "_request_duration_seconds");
        const DROPPED_METRIC: &'static str = concat!("epr_", stringify!($module), "_dropped_total");
        type Type = epr_events::$module::RequestType;
        type Request = epr_events::$module::Request;
        type Response = epr_events::$module::Response;

        fn types() -> Vec<Self::Type> {
            epr_events::$module::RequestType::ALL.to_vec()
        }
        fn token(t: Self::Type) -> &'static str {
            t.request_token()
        }
        fn subject(instance: &str, t: Self::Type) -> String {
            epr_events::$module::request_subject(instance, t)
        }
        fn decode_request(
            t: Self::Type,
            payload: &[u8],
        ) -> Result<(epr_events::$module::Envelope, Self::Request), epr_events::DecodeError> {
            epr_events::$module::decode_request(t, payload)
        }
        fn decode_envelope(
            t: Self::Type,
            payload: &[u8],
        ) -> Result<epr_events::$module::Envelope, epr_events::DecodeError> {
            epr_events::$module::decode_request_envelope(t, payload)
        }
        fn encode_response(
            env: &epr_events::$module::Envelope,
            status: &epr_events::$module::Status,
            body: &Self::Response,
        ) -> Result<Vec<u8>, epr_events::EncodeError> {
            epr_events::$module::encode_response(env, status, body)
        }
        fn empty(t: Self::Type) -> Self::Response {
            epr_events::$module::Response::empty(t)
        }
    };
}
pub(crate) use wire;

pub(crate) fn status(code: i32, reason: impl Into<String>) -> Status {
    Status {
        code,
        reason: Some(reason.into()),
    }
}

/// The status of a refused or failed use case. The RFCs list no codes; these follow the HTTP
/// meaning of each refusal, as the REST API does.
pub(crate) fn error_status(e: &StoreError) -> Status {
    match e {
        StoreError::Rejected(d) => match d {
            DomainError::Invalid(v) => status(400, v.to_string()),
            DomainError::NotFound { .. } => status(404, d.to_string()),
            DomainError::Conflict { .. } | DomainError::FilterPending { .. } => {
                status(409, d.to_string())
            }
            DomainError::PreconditionFailed { .. } => status(412, d.to_string()),
            DomainError::TooLarge { .. } => status(413, d.to_string()),
            DomainError::Refused(_) => status(403, d.to_string()),
        },
        StoreError::Unavailable(_) => status(503, e.to_string()),
    }
}

/// Serves `protocol` for every current tenant until `stop` turns true, then stops taking
/// requests and waits (briefly) for the ones in flight.
///
/// Each tenant gets its own subscriptions on its instance name's subjects, in that instance
/// name's queue group; the tenant set is followed: a new tenant is subscribed, a removed
/// tenant's subscriptions are dropped at once (its requests then find no responder, like
/// those of an unknown service). `max_in_flight` bounds the requests of all tenants together.
/// Fails only if the first tenants cannot be subscribed.
pub(crate) async fn serve<P: Protocol>(
    nats: Nats,
    protocol: P,
    tenancy: Tenancy,
    max_in_flight: usize,
    mut stop: watch::Receiver<bool>,
) -> Result<(), async_nats::SubscribeError> {
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let ctx = Arc::new((nats, protocol));
    let mut tenants = tenancy.tenants.clone();
    let mut running: BTreeMap<TenantId, (watch::Sender<bool>, JoinHandle<()>)> = BTreeMap::new();
    let mut first = true;
    loop {
        let snapshot = tenants.borrow_and_update().clone();
        let gone: Vec<TenantId> = running
            .keys()
            .filter(|t| !snapshot.contains(t))
            .cloned()
            .collect();
        for tenant in gone {
            if let Some((stop_tx, _task)) = running.remove(&tenant) {
                // The task drops its subscriptions (unsubscribes) and ends; requests it
                // already took are still answered.
                let _ = stop_tx.send(true);
                tracing::info!(tenant = %tenant, instance = %tenancy.naming.instance_of(&tenant),
                    "{} stopped serving a removed tenant", P::NAME);
            }
        }
        for tenant in snapshot.tenants.keys() {
            if running.contains_key(tenant) {
                continue;
            }
            let instance = tenancy.naming.instance_of(tenant);
            match subscribe::<P>(&ctx.0, &instance).await {
                Ok(requests) => {
                    let (stop_tx, stop_rx) = watch::channel(false);
                    let task = tokio::spawn(serve_tenant(
                        ctx.clone(),
                        tenant.clone(),
                        requests,
                        slots.clone(),
                        stop_rx,
                    ));
                    running.insert(tenant.clone(), (stop_tx, task));
                    tracing::debug!(tenant = %tenant, instance = %instance, "{} serving", P::NAME);
                }
                // Nothing runs yet: the caller reports the front-end as not running.
                Err(e) if first => return Err(e),
                // Retried at the next change of the tenant set.
                Err(e) => tracing::error!(tenant = %tenant, instance = %instance, error = %e,
                    "{} could not subscribe for a tenant; its requests are not served", P::NAME),
            }
        }
        first = false;
        let fixed = tokio::select! {
            changed = tenants.changed() => changed.is_err(),
            _ = stop.wait_for(|s| *s) => break,
        };
        if fixed {
            // The tenant set no longer changes: serve the current one until stopped.
            let _ = stop.wait_for(|s| *s).await;
            break;
        }
    }
    let mut tasks = Vec::new();
    for (_, (stop_tx, task)) in running {
        let _ = stop_tx.send(true);
        tasks.push(task);
    }
    for task in tasks {
        let _ = task.await;
    }
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(5), slots.acquire_many(all)).await;
    Ok(())
}

type Requests<T> = futures_util::stream::BoxStream<'static, (T, async_nats::Message)>;

/// One queue subscription per request type on `instance`'s subjects, in its queue group.
async fn subscribe<P: Protocol>(
    nats: &Nats,
    instance: &str,
) -> Result<Requests<P::Type>, async_nats::SubscribeError> {
    let mut subs = Vec::new();
    for t in P::types() {
        let sub = nats
            .client
            .queue_subscribe(P::subject(instance, t), instance.to_owned())
            .await?;
        subs.push(sub.map(move |m| (t, m)));
    }
    Ok(futures_util::stream::select_all(subs).boxed())
}

/// Takes one tenant's requests until `stop` turns true, then unsubscribes.
async fn serve_tenant<P: Protocol>(
    ctx: Arc<(Nats, P)>,
    tenant: TenantId,
    mut requests: Requests<P::Type>,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let tenant = Arc::new(tenant);
    loop {
        let next = tokio::select! {
            next = requests.next() => next,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some((t, msg)) = next else { break };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (ctx, tenant) = (ctx.clone(), tenant.clone());
        tokio::spawn(async move {
            let (nats, protocol) = &*ctx;
            handle(nats, protocol, &tenant, t, msg).await;
            drop(permit);
        });
    }
    drop(requests); // unsubscribes
}

async fn handle<P: Protocol>(
    nats: &Nats,
    protocol: &P,
    tenant: &TenantId,
    t: P::Type,
    msg: async_nats::Message,
) {
    let started = Instant::now();
    let kind = P::token(t);
    let name = P::NAME;
    let Some(reply_to) = msg.reply.clone() else {
        metrics::counter!(P::DROPPED_METRIC, "type" => kind, "reason" => "no-reply-subject")
            .increment(1);
        tracing::warn!(subject = %msg.subject, "{name} request without a reply subject dropped");
        return;
    };
    let (env, (reply_status, body)) = match P::decode_request(t, &msg.payload) {
        Ok((env, req)) => {
            if env.expired(now_millis()) {
                metrics::counter!(P::DROPPED_METRIC, "type" => kind, "reason" => "expired")
                    .increment(1);
                let corr = &env.correlation_id;
                tracing::info!(correlation_id = %corr, kind, "expired {name} request dropped");
                return;
            }
            let answer = protocol.answer(tenant, req, &env.correlation_id).await;
            (env, answer)
        }
        Err(e) => {
            // Echo the correlation ID if at least the envelope decodes, so the client can
            // match the error to its request.
            let env = P::decode_envelope(t, &msg.payload).unwrap_or(Envelope {
                correlation_id: String::new(),
                timestamp: 0,
                timeout: 0,
            });
            let corr = &env.correlation_id;
            tracing::info!(correlation_id = %corr, kind, error = %e, "undecodable {name} request");
            (
                env,
                (status(400, format!("undecodable {kind}: {e}")), P::empty(t)),
            )
        }
    };
    let out = Envelope {
        correlation_id: env.correlation_id.clone(),
        timestamp: now_millis(),
        timeout: 0,
    };
    let code = reply_status.code;
    let payload = match P::encode_response(&out, &reply_status, &body) {
        Ok(p) => p,
        Err(e) => {
            // A reply that cannot be encoded (a bug) still gets an answer.
            tracing::error!(error = %e, kind, "{name} response cannot be encoded");
            match P::encode_response(
                &out,
                &status(500, format!("response cannot be encoded: {e}")),
                &P::empty(t),
            ) {
                Ok(p) => p,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = nats.client.publish(reply_to, payload.into()).await {
        tracing::warn!(error = %e, kind, "{name} reply not sent");
    }
    metrics::counter!(P::REQUESTS_METRIC, "type" => kind, "status" => code.to_string())
        .increment(1);
    metrics::histogram!(P::DURATION_METRIC, "type" => kind).record(started.elapsed().as_secs_f64());
    tracing::debug!(correlation_id = %env.correlation_id, kind, code, "{name} request");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_http_status_codes() {
        let code = |e: DomainError| error_status(&StoreError::Rejected(e)).code;
        assert_eq!(code(DomainError::not_found("endpoint", "x")), 404);
        assert_eq!(
            code(DomainError::PreconditionFailed {
                current: "\"1-m1\"".into()
            }),
            412
        );
        assert_eq!(
            code(DomainError::TooLarge {
                field: "metadata",
                actual: 2,
                limit: 1
            }),
            413
        );
        assert_eq!(code(DomainError::FilterPending { id: "f".into() }), 409);
        assert_eq!(
            error_status(&StoreError::Unavailable("down".into())).code,
            503
        );
    }
}
