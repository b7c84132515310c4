//! Authentication end to end through the running server: loopback issuers (`TestIssuer`) and
//! a real OpenID provider sign the tokens, every refusal is checked on the wire (status,
//! body, `WWW-Authenticate`) and against the store, keys rotate, and the Tenant Manager and
//! 21/TLE events on a real nats-server add and remove tenants.

use crate::auth_support::{
    assert_forbidden, assert_invalid_token, assert_no_token, kid_of, publish_tenant_event,
    spawn_auth, OidcProvider, ADMIN_SCOPES,
};
use crate::child::free_port;
use crate::helpers::{poll, TestApp};
use crate::nats_support::{spawn_on_nats, unique_instance, wait_nats, Event, PrivateNats};
use epr_auth::testkit::{tm_tenant, TestIssuer, TestKey, TestTenantManager};
use epr_core::ids::{EndpointId, TenantId};
use epr_core::query::{EndpointQuery, PageRequest};
use epr_events::tenant::TenantEventKind;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

/// Endpoints stored in a tenant, read through the app's use cases (no token).
async fn stored(app: &TestApp, t: &str) -> Vec<String> {
    let page = PageRequest::new(0, 1000);
    let mut ids: Vec<String> = app
        .registry
        .list(&tenant(t), &EndpointQuery::default(), page)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    ids.sort();
    ids
}

fn register_body(id: &str) -> Value {
    json!({"endpointId": id, "appVersion": {"name": "demo-v1"}, "metadata": {"k": id}})
}

/// `POST /endpoints` registering `id`, with these `Authorization` headers.
async fn post_with_headers(app: &TestApp, id: &str, headers: &[&str]) -> reqwest::Response {
    let mut rb = app
        .api(Method::POST, "/endpoints")
        .header("content-type", "application/json")
        .body(register_body(id).to_string());
    for h in headers {
        rb = rb.header("authorization", *h);
    }
    rb.send().await.unwrap()
}

/// A `POST /endpoints` of `refused-<n>` with `token`.
async fn post_as(app: &TestApp, token: &str, id: &str) -> reqwest::Response {
    app.send_as(token, Method::POST, "/endpoints", &register_body(id))
        .await
}

/// Sends every token at once; each is refused for its unknown `kid`.
async fn flood(app: &TestApp, tokens: &[String]) {
    futures_util::future::join_all(tokens.iter().map(|token| async move {
        let r = app.get_as(token, "/endpoints/e1").await;
        assert_invalid_token(r, "unknown signing key").await;
    }))
    .await;
}

