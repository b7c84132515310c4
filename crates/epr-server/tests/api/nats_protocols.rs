//! The NATS front-ends on a real nats-server: every 19/EPMMP operation as a request/reply
//! round trip (successes and errors), and the 9/ELCE `connected` listener.

use crate::helpers::TestApp;
use crate::nats_support::{
    collect, shared_client, shared_url, spawn_on_nats, unique_instance, wait_nats, PrivateNats,
};
use epr_events::connectivity::{encode_connected, ConnectedEvent};
use epr_events::epmmp::{
    decode_response, encode_request, request_subject, Envelope, KeyUpdateCommand, Request,
    RequestType, Response, Status,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn spawn_nats(url: &str, instance: &str) -> TestApp {
    let app = spawn_on_nats(url, instance, |s| {
        s.nats.restricted_metadata_keys = vec!["secret".into()];
    })
    .await;
    wait_nats(&app, "UP").await;
    app
}

struct Client {
    nats: async_nats::Client,
    instance: String,
}

impl Client {
    /// Sends `req` and decodes the reply; the reply must echo the correlation ID.
    async fn call(&self, corr: &str, req: Request) -> (Status, Response) {
        let t = req.request_type();
        let env = Envelope {
            correlation_id: corr.into(),
            timestamp: now_ms(),
            timeout: 10_000,
        };
        let payload = encode_request(&env, &req).unwrap();
        let (status, body) = self.raw(t, payload).await.expect("a reply");
        (status, body)
    }

    async fn raw(&self, t: RequestType, payload: Vec<u8>) -> Option<(Status, Response)> {
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
        Some((status, body))
    }
}

fn bytes(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

async fn metadata(app: &TestApp, id: &str) -> (Value, String) {
    let r = app.get(&format!("/endpoints/{id}/metadata")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let tag = r.headers()["etag"].to_str().unwrap().to_owned();
    (r.json().await.unwrap(), tag)
}

#[tokio::test]
async fn every_epmmp_operation_round_trips_with_rfc_status_codes() {
    let instance = unique_instance("mm");
    let nats = shared_client().await;
    let mut events = nats
        .subscribe(format!(
            "kaa.v1.events.{instance}.endpoint.metadata.updated"
        ))
        .await
        .unwrap();
    let app = spawn_nats(&shared_url(), &instance).await;
    let c = Client {
        nats: nats.clone(),
        instance: instance.clone(),
    };
    app.register("ep-1", "demo-v1", json!({"a": 1, "b": "x"}))
        .await;
    app.register("ep-2", "demo-v2", json!({})).await;
    assert_eq!(
        collect(&mut events, 1, Duration::from_secs(5)).await.len(),
        1
    );

    // --- get ---
    let (md, tag) = metadata(&app, "ep-1").await;
    let (s, body) = c
        .call(
            "c-get",
            Request::MetadataGet {
                endpoint_id: "ep-1".into(),
                include: vec![],
                include_metadata: true,
            },
        )
        .await;
    assert_eq!(s, Status::OK);
    let Response::MetadataGet {
        endpoint_id,
        e_tag,
        payload,
        app_version_name,
    } = body
    else {
        panic!("wrong body")
    };
    assert_eq!(endpoint_id, "ep-1");
    assert_eq!(
        e_tag.as_deref(),
        Some(tag.as_str()),
        "the REST metadata ETag"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&payload.unwrap()).unwrap(),
        md
    );
    assert_eq!(app_version_name.as_deref(), Some("demo-v1"));

    let (_, body) = c
        .call(
            "c-get-some",
            Request::MetadataGet {
                endpoint_id: "ep-1".into(),
                include: vec!["a".into(), "absent".into()],
                include_metadata: true,
            },
        )
        .await;
    let Response::MetadataGet { payload, .. } = body else {
        panic!()
    };
    assert_eq!(
        serde_json::from_slice::<Value>(&payload.unwrap()).unwrap(),
        json!({"a": 1})
    );
    let (_, body) = c
        .call(
            "c-get-version",
            Request::MetadataGet {
                endpoint_id: "ep-1".into(),
                include: vec![],
                include_metadata: false,
            },
        )
        .await;
    let Response::MetadataGet {
        payload,
        app_version_name,
        ..
    } = body
    else {
        panic!()
    };
    assert_eq!(payload, None);
    assert_eq!(app_version_name.as_deref(), Some("demo-v1"));
    let (s, body) = c
        .call(
            "c-get-404",
            Request::MetadataGet {
                endpoint_id: "nope".into(),
                include: vec![],
                include_metadata: true,
            },
        )
        .await;
    assert_eq!(s.code, 404);
    assert!(s.reason.unwrap().contains("nope"));
    let Response::MetadataGet { endpoint_id, .. } = body else {
        panic!()
    };
    assert_eq!(endpoint_id, "nope", "an error reply names the endpoint");
    let (s, _) = c
        .call(
            "c-get-400",
            Request::MetadataGet {
                endpoint_id: "bad id".into(),
                include: vec![],
                include_metadata: true,
            },
        )
        .await;
    assert_eq!(s.code, 400);
    assert!(s.reason.unwrap().contains("endpointId"));

    // --- keys ---
    let (s, body) = c
        .call(
            "c-keys",
            Request::KeysGet {
                endpoint_id: "ep-1".into(),
            },
        )
        .await;
    assert_eq!(s, Status::OK);
    assert_eq!(
        body,
        Response::KeysGet {
            endpoint_id: "ep-1".into(),
            keys: vec!["a".into(), "b".into()]
        }
    );
    let (s, _) = c
        .call(
            "c-keys-404",
            Request::KeysGet {
                endpoint_id: "nope".into(),
            },
        )
        .await;
    assert_eq!(s.code, 404);

    // --- patch ---
    let patch = |if_match: Option<&str>, p: Value| Request::MetadataPatch {
        endpoint_id: "ep-1".into(),
        if_match: if_match.map(str::to_owned),
        patch: bytes(&p),
    };
    let (s, body) = c
        .call(
            "c-patch",
            patch(
                Some(&tag),
                json!([{"op": "replace", "path": "/a", "value": 2}, {"op": "remove", "path": "/b"}]),
            ),
        )
        .await;
    assert_eq!(s, Status::OK);
    assert_eq!(
        body,
        Response::MetadataPatch {
            endpoint_id: "ep-1".into()
        }
    );
    assert_eq!(metadata(&app, "ep-1").await.0, json!({"a": 2}));
    let ev = collect(&mut events, 1, Duration::from_secs(5)).await;
    assert_eq!(
        ev[0].str("correlationId"),
        "c-patch",
        "15/EME for a NATS change"
    );
    assert_eq!(
        ev[0].updated(),
        BTreeMap::from([("a".into(), (Some("1".into()), Some("2".into())))])
    );
    let (s, _) = c
        .call(
            "c-patch-stale",
            patch(Some(&tag), json!([{"op": "add", "path": "/z", "value": 1}])),
        )
        .await;
    assert_eq!(s.code, 412, "ifMatch with a stale eTag");
    let (s, _) = c
        .call(
            "c-patch-test",
            patch(None, json!([{"op": "test", "path": "/a", "value": 99}])),
        )
        .await;
    assert_eq!(s.code, 400, "a failed test operation");
    let (s, _) = c
        .call(
            "c-patch-bad",
            Request::MetadataPatch {
                endpoint_id: "ep-1".into(),
                if_match: None,
                patch: b"{not json".to_vec(),
            },
        )
        .await;
    assert_eq!(s.code, 400);
    assert!(s.reason.unwrap().contains("JSON Patch"));
    let (s, _) = c
        .call(
            "c-patch-restricted",
            patch(None, json!([{"op": "add", "path": "/secret", "value": 1}])),
        )
        .await;
    assert_eq!(s.code, 403);
    let (s, _) = c
        .call(
            "c-patch-404",
            Request::MetadataPatch {
                endpoint_id: "nope".into(),
                if_match: None,
                patch: bytes(&json!([])),
            },
        )
        .await;
    assert_eq!(s.code, 404);

    // --- key update ---
    let (s, body) = c
        .call(
            "c-key",
            Request::KeyUpdate {
                endpoint_id: "ep-1".into(),
                key: "list".into(),
                value: bytes(&json!([1, "two"])),
            },
        )
        .await;
    assert_eq!(s, Status::OK);
    assert_eq!(
        body,
        Response::KeyUpdate {
            endpoint_id: "ep-1".into()
        }
    );
    assert_eq!(
        metadata(&app, "ep-1").await.0,
        json!({"a": 2, "list": [1, "two"]})
    );
    let ev = collect(&mut events, 1, Duration::from_secs(5)).await;
    assert_eq!(ev[0].str("correlationId"), "c-key");
    for (corr, key, value, code) in [
        ("c-key-json", "k", b"not json".to_vec(), 400),
        ("c-key-restricted", "secret", b"1".to_vec(), 403),
        ("c-key-empty", "", b"1".to_vec(), 400),
    ] {
        let (s, _) = c
            .call(
                corr,
                Request::KeyUpdate {
                    endpoint_id: "ep-1".into(),
                    key: key.into(),
                    value,
                },
            )
            .await;
        assert_eq!(s.code, code, "{corr}: {s:?}");
    }

    // --- batch key update ---
    let cmd = |id: &str, key: &str, v: Value| KeyUpdateCommand {
        endpoint_id: id.into(),
        key: key.into(),
        value: bytes(&v),
    };
    let (s, body) = c
        .call(
            "c-batch",
            Request::KeyBatchUpdate {
                commands: vec![
                    cmd("ep-1", "x", json!(1)),
                    cmd("ep-2", "y", json!("why")),
                    cmd("ep-1", "x", json!(2)),
                ],
            },
        )
        .await;
    assert_eq!(s, Status::OK);
    assert_eq!(body, Response::KeyBatchUpdate);
    assert_eq!(metadata(&app, "ep-1").await.0["x"], json!(2), "in order");
    assert_eq!(metadata(&app, "ep-2").await.0, json!({"y": "why"}));
    let ev = collect(&mut events, 2, Duration::from_secs(5)).await;
    assert_eq!(ev.len(), 2, "one event per endpoint");
    assert!(ev.iter().all(|e| e.str("correlationId") == "c-batch"));
    let (s, _) = c
        .call(
            "c-batch-404",
            Request::KeyBatchUpdate {
                commands: vec![cmd("ep-1", "x", json!(3)), cmd("nope", "x", json!(3))],
            },
        )
        .await;
    assert_eq!(s.code, 404);
    assert!(s.reason.unwrap().contains("nope"));
    assert_eq!(
        metadata(&app, "ep-1").await.0["x"],
        json!(2),
        "nothing changed"
    );
    let (s, _) = c
        .call(
            "c-batch-bad",
            Request::KeyBatchUpdate {
                commands: vec![
                    cmd("ep-1", "x", json!(4)),
                    KeyUpdateCommand {
                        endpoint_id: "ep-2".into(),
                        key: "y".into(),
                        value: b"{".to_vec(),
                    },
                ],
            },
        )
        .await;
    assert_eq!(s.code, 400);
    assert!(s.reason.unwrap().contains("commands[1].metadataValue"));
    assert_eq!(metadata(&app, "ep-1").await.0["x"], json!(2));

    // --- app versions ---
    let ids = vec!["ep-1".into(), "ep-2".into(), "nope".into(), "ep-1".into()];
    let (s, body) = c
        .call(
            "c-versions",
            Request::AppVersionsGet {
                endpoint_ids: ids.clone(),
            },
        )
        .await;
    assert_eq!(s, Status::OK);
    assert_eq!(
        body,
        Response::AppVersionsGet {
            endpoint_ids: ids,
            app_versions_to_endpoints: BTreeMap::from([
                ("demo-v1".into(), vec!["ep-1".into()]),
                ("demo-v2".into(), vec!["ep-2".into()]),
            ])
        }
    );

    // --- malformed and expired requests ---
    let (s, body) = c
        .raw(RequestType::KeysGet, b"\x01\x02garbage".to_vec())
        .await
        .expect("an undecodable request gets an error reply");
    assert_eq!(s.code, 400);
    assert_eq!(body, Response::empty(RequestType::KeysGet));
    let expired = encode_request(
        &Envelope {
            correlation_id: "c-expired".into(),
            timestamp: now_ms() - 60_000,
            timeout: 1_000,
        },
        &Request::KeysGet {
            endpoint_id: "ep-1".into(),
        },
    )
    .unwrap();
    assert!(
        c.raw(RequestType::KeysGet, expired).await.is_none(),
        "an expired request is dropped"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("epr_epmmp_dropped_total") && l.contains("expired")),
        "expired requests are counted"
    );
    app.stop().await;
}

#[tokio::test]
async fn connected_events_update_changed_app_versions_only() {
    let dir = tempfile::tempdir().unwrap();
    let nats_server = PrivateNats::start(dir.path());
    let instance = unique_instance("cn");
    let nats = nats_server.client().await;
    let mut lifecycle = nats
        .subscribe(format!("kaa.v1.events.{instance}.endpoint.lifecycle.*"))
        .await
        .unwrap();
    let app = spawn_nats(&nats_server.url(), &instance).await;
    app.register("ep-1", "demo-v1", json!({})).await;
    app.register("ep-2", "demo-v1", json!({})).await;
    assert_eq!(
        collect(&mut lifecycle, 2, Duration::from_secs(5))
            .await
            .len(),
        2
    );

    // Garbage on the subject is ignored; the listener keeps going.
    nats.publish(
        "kaa.v1.events.kpc.endpoint.connectivity.connected",
        "garbage".into(),
    )
    .await
    .unwrap();
    let event = ConnectedEvent {
        correlation_id: "conn-1".into(),
        timestamp: now_ms(),
        timeout: 0,
        endpoints: BTreeMap::from([
            ("ep-1".into(), "demo-v2".into()),  // changed
            ("ep-2".into(), "demo-v1".into()),  // unchanged
            ("ghost".into(), "demo-v1".into()), // unknown
            ("ep-x".into(), "other-v1".into()), // unknown too
        ]),
        originator_replica_id: "kpc-0".into(),
    };
    nats.publish(
        "kaa.v1.events.kpc.endpoint.connectivity.connected",
        encode_connected(&event).unwrap().into(),
    )
    .await
    .unwrap();

    let got = collect(&mut lifecycle, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].kind(), "lifecycle.appversion-updated");
    assert_eq!(got[0].str("endpointId"), "ep-1");
    assert_eq!(got[0].str("appVersionName"), "demo-v2");
    assert_eq!(got[0].str("previousAppVersionName"), "demo-v1");
    assert_eq!(got[0].str("correlationId"), "conn-1");
    let r = app.get("/endpoints/ep-1/app-version").await;
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "demo-v2");
    assert!(
        collect(&mut lifecycle, 1, Duration::from_millis(500))
            .await
            .is_empty(),
        "no event for the unchanged endpoint, none created for unknown ones"
    );
    assert_eq!(app.total("").await, 2, "unknown endpoints are not created");

    let metrics = app.metrics().await;
    let count = |outcome: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("epr_connected_endpoints_total")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(count("unknown") >= 2.0, "{metrics}");
    assert!(count("updated") >= 1.0);
    assert!(metrics.contains("epr_connected_events_invalid_total"));
    app.stop().await;
}

