//! Saved endpoint filters over HTTP: `/applications/{app}/filters`, the back-fill that turns
//! a filter active, its stored membership (`GET /endpoints?filterId=`, `include=filters`)
//! kept up to date by endpoint writes, preconditions, scoping and restarts.

use crate::helpers::{
    assert_error, poll, spawn_app, spawn_settings, spawn_with, test_settings, TestApp,
};
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const CITIES: [&str; 4] = ["Kyiv", "Lviv", "Odesa", "Kharkiv"];

/// Endpoints whose city is Kyiv or Lviv.
fn q_city() -> Value {
    json!({"metadata": {"$elemMatch": {"key": "city", "value": {"$in": ["Kyiv", "Lviv"]}}}})
}

/// Endpoints in demo-v1 whose numeric level is at least 3.
fn q_v1_level() -> Value {
    json!({"$and": [
        {"application_version": "demo-v1"},
        {"metadata": {"$elemMatch": {"key": "level", "value": {"$gte": 3}}}}
    ]})
}

#[derive(Clone)]
struct Ep {
    id: String,
    version: &'static str,
    metadata: Value,
}

fn city_match(ep: &Ep) -> bool {
    ep.metadata["city"]
        .as_str()
        .is_some_and(|c| c == "Kyiv" || c == "Lviv")
}

fn v1_level_match(ep: &Ep) -> bool {
    ep.version == "demo-v1" && ep.metadata["level"].as_i64().is_some_and(|l| l >= 3)
}

/// 30 endpoints of `demo` in both versions with varied metadata: some without a city, some
/// with a string level (which `$gte: 3` must not match: type brackets).
fn fleet() -> Vec<Ep> {
    (0..30)
        .map(|i: usize| {
            let mut md = json!({"level": i % 5, "serial": format!("SN-{i:03}")});
            if !i.is_multiple_of(7) {
                md["city"] = json!(CITIES[i % 4]);
            }
            if i % 10 == 9 {
                md["level"] = json!("high");
            }
            Ep {
                id: format!("ep-{i:02}"),
                version: if i.is_multiple_of(3) {
                    "demo-v2"
                } else {
                    "demo-v1"
                },
                metadata: md,
            }
        })
        .collect()
}

/// Registers the fleet, plus endpoints of the application `other` that would match the
/// demo filters if filters were not scoped to their application.
async fn register_fleet(app: &TestApp) -> Vec<Ep> {
    let eps = fleet();
    for ep in &eps {
        app.register(&ep.id, ep.version, ep.metadata.clone()).await;
    }
    for i in 0..3 {
        app.register(
            &format!("oth-{i}"),
            "other-v1",
            json!({"city": "Kyiv", "level": 4}),
        )
        .await;
    }
    eps
}

fn ids_where(eps: &[Ep], pred: impl Fn(&Ep) -> bool) -> BTreeSet<String> {
    eps.iter()
        .filter(|e| pred(e))
        .map(|e| e.id.clone())
        .collect()
}

fn filters_path(app_name: &str) -> String {
    format!("/applications/{app_name}/filters")
}

fn filter_path(app_name: &str, id: &str) -> String {
    format!("/applications/{app_name}/filters/{id}")
}

async fn post_filter(app: &TestApp, app_name: &str, body: &Value) -> Response {
    app.send_json(Method::POST, &filters_path(app_name), body)
        .await
}

/// Creates a filter, asserting `201`; returns (body, ETag).
async fn create(app: &TestApp, app_name: &str, name: &str, query: Value) -> (Value, String) {
    let r = post_filter(app, app_name, &json!({"name": name, "mongoQuery": query})).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let etag = etag(&r);
    (r.json().await.unwrap(), etag)
}

fn etag(r: &Response) -> String {
    r.headers()["etag"].to_str().unwrap().to_owned()
}

fn id_of(f: &Value) -> String {
    f["id"].as_str().expect("a filter has an id").to_owned()
}

/// GETs a filter, asserting `200`; returns (body, ETag).
async fn get_filter(app: &TestApp, app_name: &str, id: &str) -> (Value, String) {
    let r = app.get(&filter_path(app_name, id)).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let etag = etag(&r);
    (r.json().await.unwrap(), etag)
}

/// Polls the filter every 20 ms until it is active (at most 10 s); returns it.
async fn wait_active(app: &TestApp, app_name: &str, id: &str) -> Value {
    poll(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let (f, _) = get_filter(app, app_name, id).await;
            if f["status"] == "active" {
                return Ok(f);
            }
            assert_eq!(f["status"], "pending", "{f}");
            Err(format!("filter {id} still pending after 10 s: {f}"))
        },
    )
    .await
}