/// Every refusal of a token, through HTTP: status, body and challenge, and nothing stored.
#[tokio::test]
async fn every_rejection_through_http() {
    let acme = TestIssuer::start(&[TestKey::Rsa1, TestKey::Ec1]).await;
    let beta = TestIssuer::start(&[TestKey::Rsa2]).await;
    let stranger = TestIssuer::start(&[TestKey::Ed1]).await;
    let app = spawn_auth(&[("acme", acme.url()), ("beta", beta.url())], |s| {
        s.auth.jwks_min_refetch_secs = 3;
    })
    .await;
    let admin = |iss: &TestIssuer, key: TestKey| iss.token(key).roles(&["endpoint-admin"]);

    // The baseline: each tenant's admin registers `e1` in its own tenant.
    let acme_admin = admin(&acme, TestKey::Rsa1).sign();
    let beta_admin = admin(&beta, TestKey::Rsa2).sign();
    for (token, t) in [(&acme_admin, "acme"), (&beta_admin, "beta")] {
        let r = app
            .send_as(
                token,
                Method::POST,
                "/endpoints",
                &json!({"endpointId": "e1", "appVersion": {"name": "demo-v1"},
                        "metadata": {"owner": t}}),
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
    }
    // An ES256 key of the same issuer works too; each token sees its own tenant.
    let r = app
        .get_as(&admin(&acme, TestKey::Ec1).sign(), "/endpoints/e1/metadata")
        .await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"owner": "acme"}));
    let r = app.get_as(&beta_admin, "/endpoints/e1/metadata").await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"owner": "beta"}));

    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("refused-{n}")
    };

    // No token; malformed headers.
    assert_no_token(post_with_headers(&app, &next_id(), &[]).await).await;
    for (headers, reason) in [
        (
            vec!["Basic dXNlcjpwdw=="],
            "the Authorization scheme must be Bearer",
        ),
        (
            vec!["Bearer a b"],
            "the Authorization header is not 'Bearer <token>'",
        ),
        (
            vec!["Bearer"],
            "the Authorization header is not 'Bearer <token>'",
        ),
        (
            vec![&*format!("Bearer {acme_admin}"), "Bearer other"],
            "more than one Authorization header",
        ),
        (vec!["Bearer not-a-jwt"], "the access token is malformed"),
    ] {
        let r = post_with_headers(&app, &next_id(), &headers).await;
        assert_invalid_token(r, reason).await;
    }

    // Refused tokens, each for its reason.
    let hs256 = acme
        .token(TestKey::Rsa1)
        .roles(&["endpoint-admin"])
        .sign_hs256(TestKey::Rsa1.public_pem().as_bytes());
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            admin(&acme, TestKey::Rsa1).exp_in(-120).sign(),
            "the access token has expired",
        ),
        (
            "not yet valid",
            admin(&acme, TestKey::Rsa1).nbf_in(300).sign(),
            "the access token is not valid yet (nbf)",
        ),
        (
            "no expiry",
            admin(&acme, TestKey::Rsa1).without("exp").sign(),
            "the access token has no expiry (exp)",
        ),
        (
            "wrong audience",
            admin(&acme, TestKey::Rsa1)
                .aud(json!(["another-service"]))
                .sign(),
            "the access token is not meant for this service (aud)",
        ),
        // A known issuer's key (acme's) with another known issuer (beta): beta's keys do
        // not have it, or (with beta's kid) the signature does not verify.
        (
            "wrong issuer",
            admin(&acme, TestKey::Rsa1).iss(beta.url()).sign(),
            "unknown signing key",
        ),
        (
            "wrong issuer, borrowed kid",
            admin(&acme, TestKey::Rsa1)
                .iss(beta.url())
                .kid(Some(TestKey::Rsa2.kid()))
                .sign(),
            "bad signature",
        ),
        (
            "unknown issuer",
            stranger
                .token(TestKey::Ed1)
                .roles(&["endpoint-admin"])
                .sign(),
            "unknown issuer",
        ),
        (
            "alg none",
            admin(&acme, TestKey::Rsa1).sign_none(),
            "the token algorithm none is not accepted",
        ),
        (
            "HS256 signed with the public key",
            hs256,
            "the token algorithm HS256 is not accepted",
        ),
    ];
    for (case, token, reason) in &cases {
        let r = post_as(&app, token, &next_id()).await;
        let body = assert_invalid_token(r, reason).await;
        assert!(
            !body.to_string().contains(token.as_str()),
            "{case}: the token is echoed"
        );
        // A refused token reads nothing either.
        let r = app.get_as(token, "/endpoints/e1").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{case}");
    }
    assert_eq!(
        stranger.jwks_requests() + stranger.discovery_requests(),
        0,
        "an unknown issuer is never asked for anything"
    );

    // A flood of tokens with random `kid`s: at most one refetch per interval. The tokens
    // are signed beforehand (RSA signing is slow in a debug build); the interval of the
    // last fetch is waited out first, so exactly one refetch is allowed.
    let floods: Vec<Vec<String>> = (0..2)
        .map(|round| {
            (0..40)
                .map(|i| {
                    let kid = format!("random-{round}-{i}-{}", uuid::Uuid::new_v4());
                    admin(&acme, TestKey::Rsa1).kid(Some(&kid)).sign()
                })
                .collect()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (jwks0, disc0) = (acme.jwks_requests(), acme.discovery_requests());
    let t0 = Instant::now();
    flood(&app, &floods[0]).await;
    assert_eq!(
        (
            acme.jwks_requests() - jwks0,
            acme.discovery_requests() - disc0
        ),
        (1, 0),
        "40 unknown kids cost the issuer one JWKS request (the jwks_uri is remembered)"
    );
    flood(&app, &floods[1]).await;
    // (Only meaningful within the interval: on a very slow machine a second one is allowed.)
    let allowed = if t0.elapsed() < Duration::from_secs(3) {
        1
    } else {
        2
    };
    assert!(
        acme.jwks_requests() - jwks0 <= allowed,
        "within the interval, no more requests: {} in {:?}",
        acme.jwks_requests() - jwks0,
        t0.elapsed()
    );

    // A valid token without the scope: 403 naming it; its reads still work.
    let reader = acme.token(TestKey::Rsa1).scope("endpoint:read").sign();
    let body = assert_forbidden(
        post_as(&app, &reader, &next_id()).await,
        "application:endpoint:create",
    )
    .await;
    // Held nowhere: refused before the body (and its application) is read.
    assert_eq!(
        body["message"],
        "the access token lacks the scope application:endpoint:create on tenant-system"
    );
    assert_forbidden(
        app.api_as(&reader, Method::DELETE, "/endpoints/e1")
            .send()
            .await
            .unwrap(),
        "endpoint:delete",
    )
    .await;
    assert_forbidden(
        app.send_as(&reader, Method::PUT, "/endpoints/e1/metadata/k", &json!(1))
            .await,
        "endpoint:update",
    )
    .await;
    assert_eq!(
        app.get_as(&reader, "/endpoints/e1").await.status(),
        StatusCode::OK
    );

    // Nothing refused was stored, in any tenant; e1 kept its metadata.
    assert_eq!(stored(&app, "acme").await, ["e1"]);
    assert_eq!(stored(&app, "beta").await, ["e1"]);
    assert_eq!(stored(&app, "kaa").await, Vec::<String>::new());
    let e1 = app
        .registry
        .get(&tenant("acme"), &EndpointId::parse("e1").unwrap())
        .await
        .unwrap();
    assert_eq!(e1.metadata.to_value(), json!({"owner": "acme"}));
    // Counted by outcome.
    let m = app.metrics().await;
    assert!(
        m.contains("epr_auth_tokens_total{outcome=\"invalid\"}"),
        "{m}"
    );
    app.stop().await;
}

/// An issuer that cannot be reached before its keys were ever loaded: 503 with
/// `Retry-After` (not 401: the token may be fine), nothing stored; served once it is back.
#[tokio::test]
async fn an_unreachable_issuer_answers_503_until_its_keys_load() {
    let issuer = TestIssuer::start(&[TestKey::Rsa1]).await;
    issuer.set_available(false);
    let app = spawn_auth(&[("acme", issuer.url())], |s| {
        s.auth.jwks_min_refetch_secs = 1;
    })
    .await;
    let token = issuer
        .token(TestKey::Rsa1)
        .roles(&["endpoint-admin"])
        .sign();
    for r in [
        post_as(&app, &token, "e1").await,
        app.get_as(&token, "/endpoints").await,
    ] {
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
        assert!(!r.headers().contains_key("www-authenticate"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], 503, "{body}");
        assert_eq!(
            body["message"], "the access token cannot be checked now; retry later",
            "{body}"
        );
    }
    let health = app.get_json("/health/ready").await;
    assert_eq!(health["components"]["auth"]["status"], "DOWN", "{health}");
    assert_eq!(stored(&app, "acme").await, Vec::<String>::new());

    issuer.set_available(true);
    poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            match post_as(&app, &token, "e1").await.status() {
                StatusCode::CREATED => Ok(()),
                s => Err(format!("still {s} after the issuer came back")),
            }
        },
    )
    .await;
    assert_eq!(stored(&app, "acme").await, ["e1"]);
    app.stop().await;
}

