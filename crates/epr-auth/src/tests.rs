//! Behaviour of [`Auth`] against the testkit's real loopback issuer and Tenant Manager.

use crate::testkit::{tm_tenant, TestIssuer, TestKey, TestTenantManager};
use crate::{Auth, AuthSettings, TenantSettings};
use epr_core::auth::{AuthError, Authenticator, Scope, ScopeSet, TenantControl};
use epr_core::ids::TenantId;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn tid(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

fn settings(tenants: &[(&str, &TestIssuer)]) -> AuthSettings {
    AuthSettings {
        tenants: tenants
            .iter()
            .map(|(id, iss)| TenantSettings {
                id: id.to_string(),
                issuer: iss.url().to_owned(),
                ..Default::default()
            })
            .collect(),
        jwks_min_refetch_secs: 60,
        ..Default::default()
    }
}

fn auth(s: AuthSettings) -> Arc<Auth> {
    Auth::new(s, tid("kaa")).unwrap()
}

fn invalid(r: Result<std::sync::Arc<epr_core::auth::Principal>, AuthError>) -> String {
    match r {
        Err(AuthError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

async fn refresh_keys(a: &Auth) {
    for k in a.dir.issuers() {
        let _ = k.refresh(&a.verifier.http).await;
    }
}

/// Poll until `f` holds (background loops), at most 5 s.
async fn eventually(mut f: impl FnMut() -> bool) {
    for _ in 0..250 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached within 5 s");
}

#[tokio::test]
async fn each_accepted_algorithm_verifies_and_selects_the_tenant() {
    let iss = TestIssuer::start(&[TestKey::Rsa1, TestKey::Ec1, TestKey::Ed1]).await;
    let a = auth(settings(&[("acme", &iss)]));
    for key in [TestKey::Rsa1, TestKey::Ec1, TestKey::Ed1] {
        let tok = iss
            .token(key)
            .subject("dev-1")
            .scope("endpoint:read")
            .sign();
        let p = a
            .authenticate(&tok)
            .await
            .unwrap_or_else(|e| panic!("{key:?}: {e}"));
        assert_eq!(p.tenant, tid("acme"));
        assert_eq!(p.subject.as_deref(), Some("dev-1"));
        assert_eq!(
            p.scopes,
            [Scope::EndpointRead].into_iter().collect::<ScopeSet>()
        );
        assert!(p.expires_at_ms.unwrap() > crate::testkit::now() * 1000);
    }
    // Discovery once, the JWKS once: the three keys came in one fetch.
    assert_eq!(iss.discovery_requests(), 1);
    assert_eq!(iss.jwks_requests(), 1);
}

#[tokio::test]
async fn an_algorithm_not_configured_is_refused() {
    let iss = TestIssuer::start(&[TestKey::Rsa1, TestKey::Ed1]).await;
    let mut s = settings(&[("acme", &iss)]);
    s.algorithms = vec!["RS256".into()];
    let a = auth(s);
    let m = invalid(a.authenticate(&iss.token(TestKey::Ed1).sign()).await);
    assert_eq!(m, "the token algorithm EdDSA is not accepted");
    a.authenticate(&iss.token(TestKey::Rsa1).sign())
        .await
        .unwrap();
}

#[tokio::test]
async fn time_claims_are_enforced_with_leeway() {
    let iss = TestIssuer::start(&[TestKey::Rsa1]).await;
    let mut s = settings(&[("acme", &iss)]);
    s.leeway_secs = 30;
    let a = auth(s);
    let t = || iss.token(TestKey::Rsa1);
    assert_eq!(
        invalid(a.authenticate(&t().exp_in(-60).sign()).await),
        "the access token has expired"
    );
    assert_eq!(
        invalid(a.authenticate(&t().nbf_in(120).sign()).await),
        "the access token is not valid yet (nbf)"
    );
    assert_eq!(
        invalid(a.authenticate(&t().without("exp").sign()).await),
        "the access token has no expiry (exp)"
    );
    // Within the leeway on both sides.
    a.authenticate(&t().exp_in(-10).sign()).await.unwrap();
    a.authenticate(&t().nbf_in(10).sign()).await.unwrap();
}

#[tokio::test]
async fn issuer_and_audience_are_enforced() {
    let iss = TestIssuer::start(&[TestKey::Rsa1]).await;
    let stranger = TestIssuer::start(&[TestKey::Rsa2]).await;
    let mut s = settings(&[("acme", &iss)]);
    s.tenants[0].audiences = vec!["epr".into(), "kaa-rest-api".into()];
    let a = auth(s);
    // Unknown issuer: refused without any request to it.
    let m = invalid(a.authenticate(&stranger.token(TestKey::Rsa2).sign()).await);
    assert_eq!(m, "unknown issuer");
    assert_eq!(stranger.discovery_requests() + stranger.jwks_requests(), 0);
    assert_eq!(iss.jwks_requests(), 0);
    // Another issuer's key claiming to be acme's issuer: acme's keys do not know it.
    let forged = stranger.token(TestKey::Rsa2).iss(iss.url()).sign();
    assert_eq!(
        invalid(a.authenticate(&forged).await),
        "unknown signing key"
    );
    // acme's kid, another key's signature.
    let forged = stranger
        .token(TestKey::Rsa2)
        .iss(iss.url())
        .kid(Some("rsa1"))
        .sign();
    assert_eq!(invalid(a.authenticate(&forged).await), "bad signature");
    // Missing iss.
    let m = invalid(
        a.authenticate(&iss.token(TestKey::Rsa1).without("iss").sign())
            .await,
    );
    assert_eq!(m, "the access token has no issuer (iss)");
    // Audience: one of the tenant's.
    let t = || iss.token(TestKey::Rsa1);
    assert_eq!(
        invalid(a.authenticate(&t().aud(json!("account")).sign()).await),
        "the access token is not meant for this service (aud)"
    );
    assert_eq!(
        invalid(a.authenticate(&t().without("aud").sign()).await),
        "the access token has no audience (aud)"
    );
    a.authenticate(&t().aud(json!(["account", "epr"])).sign())
        .await
        .unwrap();
}

#[tokio::test]
async fn alg_none_and_hmac_with_the_public_key_are_refused() {
    let iss = TestIssuer::start(&[TestKey::Rsa1]).await;
    let a = auth(settings(&[("acme", &iss)]));
    let t = iss.token(TestKey::Rsa1).scope("endpoint:delete");
    assert_eq!(
        invalid(a.authenticate(&t.sign_none()).await),
        "the token algorithm none is not accepted"
    );
    let hs = t.sign_hs256(TestKey::Rsa1.public_pem().as_bytes());
    assert_eq!(
        invalid(a.authenticate(&hs).await),
        "the token algorithm HS256 is not accepted"
    );
    // A JWKS that publishes a symmetric key does not make HS256 usable either.
    iss.set_jwks(vec![
        json!({"kty": "oct", "k": "c2VjcmV0", "kid": "rsa1", "alg": "HS256"}),
    ]);
    let hs = t.sign_hs256(b"secret");
    assert_eq!(
        invalid(a.authenticate(&hs).await),
        "the token algorithm HS256 is not accepted"
    );
    assert_eq!(
        invalid(a.authenticate("not.a.jwt").await),
        "the access token is malformed"
    );
    assert_eq!(
        invalid(a.authenticate("").await),
        "the access token is malformed"
    );
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval_and_share_one_fetch() {
    let iss = TestIssuer::start(&[TestKey::Rsa1]).await;
    let mut s = settings(&[("acme", &iss)]);
    s.jwks_min_refetch_secs = 1;
    let a = auth(s);
    // No keys yet: 32 concurrent first requests share one fetch.
    let tok = iss.token(TestKey::Rsa1).sign();
    let all = futures_util::future::join_all((0..32).map(|_| a.authenticate(&tok))).await;
    assert!(all.iter().all(Result::is_ok));
    assert_eq!(iss.jwks_requests(), 1);
    // Right after a fetch, an unknown kid causes none.
    let m = invalid(
        a.authenticate(&iss.token(TestKey::Rsa1).kid(Some("early")).sign())
            .await,
    );
    assert_eq!(m, "unknown signing key");
    assert_eq!(iss.jwks_requests(), 1);
    // A flood of random kids once the interval is over: one refetch for all of them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let forged: Vec<String> = (0..200)
        .map(|i| {
            iss.token(TestKey::Rsa1)
                .kid(Some(&format!("random-{i}")))
                .sign()
        })
        .collect();
    let all = futures_util::future::join_all(forged.iter().map(|t| a.authenticate(t))).await;
    for r in all {
        assert_eq!(invalid(r), "unknown signing key");
    }
    assert_eq!(iss.jwks_requests(), 2, "one refetch for the whole flood");
    // A new key published in the meantime is not fetched before the interval ends.
    iss.set_keys(&[TestKey::Rsa1, TestKey::Rsa2]);
    let m = invalid(a.authenticate(&iss.token(TestKey::Rsa2).sign()).await);
    assert_eq!(m, "unknown signing key");
    assert_eq!(iss.jwks_requests(), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.authenticate(&iss.token(TestKey::Rsa2).sign())
        .await
        .unwrap();
    assert_eq!(iss.jwks_requests(), 3);
}

#[tokio::test]
async fn a_new_key_is_fetched_on_first_use() {
    let iss = TestIssuer::start(&[TestKey::Ec1]).await;
    let mut s = settings(&[("acme", &iss)]);
    s.jwks_min_refetch_secs = 1;
    let a = auth(s);
    a.authenticate(&iss.token(TestKey::Ec1).sign())
        .await
        .unwrap();
    iss.set_keys(&[TestKey::Ec1, TestKey::Ec2]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.authenticate(&iss.token(TestKey::Ec2).sign())
        .await
        .unwrap();
    assert_eq!(iss.jwks_requests(), 2);
}

#[tokio::test]
async fn rotated_away_keys_invalidate_cached_tokens_and_failed_refreshes_keep_keys() {
    let iss = TestIssuer::start(&[TestKey::Rsa1, TestKey::Ed1]).await;
    let a = auth(settings(&[("acme", &iss)]));
    let old = iss.token(TestKey::Rsa1).sign();
    let ed = iss.token(TestKey::Ed1).sign();
    a.authenticate(&old).await.unwrap();
    a.authenticate(&ed).await.unwrap();
    // The issuer is down: the refresh fails, the keys stay.
    iss.set_available(false);
    refresh_keys(&a).await;
    a.authenticate(&iss.token(TestKey::Rsa1).subject("fresh").sign())
        .await
        .unwrap();
    assert_eq!(a.health().0, "UP");
    // Rotation: rsa1 is gone, the cached token with it is refused.
    iss.set_available(true);
    iss.set_keys(&[TestKey::Rsa2, TestKey::Ed1]);
    refresh_keys(&a).await;
    assert_eq!(invalid(a.authenticate(&old).await), "unknown signing key");
    a.authenticate(&ed).await.unwrap();
    a.authenticate(&iss.token(TestKey::Rsa2).sign())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_cache_skips_the_signature_but_not_the_expiry() {
    let iss = TestIssuer::start(&[TestKey::Rsa1]).await;
    let mut s = settings(&[("acme", &iss)]);
    s.leeway_secs = 0;
    let a = auth(s);
    let tok = iss.token(TestKey::Rsa1).exp_in(1).sign();
    a.authenticate(&tok).await.unwrap();
    assert_eq!(a.verifier.cache.len(), 1);
    // A hit: the issuer's keys are not consulted again even if it is down.
    iss.set_available(false);
    a.authenticate(&tok).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        invalid(a.authenticate(&tok).await),
        "the access token has expired"
    );
    assert_eq!(a.verifier.cache.len(), 0, "the expired entry is dropped");
    assert_eq!(iss.jwks_requests(), 1);
}

#[tokio::test]
async fn tokens_without_kid_are_tried_against_keys_of_their_algorithm() {
    let iss = TestIssuer::start(&[]).await;
    iss.set_jwks(vec![
        TestKey::Rsa1.jwk_with(false),
        TestKey::Rsa2.jwk_with(false),
        TestKey::Ec1.jwk_with(false),
    ]);
    let a = auth(settings(&[("acme", &iss)]));
    a.authenticate(&iss.token(TestKey::Rsa2).kid(None).sign())
        .await
        .unwrap();
    a.authenticate(&iss.token(TestKey::Ec1).kid(None).sign())
        .await
        .unwrap();
    let m = invalid(
        a.authenticate(&iss.token(TestKey::Ec2).kid(None).sign())
            .await,
    );
    assert_eq!(m, "bad signature");
    // The cached kid-less token is bound to its key's thumbprint: rotating it out refuses it.
    let t = iss.token(TestKey::Rsa1).kid(None).sign();
    a.authenticate(&t).await.unwrap();
    iss.set_jwks(vec![TestKey::Rsa2.jwk_with(false)]);
    refresh_keys(&a).await;
    assert_eq!(invalid(a.authenticate(&t).await), "bad signature");
}

#[tokio::test]
async fn unreachable_issuer_without_keys_is_unavailable() {
    let iss = TestIssuer::start(&[TestKey::Rsa1]).await;
    iss.set_available(false);
    let mut s = settings(&[("acme", &iss)]);
    s.jwks_min_refetch_secs = 1;
    let a = auth(s);
    let tok = iss.token(TestKey::Rsa1).sign();
    match a.authenticate(&tok).await {
        Err(AuthError::Unavailable(m)) => assert!(m.contains("HTTP 503"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Within the interval, no new attempt.
    let _ = a.authenticate(&tok).await;
    assert_eq!(iss.discovery_requests(), 1);
    assert_eq!(a.health().0, "DOWN");
    iss.set_available(true);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.authenticate(&tok).await.unwrap();
}

#[tokio::test]
async fn https_issuers_use_the_ring_provider() {
    // A plain-HTTP server behind an https URL: the TLS handshake fails (no panic about a
    // missing crypto provider), and the caller learns the keys are unavailable.
    let plain = TestIssuer::start(&[TestKey::Rsa1]).await;
    let https = plain.url().replace("http://", "https://");
    let mut s = AuthSettings::default();
    s.tenants.push(TenantSettings {
        id: "acme".into(),
        issuer: https.clone(),
        ..Default::default()
    });
    let a = auth(s);
    let tok = plain.token(TestKey::Rsa1).iss(&https).sign();
    match a.authenticate(&tok).await {
        Err(AuthError::Unavailable(m)) => {
            // rustls read the plain-HTTP answer as a TLS record.
            assert!(
                m.contains(&https) && m.contains("InvalidContentType"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn scopes_from_roles_and_uma_permissions() {
    let iss = TestIssuer::start(&[TestKey::Rsa1]).await;
    let mut s = settings(&[("acme", &iss)]);
    s.scopes.claims = vec![
        "scope".into(),
        "realm_access.roles".into(),
        "authorization.permissions".into(),
    ];
    let a = auth(s);
    let tok = iss
        .token(TestKey::Rsa1)
        .scope("openid profile")
        .roles(&["application-reader"])
        .claim(
            "authorization",
            json!({"permissions": [{"rsname": "endpoint-e1", "scopes": ["endpoint:delete"]}]}),
        )
        .sign();
    let p = a.authenticate(&tok).await.unwrap();
    assert!(p.allows(Scope::ApplicationRead, epr_core::auth::Resource::Tenant));
    assert!(p.allows(
        Scope::EndpointDelete,
        epr_core::auth::Resource::Endpoint("e1")
    ));
    assert!(!p.allows(
        Scope::EndpointDelete,
        epr_core::auth::Resource::Endpoint("e2")
    ));
    assert!(!p.allows(Scope::EndpointRead, epr_core::auth::Resource::Tenant));
}

#[tokio::test]
async fn without_authorization_every_valid_token_may_do_everything() {
    let iss = TestIssuer::start(&[TestKey::Rsa1]).await;
    let mut s = settings(&[("acme", &iss)]);
    s.authorization = false;
    let a = auth(s);
    let p = a
        .authenticate(&iss.token(TestKey::Rsa1).sign())
        .await
        .unwrap();
    assert_eq!(p.scopes, ScopeSet::all());
    assert_eq!(
        invalid(
            a.authenticate(&iss.token(TestKey::Rsa1).exp_in(-100).sign())
                .await
        ),
        "the access token has expired"
    );
}

#[tokio::test]
async fn off_means_anonymous_in_the_default_tenant() {
    let a = auth(AuthSettings::default());
    assert!(!a.enabled());
    let p = a.authenticate("whatever").await.unwrap();
    assert_eq!(p.tenant, tid("kaa"));
    assert_eq!(p.scopes, ScopeSet::all());
    assert_eq!(a.health().0, "DISABLED");
    assert!(a.tenants().borrow().contains(&tid("kaa")));
}

#[tokio::test]
async fn unregistered_tenants_are_refused_at_once_even_when_cached() {
    let acme = TestIssuer::start(&[TestKey::Rsa1]).await;
    let beta = TestIssuer::start(&[TestKey::Ec1]).await;
    let a = auth(settings(&[("acme", &acme), ("beta", &beta)]));
    let mut rx = a.tenants();
    let tok = acme.token(TestKey::Rsa1).sign();
    a.authenticate(&tok).await.unwrap();
    a.tenant_unregistered("acme");
    assert_eq!(invalid(a.authenticate(&tok).await), "tenant unregistered");
    let fresh = acme.token(TestKey::Rsa1).subject("other").sign();
    assert_eq!(invalid(a.authenticate(&fresh).await), "tenant unregistered");
    assert!(rx.has_changed().unwrap());
    assert!(!rx.borrow_and_update().contains(&tid("acme")));
    a.authenticate(&beta.token(TestKey::Ec1).sign())
        .await
        .unwrap();
    // Unknown tenants and repeats change nothing.
    a.tenant_unregistered("nobody");
    a.tenant_unregistered("acme");
    a.tenant_unregistered("bad id!");
    assert!(!rx.has_changed().unwrap());
    // A configured tenant comes back with an update notice.
    a.tenant_updated("acme");
    assert!(rx.borrow_and_update().contains(&tid("acme")));
    a.authenticate(&tok).await.unwrap();
}

fn tm_settings(tm: &TestTenantManager) -> AuthSettings {
    let mut s = AuthSettings::default();
    s.tenant_manager.url = tm.url();
    s.tenant_manager.refresh_secs = 3600;
    s.jwks_min_refetch_secs = 60;
    s
}

fn ids(a: &Auth) -> Vec<String> {
    a.tenants()
        .borrow()
        .tenants
        .keys()
        .map(|t| t.as_str().to_owned())
        .collect()
}

#[tokio::test]
async fn the_tenant_manager_is_read_page_by_page_and_only_usable_tenants_are_kept() {
    let iss: Vec<TestIssuer> =
        futures_util::future::join_all((0..8).map(|_| TestIssuer::start(&[TestKey::Rsa1]))).await;
    let tm = TestTenantManager::start().await;
    let mut tenants: Vec<_> = (0..5)
        .map(|i| tm_tenant(&format!("t{i}"), iss[i].url(), "AVAILABLE"))
        .collect();
    tenants.push(tm_tenant("creating", iss[5].url(), "CREATING"));
    tenants.push(json!({"id": "no-issuer", "status": "AVAILABLE"}));
    tenants.push(tm_tenant("bad id!", iss[6].url(), "AVAILABLE"));
    tenants.push(tm_tenant("dup1", iss[7].url(), "AVAILABLE"));
    tenants.push(tm_tenant("dup2", iss[7].url(), "AVAILABLE"));
    tm.set_tenants(tenants);
    let mut s = tm_settings(&tm);
    s.tenant_manager.page_size = 3;
    let a = auth(s);
    assert!(ids(&a).is_empty());
    assert_eq!(a.health().0, "DOWN", "no tenant list yet");
    let stop = CancellationToken::new();
    let run = tokio::spawn(a.clone().run(stop.clone()));
    eventually(|| ids(&a).len() == 5).await;
    assert_eq!(ids(&a), ["t0", "t1", "t2", "t3", "t4"]);
    assert_eq!(tm.requests(), 4, "10 tenants in pages of 3");
    assert!(tm.limits_seen().iter().all(|l| *l == 3));
    // Keys of new issuers are fetched at once, so the first request finds them.
    eventually(|| iss[0..5].iter().all(|i| i.jwks_requests() == 1)).await;
    eventually(|| a.health().0 == "UP").await;
    let p = a
        .authenticate(&iss[3].token(TestKey::Rsa1).sign())
        .await
        .unwrap();
    assert_eq!(p.tenant, tid("t3"));
    assert_eq!(
        invalid(a.authenticate(&iss[7].token(TestKey::Rsa1).sign()).await),
        "unknown issuer"
    );
    assert_eq!(
        invalid(a.authenticate(&iss[5].token(TestKey::Rsa1).sign()).await),
        "unknown issuer"
    );
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn tenant_updates_reread_once_per_burst_outages_keep_the_list_and_publish_only_changes() {
    let i1 = TestIssuer::start(&[TestKey::Rsa1]).await;
    let i2 = TestIssuer::start(&[TestKey::Ec1]).await;
    let tm = TestTenantManager::start().await;
    tm.set_tenants(vec![
        tm_tenant("t1", i1.url(), "AVAILABLE"),
        tm_tenant("t2", i2.url(), "CREATING"),
    ]);
    let a = auth(tm_settings(&tm));
    let mut rx = a.tenants();
    let stop = CancellationToken::new();
    let run = tokio::spawn(a.clone().run(stop.clone()));
    eventually(|| ids(&a) == ["t1"]).await;
    rx.borrow_and_update();
    assert_eq!(tm.requests(), 1);
    // The same list again: nothing is published.
    a.tenant_updated("t1");
    eventually(|| tm.requests() == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!rx.has_changed().unwrap());
    // t2 becomes available; a burst of notices costs one read.
    tm.set_tenants(vec![
        tm_tenant("t1", i1.url(), "AVAILABLE"),
        tm_tenant("t2", i2.url(), "AVAILABLE"),
    ]);
    for _ in 0..10 {
        a.tenant_updated("t2");
    }
    eventually(|| ids(&a) == ["t1", "t2"]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(tm.requests(), 3);
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    // An outage keeps the last list.
    tm.set_available(false);
    a.tenant_updated("t1");
    eventually(|| tm.requests() == 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ids(&a), ["t1", "t2"]);
    assert!(!rx.has_changed().unwrap());
    assert_eq!(a.health().1["tenant_manager"]["last_read"], "error");
    a.authenticate(&i2.token(TestKey::Ec1).sign())
        .await
        .unwrap();
    // Back: a tenant removed from the list goes.
    tm.set_available(true);
    tm.set_tenants(vec![tm_tenant("t2", i2.url(), "AVAILABLE")]);
    a.tenant_updated("t1");
    eventually(|| ids(&a) == ["t2"]).await;
    assert_eq!(
        invalid(a.authenticate(&i1.token(TestKey::Rsa1).sign()).await),
        "unknown issuer"
    );
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn an_unregistered_tenant_stays_out_of_a_read_that_started_before_the_notice() {
    let i1 = TestIssuer::start(&[TestKey::Rsa1]).await;
    let tm = TestTenantManager::start().await;
    tm.set_tenants(vec![tm_tenant("t1", i1.url(), "AVAILABLE")]);
    let a = auth(tm_settings(&tm));
    let stop = CancellationToken::new();
    let run = tokio::spawn(a.clone().run(stop.clone()));
    eventually(|| ids(&a) == ["t1"]).await;
    // A slow read is under way when the notice arrives.
    tm.set_delay_ms(600);
    a.tenant_updated("t1");
    eventually(|| tm.requests() == 2).await;
    a.tenant_unregistered("t1");
    assert!(ids(&a).is_empty());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(ids(&a).is_empty(), "the older read does not bring t1 back");
    assert_eq!(
        invalid(a.authenticate(&i1.token(TestKey::Rsa1).sign()).await),
        "tenant unregistered"
    );
    // A read that started after the notice and still lists t1 is the truth.
    tm.set_delay_ms(0);
    a.tenant_updated("t1");
    eventually(|| ids(&a) == ["t1"]).await;
    a.authenticate(&i1.token(TestKey::Rsa1).sign())
        .await
        .unwrap();
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn the_tenant_manager_service_account_token_is_cached() {
    let kc = TestIssuer::start(&[]).await;
    let i1 = TestIssuer::start(&[TestKey::Rsa1]).await;
    let tm = TestTenantManager::start().await;
    tm.require_bearer_prefix(Some("Bearer svc-"));
    tm.set_tenants(vec![tm_tenant("t1", i1.url(), "AVAILABLE")]);
    let mut s = tm_settings(&tm);
    s.tenant_manager.token_url = kc.token_url();
    s.tenant_manager.client_id = "epr".into();
    s.tenant_manager.client_secret = "s3cret".into();
    let a = auth(s);
    let stop = CancellationToken::new();
    let run = tokio::spawn(a.clone().run(stop.clone()));
    eventually(|| ids(&a) == ["t1"]).await;
    a.tenant_updated("t1");
    eventually(|| tm.requests() == 2).await;
    assert_eq!(kc.token_requests(), 1);
    assert_eq!(a.health().1["tenant_manager"]["last_read"], "ok");
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn configured_and_tenant_manager_tenants_merge() {
    let cfg = TestIssuer::start(&[TestKey::Ed1]).await;
    let i1 = TestIssuer::start(&[TestKey::Rsa1]).await;
    let tm = TestTenantManager::start().await;
    // The TM lists the configured tenant with another issuer, and a tenant with the
    // configured issuer: configuration wins, the clashing TM tenant is left out.
    tm.set_tenants(vec![
        tm_tenant("kaa", "http://127.0.0.1:9/elsewhere", "AVAILABLE"),
        tm_tenant("t1", i1.url(), "AVAILABLE"),
        tm_tenant("clash", cfg.url(), "AVAILABLE"),
    ]);
    let mut s = tm_settings(&tm);
    s.tenants.push(TenantSettings {
        id: "kaa".into(),
        issuer: cfg.url().into(),
        ..Default::default()
    });
    let a = auth(s);
    assert_eq!(
        ids(&a),
        ["kaa"],
        "configured tenants are there before the first read"
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn(a.clone().run(stop.clone()));
    eventually(|| ids(&a) == ["kaa", "t1"]).await;
    assert_eq!(
        a.authenticate(&cfg.token(TestKey::Ed1).sign())
            .await
            .unwrap()
            .tenant,
        tid("kaa")
    );
    assert_eq!(
        a.authenticate(&i1.token(TestKey::Rsa1).sign())
            .await
            .unwrap()
            .tenant,
        tid("t1")
    );
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn a_tenant_manager_down_at_start_is_retried_before_the_refresh_interval() {
    let i1 = TestIssuer::start(&[TestKey::Rsa1]).await;
    let tm = TestTenantManager::start().await;
    tm.set_tenants(vec![tm_tenant("t1", i1.url(), "AVAILABLE")]);
    tm.set_available(false);
    let a = auth(tm_settings(&tm)); // refresh_secs: 3600
    let stop = CancellationToken::new();
    let run = tokio::spawn(a.clone().run(stop.clone()));
    eventually(|| tm.requests() == 1).await;
    assert_eq!(a.health().0, "DOWN");
    tm.set_available(true);
    tokio::time::sleep(crate::TM_RETRY).await;
    eventually(|| ids(&a) == ["t1"]).await;
    assert_eq!(tm.requests(), 2);
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn a_fractional_exp_is_accepted_and_cached() {
    let iss = TestIssuer::start(&[TestKey::Rsa1]).await;
    let a = auth(settings(&[("acme", &iss)]));
    let exp = crate::testkit::now() as f64 + 300.5;
    let tok = iss.token(TestKey::Rsa1).claim("exp", json!(exp)).sign();
    // NumericDate may be fractional (RFC 7519): accepted, and the cached copy keeps the
    // expiry in seconds.
    let p = a.authenticate(&tok).await.unwrap();
    assert_eq!(p.expires_at_ms, Some((exp as i64) * 1000));
    a.authenticate(&tok).await.unwrap();
    assert_eq!(a.verifier.cache.len(), 1);
}
