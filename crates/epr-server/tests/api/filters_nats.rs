//! Saved filters on a real nats-server: the 18/EFE events of a filter's whole life (decoded
//! with the `.avsc` files), and the 20/EFMP requests (filters of an endpoint, endpoints of a
//! filter, errors, and the 413 of a reply larger than the server's `max_payload`).

use crate::helpers::{poll, TestApp};
use crate::nats_support::{
    decode, schema_for, shared_client, shared_url, spawn_on_nats, subscribe_events,
    unique_instance, wait_nats, PrivateNats,
};
use apache_avro::types::Value as Avro;
use epr_events::efmp::{
    decode_response, encode_request, list_by_filter_response_size, request_subject, Envelope,
    Request, RequestType, Response, Status,
};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A REST request with an `X-Request-Id` (the correlation ID of the events it causes).
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    request_id: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut r = app.api(method, path).header("x-request-id", request_id);
    if let Some(body) = body {
        r = r
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    r.send().await.unwrap()
}

async fn expect(r: reqwest::Response, status: StatusCode) -> Value {
    let got = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    }
}

/// Creates a filter in `demo`; returns its ID.
async fn create_filter(app: &TestApp, name: &str, query: Value, request_id: &str) -> String {
    let r = send(
        app,
        Method::POST,
        "/applications/demo/filters",
        request_id,
        Some(json!({"name": name, "mongoQuery": query})),
    )
    .await;
    let body = expect(r, StatusCode::CREATED).await;
    assert!(
        body["status"] == "pending" || body["status"] == "active",
        "{body}"
    );
    body["id"].as_str().unwrap().to_owned()
}

/// Waits until the filter is active (its back-fill done); returns it.
async fn wait_active(app: &TestApp, id: &str) -> Value {
    poll(
        Duration::from_secs(15),
        Duration::from_millis(10),
        || async {
            let r = app.get(&format!("/applications/demo/filters/{id}")).await;
            let body = expect(r, StatusCode::OK).await;
            if body["status"] == "active" {
                Ok(body)
            } else {
                Err(format!("filter {id} never became active"))
            }
        },
    )
    .await
}

/// One message of an instance's event stream, decoded with the `.avsc` file of its subject.
#[derive(Debug)]
struct Msg {
    subject: String,
    /// 18/EFE: the event type (`pending`, `ep-matched`, ...); else `lifecycle.registered`, ...
    kind: String,
    filter: bool,
    fields: BTreeMap<String, Avro>,
}

impl Msg {
    fn decode(subject: &str, payload: &[u8]) -> Self {
        let tokens: Vec<&str> = subject.split('.').collect();
        if tokens.get(4) == Some(&"endpoint-filter") {
            assert_eq!(tokens.len(), 7, "{subject}");
            let kind = tokens[6];
            let file = match kind {
                "pending" => "0018-epf-pending.avsc",
                "activated" => "0018-epf-activated.avsc",
                "deleted" => "0018-epf-deleted.avsc",
                "ep-matched" => "0018-epf-ep-matched.avsc",
                "ep-unmatched" => "0018-epf-ep-unmatched.avsc",
                other => panic!("unexpected 18/EFE event type {other}"),
            };
            Msg {
                subject: subject.to_owned(),
                kind: kind.to_owned(),
                filter: true,
                fields: decode(file, payload),
            }
        } else {
            Msg {
                subject: subject.to_owned(),
                kind: tokens[tokens.len() - 2..].join("."),
                filter: false,
                fields: decode(schema_for(subject), payload),
            }
        }
    }

    fn str(&self, field: &str) -> String {
        match &self.fields[field] {
            Avro::String(s) => s.clone(),
            other => panic!("{field} is not a string: {other:?}"),
        }
    }

    fn opt_str(&self, field: &str) -> Option<String> {
        match &self.fields[field] {
            Avro::Union(_, inner) => match &**inner {
                Avro::String(s) => Some(s.clone()),
                Avro::Null => None,
                other => panic!("{field} holds {other:?}"),
            },
            other => panic!("{field} is not a union: {other:?}"),
        }
    }
}

/// What a test checks of an 18/EFE event beyond the fields every event of the filter shares.
#[derive(Debug, PartialEq)]
struct Efe {
    kind: String,
    /// Endpoint ID and app version (ep-matched / ep-unmatched only).
    endpoint: Option<(String, String)>,
    correlation_id: String,
    filter_name: String,
}

