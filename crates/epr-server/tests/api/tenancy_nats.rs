//! Tenancy on a real nats-server: every tenant has its own service instance name, so two
//! tenants holding the same endpoint IDs, app names and filter names are served apart by
//! 19/EPMMP, 20/EFMP, the relay and the `connected` listener; 21/TLE events remove a tenant
//! (its subjects go silent, its data is purged) or are handed to the tenant directory.
//!
//! Each test runs its own nats-server: the `connected` and 21/TLE subjects are shared by
//! every service instance, so tests on the shared server would see each other's events.

use crate::helpers::{poll, TestApp};
use crate::nats_support::{spawn_on_nats, unique_instance, wait_nats, Event, PrivateNats};
use epr_core::auth::TenantControl;
use epr_core::ids::{EndpointId, TenantId};
use epr_core::query::{EndpointQuery, PageRequest};
use epr_core::registry::{FilterInput, RegisterInput};
use epr_events::connectivity::{encode_connected, ConnectedEvent};
use epr_events::tenant::{encode_tenant_event, TenantEvent, TenantEventKind};
use epr_events::{efmp, epmmp};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

fn env() -> epmmp::Envelope {
    epmmp::Envelope {
        correlation_id: "corr".into(),
        timestamp: now_ms(),
        timeout: 10_000,
    }
}

/// An app with tenants `alpha` (the default: instance `instance`) and `beta` (instance
/// `instance-beta`), each with a dummy issuer (no token is checked on NATS).
async fn spawn_tenants(
    nats: &PrivateNats,
    instance: &str,
    adjust: impl FnOnce(&mut epr_server::Settings) + Send + 'static,
) -> TestApp {
    let app = spawn_on_nats(&nats.url(), instance, move |s| {
        s.tenant.default = "alpha".into();
        for id in ["alpha", "beta"] {
            s.auth.tenants.push(epr_auth::TenantSettings {
                id: id.into(),
                issuer: format!("https://issuer.invalid/{id}"),
                ..Default::default()
            });
        }
        adjust(s);
    })
    .await;
    wait_nats(&app, "UP").await;
    app
}

/// The same data in a tenant: `ep-1`, `ep-2` (demo-v1) with `owner` = the tenant, and a
/// filter `f` matching demo-v1; returns the filter ID once it is active.
async fn seed(app: &TestApp, t: &str) -> String {
    let r = &app.registry;
    for id in ["ep-1", "ep-2"] {
        r.register(
            &tenant(t),
            RegisterInput {
                endpoint_id: Some(id.into()),
                app_version: "demo-v1".into(),
                metadata: Some(json!({"owner": t})),
                token: None,
            },
            "seed",
        )
        .await
        .unwrap();
    }
    let f = r
        .create_filter(
            &tenant(t),
            "demo",
            FilterInput {
                name: Some("f".into()),
                description: None,
                mongo_query: Some(json!({"application_version": "demo-v1"})),
            },
            "seed",
        )
        .await
        .unwrap();
    let id = f.id.to_string();
    poll(
        Duration::from_secs(15),
        Duration::from_millis(10),
        || async {
            let f = r.get_filter(&tenant(t), "demo", &id).await.unwrap();
            if f.status == epr_core::endpoint_filter::FilterStatus::Active {
                Ok(())
            } else {
                Err(format!("filter {id} of {t} never became active"))
            }
        },
    )
    .await;
    id
}

async fn epmmp_call(
    nats: &async_nats::Client,
    instance: &str,
    req: epmmp::Request,
) -> Result<(epmmp::Status, epmmp::Response), async_nats::RequestError> {
    let t = req.request_type();
    let payload = epmmp::encode_request(&env(), &req).unwrap();
    let reply = nats
        .request(epmmp::request_subject(instance, t), payload.into())
        .await?;
    let (_, status, body) = epmmp::decode_response(t, &reply.payload).unwrap();
    Ok((status, body))
}

async fn efmp_call(
    nats: &async_nats::Client,
    instance: &str,
    req: efmp::Request,
) -> (efmp::Status, efmp::Response) {
    let t = req.request_type();
    let payload = efmp::encode_request(&env(), &req).unwrap();
    let reply = nats
        .request(efmp::request_subject(instance, t), payload.into())
        .await
        .unwrap();
    let (_, status, body) = efmp::decode_response(t, &reply.payload).unwrap();
    (status, body)
}