/// A real OpenID provider: tokens from a client credentials grant drive endpoints and
/// filters; the reader's token reads only; the signing key rotates (k1 → k2,k1 → k2).
#[tokio::test]
async fn real_openid_provider_with_key_rotation() {
    let keys = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut op = OidcProvider::start(keys.path(), port, "k1");
    let issuer = op.issuer();
    let app = spawn_auth(&[("acme", &issuer)], |s| {
        // Short, so that a key's removal is seen within a second (see the end).
        s.auth.jwks_refresh_secs = 1;
        s.auth.jwks_min_refetch_secs = 1;
    })
    .await;
    let admin = op.token("epr-admin", ADMIN_SCOPES).await;
    let reader = op.token("epr-reader", "endpoint:read").await;
    assert_eq!(kid_of(&admin), "k1");

    // Endpoints: register, read, update, patch, delete.
    for id in ["d1", "d2"] {
        let r = post_as(&app, &admin, id).await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
    }
    let r = app
        .send_as(
            &admin,
            Method::PUT,
            "/endpoints/d1/metadata/level",
            &json!(7),
        )
        .await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let r = app
        .api_as(&admin, Method::PATCH, "/endpoints/d1/metadata")
        .header("content-type", "application/json-patch+json")
        .body(json!([{"op": "add", "path": "/city", "value": "Kyiv"}]).to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let r = app.get_as(&admin, "/endpoints/d1/metadata").await;
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"k": "d1", "level": 7, "city": "Kyiv"})
    );
    let r = app
        .api_as(&admin, Method::DELETE, "/endpoints/d2")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    // A filter, and the endpoints it matches.
    let r = app
        .send_as(
            &admin,
            Method::POST,
            "/applications/demo/filters",
            &json!({"name": "kyiv", "mongoQuery": {"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}}),
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let filter = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let members = poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let r = app
                .get_as(
                    &admin,
                    &format!("/endpoints?filterId={filter}&applicationName=demo"),
                )
                .await;
            match r.status() {
                StatusCode::OK => Ok(r.json::<Value>().await.unwrap()),
                s => Err(format!("listing by the filter: {s}")),
            }
        },
    )
    .await;
    assert_eq!(members["totalElements"], 1, "{members}");
    assert_eq!(members["content"][0]["endpointId"], "d1", "{members}");

    // The reader reads, and is refused every write.
    assert_eq!(
        app.get_as(&reader, "/endpoints/d1").await.status(),
        StatusCode::OK
    );
    let r = app.get_as(&reader, "/endpoints").await;
    assert_eq!(r.json::<Value>().await.unwrap()["totalElements"], 1);
    assert_forbidden(
        post_as(&app, &reader, "r1").await,
        "application:endpoint:create",
    )
    .await;
    assert_forbidden(
        app.send_as(
            &reader,
            Method::PUT,
            "/endpoints/d1/metadata/level",
            &json!(0),
        )
        .await,
        "endpoint:update",
    )
    .await;
    assert_forbidden(
        app.api_as(&reader, Method::DELETE, "/endpoints/d1")
            .send()
            .await
            .unwrap(),
        "endpoint:delete",
    )
    .await;
    assert_forbidden(
        app.get_as(&reader, "/applications/demo/filters").await,
        "application:endpoint-filter:read",
    )
    .await;
    assert_eq!(stored(&app, "acme").await, ["d1"]);

    // Rotation, step 1: k2 signs, k1 is still published. A k2 token is accepted once EPR
    // has refetched the keys (its unknown kid triggers it); the k1 token still works.
    op.stop();
    op.restart("k2,k1");
    let admin2 = op.token("epr-admin", ADMIN_SCOPES).await;
    assert_eq!(kid_of(&admin2), "k2");
    poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            match app.get_as(&admin2, "/endpoints/d1").await.status() {
                StatusCode::OK => Ok(()),
                s => Err(format!("the k2 token is still refused: {s}")),
            }
        },
    )
    .await;
    assert_eq!(
        app.get_as(&admin, "/endpoints/d1").await.status(),
        StatusCode::OK
    );

    // Step 2: k1 is no longer published. Within a refresh interval (1 s) the k1 token
    // (verified and cached before) is refused; the k2 token is not.
    op.stop();
    op.restart("k2");
    let started = Instant::now();
    let body = poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let r = app.get_as(&admin, "/endpoints/d1").await;
            match r.status() {
                StatusCode::UNAUTHORIZED => {
                    Ok(assert_invalid_token(r, "unknown signing key").await)
                }
                s => Err(format!("the k1 token is still accepted: {s}")),
            }
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused after {:?}: {body}",
        started.elapsed()
    );
    assert_eq!(
        app.get_as(&admin2, "/endpoints/d1").await.status(),
        StatusCode::OK
    );
    let r = app
        .api_as(&admin2, Method::DELETE, "/endpoints/d1")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(stored(&app, "acme").await, Vec::<String>::new());
    app.stop().await;
    drop(op);
}