fn status_event(kind: &str, corr: &str, name: &str) -> Efe {
    Efe {
        kind: kind.into(),
        endpoint: None,
        correlation_id: corr.into(),
        filter_name: name.into(),
    }
}

fn endpoint_event(matched: bool, endpoint: &str, version: &str, corr: &str, name: &str) -> Efe {
    Efe {
        kind: if matched {
            "ep-matched"
        } else {
            "ep-unmatched"
        }
        .into(),
        endpoint: Some((endpoint.into(), version.into())),
        correlation_id: corr.into(),
        filter_name: name.into(),
    }
}

/// The instance's events, in publication (commit) order.
struct Feed {
    sub: async_nats::Subscriber,
    instance: String,
    filter_id: Option<String>,
    started: i64,
}

impl Feed {
    async fn next(&mut self) -> Msg {
        let m = tokio::time::timeout(Duration::from_secs(10), self.sub.next())
            .await
            .expect("an event within 10 s")
            .expect("the subscription is open");
        Msg::decode(&m.subject, &m.payload)
    }

    /// The 18/EFE events published up to and including the first message `stop` accepts,
    /// checked for what every event of the filter carries and summarised as [`Efe`].
    async fn filter_events_until(&mut self, stop: impl Fn(&Msg) -> bool) -> Vec<Efe> {
        let mut out = Vec::new();
        loop {
            let m = self.next().await;
            let last = stop(&m);
            if m.filter {
                out.push(self.check(&m));
            }
            if last {
                return out;
            }
        }
    }

    fn check(&self, m: &Msg) -> Efe {
        let id = self.filter_id.as_deref().expect("the filter ID is known");
        assert_eq!(
            m.subject,
            format!(
                "kaa.v1.events.{}.endpoint-filter.{id}.{}",
                self.instance, m.kind
            )
        );
        assert_eq!(m.str("filterId"), id);
        assert_eq!(m.str("applicationName"), "demo");
        assert_eq!(m.str("originatorReplicaId"), "replica-1");
        assert_eq!(m.fields["timeout"], Avro::Long(0));
        let Avro::Long(ts) = m.fields["timestamp"] else {
            panic!("timestamp is not a long")
        };
        assert!(ts >= self.started - 5 && ts <= now_ms() + 5, "{ts}");
        let endpoint = m
            .kind
            .starts_with("ep-")
            .then(|| (m.str("endpointId"), m.str("appVersionName")));
        Efe {
            kind: m.kind.clone(),
            endpoint,
            correlation_id: m.str("correlationId"),
            filter_name: m.opt_str("filterName").expect("filterName is always set"),
        }
    }
}

fn is_filter_event(kind: &'static str) -> impl Fn(&Msg) -> bool {
    move |m| m.filter && m.kind == kind
}

/// An event of a later transaction than everything before it: every event committed
/// earlier has been published before it (one relay, commit order).
fn is_registration_of(endpoint: &'static str) -> impl Fn(&Msg) -> bool {
    move |m| !m.filter && m.kind == "lifecycle.registered" && m.str("endpointId") == endpoint
}

/// The 18/EFE event of `kind` about `endpoint`. (Within one transaction the endpoint's own
/// events may come first, so they cannot serve as the end of its filter events.)
fn is_endpoint_event(kind: &'static str, endpoint: &'static str) -> impl Fn(&Msg) -> bool {
    move |m| m.filter && m.kind == kind && m.str("endpointId") == endpoint
}

