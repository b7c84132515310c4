//! The `selfreg` phase (issue 11): operator registration vs device self-registration, side by
//! side in one run.
//!
//! On each target, with the same connections, warm-up, duration and metadata (the five keys
//! of issue 13's mix, [`crate::keymix::write_md`]), three closed-loop measurements:
//! - `selfreg-operator`: `POST /api/v1/endpoints`;
//! - `selfreg-device`: `POST /device/v1/applications/{app}/registrations` with the
//!   application's provisioning secret, under a policy ([`policy`]) that checks every key
//!   (all required; allowed values of each kind: a list, a pattern, a range) and the endpoint
//!   ID pattern;
//! - `selfreg-claim`: the same with a one-time claim token per registration instead of the
//!   secret (minted before the measurement, bound to the ID pattern; --selfreg-claims 0 skips
//!   it).
//!
//! The order alternates by round (operator, device, claim in odd rounds; claim, device,
//! operator in even ones), so drift and position hit both sides alike. The target of issue
//! 11: self-registrations/s ≥ 70 % of operator registrations/s.

use crate::client::Conn;
use crate::keymix::{write_md, KINDS};
use crate::{measure_closed, Args, Ctx, EventsCheck, Phase, PhaseResult, Round, Target, Worker};
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

/// The device API limits requests per source address; the bench sends everything from one,
/// so spawned servers get the highest limit the server accepts (16,667/s, burst a million):
/// the limiter still runs on every request (its cost is measured) but never engages within
/// a measurement (`--selfreg-yaml`).
pub const SERVER_YAML: &str = "self_registration:\n  rate_limit:\n    per_source_per_minute: 1000000\n    per_source_burst: 1000000\n";

/// The application's provisioning secret (the policy's, sent by every `selfreg-device`
/// registration).
const SECRET: &str = "bench-provisioning-secret-0f3c9a7e";
/// The policy's endpoint ID pattern; every ID the phase registers matches it.
const ID_PATTERN: &str = "bench-[0-9a-z-]+";
/// The issue's target: self-registrations/s as a percentage of operator registrations/s.
const TARGET_PCT: f64 = 70.0;
/// Claim tokens per `POST …/claim-tokens` (the API's maximum).
const MINT_BATCH: usize = 1000;

/// The self-registration policy the phase puts on the application.
pub fn policy() -> serde_json::Value {
    let cities: Vec<String> = (0..40).map(|c| format!("c{c}")).collect();
    serde_json::json!({
        "mode": "open",
        "provisioningSecret": SECRET,
        "reregistration": "refuse",
        "endpointIdPattern": ID_PATTERN,
        "maxMetadataBytes": 4096,
        "requiredMetadataKeys": ["city", "level", "kind", "on", "fw"],
        "allowedMetadataValues": {
            "city": {"values": cities},
            "level": {"min": 0, "max": 49},
            "kind": {"values": KINDS},
            "on": {"values": [true, false]},
            "fw": {"pattern": "1\\.[0-9]+\\.0"},
        },
    })
}