/// Replicas of one instance share a queue group: each `connected` event is handled by one
/// of them. Here two replicas have separate stores holding the same endpoint, so exactly one
/// store sees the update.
#[tokio::test]
async fn replicas_of_one_instance_share_connected_events() {
    let dir = tempfile::tempdir().unwrap();
    let nats_server = PrivateNats::start(dir.path());
    let instance = unique_instance("rep");
    let a = spawn_nats(&nats_server.url(), &instance).await;
    let b = spawn_nats(&nats_server.url(), &instance).await;
    let n = 20;
    for app in [&a, &b] {
        for i in 0..n {
            app.register(&format!("ep-{i}"), "demo-v1", json!({})).await;
        }
    }
    let nats = nats_server.client().await;
    for i in 0..n {
        let event = ConnectedEvent {
            correlation_id: format!("conn-{i}"),
            timestamp: now_ms(),
            timeout: 0,
            endpoints: BTreeMap::from([(format!("ep-{i}"), "demo-v2".into())]),
            originator_replica_id: "kpc-0".into(),
        };
        nats.publish(
            "kaa.v1.events.kpc.endpoint.connectivity.connected",
            encode_connected(&event).unwrap().into(),
        )
        .await
        .unwrap();
    }
    nats.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mut in_a, mut in_b) = (0, 0);
        for i in 0..n {
            for (app, count) in [(&a, &mut in_a), (&b, &mut in_b)] {
                let r = app.get(&format!("/endpoints/ep-{i}/app-version")).await;
                if r.json::<Value>().await.unwrap()["name"] == "demo-v2" {
                    *count += 1;
                }
            }
        }
        if in_a + in_b == n {
            // Settle: a duplicate delivery would show up as a total above n.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let again = a.total("applicationVersionName=demo-v2").await
                + b.total("applicationVersionName=demo-v2").await;
            assert_eq!(again, n as u64, "each event handled exactly once");
            break;
        }
        assert!(in_a + in_b < n, "an event was handled by both replicas");
        assert!(
            Instant::now() < deadline,
            "events not handled: {in_a} + {in_b} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
    b.stop().await;
}