#[tokio::test]
async fn a_filters_life_is_published_as_18_efe_events() {
    let instance = unique_instance("fe");
    let (_nats, sub) = subscribe_events(&instance).await;
    let app = spawn_on_nats(&shared_url(), &instance, |_| {}).await;
    wait_nats(&app, "UP").await;
    let mut feed = Feed {
        sub,
        instance: instance.clone(),
        filter_id: None,
        started: now_ms(),
    };
    let kyiv = json!({"city": "Kyiv"});
    app.register("ep-1", "demo-v1", kyiv.clone()).await;
    app.register("ep-2", "demo-v1", json!({"city": "Lviv"}))
        .await;
    app.register("ep-3", "demo-v2", kyiv.clone()).await;

    // Created: pending; the back-fill finds ep-1 and ep-3 silently, then activated.
    let id = create_filter(
        &app,
        "kyiv",
        json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}),
        "req-create",
    )
    .await;
    feed.filter_id = Some(id.clone());
    assert_eq!(
        feed.filter_events_until(is_filter_event("activated")).await,
        [
            status_event("pending", "req-create", "kyiv"),
            status_event("activated", "req-create", "kyiv"),
        ],
        "no ep-matched while the membership is built"
    );
    let filter = wait_active(&app, &id).await;
    assert_eq!(filter["matchedEndpointsCount"], 2, "{filter}");

    // Matching by registration and by a metadata change; unmatching by a metadata change and
    // by unregistration. A registration that matches nothing publishes nothing.
    let r = send(
        &app,
        Method::POST,
        "/endpoints",
        "req-reg-4",
        Some(json!({"endpointId": "ep-4", "appVersion": {"name": "demo-v1"}, "metadata": kyiv})),
    )
    .await;
    expect(r, StatusCode::CREATED).await;
    let r = send(
        &app,
        Method::POST,
        "/endpoints",
        "req-reg-5",
        Some(json!({
            "endpointId": "ep-5",
            "appVersion": {"name": "demo-v2"},
            "metadata": {"city": "Odesa"}
        })),
    )
    .await;
    expect(r, StatusCode::CREATED).await;
    let r = send(
        &app,
        Method::PUT,
        "/endpoints/ep-5/metadata/city",
        "req-md-5",
        Some(json!("Kyiv")),
    )
    .await;
    expect(r, StatusCode::NO_CONTENT).await;
    let r = send(
        &app,
        Method::PUT,
        "/endpoints/ep-1/metadata",
        "req-md-1",
        Some(json!({"city": "Lviv"})),
    )
    .await;
    expect(r, StatusCode::NO_CONTENT).await;
    let r = send(&app, Method::DELETE, "/endpoints/ep-3", "req-del-3", None).await;
    expect(r, StatusCode::NO_CONTENT).await;
    assert_eq!(
        feed.filter_events_until(is_endpoint_event("ep-unmatched", "ep-3"))
            .await,
        [
            endpoint_event(true, "ep-4", "demo-v1", "req-reg-4", "kyiv"),
            endpoint_event(true, "ep-5", "demo-v2", "req-md-5", "kyiv"),
            endpoint_event(false, "ep-1", "demo-v1", "req-md-1", "kyiv"),
            endpoint_event(false, "ep-3", "demo-v2", "req-del-3", "kyiv"),
        ]
    );

    // A new name alone changes no membership and publishes nothing; later events carry it.
    let path = format!("/applications/demo/filters/{id}");
    let r = send(
        &app,
        Method::PATCH,
        &path,
        "req-rename",
        Some(json!({"name": "kyiv-2"})),
    )
    .await;
    expect(r, StatusCode::OK).await;
    // A new query: pending again, the membership is rebuilt silently (ep-4 leaves and ep-5
    // stays without an event), then activated, both with the PATCH's request ID.
    let r = send(
        &app,
        Method::PATCH,
        &path,
        "req-patch",
        Some(json!({"mongoQuery": {"application_version": "demo-v2"}})),
    )
    .await;
    let body = expect(r, StatusCode::OK).await;
    assert!(
        body["status"] == "pending" || body["status"] == "active",
        "{body}"
    );
    assert_eq!(
        feed.filter_events_until(is_filter_event("activated")).await,
        [
            status_event("pending", "req-patch", "kyiv-2"),
            status_event("activated", "req-patch", "kyiv-2"),
        ]
    );
    let filter = wait_active(&app, &id).await;
    assert_eq!(filter["matchedEndpointsCount"], 1, "{filter}");

    // App version changes move an endpoint in and out; appVersionName is the new version.
    for (version, corr) in [("demo-v2", "req-av-2"), ("demo-v1", "req-av-1")] {
        let r = send(
            &app,
            Method::PUT,
            "/endpoints/ep-2/app-version",
            corr,
            Some(json!({"name": version})),
        )
        .await;
        expect(r, StatusCode::NO_CONTENT).await;
    }
    let r = send(&app, Method::DELETE, &path, "req-delete", None).await;
    expect(r, StatusCode::NO_CONTENT).await;
    // After the deletion nothing about the filter is published any more.
    app.register("ep-6", "demo-v2", json!({})).await;
    assert_eq!(
        feed.filter_events_until(is_registration_of("ep-6")).await,
        [
            endpoint_event(true, "ep-2", "demo-v2", "req-av-2", "kyiv-2"),
            endpoint_event(false, "ep-2", "demo-v1", "req-av-1", "kyiv-2"),
            status_event("deleted", "req-delete", "kyiv-2"),
        ]
    );
    app.stop().await;
}