/// Writes the path and body of one registration of `phase` into the worker's buffers;
/// returns the endpoint ID.
pub fn write_request(w: &mut Worker, phase: Phase, ctx: &Ctx) -> Result<String> {
    let n = w.seq;
    let tag = match phase {
        Phase::SrOperator => 'o',
        Phase::SrDevice => 'd',
        Phase::SrClaim => 'c',
        _ => bail!("{} is not a selfreg phase", phase.name()),
    };
    let id = format!("bench-{}-{tag}{}-{n}", ctx.run_id, w.idx);
    // The same key stream on every side: equal metadata mixes.
    let key = ((w.idx as u64) << 40) | n;
    if phase == Phase::SrOperator {
        w.path.push_str("/api/v1/endpoints");
        write!(
            w.body,
            r#"{{"endpointId":"{id}","appVersion":{{"name":"{}"}},"metadata":"#,
            ctx.app_version
        )?;
        write_md(&mut w.body, key);
        w.body.push('}');
        return Ok(id);
    }
    w.path.push_str(&ctx.device_path);
    write!(
        w.body,
        r#"{{"endpointId":"{id}","appVersion":"{}","metadata":"#,
        ctx.app_version
    )?;
    write_md(&mut w.body, key);
    if phase == Phase::SrDevice {
        write!(w.body, r#","provisioningSecret":"{SECRET}"}}"#)?;
    } else {
        let claim = ctx
            .claims
            .lock()
            .map_err(|_| anyhow!("claim pool poisoned"))?
            .pop()
            .ok_or_else(|| anyhow!("out of claim tokens (raise --selfreg-claims)"))?;
        write!(w.body, r#","claimToken":"{claim}"}}"#)?;
    }
    Ok(id)
}

/// One target's round: the rates side by side.
#[derive(Serialize, Clone, Debug)]
pub struct SelfRegRow {
    pub target: &'static str,
    pub round: usize,
    pub operator_rps: f64,
    pub operator_p99_ms: f64,
    pub device_rps: f64,
    pub device_p99_ms: f64,
    /// device / operator, %.
    pub device_pct: f64,
    pub claim_rps: Option<f64>,
    pub claim_p99_ms: Option<f64>,
    pub claim_pct: Option<f64>,
    /// Claim tokens minted for the claim measurement, and how fast.
    pub claims_minted: usize,
    pub claims_minted_per_s: Option<f64>,
    /// Claim tokens left unused (none left: the measurement ran out, see its errors).
    pub claims_left: usize,
    /// Requests with an error status in the recorded windows (operator + device + claim).
    pub errors: u64,
    /// The policy refused the two probes (a value out of range, an ID off the pattern).
    pub policy_enforced: bool,
}

/// State across rounds.
#[derive(Default)]
pub struct SelfRegBench {
    /// Targets whose application has the policy, and whether its probes were refused.
    policy: HashMap<&'static str, bool>,
    /// Best registration rate seen per target (sizes the claim-token batch).
    best_rps: HashMap<&'static str, f64>,
}

impl SelfRegBench {
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &mut self,
        targets: &mut [Target],
        ctx: &Arc<Ctx>,
        round: usize,
        args: &Args,
        results: &mut Vec<PhaseResult>,
        checks: &mut Vec<EventsCheck>,
        out: &mut Vec<SelfRegRow>,
    ) -> Result<()> {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        let mut phases = vec![Phase::SrOperator, Phase::SrDevice];
        if args.selfreg_claims > 0 {
            phases.push(Phase::SrClaim);
        }
        if round.is_multiple_of(2) {
            order.reverse();
            phases.reverse();
        }
        for i in order {
            let name = targets[i].name;
            if !self.policy.contains_key(name) {
                let enforced = put_policy(&targets[i], args).await?;
                self.policy.insert(name, enforced);
            }
            let mut row = SelfRegRow {
                target: name,
                round,
                operator_rps: 0.0,
                operator_p99_ms: 0.0,
                device_rps: 0.0,
                device_p99_ms: 0.0,
                device_pct: 0.0,
                claim_rps: None,
                claim_p99_ms: None,
                claim_pct: None,
                claims_minted: 0,
                claims_minted_per_s: None,
                claims_left: 0,
                errors: 0,
                policy_enforced: self.policy[name],
            };
            for &phase in &phases {
                if phase == Phase::SrClaim {
                    let best = self.best_rps.get(name).copied().unwrap_or(0.0);
                    let want = (1.5 * best * (args.warmup + args.duration)).ceil() as usize;
                    let n = want.clamp(MINT_BATCH.min(args.selfreg_claims), args.selfreg_claims);
                    let started = Instant::now();
                    let claims = mint_claims(&targets[i], args, n).await?;
                    row.claims_minted = claims.len();
                    row.claims_minted_per_s =
                        Some(claims.len() as f64 / started.elapsed().as_secs_f64());
                    *ctx.claims
                        .lock()
                        .map_err(|_| anyhow!("claim pool poisoned"))? = claims;
                }
                // Always settle: the previous side's leftovers (WAL checkpoint, relay) must
                // not run during this one.
                let (res, check) =
                    measure_closed(targets, i, phase, round, ctx, args, true).await?;
                let best = self.best_rps.entry(name).or_default();
                *best = best.max(res.rps);
                row.errors += res.errors;
                match phase {
                    Phase::SrOperator => {
                        (row.operator_rps, row.operator_p99_ms) = (res.rps, res.p99_ms)
                    }
                    Phase::SrDevice => (row.device_rps, row.device_p99_ms) = (res.rps, res.p99_ms),
                    _ => {
                        row.claim_rps = Some(res.rps);
                        row.claim_p99_ms = Some(res.p99_ms);
                        let mut pool = ctx
                            .claims
                            .lock()
                            .map_err(|_| anyhow!("claim pool poisoned"))?;
                        row.claims_left = pool.len();
                        pool.clear();
                    }
                }
                results.push(res);
                checks.extend(check);
            }
            row.device_pct = pct(row.device_rps, row.operator_rps);
            row.claim_pct = row.claim_rps.map(|c| pct(c, row.operator_rps));
            if row.claim_rps.is_some() && row.claims_left == 0 {
                eprintln!(
                    "selfreg [{name}] round {round}: the claim tokens ran out; raise --selfreg-claims"
                );
            }
            out.push(row);
        }
        Ok(())
    }
}

fn pct(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        100.0 * a / b
    } else {
        f64::NAN
    }
}

