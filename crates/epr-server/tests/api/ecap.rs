//! 16/ECAP on a real nats-server: token validation (an `Inactive` token is activated by its
//! first validation; `Suspended`/`Revoked` are refused; unknown tokens answer `404` with null
//! IDs; malformed requests get a `400` reply), status transitions by token value, the
//! `endpoint.token.revoked` and extension `endpoint.token.status-changed` events (decoded with
//! the `.avsc` files), and tenants served apart by instance name.

use crate::helpers::{poll, TestApp};
use crate::nats_support::{
    collect, shared_client, shared_url, spawn_on_nats, unique_instance, wait_nats,
};
use epr_core::credentials::{TokenListQuery, TokenStatus};
use epr_core::ids::{EndpointId, TenantId};
use epr_core::query::PageRequest;
use epr_core::registry::RegisterInput;
use epr_events::ecap::{
    decode_response, encode_request, request_subject, Envelope, Request, RequestType, Response,
    Status,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

struct Client {
    nats: async_nats::Client,
    instance: String,
}

impl Client {
    async fn raw(&self, t: RequestType, payload: Vec<u8>) -> Option<(Envelope, Status, Response)> {
        let reply = tokio::time::timeout(
            Duration::from_secs(3),
            self.nats
                .request(request_subject(&self.instance, t), payload.into()),
        )
        .await
        .ok()?
        .ok()?;
        Some(decode_response(t, &reply.payload).expect("a 16/ECAP response"))
    }

    /// Sends `req`; the reply must echo the correlation ID.
    async fn call(&self, req: Request) -> (Status, Response) {
        let corr = format!("c-{}", now_ms());
        let env = Envelope {
            correlation_id: corr.clone(),
            timestamp: now_ms(),
            timeout: 10_000,
        };
        let payload = encode_request(&env, &req).unwrap();
        let (env, status, body) = self
            .raw(req.request_type(), payload)
            .await
            .expect("a reply");
        assert_eq!(env.correlation_id, corr);
        assert!(env.timestamp > 0);
        (status, body)
    }

    async fn validate(&self, app: &str, token: &str) -> (Status, Response) {
        self.call(Request::TokenValidation {
            app_name: app.into(),
            token: token.into(),
        })
        .await
    }

    async fn transition(&self, app: &str, token: &str, target: &str) -> Status {
        let (status, body) = self
            .call(Request::TokenStatusTransition {
                app_name: app.into(),
                token: token.into(),
                target_status: target.into(),
            })
            .await;
        assert_eq!(body, Response::TokenStatusTransition);
        status
    }
}

async fn spawn(instance: &str) -> (TestApp, Client) {
    let app = spawn_on_nats(&shared_url(), instance, |_| {}).await;
    wait_nats(&app, "UP").await;
    let c = Client {
        nats: shared_client().await,
        instance: instance.to_owned(),
    };
    (app, c)
}

/// Registers `id` in demo-v1 with the token `token`.
async fn register(app: &TestApp, id: &str, token: &str) {
    let r = app
        .post_endpoint(
            &json!({"endpointId": id, "appVersion": {"name": "demo-v1"}, "endpointToken": token}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// The endpoint's tokens over REST, oldest first.
async fn tokens(app: &TestApp, id: &str) -> Vec<Value> {
    let r = app.get(&format!("/endpoints/{id}/tokens?order=ASC")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    body["content"].as_array().unwrap().clone()
}

fn ids_of(token_id: &str, endpoint_id: &str) -> Response {
    Response::TokenValidation {
        token_id: Some(token_id.into()),
        endpoint_id: Some(endpoint_id.into()),
    }
}

fn no_ids() -> Response {
    Response::TokenValidation {
        token_id: None,
        endpoint_id: None,
    }
}

async fn rest_status(app: &TestApp, ep: &str, id: &str, status: &str) {
    let r = app
        .send_json(
            Method::PUT,
            &format!("/endpoints/{ep}/tokens/{id}/status"),
            &json!({ "status": status }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn validation_activates_refuses_and_resolves() {
    let instance = unique_instance("ec");
    let (app, c) = spawn(&instance).await;
    register(&app, "ep-1", "tok-1").await;
    let t = tokens(&app, "ep-1").await;
    let id = t[0]["endpointTokenId"].as_str().unwrap().to_owned();
    assert_eq!(t[0]["status"], "Inactive");

    // The first validation activates the token; REST shows it Active.
    let (s, body) = c.validate("demo", "tok-1").await;
    assert_eq!((s, body), (Status::OK, ids_of(&id, "ep-1")));
    let t = tokens(&app, "ep-1").await;
    assert_eq!(t[0]["status"], "Active");
    assert!(t[0]["updateDate"].is_string());
    // Active: valid again, unchanged.
    let (s, body) = c.validate("demo", "tok-1").await;
    assert_eq!((s, body), (Status::OK, ids_of(&id, "ep-1")));

    // Suspended and Revoked tokens are refused with 403, their IDs given.
    rest_status(&app, "ep-1", &id, "Suspended").await;
    let (s, body) = c.validate("demo", "tok-1").await;
    assert_eq!(s.code, 403);
    assert!(s.reason.unwrap().contains("Suspended"));
    assert_eq!(body, ids_of(&id, "ep-1"));
    rest_status(&app, "ep-1", &id, "Active").await;
    assert_eq!(c.validate("demo", "tok-1").await.0, Status::OK);
    rest_status(&app, "ep-1", &id, "Revoked").await;
    let (s, body) = c.validate("demo", "tok-1").await;
    assert_eq!(s.code, 403);
    assert!(s.reason.unwrap().contains("Revoked"));
    assert_eq!(body, ids_of(&id, "ep-1"));

    // Unknown: another value, or the right value in another application.
    for (a, tok) in [("demo", "no-such-token"), ("other", "tok-1")] {
        let (s, body) = c.validate(a, tok).await;
        assert_eq!((s.code, body), (404, no_ids()), "{a} {tok}");
    }
    // An Inactive token validated in another application stays Inactive.
    register(&app, "ep-2", "tok-2").await;
    assert_eq!(c.validate("other", "tok-2").await.0.code, 404);
    assert_eq!(tokens(&app, "ep-2").await[0]["status"], "Inactive");

    // Malformed application names and tokens: 400, nothing resolved.
    for (a, tok) in [("Not An App", "tok-2"), ("demo", "a.b"), ("demo", "")] {
        let (s, body) = c.validate(a, tok).await;
        assert_eq!((s.code, body), (400, no_ids()), "{a:?} {tok:?}");
    }
    assert_eq!(tokens(&app, "ep-2").await[0]["status"], "Inactive");

    // Undecodable payloads get a 400 reply, never silence; the correlation ID is echoed
    // when the envelope can be read.
    for t in RequestType::ALL {
        let (env, s, body) = c
            .raw(t, b"\x01\x02garbage".to_vec())
            .await
            .expect("an undecodable request gets a reply");
        assert_eq!((s.code, env.correlation_id.as_str()), (400, ""));
        assert!(s.reason.unwrap().starts_with("undecodable"));
        assert_eq!(body, Response::empty(t));
    }
    let env = Envelope {
        correlation_id: "c-cut".into(),
        timestamp: now_ms(),
        timeout: 0,
    };
    let mut cut = encode_request(
        &env,
        &Request::TokenValidation {
            app_name: "demo".into(),
            token: "tok-2".into(),
        },
    )
    .unwrap();
    cut.truncate(cut.len() - 2);
    let (env, s, body) = c.raw(RequestType::TokenValidation, cut).await.unwrap();
    assert_eq!((env.correlation_id.as_str(), s.code), ("c-cut", 400));
    assert_eq!(body, no_ids());

    // Without a reply subject: dropped and counted.
    let payload = encode_request(
        &Envelope {
            correlation_id: "c-no-reply".into(),
            timestamp: now_ms(),
            timeout: 0,
        },
        &Request::TokenValidation {
            app_name: "demo".into(),
            token: "tok-2".into(),
        },
    )
    .unwrap();
    c.nats
        .publish(
            request_subject(&instance, RequestType::TokenValidation),
            payload.into(),
        )
        .await
        .unwrap();
    c.nats.flush().await.unwrap();
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let m = app.metrics().await;
            let dropped = m.lines().any(|l| {
                l.starts_with("epr_ecap_dropped_total") && l.contains("\"no-reply-subject\"")
            });
            let answered = m.lines().any(|l| {
                l.starts_with("epr_ecap_requests_total")
                    && l.contains("ep-token-request")
                    && l.contains("\"403\"")
            });
            if dropped && answered {
                Ok(())
            } else {
                Err(format!("16/ECAP requests are not counted:\n{m}"))
            }
        },
    )
    .await;
    // The dropped request activated nothing.
    assert_eq!(tokens(&app, "ep-2").await[0]["status"], "Inactive");
    app.stop().await;
}

#[tokio::test]
async fn status_transitions_by_token_value() {
    let instance = unique_instance("et");
    let (app, c) = spawn(&instance).await;
    register(&app, "ep-1", "tok-1").await;

    assert_eq!(c.transition("demo", "tok-1", "Suspended").await, Status::OK);
    assert_eq!(status_of(&app, "ep-1").await, "Suspended");
    // Already in the target status: 200, unchanged.
    assert_eq!(c.transition("demo", "tok-1", "Suspended").await, Status::OK);
    // Any letter case (16/ECAP does not spell the values).
    assert_eq!(c.transition("demo", "tok-1", "active").await, Status::OK);
    assert_eq!(status_of(&app, "ep-1").await, "Active");
    let s = c.transition("demo", "tok-1", "Paused").await;
    assert_eq!(s.code, 400);
    assert!(s.reason.unwrap().contains("targetStatus"));
    let s = c.transition("demo", "tok-1", "Inactive").await;
    assert_eq!(s.code, 409);
    assert_eq!(status_of(&app, "ep-1").await, "Active");
    assert_eq!(c.transition("demo", "tok-1", "REVOKED").await, Status::OK);
    assert_eq!(status_of(&app, "ep-1").await, "Revoked");
    // Revocation is final; revoking again is answered 200.
    assert_eq!(c.transition("demo", "tok-1", "Active").await.code, 409);
    assert_eq!(c.transition("demo", "tok-1", "Revoked").await, Status::OK);
    // Unknown token, wrong application, malformed values.
    assert_eq!(c.transition("demo", "nope", "Active").await.code, 404);
    assert_eq!(c.transition("other", "tok-1", "Revoked").await.code, 404);
    assert_eq!(c.transition("demo", "a.b", "Active").await.code, 400);
    assert_eq!(c.transition("Bad", "tok-1", "Active").await.code, 400);
    app.stop().await;
}

async fn status_of(app: &TestApp, ep: &str) -> Value {
    tokens(app, ep).await[0]["status"].clone()
}

#[tokio::test]
async fn token_events_are_published_with_the_avsc_shapes() {
    let instance = unique_instance("ev");
    let nats = shared_client().await;
    let mut events = nats
        .subscribe(format!("kaa.v1.events.{instance}.endpoint.token.>"))
        .await
        .unwrap();
    let mut lifecycle = nats
        .subscribe(format!("kaa.v1.events.{instance}.endpoint.lifecycle.>"))
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let (app, c) = spawn(&instance).await;

    // The registration's token is announced by `registered`, not by a token event.
    register(&app, "ep-1", "tok-1").await;
    let reg = collect(&mut lifecycle, 1, Duration::from_secs(5)).await;
    assert_eq!(reg[0].kind(), "lifecycle.registered");
    let first = tokens(&app, "ep-1").await[0]["endpointTokenId"]
        .as_str()
        .unwrap()
        .to_owned();

    // A token issued later: status-changed without a previous status.
    let r = app
        .api(Method::POST, "/endpoints/ep-1/tokens")
        .header("content-type", "application/json")
        .header("x-request-id", "req-issue-1")
        .body(json!({"applicationName": "demo", "token": "tok-2"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let second = r.json::<Value>().await.unwrap()["endpointTokenId"]
        .as_str()
        .unwrap()
        .to_owned();
    // Activated by its first validation, then suspended and revoked over REST.
    assert_eq!(c.validate("demo", "tok-1").await.0, Status::OK);
    rest_status(&app, "ep-1", &first, "Suspended").await;
    rest_status(&app, "ep-1", &second, "Revoked").await;
    // A third token; unregistration revokes every token not yet revoked (first and third).
    let r = app
        .send_json(
            Method::POST,
            "/endpoints/ep-1/tokens",
            &json!({"applicationName": "demo"}),
        )
        .await;
    let third = r.json::<Value>().await.unwrap()["endpointTokenId"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .api(Method::DELETE, "/endpoints/ep-1")
        .header("x-request-id", "req-unregister-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    let got = collect(&mut events, 6, Duration::from_secs(10)).await;
    let kinds: Vec<String> = got.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        [
            "token.status-changed", // second issued
            "token.status-changed", // first activated
            "token.status-changed", // first suspended
            "token.revoked",        // second revoked
            "token.status-changed", // third issued
            "token.revoked",        // unregistration
        ]
    );
    for e in &got {
        assert_eq!(e.str("appName"), "demo");
        assert_eq!(e.str("endpointId"), "ep-1");
        assert_eq!(e.str("originatorReplicaId"), "replica-1");
        assert_eq!(e.long("timeout"), 0);
        assert!(e.long("timestamp") > 0);
        assert!(e.subject.starts_with(&format!("kaa.v1.events.{instance}.")));
    }
    let change = |e: &crate::nats_support::Event| {
        (
            e.str("tokenId"),
            e.opt_str("previousStatus"),
            e.str("status"),
        )
    };
    assert_eq!(change(&got[0]), (second.clone(), None, "Inactive".into()));
    assert_eq!(got[0].str("correlationId"), "req-issue-1");
    assert_eq!(
        change(&got[1]),
        (first.clone(), Some("Inactive".into()), "Active".into())
    );
    assert_eq!(
        change(&got[2]),
        (first.clone(), Some("Active".into()), "Suspended".into())
    );
    assert_eq!(got[3].strings("tokenIds"), vec![second.clone()]);
    assert_eq!(change(&got[4]), (third.clone(), None, "Inactive".into()));
    let mut revoked = got[5].strings("tokenIds");
    revoked.sort();
    let mut expected = vec![first.clone(), third.clone()];
    expected.sort();
    assert_eq!(revoked, expected, "every usable token of the endpoint");
    assert_eq!(got[5].str("correlationId"), "req-unregister-1");
    // The unregistration's lifecycle event comes too; nothing else follows.
    let un = collect(&mut lifecycle, 1, Duration::from_secs(5)).await;
    assert_eq!(un[0].kind(), "lifecycle.unregistered");
    assert!(collect(&mut events, 1, Duration::from_millis(300))
        .await
        .is_empty());
    app.stop().await;
}

#[tokio::test]
async fn tenants_are_served_apart_by_instance_name() {
    let alpha = unique_instance("ea");
    let beta = format!("{alpha}-beta");
    let app = spawn_on_nats(&shared_url(), &alpha, |s| {
        s.tenant.default = "alpha".into();
        for id in ["alpha", "beta"] {
            s.auth.tenants.push(epr_auth::TenantSettings {
                id: id.into(),
                issuer: format!("https://issuer.invalid/{id}"),
                ..Default::default()
            });
        }
    })
    .await;
    wait_nats(&app, "UP").await;
    let nats = shared_client().await;
    // The same endpoint ID and token value in both tenants.
    for t in ["alpha", "beta"] {
        app.registry
            .register(
                &TenantId::parse(t).unwrap(),
                RegisterInput {
                    endpoint_id: Some("ep-1".into()),
                    app_version: "demo-v1".into(),
                    metadata: None,
                    token: Some("shared-token".into()),
                },
                "seed",
            )
            .await
            .unwrap();
    }
    let status_in = |t: &'static str| {
        let registry = app.registry.clone();
        async move {
            let page = registry
                .list_tokens(
                    &TenantId::parse(t).unwrap(),
                    &EndpointId::parse("ep-1").unwrap(),
                    &TokenListQuery::default(),
                    PageRequest {
                        offset: 0,
                        limit: 10,
                        after: None,
                    },
                )
                .await
                .unwrap();
            (page.items[0].id.to_string(), page.items[0].status)
        }
    };
    let (beta_id, _) = status_in("beta").await;
    let (alpha_id, _) = status_in("alpha").await;
    let in_beta = Client {
        nats: nats.clone(),
        instance: beta.clone(),
    };
    let in_alpha = Client {
        nats,
        instance: alpha.clone(),
    };
    // Validated in beta: beta's token is resolved and activated, alpha's is untouched.
    let (s, body) = in_beta.validate("demo", "shared-token").await;
    assert_eq!((s, body), (Status::OK, ids_of(&beta_id, "ep-1")));
    assert_eq!(status_in("beta").await.1, TokenStatus::Active);
    assert_eq!(status_in("alpha").await.1, TokenStatus::Inactive);
    // Suspended in alpha: beta's stays Active.
    assert_eq!(
        in_alpha
            .transition("demo", "shared-token", "Suspended")
            .await,
        Status::OK
    );
    assert_eq!(
        status_in("alpha").await,
        (alpha_id.clone(), TokenStatus::Suspended)
    );
    assert_eq!(status_in("beta").await.1, TokenStatus::Active);
    let (s, body) = in_alpha.validate("demo", "shared-token").await;
    assert_eq!((s.code, body), (403, ids_of(&alpha_id, "ep-1")));
    assert_eq!(in_beta.validate("demo", "shared-token").await.0, Status::OK);
    app.stop().await;
}