/// A request datum with this envelope.
fn request(corr: &str, timestamp: i64, timeout: i64, req: &Request) -> Vec<u8> {
    let env = Envelope {
        correlation_id: corr.into(),
        timestamp,
        timeout,
    };
    encode_request(&env, req).unwrap()
}

/// A 20/EFMP client on one connection.
struct Client {
    nats: async_nats::Client,
    instance: String,
}

impl Client {
    /// Sends `req` and decodes the reply, which must echo the correlation ID.
    async fn call(&self, corr: &str, req: Request) -> (Status, Response) {
        let payload = request(corr, now_ms(), 10_000, &req);
        let (env, status, body) = self
            .raw(req.request_type(), payload)
            .await
            .expect("a reply");
        assert_eq!(env.correlation_id, corr);
        (status, body)
    }

    async fn raw(&self, t: RequestType, payload: Vec<u8>) -> Option<(Envelope, Status, Response)> {
        let reply = tokio::time::timeout(
            Duration::from_secs(3),
            self.nats
                .request(request_subject(&self.instance, t), payload.into()),
        )
        .await
        .ok()?
        .ok()?;
        let (env, status, body) = decode_response(t, &reply.payload).unwrap();
        assert!(env.timestamp > 0);
        assert_eq!(env.timeout, 0);
        Some((env, status, body))
    }

    async fn filters_of(&self, endpoint: &str) -> (Status, Vec<String>) {
        let (status, body) = self
            .call(
                &format!("c-{endpoint}"),
                Request::EndpointFilters {
                    endpoint_id: endpoint.into(),
                },
            )
            .await;
        let Response::EndpointFilters {
            endpoint_id,
            mut filter_ids,
        } = body
        else {
            panic!("wrong body")
        };
        assert_eq!(endpoint_id, endpoint, "the endpoint ID is echoed");
        filter_ids.sort();
        (status, filter_ids)
    }

    async fn list(&self, filter: &str) -> (Status, BTreeMap<String, Vec<String>>) {
        let (status, body) = self
            .call(
                &format!("c-{filter}"),
                Request::ListByFilter {
                    filter_id: filter.into(),
                },
            )
            .await;
        let Response::ListByFilter {
            filter_id,
            app_versions_to_endpoints,
        } = body
        else {
            panic!("wrong body")
        };
        assert_eq!(filter_id, filter, "the filter ID is echoed");
        (status, app_versions_to_endpoints)
    }
}

fn map(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect()
}