/// `owner` of an endpoint as 19/EPMMP on `instance` answers it.
async fn owner(nats: &async_nats::Client, instance: &str, id: &str) -> Value {
    let (status, body) = epmmp_call(
        nats,
        instance,
        epmmp::Request::MetadataGet {
            endpoint_id: id.into(),
            include: vec![],
            include_metadata: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(status.code, 200, "{status:?}");
    let epmmp::Response::MetadataGet {
        payload: Some(p), ..
    } = body
    else {
        panic!("no metadata: {body:?}")
    };
    serde_json::from_slice::<Value>(&p).unwrap()["owner"].clone()
}

async fn app_version(app: &TestApp, t: &str, id: &str) -> String {
    app.registry
        .get(&tenant(t), &EndpointId::parse(id).unwrap())
        .await
        .unwrap()
        .app_version
        .to_string()
}

fn counter(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn tenants_with_the_same_ids_are_served_apart_on_every_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = PrivateNats::start(dir.path());
    let nats = server.client().await;
    let alpha = unique_instance("tn");
    let beta = format!("{alpha}-beta");
    let mut events = nats.subscribe("kaa.v1.events.>").await.unwrap();
    nats.flush().await.unwrap();
    let app = spawn_tenants(&server, &alpha, |s| {
        s.nats.connected_tenants = BTreeMap::from([
            ("kpc-beta".into(), "beta".into()),
            ("kpc-x".into(), "gamma".into()),
        ]);
    })
    .await;
    let alpha_filter = seed(&app, "alpha").await;
    let beta_filter = seed(&app, "beta").await;

    // Events: each tenant's on its own instance subject.
    let mut registered = BTreeMap::<String, Vec<String>>::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while registered.values().map(Vec::len).sum::<usize>() < 4 {
        let msg = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("4 registered events")
            .unwrap();
        if msg.subject.ends_with(".endpoint.lifecycle.registered") {
            let ev = Event::from_message(&msg.subject, &msg.payload);
            let origin = msg.subject.split('.').nth(3).unwrap().to_owned();
            registered
                .entry(origin)
                .or_default()
                .push(ev.str("endpointId"));
        }
    }
    assert_eq!(registered[&alpha], ["ep-1", "ep-2"]);
    assert_eq!(registered[&beta], ["ep-1", "ep-2"]);

    // 19/EPMMP: each instance reads and changes its own tenant only.
    assert_eq!(owner(&nats, &alpha, "ep-1").await, "alpha");
    assert_eq!(owner(&nats, &beta, "ep-1").await, "beta");
    let (status, _) = epmmp_call(
        &nats,
        &beta,
        epmmp::Request::MetadataPatch {
            endpoint_id: "ep-1".into(),
            if_match: None,
            patch: br#"[{"op":"replace","path":"/owner","value":"beta-2"}]"#.to_vec(),
        },
    )
    .await
    .unwrap();
    assert_eq!(status.code, 200);
    assert_eq!(owner(&nats, &beta, "ep-1").await, "beta-2");
    assert_eq!(owner(&nats, &alpha, "ep-1").await, "alpha");

    // 20/EFMP: the same filter name, each tenant's own filter.
    for (instance, own, other) in [
        (&alpha, &alpha_filter, &beta_filter),
        (&beta, &beta_filter, &alpha_filter),
    ] {
        let (status, body) = efmp_call(
            &nats,
            instance,
            efmp::Request::EndpointFilters {
                endpoint_id: "ep-1".into(),
            },
        )
        .await;
        assert_eq!(status.code, 200);
        let efmp::Response::EndpointFilters { filter_ids, .. } = body else {
            panic!()
        };
        assert_eq!(filter_ids, std::slice::from_ref(own));
        let (status, _) = efmp_call(
            &nats,
            instance,
            efmp::Request::ListByFilter {
                filter_id: other.clone(),
            },
        )
        .await;
        assert_eq!(status.code, 404, "another tenant's filter is unknown here");
    }

    // `connected`: a mapped originator changes its tenant only; others the default tenant.
    let connected = |id: &str, version: &str| ConnectedEvent {
        correlation_id: format!("conn-{version}"),
        timestamp: now_ms(),
        timeout: 0,
        endpoints: BTreeMap::from([(id.to_owned(), version.to_owned())]),
        originator_replica_id: "kpc-0".into(),
    };
    let publish = |origin: &str, ev: ConnectedEvent| {
        let (nats, subject) = (
            nats.clone(),
            format!("kaa.v1.events.{origin}.endpoint.connectivity.connected"),
        );
        async move {
            nats.publish(subject, encode_connected(&ev).unwrap().into())
                .await
                .unwrap();
            nats.flush().await.unwrap();
        }
    };
    publish("kpc-beta", connected("ep-1", "demo-v2")).await;
    publish("kpc", connected("ep-2", "demo-v2")).await;
    // A mapped tenant that is not current: ignored.
    publish("kpc-x", connected("ep-1", "other-v1")).await;
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let got = (
                app_version(&app, "beta", "ep-1").await,
                app_version(&app, "alpha", "ep-2").await,
            );
            if got == ("demo-v2".into(), "demo-v2".into()) {
                Ok(())
            } else {
                Err(format!("connected events not applied: {got:?}"))
            }
        },
    )
    .await;
    assert_eq!(app_version(&app, "alpha", "ep-1").await, "demo-v1");
    assert_eq!(app_version(&app, "beta", "ep-2").await, "demo-v1");
    let metrics = app.metrics().await;
    assert!(
        counter(
            &metrics,
            "epr_connected_events_ignored_total",
            "reason=\"unknown-tenant\""
        ) >= 1.0,
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_unregistered_tenant_goes_silent_and_its_data_is_purged_with_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = PrivateNats::start(dir.path());
    let nats = server.client().await;
    let alpha = unique_instance("tp");
    let beta = format!("{alpha}-beta");
    let mut beta_events = nats
        .subscribe(format!("kaa.v1.events.{beta}.>"))
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let app = spawn_tenants(&server, &alpha, |s| {
        s.auth.removed_tenant_data = "purge".into();
    })
    .await;
    seed(&app, "alpha").await;
    let beta_filter = seed(&app, "beta").await;
    assert_eq!(owner(&nats, &beta, "ep-1").await, "beta");

    // `updated` reaches the tenant directory (counted), and changes nothing here.
    let tle = |kind: TenantEventKind, t: &str| {
        let ev = TenantEvent {
            correlation_id: "tle-1".into(),
            timestamp: now_ms(),
            timeout: 0,
            tenant_id: t.into(),
            originator_replica_id: "tm-0".into(),
        };
        let subject = format!("kaa.v1.events.tm.tenant.lifecycle.{}", kind.token());
        let nats = nats.clone();
        async move {
            nats.publish(subject, encode_tenant_event(kind, &ev).unwrap().into())
                .await
                .unwrap();
            nats.flush().await.unwrap();
        }
    };
    tle(TenantEventKind::Updated, "beta").await;
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let m = app.metrics().await;
            if counter(&m, "epr_tenant_events_total", "type=\"updated\"") >= 1.0 {
                Ok(())
            } else {
                Err(format!("updated not applied: {m}"))
            }
        },
    )
    .await;
    assert_eq!(owner(&nats, &beta, "ep-1").await, "beta");

    tle(TenantEventKind::Unregistered, "beta").await;
    // Beta's request subjects go silent: no responder at all. (A request that reached the
    // subscription just before it was dropped gets no reply either: a client timeout.)
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let call = epmmp_call(
                &nats,
                &beta,
                epmmp::Request::KeysGet {
                    endpoint_id: "ep-1".into(),
                },
            );
            match tokio::time::timeout(Duration::from_millis(500), call).await {
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
                Ok(Ok(reply)) => Err(format!("beta still answers: {reply:?}")),
                other => Err(format!("beta has a subscription: {other:?}")),
            }
        },
    )
    .await;
    // Its data is deleted with events under its instance name: the filter's `deleted`, each
    // endpoint's `unregistered` (and no `ep-unmatched`: the filter went first).
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while seen.len() < 3 {
        let msg = tokio::time::timeout_at(deadline, beta_events.next())
            .await
            .unwrap_or_else(|_| panic!("purge events: {seen:?}"))
            .unwrap();
        let s = msg.subject.to_string();
        if s.ends_with(".endpoint.lifecycle.unregistered") {
            let ev = Event::from_message(&s, &msg.payload);
            assert_eq!(ev.str("correlationId"), "purge-tenant-beta");
            seen.push(format!("unregistered {}", ev.str("endpointId")));
        } else if s == format!("kaa.v1.events.{beta}.endpoint-filter.{beta_filter}.deleted") {
            seen.push("filter deleted".into());
        } else {
            assert!(!s.ends_with("ep-unmatched"), "{s}");
        }
    }
    // The filter goes first; the endpoints' deletions are submitted together, so their
    // relative order is the commit order of independent writes (PostgreSQL commits them on
    // different writers): compared as a set.
    seen[1..].sort();
    assert_eq!(
        seen,
        ["filter deleted", "unregistered ep-1", "unregistered ep-2"]
    );
    let all = PageRequest {
        offset: 0,
        limit: 100,
        after: None,
    };
    let r = &app.registry;
    assert_eq!(
        r.list(&tenant("beta"), &EndpointQuery::default(), all)
            .await
            .unwrap()
            .total,
        0
    );
    assert!(r
        .store()
        .export_filters(&tenant("beta"))
        .await
        .unwrap()
        .is_empty());
    // Alpha is untouched and still served.
    assert_eq!(
        r.list(&tenant("alpha"), &EndpointQuery::default(), all)
            .await
            .unwrap()
            .total,
        2
    );
    assert_eq!(
        r.store()
            .export_filters(&tenant("alpha"))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(owner(&nats, &alpha, "ep-1").await, "alpha");
    // Deleting the deleted again is a no-op (idempotent purge).
    let step = r
        .purge_tenant_step(&tenant("beta"), 10, "again")
        .await
        .unwrap();
    assert!(step.done);
    app.stop().await;
}