/// The Tenant Manager (paged) and 21/TLE events on a real nats-server: a tenant listed
/// later is usable after an `updated` event, an `unregistered` one is refused at once (its
/// cached tokens too) and its data purged with events; one the Tenant Manager stops listing
/// is refused after an `updated` event, its data kept. Other tenants are unaffected.
#[tokio::test]
async fn tenant_manager_and_lifecycle_events_add_and_remove_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let server = PrivateNats::start(dir.path());
    let nats = server.client().await;
    let mut issuers = Vec::new();
    // t1..t4 from the Tenant Manager; the fifth for `cfg`, a configured tenant.
    for _ in 0..5 {
        issuers.push(TestIssuer::start(&[TestKey::Rsa1]).await);
    }
    let ids = ["t1", "t2", "t3", "t4"];
    let listed = |which: &[usize]| -> Vec<Value> {
        which
            .iter()
            .map(|&i| tm_tenant(ids[i], issuers[i].url(), "AVAILABLE"))
            .collect()
    };
    let tm = TestTenantManager::start().await;
    // t4 exists but its realm is not ready: not used.
    let mut first = listed(&[0, 1, 2]);
    first.push(tm_tenant("t4", issuers[3].url(), "CREATING"));
    tm.set_tenants(first);
    let instance = unique_instance("ae");
    let mut t3_events = nats
        .subscribe(format!("kaa.v1.events.{instance}-t3.>"))
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let tm_url = tm.url();
    let cfg_issuer = issuers[4].url().to_owned();
    let app = spawn_on_nats(&server.url(), &instance, move |s| {
        s.auth.tenants = vec![crate::auth_support::tenant("cfg", &cfg_issuer)];
        s.auth.tenant_manager.url = tm_url;
        s.auth.tenant_manager.page_size = 2;
        // Far away: every change below comes from an event, not from the periodic read.
        s.auth.tenant_manager.refresh_secs = 3600;
        s.auth.removed_tenant_data = "purge".into();
    })
    .await;
    wait_nats(&app, "UP").await;
    let token: Vec<String> = issuers
        .iter()
        .map(|i| i.token(TestKey::Rsa1).roles(&["endpoint-admin"]).sign())
        .collect();
    let status_of = |i: usize| {
        let (app, token) = (&app, &token);
        async move { app.get_as(&token[i], "/endpoints").await.status() }
    };
    poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            match status_of(0).await {
                StatusCode::OK => Ok(()),
                s => Err(format!("t1 not usable: {s}")),
            }
        },
    )
    .await;
    assert!(
        tm.limits_seen().iter().all(|&l| l == 2),
        "{:?}",
        tm.limits_seen()
    );
    assert!(tm.requests() >= 2, "4 tenants in pages of 2");
    for (i, id) in ids.iter().enumerate().take(3) {
        let r = post_as(&app, &token[i], &format!("ep-{id}")).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{id}");
    }
    assert_invalid_token(app.get_as(&token[3], "/endpoints").await, "unknown issuer").await;

    // t4 becomes AVAILABLE; the `updated` event makes EPR read the list now. (Published
    // again if the listener's subscription was not in place yet.)
    tm.set_tenants(listed(&[0, 1, 2, 3]));
    let started = Instant::now();
    'usable: {
        for _ in 0..5 {
            publish_tenant_event(&nats, TenantEventKind::Updated, "t4").await;
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                if status_of(3).await == StatusCode::OK {
                    break 'usable;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("t4 never became usable after `updated` events");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    let r = post_as(&app, &token[3], "ep-t4").await;
    assert_eq!(r.status(), StatusCode::CREATED);

    // t3 is deleted in the Tenant Manager and unregistered: its token (cached: it was just
    // used) is refused at once, with its own reason; its data is purged, with events.
    tm.set_tenants(listed(&[0, 1, 3]));
    publish_tenant_event(&nats, TenantEventKind::Unregistered, "t3").await;
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let r = app.get_as(&token[2], "/endpoints").await;
            match r.status() {
                StatusCode::UNAUTHORIZED => {
                    Ok(assert_invalid_token(r, "tenant unregistered").await)
                }
                s => Err(format!("t3 still served: {s}")),
            }
        },
    )
    .await;
    let ev = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let m = t3_events.next().await.unwrap();
            if m.subject.ends_with(".endpoint.lifecycle.unregistered") {
                return Event::from_message(&m.subject, &m.payload);
            }
        }
    })
    .await
    .expect("t3's endpoint is unregistered by the purge");
    assert_eq!(ev.str("endpointId"), "ep-t3");
    assert_eq!(ev.str("correlationId"), "purge-tenant-t3");
    poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let left = stored(&app, "t3").await;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("t3 still has {left:?}"))
            }
        },
    )
    .await;

    // t2 disappears from the Tenant Manager's list (no `unregistered`): after an `updated`
    // event its tokens are refused as of an unknown issuer, and its data is kept.
    tm.set_tenants(listed(&[0, 3]));
    publish_tenant_event(&nats, TenantEventKind::Updated, "t2").await;
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let r = app.get_as(&token[1], "/endpoints").await;
            match r.status() {
                StatusCode::UNAUTHORIZED => Ok(assert_invalid_token(r, "unknown issuer").await),
                s => Err(format!("t2 still served: {s}")),
            }
        },
    )
    .await;
    assert_eq!(stored(&app, "t2").await, ["ep-t2"]);

    // A configured tenant: `unregistered` removes it (no Tenant Manager read brings it
    // back); an `updated` event naming it restores it.
    assert_eq!(status_of(4).await, StatusCode::OK);
    publish_tenant_event(&nats, TenantEventKind::Unregistered, "cfg").await;
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let r = app.get_as(&token[4], "/endpoints").await;
            match r.status() {
                StatusCode::UNAUTHORIZED => {
                    Ok(assert_invalid_token(r, "tenant unregistered").await)
                }
                s => Err(format!("cfg still served: {s}")),
            }
        },
    )
    .await;
    publish_tenant_event(&nats, TenantEventKind::Updated, "cfg").await;
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            match status_of(4).await {
                StatusCode::OK => Ok(()),
                s => Err(format!("cfg not restored: {s}")),
            }
        },
    )
    .await;

    // The others were never disturbed.
    for (i, id) in [(0, "t1"), (3, "t4")] {
        let r = app.get_as(&token[i], &format!("/endpoints/ep-{id}")).await;
        assert_eq!(r.status(), StatusCode::OK, "{id}");
    }
    assert_eq!(stored(&app, "t1").await, ["ep-t1"]);
    app.stop().await;
}