#[tokio::test]
async fn efmp_answers_the_filters_of_an_endpoint_and_the_endpoints_of_a_filter() {
    let instance = unique_instance("fm");
    let app = spawn_on_nats(&shared_url(), &instance, |_| {}).await;
    wait_nats(&app, "UP").await;
    let c = Client {
        nats: shared_client().await,
        instance,
    };
    app.register("a1", "demo-v1", json!({"t": "x"})).await;
    app.register("a2", "demo-v2", json!({"t": "x"})).await;
    app.register("a3", "demo-v1", json!({"t": "x"})).await;
    app.register("b1", "demo-v1", json!({"t": "y"})).await;
    app.register("o1", "other-v1", json!({"t": "x"})).await;
    let tx = create_filter(
        &app,
        "t-x",
        json!({"metadata": {"$elemMatch": {"key": "t", "value": "x"}}}),
        "req-1",
    )
    .await;
    let v1 = create_filter(
        &app,
        "v1",
        json!({"application_version": "demo-v1"}),
        "req-2",
    )
    .await;
    let empty = create_filter(
        &app,
        "none",
        json!({"application_version": "demo-v9"}),
        "req-3",
    )
    .await;
    for id in [&tx, &v1, &empty] {
        wait_active(&app, id).await;
    }

    // --- ep-filters ---
    let mut both = vec![tx.clone(), v1.clone()];
    both.sort();
    assert_eq!(c.filters_of("a1").await, (Status::OK, both));
    assert_eq!(c.filters_of("a2").await, (Status::OK, vec![tx.clone()]));
    assert_eq!(c.filters_of("b1").await, (Status::OK, vec![v1.clone()]));
    // Filters are per application: o1 matches t=x but is in `other`.
    assert_eq!(c.filters_of("o1").await, (Status::OK, vec![]));
    let (s, ids) = c.filters_of("nobody").await;
    assert_eq!(s.code, 404);
    assert!(s.reason.unwrap().contains("nobody"));
    assert!(ids.is_empty());

    // --- ep-list-by-filter: app version → endpoints in registration order ---
    assert_eq!(
        c.list(&tx).await,
        (
            Status::OK,
            map(&[("demo-v1", &["a1", "a3"]), ("demo-v2", &["a2"])])
        )
    );
    assert_eq!(
        c.list(&v1).await,
        (Status::OK, map(&[("demo-v1", &["a1", "a3", "b1"])]))
    );
    assert_eq!(c.list(&empty).await, (Status::OK, BTreeMap::new()));
    // A change moves an endpoint between versions and out of filters.
    let r = send(
        &app,
        Method::PUT,
        "/endpoints/a3/app-version",
        "r",
        Some(json!({"name": "demo-v2"})),
    )
    .await;
    expect(r, StatusCode::NO_CONTENT).await;
    assert_eq!(
        c.list(&tx).await,
        (
            Status::OK,
            map(&[("demo-v1", &["a1"]), ("demo-v2", &["a2", "a3"])])
        )
    );
    assert_eq!(c.filters_of("a3").await, (Status::OK, vec![tx.clone()]));
    let (s, m) = c.list("no-such-filter").await;
    assert_eq!(s.code, 404);
    assert!(s.reason.unwrap().contains("no-such-filter"));
    assert!(m.is_empty());
    let (s, _) = c.list("not.a.filter.id").await;
    assert_eq!(s.code, 400);
    // A deleted filter is unknown.
    let r = send(
        &app,
        Method::DELETE,
        &format!("/applications/demo/filters/{v1}"),
        "r-del",
        None,
    )
    .await;
    expect(r, StatusCode::NO_CONTENT).await;
    assert_eq!(c.list(&v1).await.0.code, 404);
    assert_eq!(c.filters_of("b1").await, (Status::OK, vec![]));

    // --- undecodable, expired ---
    for t in RequestType::ALL {
        let (env, s, body) = c
            .raw(t, b"\x01\x02garbage".to_vec())
            .await
            .expect("an undecodable request gets an error reply");
        assert_eq!(s.code, 400);
        assert!(s.reason.unwrap().starts_with("undecodable"));
        assert_eq!(body, Response::empty(t));
        assert_eq!(env.correlation_id, "");
    }
    // The envelope decodes but the body is cut short: the reply still echoes the ID.
    let by_tx = Request::ListByFilter {
        filter_id: tx.clone(),
    };
    let mut cut = request("c-cut", now_ms(), 0, &by_tx);
    cut.truncate(cut.len() - 3);
    let (env, s, _) = c.raw(RequestType::ListByFilter, cut).await.unwrap();
    assert_eq!((env.correlation_id.as_str(), s.code), ("c-cut", 400));
    let expired = request("c-expired", now_ms() - 60_000, 1_000, &by_tx);
    assert!(
        c.raw(RequestType::ListByFilter, expired).await.is_none(),
        "an expired request is dropped"
    );
    // Without a reply subject: dropped (and counted).
    let subject = request_subject(&c.instance, RequestType::ListByFilter);
    let no_reply = request("c-no-reply", now_ms(), 0, &by_tx);
    c.nats.publish(subject, no_reply.into()).await.unwrap();
    c.nats.flush().await.unwrap();
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let m = app.metrics().await;
            let dropped = |reason: &str| {
                m.lines().any(|l| {
                    l.starts_with("epr_efmp_dropped_total") && l.contains(&format!("\"{reason}\""))
                })
            };
            if dropped("expired") && dropped("no-reply-subject") {
                assert!(m.lines().any(|l| l.starts_with("epr_efmp_requests_total")
                    && l.contains("ep-list-by-filter-request")
                    && l.contains("\"404\"")));
                return Ok(());
            }
            Err(format!("drops are not counted:\n{m}"))
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_list_larger_than_max_payload_is_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let server = PrivateNats::start_with_config(dir.path(), "max_payload: 4096\n");
    let instance = unique_instance("fp");
    let app = spawn_on_nats(&server.url(), &instance, |_| {}).await;
    wait_nats(&app, "UP").await;
    let c = Client {
        nats: server.client().await,
        instance,
    };
    // 150 endpoints with 36-character IDs: about 5.7 KB of IDs.
    let mut ids = Vec::new();
    for i in 0..150 {
        let id = format!("endpoint-{i:04}-0123456789abcdef012345");
        assert_eq!(id.len(), 36);
        let version = if i % 3 == 0 { "demo-v2" } else { "demo-v1" };
        app.register(&id, version, json!({"big": true})).await;
        ids.push((version, id));
    }
    let big = create_filter(
        &app,
        "big",
        json!({"metadata": {"$elemMatch": {"key": "big", "value": true}}}),
        "r-big",
    )
    .await;
    let small = create_filter(
        &app,
        "small",
        json!({"application_version": "demo-v2"}),
        "r-small",
    )
    .await;
    wait_active(&app, &big).await;
    wait_active(&app, &small).await;

    let (s, m) = c.list(&big).await;
    assert_eq!(s.code, 413, "{s:?}");
    assert!(m.is_empty(), "never a truncated list");
    let mut full: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (version, id) in &ids {
        full.entry(version.to_string())
            .or_default()
            .push(id.clone());
    }
    // The size the whole reply would have had (the timestamp's length is the same now).
    let size = list_by_filter_response_size(
        &Envelope {
            correlation_id: format!("c-{big}"),
            timestamp: now_ms(),
            timeout: 0,
        },
        &Status::OK,
        &big,
        &full,
    );
    assert!(size > 4096);
    let reason = s.reason.unwrap();
    assert!(reason.contains("150 endpoints"), "{reason}");
    assert!(reason.contains(&format!("{size} bytes")), "{reason}");
    assert!(reason.contains("4096"), "{reason}");

    // 50 endpoints fit.
    let (s, m) = c.list(&small).await;
    assert_eq!(s, Status::OK);
    let expected: Vec<String> = ids
        .iter()
        .filter(|(v, _)| *v == "demo-v2")
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(m, BTreeMap::from([("demo-v2".to_owned(), expected)]));
    app.stop().await;
}