/// The members of a filter, by listing endpoints with `filterId` (asserting `200`).
async fn members(app: &TestApp, id: &str) -> BTreeSet<String> {
    let r = app
        .get(&format!("/endpoints?filterId={id}&limit=1000"))
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let body: Value = r.json().await.unwrap();
    let ids: BTreeSet<String> = body["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpointId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(body["totalElements"], ids.len() as u64, "{body}");
    ids
}

/// `include=filters` of every endpoint of `demo`, from one listing.
async fn listed_filters(app: &TestApp) -> BTreeMap<String, Vec<String>> {
    let r = app
        .get("/endpoints?applicationName=demo&include=filters&limit=1000")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    body["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let filters = e["filters"]
                .as_array()
                .unwrap_or_else(|| panic!("no filters in {e}"))
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect();
            (e["endpointId"].as_str().unwrap().to_owned(), filters)
        })
        .collect()
}

/// `include=filters` of one endpoint, from `GET /endpoints/{id}`.
async fn endpoint_filters(app: &TestApp, endpoint: &str) -> Vec<String> {
    let r = app
        .get(&format!("/endpoints/{endpoint}?include=filters"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    body["filters"]
        .as_array()
        .unwrap_or_else(|| panic!("no filters in {body}"))
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

/// `2020-06-01T10:00:00.000Z`: ISO-8601 UTC with milliseconds, like endpoint dates.
fn assert_iso_millis(v: &Value) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("not a date string: {v}"));
    let b = s.as_bytes();
    let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22];
    assert!(
        b.len() == 24
            && digits.iter().all(|&i| b[i].is_ascii_digit())
            && [
                (4, b'-'),
                (7, b'-'),
                (10, b'T'),
                (13, b':'),
                (16, b':'),
                (19, b'.'),
                (23, b'Z')
            ]
            .iter()
            .all(|&(i, c)| b[i] == c),
        "{s}"
    );
}

async fn patch_filter(
    app: &TestApp,
    app_name: &str,
    id: &str,
    if_match: Option<&str>,
    body: &Value,
) -> Response {
    let mut req = app
        .api(Method::PATCH, &filter_path(app_name, id))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(tag) = if_match {
        req = req.header("if-match", tag);
    }
    req.send().await.unwrap()
}