/// `epr check-config` and the server's log (the `EPR starting` summary included) never
/// show the Tenant Manager's client secret or credentials in URLs, though the secret is
/// used (the service-account token is fetched with it).
#[tokio::test]
async fn secrets_are_never_printed() {
    const SECRET: &str = "tm-client-s3cret";
    const URL_PASSWORD: &str = "url-pa55word";
    let issuer = TestIssuer::start(&[TestKey::Rsa1]).await;
    let tm = TestTenantManager::start().await;
    tm.set_tenants(vec![tm_tenant("acme", issuer.url(), "AVAILABLE")]);
    tm.require_bearer_prefix(Some("Bearer svc-"));
    let dir = tempfile::tempdir().unwrap();
    let nats_url = format!("nats://natsuser:{URL_PASSWORD}@127.0.0.1:{}", free_port());
    let env = [
        ("EPR_APPLICATIONS", "demo:demo-v1".to_owned()),
        ("EPR__AUTH__TENANT_MANAGER__URL", tm.url()),
        ("EPR__AUTH__TENANT_MANAGER__TOKEN_URL", issuer.token_url()),
        ("EPR__AUTH__TENANT_MANAGER__CLIENT_ID", "epr-service".into()),
        ("EPR__AUTH__TENANT_MANAGER__CLIENT_SECRET", SECRET.into()),
        ("EPR__NATS__URL", nats_url),
    ];

    // Credentials in an issuer URL are refused, without being echoed.
    let mut check = crate::child::EprCommand::new(dir.path())
        .arg("check-config")
        .envs(env.clone())
        .env(
            "EPR_AUTH_TENANTS",
            format!("beta=http://user:{URL_PASSWORD}@127.0.0.1:1/realms/beta"),
        )
        .capture_output()
        .spawn();
    let status = check
        .wait_exit(Duration::from_secs(30))
        .expect("check-config exits");
    let out = check.finish_output();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("auth.tenants[0].issuer: must not contain user information"),
        "{out}"
    );
    assert!(!out.contains(URL_PASSWORD), "{out}");

    let mut check = crate::child::EprCommand::new(dir.path())
        .arg("check-config")
        .envs(env.clone())
        .capture_output()
        .spawn();
    let status = check
        .wait_exit(Duration::from_secs(30))
        .expect("check-config exits");
    let out = check.finish_output();
    assert!(status.success(), "{out}");
    for secret in [SECRET, URL_PASSWORD] {
        assert!(
            !out.contains(secret),
            "check-config printed {secret}: {out}"
        );
    }
    let json_start = out.find('{').expect("JSON");
    let printed: Value = serde_json::from_str(&out[json_start..]).expect(&out);
    let tm_printed = &printed["auth"]["tenant_manager"];
    assert_eq!(tm_printed["client_secret"], "***", "{printed}");
    assert_eq!(tm_printed["client_id"], "epr-service", "{printed}");
    assert!(
        printed["nats"]["url"]
            .as_str()
            .unwrap()
            .starts_with("nats://***@127.0.0.1:"),
        "{printed}"
    );

    // The server: it starts, reads the Tenant Manager with a token fetched with the
    // secret, serves acme's tokens, and logs neither the secret nor the passwords.
    let mut epr = crate::child::EprCommand::new(dir.path())
        .envs(env)
        .capture_output()
        .start()
        .await;
    let token = issuer
        .token(TestKey::Rsa1)
        .roles(&["endpoint-admin"])
        .sign();
    let client = reqwest::Client::new();
    poll(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            let r = client
                .get(epr.url("/api/v1/endpoints"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            match r.status() {
                StatusCode::OK => Ok(()),
                s => Err(format!("acme's token: {s}")),
            }
        },
    )
    .await;
    assert!(
        issuer.token_requests() >= 1,
        "the service account token was fetched"
    );
    let health = client
        .get(epr.url("/health"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    epr.terminate();
    let log = epr.finish_output();
    assert!(log.contains("EPR starting"), "{log}");
    for secret in [SECRET, URL_PASSWORD] {
        assert!(!log.contains(secret), "the log shows {secret}: {log}");
        assert!(!health.contains(secret), "/health shows {secret}: {health}");
    }
}