/// The operator's `Authorization` header line of the target's connections (none without
/// --auth).
pub(crate) fn operator_header(t: &Target) -> String {
    t.workers
        .first()
        .and_then(|w| w.auth.first())
        .cloned()
        .unwrap_or_default()
}

/// Puts [`policy`] on the application, then checks that it bites: a registration with a
/// value out of its range and one with an ID off the pattern must both be refused (else the
/// device side would measure less than the rules cost). Returns whether both were.
async fn put_policy(t: &Target, args: &Args) -> Result<bool> {
    let mut conn = Conn::new(&t.addr);
    let path = format!("/api/v1/applications/{}/self-registration", args.app_name);
    let body = serde_json::to_vec(&policy())?;
    let r = conn
        .request_with_headers("PUT", &path, Some(&body), &operator_header(t))
        .await?;
    if !r.is_success() {
        bail!(
            "selfreg: PUT {path} on {}: HTTP {} {}",
            t.addr,
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    let device = format!("/device/v1/applications/{}/registrations", args.app_name);
    let mut enforced = true;
    for (what, id, level, reason) in [
        (
            "a level out of 0..=49",
            "bench-probe-range",
            50,
            "metadata-value-not-allowed",
        ),
        (
            "an ID off the pattern",
            "Probe_Off_Pattern",
            5,
            "endpoint-id-not-allowed",
        ),
    ] {
        let body = format!(
            r#"{{"endpointId":"{id}","appVersion":"{}","metadata":{{"city":"c1","level":{level},"kind":"meter","on":true,"fw":"1.2.0"}},"provisioningSecret":"{SECRET}"}}"#,
            args.app_version
        );
        let r = conn.request("POST", &device, Some(body.as_bytes())).await?;
        let text = String::from_utf8_lossy(&r.body);
        if r.is_success() || !text.contains(reason) {
            enforced = false;
            eprintln!(
                "selfreg [{}]: the policy did not refuse {what} with `{reason}`: HTTP {} {text}",
                t.name, r.status
            );
        }
    }
    Ok(enforced)
}

/// Mints `n` claim tokens (bound to the ID pattern, valid a day) in calls of up to
/// [`MINT_BATCH`]; returns their values.
async fn mint_claims(t: &Target, args: &Args, n: usize) -> Result<Vec<String>> {
    let mut conn = Conn::new(&t.addr);
    let path = format!("/api/v1/applications/{}/claim-tokens", args.app_name);
    let header = operator_header(t);
    let mut claims = Vec::with_capacity(n);
    while claims.len() < n {
        let count = (n - claims.len()).min(MINT_BATCH);
        let body = serde_json::json!({
            "count": count,
            "ttlSeconds": 86_400,
            "endpointIdPattern": ID_PATTERN,
        });
        let r = conn
            .request_with_headers("POST", &path, Some(&serde_json::to_vec(&body)?), &header)
            .await?;
        let text = String::from_utf8_lossy(&r.body);
        if !r.is_success() {
            bail!("selfreg: POST {path}: HTTP {} {text}", r.status);
        }
        let v: serde_json::Value = serde_json::from_slice(&r.body)?;
        let before = claims.len();
        collect_claims(&v, &mut claims);
        if claims.len() - before != count {
            let head: String = text.chars().take(300).collect();
            bail!(
                "selfreg: POST {path} with count {count} answered {} claim tokens: {head}",
                claims.len() - before
            );
        }
    }
    Ok(claims)
}

/// Every string under a `claimToken` key anywhere in `v` (the minted tokens' values).
fn collect_claims(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) if k == "claimToken" => out.push(s.clone()),
                    _ => collect_claims(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_claims(v, out)),
        _ => {}
    }
}

