//! Events on a real nats-server: 9/ELCE and 15/EME subjects and payloads (decoded with the
//! `.avsc` files), delivery across a NATS outage, JetStream acknowledgements, and the NATS
//! state in health.

use crate::helpers::{poll, spawn_with, TestApp};
use crate::nats_support::{
    capture_stream, collect, shared_url, spawn_on_nats, stream_messages, subscribe_events,
    unique_instance, wait_for_stream, wait_nats, Event, PrivateNats,
};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

async fn spawn_on(url: &str, instance: &str, jetstream: bool) -> TestApp {
    spawn_on_nats(url, instance, move |s| {
        s.nats.jetstream = jetstream;
        s.nats.max_backoff_ms = 200;
    })
    .await
}

/// Waits (10 s at most) until NATS is up and the outbox holds `depth` events.
async fn outbox_depth(app: &TestApp, depth: u64, failure: &str) {
    poll(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            let body = wait_nats(app, "UP").await;
            if body["components"]["nats"]["details"]["outboxDepth"] == depth {
                Ok(())
            } else {
                Err(format!("{failure}: {body}"))
            }
        },
    )
    .await
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

#[tokio::test]
async fn every_event_type_arrives_on_its_subject_and_decodes_with_the_avsc() {
    let instance = unique_instance("ev");
    let (_nats, mut sub) = subscribe_events(&instance).await;
    let app = spawn_on(&shared_url(), &instance, false).await;
    wait_nats(&app, "UP").await;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    let with_id = |m: Method, path: &str, id: &str| {
        app.api(m, path)
            .header("x-request-id", id)
            .header("content-type", "application/json")
    };
    let r = with_id(Method::POST, "/endpoints", "req-register")
        .body(json!({"endpointId": "ep-1", "appVersion": {"name": "demo-v1"}, "metadata": {"a": 1, "s": "x"}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = with_id(Method::PUT, "/endpoints/ep-1/metadata/n", "req-put-key")
        .body("null")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = with_id(Method::PUT, "/endpoints/ep-1/app-version", "req-version")
        .body(json!({"name": "demo-v2"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = with_id(Method::PUT, "/endpoints/ep-1/metadata", "req-replace")
        .body(json!({"a": 2, "n": null, "new": {"deep": [1, "two"]}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = with_id(Method::DELETE, "/endpoints/ep-1", "req-delete")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    let events = collect(&mut sub, 7, Duration::from_secs(10)).await;
    let kinds: Vec<String> = events.iter().map(Event::kind).collect();
    assert_eq!(
        kinds,
        [
            "lifecycle.registered",
            "metadata.updated",
            "metadata.updated",
            "lifecycle.appversion-updated",
            "metadata.updated",
            "lifecycle.unregistered",
            // The registration's token, revoked by the unregistration (16/ECAP).
            "token.revoked"
        ]
    );
    let prefix = format!("kaa.v1.events.{instance}.endpoint.");
    for (e, kind) in events.iter().zip(&kinds) {
        assert_eq!(e.subject, format!("{prefix}{kind}"));
        assert_eq!(e.str("endpointId"), "ep-1");
        assert_eq!(e.str("originatorReplicaId"), "replica-1");
        assert_eq!(e.long("timeout"), 0);
        let ts = e.long("timestamp");
        assert!(ts >= started - 5 && ts <= started + 60_000, "{ts}");
    }
    let corr: Vec<String> = events.iter().map(|e| e.str("correlationId")).collect();
    assert_eq!(
        corr,
        [
            "req-register",
            "req-register",
            "req-put-key",
            "req-version",
            "req-replace",
            "req-delete",
            "req-delete"
        ]
    );

    let (reg, initial, put_key, version, replace, unreg) = (
        &events[0], &events[1], &events[2], &events[3], &events[4], &events[5],
    );
    assert_eq!(reg.str("appVersionName"), "demo-v1");
    assert_eq!(
        initial.json_map("added"),
        BTreeMap::from([("a".into(), some("1")), ("s".into(), some("\"x\""))])
    );
    assert!(initial.json_map("removed").is_empty() && initial.updated().is_empty());
    // JSON null travels as Avro null.
    assert_eq!(
        put_key.json_map("added"),
        BTreeMap::from([("n".into(), None)])
    );
    assert_eq!(put_key.str("appVersionName"), "demo-v1");
    assert_eq!(version.str("appVersionName"), "demo-v2");
    assert_eq!(version.str("previousAppVersionName"), "demo-v1");
    assert_eq!(
        replace.json_map("added"),
        BTreeMap::from([("new".into(), some(r#"{"deep":[1,"two"]}"#))])
    );
    assert_eq!(
        replace.json_map("removed"),
        BTreeMap::from([("s".into(), some("\"x\""))])
    );
    assert_eq!(
        replace.updated(),
        BTreeMap::from([("a".into(), (some("1"), some("2")))])
    );
    assert_eq!(replace.str("appVersionName"), "demo-v2");
    assert_eq!(unreg.str("appVersionName"), "demo-v2");
    assert_eq!(events[6].str("appName"), "demo");
    assert_eq!(events[6].strings("tokenIds").len(), 1);

    // Nothing else was published, and an unchanged write publishes nothing.
    assert!(collect(&mut sub, 1, Duration::from_millis(300))
        .await
        .is_empty());
    app.stop().await;
}

#[tokio::test]
async fn writes_made_while_nats_is_down_are_published_after_it_returns_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = PrivateNats::start(dir.path());
    let instance = unique_instance("out");
    let observer = nats.client().await;
    let mut stream = capture_stream(&observer, "OUTAGE", &instance).await;
    let app = spawn_on(&nats.url(), &instance, false).await;
    wait_nats(&app, "UP").await;

    // Before the outage: one endpoint, two events.
    app.register("before", "demo-v1", json!({"k": 0})).await;
    assert_eq!(
        wait_for_stream(&mut stream, 2, Duration::from_secs(10)).await,
        2
    );

    nats.stop();
    wait_nats(&app, "DOWN").await;
    // Writes are accepted while NATS is down.
    let writers = 4;
    let per_writer = 10;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (client, base) = (app.client.clone(), app.url("/api/v1"));
        tasks.push(tokio::spawn(async move {
            let id = format!("ep-{w}");
            let r = client
                .post(format!("{base}/endpoints"))
                .json(&json!({"endpointId": id, "appVersion": {"name": "demo-v1"}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            for n in 1..=per_writer {
                let r = client
                    .put(format!("{base}/endpoints/{id}/metadata/seq"))
                    .json(&json!(n))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 204);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let body = wait_nats(&app, "DOWN").await;
    assert_eq!(body["status"], "UP", "the service stays ready: {body}");

    nats.restart();
    wait_nats(&app, "UP").await;
    let expected = 2 + writers * (1 + per_writer);
    let have = wait_for_stream(&mut stream, expected as u64, Duration::from_secs(20)).await;
    assert_eq!(have, expected as u64, "every event arrived");
    // Give a duplicate time to show up, then check exactly once and per-endpoint order.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events: Vec<Event> = stream_messages(&mut stream)
        .await
        .iter()
        .map(|(s, p)| Event::from_message(s, p))
        .collect();
    assert_eq!(events.len(), expected, "no event twice");
    for w in 0..writers {
        let id = format!("ep-{w}");
        let mine: Vec<&Event> = events
            .iter()
            .filter(|e| e.str("endpointId") == id)
            .collect();
        assert_eq!(mine[0].kind(), "lifecycle.registered");
        let seqs: Vec<Option<String>> = mine[1..]
            .iter()
            .map(|e| {
                let mut m = e.json_map("added");
                m.extend(e.updated().into_iter().map(|(k, (_, new))| (k, new)));
                m.remove("seq").unwrap()
            })
            .collect();
        let want: Vec<Option<String>> = (1..=per_writer).map(|n| Some(n.to_string())).collect();
        assert_eq!(seqs, want, "{id}: events in commit order");
    }
    app.stop().await;
}

#[tokio::test]
async fn with_jetstream_events_leave_the_outbox_only_when_a_stream_acknowledges_them() {
    let dir = tempfile::tempdir().unwrap();
    let nats = PrivateNats::start(dir.path());
    let instance = unique_instance("js");
    let app = spawn_on(&nats.url(), &instance, true).await;
    wait_nats(&app, "UP").await;
    app.register("ep-js", "demo-v1", json!({})).await;

    // No stream captures the subject: the publish is not acknowledged, the event stays.
    outbox_depth(&app, 1, "outbox depth never showed 1").await;

    let observer = nats.client().await;
    let mut stream = capture_stream(&observer, "JS", &instance).await;
    assert_eq!(
        wait_for_stream(&mut stream, 1, Duration::from_secs(20)).await,
        1
    );
    let events = stream_messages(&mut stream).await;
    let e = Event::from_message(&events[0].0, &events[0].1);
    assert_eq!(e.kind(), "lifecycle.registered");
    assert_eq!(e.str("endpointId"), "ep-js");
    // Each event carries a stable ID, so the stream drops a republished copy.
    let raw = stream.get_raw_message(1).await.unwrap();
    let id = raw
        .headers
        .get("Nats-Msg-Id")
        .map(|v| v.to_string())
        .expect("Nats-Msg-Id header");
    let (store, seq) = id.rsplit_once('-').unwrap();
    assert!(!store.is_empty() && seq.parse::<u64>().is_ok(), "{id}");
    let js = async_nats::jetstream::new(observer.clone());
    let ack = js
        .send_publish(
            events[0].0.clone(),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(events[0].1.clone().into())
                .message_id(&id),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        ack.duplicate,
        "a republished event is recognised as a duplicate"
    );
    outbox_depth(&app, 0, "outbox never drained").await;
    app.stop().await;
}

#[tokio::test]
async fn health_shows_nats_disabled_up_and_down() {
    let app = spawn_with(|_| {}).await;
    let body = app.get_json("/health").await;
    assert_eq!(body["components"]["nats"], "DISABLED");
    app.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let mut nats = PrivateNats::start(dir.path());
    let app = spawn_on(&nats.url(), &unique_instance("h"), false).await;
    let body = wait_nats(&app, "UP").await;
    assert_eq!(body["components"]["nats"]["details"]["url"], nats.url());
    nats.stop();
    wait_nats(&app, "DOWN").await;
    let body = app.get_json("/health").await;
    assert_eq!(body["status"], "UP");
    assert_eq!(body["components"]["nats"], "DOWN");
    app.stop().await;
}

#[tokio::test]
async fn the_service_starts_and_accepts_writes_when_nats_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_on(&format!("nats://127.0.0.1:{port}"), "unreach", false).await;
    app.register("ep-u", "demo-v1", json!({})).await;
    let body = wait_nats(&app, "DOWN").await;
    assert_eq!(body["status"], "UP");
    app.stop().await;
}