async fn delete_filter(
    app: &TestApp,
    app_name: &str,
    id: &str,
    if_match: Option<&str>,
) -> Response {
    let mut req = app.api(Method::DELETE, &filter_path(app_name, id));
    if let Some(tag) = if_match {
        req = req.header("if-match", tag);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn create_turns_active_with_exact_membership() {
    let app = spawn_app().await;
    let eps = register_fleet(&app).await;
    let want_city = ids_where(&eps, city_match);
    let want_level = ids_where(&eps, v1_level_match);
    assert!(want_city.len() >= 5 && want_city.len() < eps.len() - 5);
    assert!(want_level.len() >= 3 && want_level.len() < eps.len() - 5);

    // mongoQuery as a string (Kaa's UI) is answered as an object.
    let r = post_filter(
        &app,
        "demo",
        &json!({"name": "  Kyiv or Lviv ", "description": "big cities",
                "mongoQuery": q_city().to_string(), "applicationName": "demo"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let tag = etag(&r);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let f: Value = r.json().await.unwrap();
    let city = id_of(&f);
    assert_eq!(
        location,
        format!(
            "http://{}/api/v1/applications/demo/filters/{city}",
            app.addr
        )
    );
    assert_eq!(f["status"], "pending", "{f}");
    assert_eq!(f["applicationName"], "demo");
    assert_eq!(f["name"], "Kyiv or Lviv");
    assert_eq!(f["description"], "big cities");
    assert_eq!(f["mongoQuery"], q_city());
    assert!(f["matchedEndpointsCount"].is_u64(), "{f}");
    assert_iso_millis(&f["createdDate"]);
    assert_eq!(f["createdDate"], f["updatedDate"]);
    let keys: BTreeSet<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "id",
            "applicationName",
            "name",
            "description",
            "mongoQuery",
            "status",
            "matchedEndpointsCount",
            "createdDate",
            "updatedDate"
        ])
    );

    let (level_f, _) = create(&app, "demo", "v1 high level", q_v1_level()).await;
    assert_eq!(level_f["description"], "", "absent description is empty");
    let level = id_of(&level_f);

    let active = wait_active(&app, "demo", &city).await;
    assert_eq!(active["matchedEndpointsCount"], want_city.len() as u64);
    let active_level = wait_active(&app, "demo", &level).await;
    assert_eq!(
        active_level["matchedEndpointsCount"],
        want_level.len() as u64
    );
    // The tag covers the definition: turning active does not change it.
    let (_, tag_now) = get_filter(&app, "demo", &city).await;
    assert_eq!(tag_now, tag);
    assert_eq!(active["createdDate"], f["createdDate"]);

    // Listing by the filter: exactly the members, never endpoints of `other`.
    assert_eq!(members(&app, &city).await, want_city);
    assert_eq!(members(&app, &level).await, want_level);
    let r = app
        .get(&format!(
            "/endpoints?filterId={city}&applicationName=demo&limit=1000"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap()["totalElements"],
        want_city.len() as u64
    );
    // Combined with other criteria (ANDed), and paged.
    let v2_city = ids_where(&eps, |e| city_match(e) && e.version == "demo-v2");
    assert_eq!(
        app.total(&format!("filterId={city}&applicationVersionName=demo-v2"))
            .await,
        v2_city.len() as u64
    );
    let r = app
        .get(&format!("/endpoints?filterId={city}&limit=2&offset=1"))
        .await;
    let page: Value = r.json().await.unwrap();
    let first_two: Vec<&str> = want_city
        .iter()
        .skip(1)
        .take(2)
        .map(String::as_str)
        .collect();
    let got: Vec<&str> = page["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpointId"].as_str().unwrap())
        .collect();
    // Registration order is the ID order here (ep-00, ep-01, ...).
    assert_eq!(got, first_two, "{page}");
    assert_eq!(page["totalElements"], want_city.len() as u64);

    // include=filters on the listing and on single reads.
    let mut both = [city.clone(), level.clone()];
    both.sort();
    let listed = listed_filters(&app).await;
    assert_eq!(listed.len(), eps.len());
    for ep in &eps {
        let want: Vec<String> = both
            .iter()
            .filter(|f| (**f == city && city_match(ep)) || (**f == level && v1_level_match(ep)))
            .cloned()
            .collect();
        assert_eq!(listed[&ep.id], want, "{}", ep.id);
    }
    let matching = want_city.iter().next().unwrap();
    let not_matching = eps
        .iter()
        .find(|e| !city_match(e) && !v1_level_match(e))
        .unwrap();
    assert!(endpoint_filters(&app, matching).await.contains(&city));
    assert_eq!(
        endpoint_filters(&app, &not_matching.id).await,
        Vec::<String>::new()
    );
    assert_eq!(endpoint_filters(&app, "oth-0").await, Vec::<String>::new());
    // Without include=filters the field is absent.
    let body: Value = app
        .get(&format!("/endpoints/{matching}"))
        .await
        .json()
        .await
        .unwrap();
    assert!(body.get("filters").is_none(), "{body}");

    // Neither tag validates a body that holds membership or status: no 304 there.
    let r = app.get(&format!("/endpoints/{matching}")).await;
    let ep_tag = etag(&r);
    for (path, tag) in [
        (format!("/endpoints/{matching}?include=filters"), &ep_tag),
        (filter_path("demo", &city), &tag),
    ] {
        let r = app
            .api(Method::GET, &path)
            .header("if-none-match", tag.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(&etag(&r), tag, "{path}");
    }
    let r = app
        .api(Method::GET, &format!("/endpoints/{matching}"))
        .header("if-none-match", ep_tag.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn endpoint_writes_keep_membership_live() {
    let app = spawn_app().await;
    let eps = register_fleet(&app).await;
    let mut want = ids_where(&eps, city_match);
    let (f, _) = create(&app, "demo", "cities", q_city()).await;
    let city = id_of(&f);
    let (lf, _) = create(&app, "demo", "v1 level", q_v1_level()).await;
    let level = id_of(&lf);
    wait_active(&app, "demo", &city).await;
    wait_active(&app, "demo", &level).await;
    assert_eq!(members(&app, &city).await, want);

    let count = |app: &TestApp, id: String| {
        let path = filter_path("demo", &id);
        let client = app.client.clone();
        let url = app.url(&format!("/api/v1{path}"));
        async move {
            let f: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            f["matchedEndpointsCount"].as_u64().unwrap()
        }
    };

    // A metadata replacement makes a non-member match.
    let outsider = eps.iter().find(|e| !city_match(e)).unwrap();
    let r = app
        .send_json(
            Method::PUT,
            &format!("/endpoints/{}/metadata", outsider.id),
            &json!({"city": "Lviv"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    want.insert(outsider.id.clone());
    assert_eq!(members(&app, &city).await, want);
    assert_eq!(count(&app, city.clone()).await, want.len() as u64);
    assert!(endpoint_filters(&app, &outsider.id).await.contains(&city));

    // A key change makes a member stop matching.
    let member = eps
        .iter()
        .find(|e| city_match(e) && e.id != outsider.id)
        .unwrap();
    let r = app
        .send_json(
            Method::PUT,
            &format!("/endpoints/{}/metadata/city", member.id),
            &json!("Odesa"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    want.remove(&member.id);
    assert_eq!(members(&app, &city).await, want);
    assert!(!endpoint_filters(&app, &member.id).await.contains(&city));

    // A merge patch back into a matching city.
    let r = app
        .send_json(
            Method::PATCH,
            &format!("/endpoints/{}/metadata", member.id),
            &json!({"city": "Kyiv"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    want.insert(member.id.clone());
    assert_eq!(members(&app, &city).await, want);

    // Unregistration removes the endpoint from every filter.
    let gone = want.iter().next().unwrap().clone();
    let r = app
        .api(Method::DELETE, &format!("/endpoints/{gone}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    want.remove(&gone);
    assert_eq!(members(&app, &city).await, want);
    assert_eq!(count(&app, city.clone()).await, want.len() as u64);

    // New registrations: a matching one appears, a non-matching one does not, and an
    // endpoint of another application never does.
    app.register("new-kyiv", "demo-v2", json!({"city": "Kyiv"}))
        .await;
    app.register("new-odesa", "demo-v1", json!({"city": "Odesa"}))
        .await;
    app.register("new-other", "other-v1", json!({"city": "Kyiv"}))
        .await;
    want.insert("new-kyiv".into());
    assert_eq!(members(&app, &city).await, want);
    assert_eq!(count(&app, city.clone()).await, want.len() as u64);
    assert_eq!(endpoint_filters(&app, "new-kyiv").await, vec![city.clone()]);

    // An app-version change moves an endpoint in and out of a version-bound filter.
    let mut want_level = ids_where(&eps, v1_level_match);
    want_level.remove(&gone);
    assert_eq!(members(&app, &level).await, want_level);
    let v2_high = eps
        .iter()
        .find(|e| e.version == "demo-v2" && e.metadata["level"].as_i64() >= Some(3) && e.id != gone)
        .expect("a demo-v2 endpoint with level >= 3");
    let put_version = |id: String, version: &'static str| {
        let req = app
            .api(Method::PUT, &format!("/endpoints/{id}/app-version"))
            .header("content-type", "application/json")
            .body(json!({"name": version}).to_string());
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(
        put_version(v2_high.id.clone(), "demo-v1").await,
        StatusCode::NO_CONTENT
    );
    want_level.insert(v2_high.id.clone());
    assert_eq!(members(&app, &level).await, want_level);
    assert_eq!(
        put_version(v2_high.id.clone(), "demo-v2").await,
        StatusCode::NO_CONTENT
    );
    want_level.remove(&v2_high.id);
    assert_eq!(members(&app, &level).await, want_level);
    assert_eq!(count(&app, level.clone()).await, want_level.len() as u64);
}

#[tokio::test]
async fn patch_name_keeps_status_and_changes_the_tag() {
    let app = spawn_app().await;
    let eps = register_fleet(&app).await;
    let want = ids_where(&eps, city_match);
    let (f, created_tag) = create(&app, "demo", "cities", q_city()).await;
    let id = id_of(&f);
    let active = wait_active(&app, "demo", &id).await;

    let r = patch_filter(&app, "demo", &id, None, &json!({"name": "big cities"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let tag = etag(&r);
    assert_ne!(tag, created_tag);
    let patched: Value = r.json().await.unwrap();
    assert_eq!(patched["name"], "big cities");
    assert_eq!(patched["status"], "active", "{patched}");
    assert_eq!(patched["matchedEndpointsCount"], want.len() as u64);
    assert_eq!(patched["mongoQuery"], q_city());
    assert_eq!(patched["createdDate"], active["createdDate"]);
    assert_iso_millis(&patched["updatedDate"]);
    assert!(patched["updatedDate"].as_str() >= active["updatedDate"].as_str());
    let (got, got_tag) = get_filter(&app, "demo", &id).await;
    assert_eq!(got, patched);
    assert_eq!(got_tag, tag);
    // Membership is untouched and listing stays available.
    assert_eq!(members(&app, &id).await, want);

    // The same definition again changes nothing, not even the tag.
    let r = patch_filter(
        &app,
        "demo",
        &id,
        Some(&tag),
        &json!({"name": "big cities"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(etag(&r), tag);

    // Description: set, then cleared by null.
    let r = patch_filter(&app, "demo", &id, None, &json!({"description": "d"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let tag2 = etag(&r);
    assert_ne!(tag2, tag);
    assert_eq!(r.json::<Value>().await.unwrap()["description"], "d");
    let r = app
        .api(Method::PATCH, &filter_path("demo", &id))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"description": null}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let f: Value = r.json().await.unwrap();
    assert_eq!(f["description"], "");
    assert_eq!(f["status"], "active");
}

#[tokio::test]
async fn patch_query_goes_pending_then_active_with_new_membership() {
    let app = spawn_app().await;
    let eps = register_fleet(&app).await;
    let (f, tag) = create(&app, "demo", "f", q_city()).await;
    let id = id_of(&f);
    wait_active(&app, "demo", &id).await;
    assert_eq!(members(&app, &id).await, ids_where(&eps, city_match));

    let r = patch_filter(
        &app,
        "demo",
        &id,
        Some(&tag),
        &json!({"mongoQuery": q_v1_level()}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_ne!(etag(&r), tag);
    let patched: Value = r.json().await.unwrap();
    assert_eq!(patched["status"], "pending", "{patched}");
    assert_eq!(patched["mongoQuery"], q_v1_level());
    assert_eq!(patched["name"], "f");

    let active = wait_active(&app, "demo", &id).await;
    let want = ids_where(&eps, v1_level_match);
    assert_eq!(active["matchedEndpointsCount"], want.len() as u64);
    assert_eq!(members(&app, &id).await, want);
    let listed = listed_filters(&app).await;
    for ep in &eps {
        assert_eq!(
            listed[&ep.id].contains(&id),
            v1_level_match(ep),
            "{}",
            ep.id
        );
    }
}

#[tokio::test]
async fn failed_if_match_is_412_and_changes_nothing() {
    let app = spawn_app().await;
    register_fleet(&app).await;
    let (f, tag) = create(&app, "demo", "f", q_city()).await;
    let id = id_of(&f);
    let before = wait_active(&app, "demo", &id).await;
    let before_members = members(&app, &id).await;

    for stale in ["\"f999\"", "W/\"f1\"", "\"other\", \"f0\""] {
        let r = patch_filter(
            &app,
            "demo",
            &id,
            Some(stale),
            &json!({"name": "x", "mongoQuery": q_v1_level()}),
        )
        .await;
        let body = assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
        assert!(body["message"].as_str().unwrap().contains(&tag), "{body}");
        let r = delete_filter(&app, "demo", &id, Some(stale)).await;
        assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    }
    let (after, after_tag) = get_filter(&app, "demo", &id).await;
    assert_eq!(after, before);
    assert_eq!(after_tag, tag);
    assert_eq!(members(&app, &id).await, before_members);

    // The current tag (also in a list, or `*`) passes.
    let r = patch_filter(
        &app,
        "demo",
        &id,
        Some(&format!("\"nope\", {tag}")),
        &json!({"name": "y"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let new_tag = etag(&r);
    let r = patch_filter(&app, "demo", &id, Some("*"), &json!({"name": "z"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let newest = etag(&r);
    // The tag before the last change no longer deletes.
    let r = delete_filter(&app, "demo", &id, Some(&new_tag)).await;
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    let r = delete_filter(&app, "demo", &id, Some(&newest)).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn delete_removes_the_filter_everywhere() {
    let app = spawn_app().await;
    let eps = register_fleet(&app).await;
    let (f, _) = create(&app, "demo", "f", q_city()).await;
    let id = id_of(&f);
    let (keep, _) = create(&app, "demo", "keep", q_v1_level()).await;
    let keep = id_of(&keep);
    wait_active(&app, "demo", &id).await;
    wait_active(&app, "demo", &keep).await;
    let member = ids_where(&eps, city_match).into_iter().next().unwrap();
    assert!(endpoint_filters(&app, &member).await.contains(&id));

    let r = delete_filter(&app, "demo", &id, None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(r.headers().get("etag").is_none());
    assert!(r.bytes().await.unwrap().is_empty());

    let r = app.get(&filter_path("demo", &id)).await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
    let r = app.get(&format!("/endpoints?filterId={id}")).await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
    let r = delete_filter(&app, "demo", &id, None).await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
    let r = patch_filter(&app, "demo", &id, None, &json!({"name": "again"})).await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
    assert!(!endpoint_filters(&app, &member).await.contains(&id));
    for (_, filters) in listed_filters(&app).await {
        assert!(!filters.contains(&id));
    }
    let list: Value = app.get(&filters_path("demo")).await.json().await.unwrap();
    assert_eq!(list["totalElements"], 1, "{list}");
    assert_eq!(list["content"][0]["id"], keep.as_str());
    // The other filter is unaffected, and the name is free again.
    assert_eq!(members(&app, &keep).await, ids_where(&eps, v1_level_match));
    create(&app, "demo", "f", q_city()).await;
}

#[tokio::test]
async fn names_are_unique_within_an_application() {
    let app = spawn_app().await;
    let (a, _) = create(&app, "demo", "dup", q_city()).await;
    let r = post_filter(
        &app,
        "demo",
        &json!({"name": "dup", "mongoQuery": q_v1_level()}),
    )
    .await;
    assert_error(r, StatusCode::CONFLICT, "name", "unique").await;
    // Names are trimmed before the comparison.
    let r = post_filter(
        &app,
        "demo",
        &json!({"name": " dup ", "mongoQuery": q_city()}),
    )
    .await;
    assert_error(r, StatusCode::CONFLICT, "name", "unique").await;
    // The same name in another application is fine.
    let (other, _) = create(&app, "other", "dup", q_city()).await;
    assert_ne!(id_of(&other), id_of(&a));
    assert_eq!(other["applicationName"], "other");
    // A rename onto a taken name conflicts too, and changes nothing.
    let (b, b_tag) = create(&app, "demo", "b", q_city()).await;
    let r = patch_filter(&app, "demo", &id_of(&b), None, &json!({"name": "dup"})).await;
    assert_error(r, StatusCode::CONFLICT, "name", "unique").await;
    let (b_now, b_tag_now) = get_filter(&app, "demo", &id_of(&b)).await;
    assert_eq!(b_now["name"], "b");
    assert_eq!(b_tag_now, b_tag);
    let list: Value = app
        .get(&format!("{}?name=dup", filters_path("demo")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["totalElements"], 1);
}

#[tokio::test]
async fn filters_are_scoped_to_their_application() {
    let app = spawn_app().await;
    register_fleet(&app).await;
    let (f, tag) = create(&app, "demo", "f", q_city()).await;
    let id = id_of(&f);
    wait_active(&app, "demo", &id).await;

    let r = app.get(&filter_path("other", &id)).await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
    let r = patch_filter(&app, "other", &id, None, &json!({"name": "stolen"})).await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
    let r = delete_filter(&app, "other", &id, None).await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
    let r = app
        .get(&format!("/endpoints?filterId={id}&applicationName=other"))
        .await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
    let list: Value = app.get(&filters_path("other")).await.json().await.unwrap();
    assert_eq!(list, json!({"totalElements": 0, "content": []}));
    // Nothing happened to it.
    let (after, after_tag) = get_filter(&app, "demo", &id).await;
    assert_eq!(after["name"], "f");
    assert_eq!(after_tag, tag);
    // Both prefixes serve the same filters.
    let r = app
        .client
        .get(app.url(&format!("/epr/api/v1{}", filter_path("demo", &id))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .client
        .post(app.url(&format!("/epr/api/v1{}", filters_path("demo"))))
        .header("content-type", "application/json")
        .body(json!({"name": "via ingress", "mongoQuery": {}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let new_id = id_of(&r.json().await.unwrap());
    assert_eq!(
        location,
        format!(
            "http://{}/epr/api/v1/applications/demo/filters/{new_id}",
            app.addr
        )
    );
}

#[tokio::test]
async fn invalid_definitions_and_requests_are_refused() {
    let app = spawn_app().await;
    let bad_queries = [
        (json!({"$where": "this.a > 1"}), "unsupported-operator"),
        (
            json!({"metadata": {"$elemMatch": {"key": "a", "value": {"$expr": 1}}}}),
            "unsupported-operator",
        ),
        (json!({"endpoint_id": "x"}), "unknown-field"),
        (json!({"metadata": {"$size": -1}}), "invalid-operand"),
        (
            json!({"metadata": {"$elemMatch": {"key": "s", "value": {"$regex": "(?<=a)b"}}}}),
            "invalid-regex",
        ),
        (json!([1]), "type"),
        (json!(5), "type"),
        (json!("not json"), "type"),
    ];
    for (query, rule) in bad_queries {
        let r = post_filter(&app, "demo", &json!({"name": "bad", "mongoQuery": query})).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["field"].as_str().unwrap().starts_with("mongoQuery"),
            "{query}: {body}"
        );
        assert_eq!(body["rule"], rule, "{query}: {body}");
    }
    for (body, field, rule) in [
        (json!({"mongoQuery": {}}), "name", "required"),
        (json!({"name": "  ", "mongoQuery": {}}), "name", "required"),
        (json!({"name": "n"}), "mongoQuery", "required"),
        (
            json!({"name": "n", "mongoQuery": null}),
            "mongoQuery",
            "required",
        ),
        (json!({"name": 5, "mongoQuery": {}}), "name", "type"),
        (
            json!({"name": "n", "description": 1, "mongoQuery": {}}),
            "description",
            "type",
        ),
        (
            json!({"name": "a\u{1}b", "mongoQuery": {}}),
            "name",
            "pattern",
        ),
        (
            json!({"name": "x".repeat(257), "mongoQuery": {}}),
            "name",
            "max-length",
        ),
        (json!([{"name": "n"}]), "body", "type"),
    ] {
        let r = post_filter(&app, "demo", &body).await;
        assert_error(r, StatusCode::BAD_REQUEST, field, rule).await;
    }
    let r = app
        .api(Method::POST, &filters_path("demo"))
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "body", "json").await;
    let r = app
        .api(Method::POST, &filters_path("demo"))
        .header("content-type", "text/plain")
        .body(json!({"name": "n", "mongoQuery": {}}).to_string())
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "Content-Type",
        "media-type",
    )
    .await;
    // Unknown application, malformed application name.
    let r = post_filter(&app, "nope", &json!({"name": "n", "mongoQuery": {}})).await;
    assert_error(r, StatusCode::NOT_FOUND, "applicationName", "exists").await;
    let r = app.get(&filters_path("nope")).await;
    assert_error(r, StatusCode::NOT_FOUND, "applicationName", "exists").await;
    let r = app.get(&filters_path("Bad.App")).await;
    assert_error(r, StatusCode::BAD_REQUEST, "applicationName", "pattern").await;
    // Malformed filter IDs, in the path and in a listing.
    let r = app.get(&filter_path("demo", "bad.id")).await;
    assert_error(r, StatusCode::BAD_REQUEST, "filterId", "pattern").await;
    let r = delete_filter(&app, "demo", "bad.id", None).await;
    assert_error(r, StatusCode::BAD_REQUEST, "filterId", "pattern").await;
    let r = app.get("/endpoints?filterId=bad.id").await;
    assert_error(r, StatusCode::BAD_REQUEST, "filterId", "pattern").await;
    let r = app.get("/endpoints?filterId=a&filterId=b").await;
    assert_error(r, StatusCode::BAD_REQUEST, "filterId", "single").await;
    let r = app.get("/endpoints?filterId=no-such-filter").await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
    let r = app.get(&filter_path("demo", "no-such-filter")).await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;

    // Nothing was created by any of the refused requests.
    let list: Value = app.get(&filters_path("demo")).await.json().await.unwrap();
    assert_eq!(list["totalElements"], 0, "{list}");

    // PATCH: empty, nulls, bad query, JSON Patch media type; none changes anything.
    let (f, tag) = create(&app, "demo", "f", q_city()).await;
    let id = id_of(&f);
    for (body, field, rule) in [
        (json!({}), "body", "required"),
        (json!({"nmae": "typo"}), "body", "required"),
        (json!({"name": null}), "name", "required"),
        (json!({"mongoQuery": null}), "mongoQuery", "required"),
        (json!({"name": ""}), "name", "required"),
        (json!({"name": ["x"]}), "name", "type"),
        (json!("name"), "body", "type"),
    ] {
        let r = patch_filter(&app, "demo", &id, None, &body).await;
        assert_error(r, StatusCode::BAD_REQUEST, field, rule).await;
    }
    let r = patch_filter(
        &app,
        "demo",
        &id,
        None,
        &json!({"name": "renamed", "mongoQuery": {"$where": "1"}}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert!(body["field"].as_str().unwrap().starts_with("mongoQuery"));
    assert_eq!(body["rule"], "unsupported-operator");
    let r = app
        .api(Method::PATCH, &filter_path("demo", &id))
        .header("content-type", "application/json-patch+json")
        .body(r#"[{"op": "replace", "path": "/name", "value": "x"}]"#)
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "Content-Type",
        "media-type",
    )
    .await;
    let (after, after_tag) = get_filter(&app, "demo", &id).await;
    assert_eq!(after["name"], "f");
    assert_eq!(after["mongoQuery"], q_city());
    assert_eq!(after_tag, tag);
}

/// Listing by a pending filter is refused, never answered with part of the membership, and
/// `include=filters` leaves a pending filter out. The back-fill is slowed down through its
/// settings (one endpoint per step, 50 ms apart: 40 endpoints take 2 s), so the filter is
/// certainly still pending right after the `201`.
#[tokio::test]
async fn listing_by_a_pending_filter_is_409() {
    let app = spawn_with(|s| {
        s.store.backfill_step_ms = 0;
        s.store.backfill_batch = 1;
        s.store.backfill_pause_ms = 50;
    })
    .await;
    let endpoints: Vec<Value> = (0..40)
        .map(|n| json!({"endpointId": format!("n-{n:04}"), "metadata": {"n": n}}))
        .collect();
    let r = app
        .send_json(
            Method::POST,
            "/endpoints/batch",
            &json!({"appVersion": {"name": "demo-v1"}, "endpoints": endpoints}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(app.total("applicationName=demo").await, 40);
    let below = |k: u64| json!({"metadata": {"$elemMatch": {"key": "n", "value": {"$lt": k}}}});

    let (f, _) = create(&app, "demo", "below", below(20)).await;
    let id = id_of(&f);
    let r = app.get(&format!("/endpoints?filterId={id}&limit=1")).await;
    let body = assert_error(r, StatusCode::CONFLICT, "filterId", "filter-active").await;
    assert!(
        body["message"].as_str().unwrap().contains("pending"),
        "{body}"
    );
    assert!(
        endpoint_filters(&app, "n-0000").await.is_empty(),
        "pending: left out"
    );
    let active = wait_active(&app, "demo", &id).await;
    assert_eq!(active["matchedEndpointsCount"], 20);
    assert_eq!(app.total(&format!("filterId={id}")).await, 20);
    assert_eq!(endpoint_filters(&app, "n-0000").await, vec![id.clone()]);
    // A query change makes it pending (and refused) again until the new back-fill is done.
    let r = patch_filter(&app, "demo", &id, None, &json!({"mongoQuery": below(10)})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.get(&format!("/endpoints?filterId={id}")).await;
    assert_error(r, StatusCode::CONFLICT, "filterId", "filter-active").await;
    let active = wait_active(&app, "demo", &id).await;
    assert_eq!(active["matchedEndpointsCount"], 10);
    assert_eq!(app.total(&format!("filterId={id}")).await, 10);
}

#[tokio::test]
async fn filter_listing_pages_and_filters_by_name() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (f, _) = create(
            &app,
            "demo",
            &format!("f{i}"),
            json!({"application_version": "demo-v1"}),
        )
        .await;
        ids.push(id_of(&f));
    }
    create(&app, "other", "f0", q_city()).await;
    let list = |query: &str| {
        let req = app.api(Method::GET, &format!("{}?{query}", filters_path("demo")));
        async move { req.send().await.unwrap() }
    };
    let page_ids =
        |v: &Value| -> Vec<String> { v["content"].as_array().unwrap().iter().map(id_of).collect() };

    let all: Value = list("").await.json().await.unwrap();
    assert_eq!(all["totalElements"], 5);
    assert_eq!(page_ids(&all), ids, "oldest first");
    let p: Value = list("limit=2").await.json().await.unwrap();
    assert_eq!(p["totalElements"], 5);
    assert_eq!(page_ids(&p), ids[..2]);
    let p: Value = list("offset=2&limit=2").await.json().await.unwrap();
    assert_eq!(page_ids(&p), ids[2..4]);
    let p: Value = list("offset=4&limit=2").await.json().await.unwrap();
    assert_eq!(page_ids(&p), ids[4..]);
    let p: Value = list("offset=10").await.json().await.unwrap();
    assert_eq!(p, json!({"totalElements": 5, "content": []}));

    let p: Value = list("name=f3").await.json().await.unwrap();
    assert_eq!(p["totalElements"], 1);
    assert_eq!(page_ids(&p), [ids[3].clone()]);
    assert_eq!(p["content"][0]["name"], "f3");
    let p: Value = list("name=nope").await.json().await.unwrap();
    assert_eq!(p, json!({"totalElements": 0, "content": []}));
    let p: Value = list("name=").await.json().await.unwrap();
    assert_eq!(p["totalElements"], 5, "an empty name restricts nothing");

    for (query, field, rule) in [
        ("limit=0", "limit", "range"),
        ("limit=1001", "limit", "range"),
        ("limit=x", "limit", "integer"),
        ("offset=-1", "offset", "integer"),
        ("limit=1&limit=2", "limit", "single"),
        ("name=a&name=b", "name", "single"),
    ] {
        assert_error(list(query).await, StatusCode::BAD_REQUEST, field, rule).await;
    }

    // Conditional GET over the body: a change (even of status) gives a new tag.
    let r = list("").await;
    let tag = etag(&r);
    assert!(tag.starts_with("W/"), "{tag}");
    let r = app
        .api(Method::GET, &filters_path("demo"))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = delete_filter(&app, "demo", &ids[0], None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app
        .api(Method::GET, &filters_path("demo"))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn filters_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_settings(test_settings(dir.path())).await;
    let eps = register_fleet(&app).await;
    let (f, _) = create(&app, "demo", "cities", q_city()).await;
    let city = id_of(&f);
    wait_active(&app, "demo", &city).await;
    let r = patch_filter(&app, "demo", &city, None, &json!({"description": "kept"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let (before, before_tag) = get_filter(&app, "demo", &city).await;
    let before_members = members(&app, &city).await;
    assert_eq!(before_members, ids_where(&eps, city_match));
    // Created right before the stop: possibly still pending; it must complete after.
    let (late, _) = create(&app, "demo", "late", q_v1_level()).await;
    let late = id_of(&late);
    let before_list: Value = app.get(&filters_path("demo")).await.json().await.unwrap();
    app.stop().await;

    let app = spawn_settings(test_settings(dir.path())).await;
    let (after, after_tag) = get_filter(&app, "demo", &city).await;
    assert_eq!(after, before);
    assert_eq!(after_tag, before_tag);
    assert_eq!(members(&app, &city).await, before_members);
    let late_f = wait_active(&app, "demo", &late).await;
    let want_level = ids_where(&eps, v1_level_match);
    assert_eq!(late_f["matchedEndpointsCount"], want_level.len() as u64);
    assert_eq!(members(&app, &late).await, want_level);
    let after_list: Value = app.get(&filters_path("demo")).await.json().await.unwrap();
    assert_eq!(
        after_list["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(id_of)
            .collect::<Vec<_>>(),
        before_list["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(id_of)
            .collect::<Vec<_>>()
    );
    // Live matching goes on after the restart, and names stay unique.
    app.register(
        "after-restart",
        "demo-v1",
        json!({"city": "Lviv", "level": 4}),
    )
    .await;
    let mut want = before_members.clone();
    want.insert("after-restart".into());
    assert_eq!(members(&app, &city).await, want);
    let mut both = vec![city.clone(), late.clone()];
    both.sort();
    assert_eq!(endpoint_filters(&app, "after-restart").await, both);
    let r = post_filter(&app, "demo", &json!({"name": "cities", "mongoQuery": {}})).await;
    assert_error(r, StatusCode::CONFLICT, "name", "unique").await;
    app.stop().await;
}