/// Per target over all rounds: the rates side by side and the target's verdict.
pub fn print_summary(rounds: &[Round]) {
    let rows: Vec<&SelfRegRow> = rounds.iter().flat_map(|r| &r.selfreg).collect();
    if rows.is_empty() {
        return;
    }
    println!(
        "\nSelf-registration vs operator registration (same connections, duration, metadata):\n"
    );
    println!("| target | round | operator reg/s | p99 ms | self-reg/s (secret) | p99 ms | self / operator | self-reg/s (claim) | p99 ms | claim / operator | claims minted (per s) | errors | policy enforced |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let opt = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"));
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.1}% | {} | {} | {} | {} ({}) | {} | {} |",
            if r.target.is_empty() { "-" } else { r.target },
            r.round,
            r.operator_rps,
            r.operator_p99_ms,
            r.device_rps,
            r.device_p99_ms,
            r.device_pct,
            opt(r.claim_rps, 0),
            opt(r.claim_p99_ms, 2),
            r.claim_pct.map_or_else(|| "-".into(), |p| format!("{p:.1}%")),
            r.claims_minted,
            opt(r.claims_minted_per_s, 0),
            r.errors,
            if r.policy_enforced { "yes" } else { "**NO**" },
        );
    }
    let mut targets: Vec<&'static str> = Vec::new();
    for r in &rows {
        if !targets.contains(&r.target) {
            targets.push(r.target);
        }
    }
    println!();
    for t in targets {
        let mine: Vec<&&SelfRegRow> = rows.iter().filter(|r| r.target == t).collect();
        let op: f64 = mine.iter().map(|r| r.operator_rps).sum();
        let dev: f64 = mine.iter().map(|r| r.device_rps).sum();
        let mut per_round: Vec<f64> = mine.iter().map(|r| r.device_pct).collect();
        per_round.sort_by(f64::total_cmp);
        let pooled = pct(dev, op);
        let verdict =
            if pooled >= TARGET_PCT && mine.iter().all(|r| r.errors == 0 && r.policy_enforced) {
                "met"
            } else if pooled >= TARGET_PCT {
                "rate met, but with errors or an unenforced policy"
            } else {
                "missed"
            };
        let label = if t.is_empty() {
            String::new()
        } else {
            format!(" [{t}]")
        };
        println!(
            "self-registration / operator{label}: {pooled:.1}% pooled over {} rounds (median {:.1}%, min–max {:.1}–{:.1}%); target ≥ {TARGET_PCT:.0}%: **{verdict}**  ",
            mine.len(),
            median(&per_round),
            per_round.first().copied().unwrap_or(f64::NAN),
            per_round.last().copied().unwrap_or(f64::NAN),
        );
        let claim: Vec<f64> = mine.iter().filter_map(|r| r.claim_rps).collect();
        if !claim.is_empty() {
            let op_with: f64 = mine
                .iter()
                .filter(|r| r.claim_rps.is_some())
                .map(|r| r.operator_rps)
                .sum();
            println!(
                "claim-token self-registration / operator{label}: {:.1}% pooled over {} rounds  ",
                pct(claim.iter().sum(), op_with),
                claim.len()
            );
        }
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Conn, RegMetadata};

    fn worker() -> Worker {
        Worker {
            idx: 3,
            conn: Conn::new("127.0.0.1:1"),
            ids: Vec::new(),
            seq: 7,
            rng: 1,
            path: String::new(),
            body: String::new(),
            auth: Vec::new(),
            auth_next: 0,
        }
    }

    /// Every request the phase sends passes the policy it puts: the ID matches the pattern,
    /// every key is present and allowed, and the body stays under the size limit.
    #[test]
    fn requests_pass_the_policy() {
        let ctx = Ctx::new(
            "ab12cd34".into(),
            "bench-v1".into(),
            RegMetadata::Basic,
            "bench",
        );
        ctx.claims.lock().unwrap().push("claim-1".into());
        let p = policy();
        let allowed = &p["allowedMetadataValues"];
        let id_re = regex_lite(ID_PATTERN);
        for phase in [Phase::SrOperator, Phase::SrDevice, Phase::SrClaim] {
            let mut w = worker();
            for n in 0..500 {
                w.seq = n;
                w.path.clear();
                w.body.clear();
                let id = write_request(&mut w, phase, &ctx).unwrap_or_else(|e| {
                    assert_eq!(phase, Phase::SrClaim, "{e}");
                    String::new()
                });
                if id.is_empty() {
                    // The single claim token is used up after the first request.
                    assert!(n > 0);
                    continue;
                }
                assert!(id_re(&id), "{id}");
                let body: serde_json::Value = serde_json::from_str(&w.body).unwrap();
                assert_eq!(body["endpointId"], id.as_str());
                let md = body["metadata"].as_object().unwrap();
                assert!(serde_json::to_vec(md).unwrap().len() <= 4096);
                for key in p["requiredMetadataKeys"].as_array().unwrap() {
                    let key = key.as_str().unwrap();
                    let v = &md[key];
                    let rule = &allowed[key];
                    if let Some(values) = rule.get("values") {
                        assert!(values.as_array().unwrap().contains(v), "{key}={v}");
                    } else if let Some(min) = rule.get("min") {
                        let v = v.as_i64().unwrap();
                        assert!(v >= min.as_i64().unwrap() && v <= rule["max"].as_i64().unwrap());
                    } else {
                        let s = v.as_str().unwrap();
                        let (a, rest) = s.split_once('.').unwrap();
                        let (b, c) = rest.split_once('.').unwrap();
                        assert!(a == "1" && c == "0" && b.parse::<u32>().is_ok(), "{s}");
                    }
                }
                match phase {
                    Phase::SrOperator => {
                        assert_eq!(w.path, "/api/v1/endpoints");
                        assert_eq!(body["appVersion"]["name"], "bench-v1");
                    }
                    Phase::SrDevice => {
                        assert_eq!(w.path, "/device/v1/applications/bench/registrations");
                        assert_eq!(body["appVersion"], "bench-v1");
                        assert_eq!(body["provisioningSecret"], SECRET);
                    }
                    _ => assert_eq!(body["claimToken"], "claim-1"),
                }
            }
        }
        // The policy holds a rule of each kind and demands every key of the mix.
        assert_eq!(p["requiredMetadataKeys"].as_array().unwrap().len(), 5);
        assert!(SECRET.len() >= 16);
    }

    /// The three measurements run through the closed-loop machinery: every registration
    /// counts (and keeps its ID), and the claim side stops at the claims it was given.
    #[tokio::test]
    async fn phases_run_against_responder() {
        let addr = crate::client::tests::spawn_responder(usize::MAX).await;
        let args = <Args as clap::Parser>::parse_from([
            "epr-bench",
            "--url",
            "http://x",
            "-c",
            "2",
            "--warmup",
            "0.05",
            "-d",
            "0.2",
        ]);
        let ctx = Arc::new(Ctx::new(
            "t".into(),
            "bench-v1".into(),
            RegMetadata::Basic,
            "bench",
        ));
        *ctx.claims.lock().unwrap() = vec!["k1".into(), "k2".into(), "k3".into()];
        let target = Target {
            name: "",
            addr: addr.clone(),
            server: None,
            pid: None,
            events: None,
            workers: Vec::new(),
            replicas: Vec::new(),
            nats_instance: None,
        };
        let mut workers = crate::new_workers(&addr, 2);
        for phase in [Phase::SrOperator, Phase::SrDevice, Phase::SrClaim] {
            let (back, res, extra) = crate::run_phase(workers, &ctx, phase, &args, &target)
                .await
                .unwrap();
            workers = back;
            if phase == Phase::SrClaim {
                assert_eq!(extra.registrations, 3);
                assert!(res.errors > 0, "running out of claims is an error");
            } else {
                assert!(res.requests > 0 && res.errors == 0, "{}", res.phase);
                assert_eq!(extra.registrations, extra.acked);
            }
        }
        let ids: usize = workers.iter().map(|w| w.ids.len()).sum();
        assert!(
            ids > 3
                && workers
                    .iter()
                    .flat_map(|w| &w.ids)
                    .all(|i| i.starts_with("bench-t-"))
        );
    }

    /// `bench-[0-9a-z-]+`, anchored, without a regex dependency.
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
        assert_eq!(pattern, "bench-[0-9a-z-]+");
        |s: &str| {
            s.strip_prefix("bench-").is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .chars()
                        .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || c == '-')
            })
        }
    }

    #[test]
    fn claims_are_collected_wherever_the_answer_puts_them() {
        let v = serde_json::json!({"content": [
            {"claimTokenId": "a", "claimToken": "t1", "endpointIdPattern": "x"},
            {"claimTokenId": "b", "claimToken": "t2"}
        ], "totalElements": 2});
        let mut out = Vec::new();
        collect_claims(&v, &mut out);
        assert_eq!(out, ["t1", "t2"]);
        let mut out = Vec::new();
        collect_claims(&serde_json::json!([{"claimToken": "t3"}]), &mut out);
        assert_eq!(out, ["t3"]);
    }
}