/// While a filter is pending (its back-fill slowed down through the settings), 20/EFMP
/// refuses to list it (409, never a partial list) and leaves it out of an endpoint's
/// filters; once active, both include it.
#[tokio::test]
async fn efmp_refuses_a_pending_filter() {
    let instance = unique_instance("fp");
    let app = spawn_on_nats(&shared_url(), &instance, |s| {
        s.store.backfill_step_ms = 0;
        s.store.backfill_batch = 1;
        s.store.backfill_pause_ms = 50;
    })
    .await;
    wait_nats(&app, "UP").await;
    let c = Client {
        nats: shared_client().await,
        instance,
    };
    let ids: Vec<String> = (0..30).map(|i| format!("p{i:02}")).collect();
    for id in &ids {
        app.register(id, "demo-v1", json!({"t": "x"})).await;
    }
    let f = create_filter(
        &app,
        "slow",
        json!({"application_version": "demo-v1"}),
        "req-p",
    )
    .await;
    let (status, listed) = c.list(&f).await;
    assert_eq!(status.code, 409, "{status:?}");
    assert!(
        status
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("pending")),
        "{status:?}"
    );
    assert!(listed.is_empty(), "never a partial list");
    assert_eq!(c.filters_of("p00").await, (Status::OK, vec![]));
    wait_active(&app, &f).await;
    assert_eq!(
        c.list(&f).await,
        (
            Status::OK,
            map(&[(
                "demo-v1",
                &ids.iter().map(String::as_str).collect::<Vec<_>>()
            )])
        )
    );
    assert_eq!(c.filters_of("p00").await, (Status::OK, vec![f.clone()]));
}