/// Records what the listener hands to the tenant directory.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl TenantControl for Recorder {
    fn tenant_updated(&self, tenant: &str) {
        self.0.lock().unwrap().push(format!("updated {tenant}"));
    }
    fn tenant_unregistered(&self, tenant: &str) {
        self.0
            .lock()
            .unwrap()
            .push(format!("unregistered {tenant}"));
    }
}

#[tokio::test]
async fn every_replica_applies_tenant_events_and_drops_expired_or_garbled_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = PrivateNats::start(dir.path());
    let settings = epr_nats::NatsSettings {
        url: server.url(),
        client_name: "tle-test".into(),
        subscription_capacity: 1024,
        max_reconnect_delay: Duration::from_secs(1),
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let nats = epr_nats::Nats::connect(&settings).await.unwrap();
        nats.state.wait_connected(Duration::from_secs(5)).await;
        let rec = Arc::new(Recorder::default());
        let task = tokio::spawn(epr_nats::tenant_lifecycle::listen(
            nats,
            rec.clone() as Arc<dyn TenantControl>,
            stop.clone(),
        ));
        replicas.push((rec, task));
    }
    let client = server.client().await;
    // Let the subscriptions reach the server before publishing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let send = |kind: TenantEventKind, t: &str, timestamp: i64, timeout: i64| {
        let ev = TenantEvent {
            correlation_id: format!("c-{t}"),
            timestamp,
            timeout,
            tenant_id: t.into(),
            originator_replica_id: "tm-0".into(),
        };
        (
            format!("kaa.v1.events.tm.tenant.lifecycle.{}", kind.token()),
            encode_tenant_event(kind, &ev).unwrap(),
        )
    };
    let now = now_ms();
    for (subject, payload) in [
        send(TenantEventKind::Updated, "acme", now, 0),
        send(TenantEventKind::Unregistered, "old", now - 60_000, 1_000), // expired
        (
            "kaa.v1.events.tm.tenant.lifecycle.updated".into(),
            b"garbage".to_vec(),
        ),
        send(TenantEventKind::Unregistered, "acme", now, 60_000),
    ] {
        client.publish(subject, payload.into()).await.unwrap();
    }
    client.flush().await.unwrap();
    for (rec, _) in &replicas {
        poll(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || async {
                let got = rec.0.lock().unwrap().clone();
                if got.len() >= 2 {
                    Ok(())
                } else {
                    Err(format!("events not applied: {got:?}"))
                }
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (rec, _) in &replicas {
        assert_eq!(
            *rec.0.lock().unwrap(),
            ["updated acme", "unregistered acme"],
            "every replica applies each event once; expired and garbled ones are dropped"
        );
    }
    stop_tx.send(true).unwrap();
    for (_, task) in replicas {
        task.await.unwrap().unwrap();
    }
}
