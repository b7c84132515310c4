//! Authentication: the `--auth` comparison (servers with JWT validation off and on, side
//! by side) and the `auth-verify` timing loop (what one token check costs, per algorithm).
//!
//! The issuer is an in-process [`TestIssuer`] (loopback discovery + JWKS) with the fixed
//! test keys of `epr-auth`; tokens are minted once, before any measurement, so signing
//! (milliseconds for RSA) never runs inside a recorded window.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use epr_auth::testkit::{TestIssuer, TestKey};
use epr_auth::{Auth, AuthSettings, TenantSettings};
use epr_core::auth::Authenticator;
use epr_core::ids::TenantId;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::client::Conn;

/// The tenant of the authentication-on servers.
pub const TENANT: &str = "bench";

/// The scopes every bench token carries (tenant-wide): register, read, update.
const SCOPES: &str = "application:endpoint:create endpoint:read endpoint:update";

/// Token lifetime: longer than any run, so no token expires mid-measurement.
const TOKEN_TTL_SECS: i64 = 24 * 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Alg {
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "EdDSA")]
    EdDsa,
}

impl Alg {
    pub fn key(self) -> TestKey {
        match self {
            Alg::Rs256 => TestKey::Rsa1,
            Alg::Es256 => TestKey::Ec1,
            Alg::EdDsa => TestKey::Ed1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// The issuer of a `--auth` run and the tokens of every connection.
pub struct AuthBench {
    pub issuer: TestIssuer,
    pub alg: Alg,
}

impl AuthBench {
    pub async fn start(alg: Alg) -> AuthBench {
        let issuer = TestIssuer::start(&[alg.key()]).await;
        AuthBench { issuer, alg }
    }

    /// The `auth` section of an authentication-on server's config. `cache_entries` 0: every
    /// request verifies its token's signature (the miss path).
    pub fn yaml(&self, cache_entries: usize) -> Result<String> {
        Ok(format!(
            "auth:\n  tenants:\n    - id: {TENANT}\n      issuer: {}\n  token_cache_entries: {cache_entries}\n",
            serde_json::to_string(self.issuer.url())?
        ))
    }

    /// `n` distinct tokens of connection `conn`, as complete `Authorization` header lines.
    /// Distinct subjects (`bench-c<conn>-t<i>`): what distinct clients send.
    pub fn header_lines(&self, conn: usize, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let token = self
                    .issuer
                    .token(self.alg.key())
                    .subject(&format!("bench-c{conn}-t{i}"))
                    .scope(SCOPES)
                    .exp_in(TOKEN_TTL_SECS)
                    .sign();
                format!("Authorization: Bearer {token}\r\n")
            })
            .collect()
    }
}

/// Waits until a server with authentication on accepts `header` (its issuer's keys are
/// loaded): a token-checked request answers 404 for an unknown endpoint instead of 503.
pub async fn wait_accepts(addr: &str, header: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = Conn::new(addr);
    loop {
        let r = conn
            .request_with_headers("GET", "/api/v1/endpoints/bench-probe", None, header)
            .await?;
        match r.status {
            404 | 200 => return Ok(()),
            503 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            s => bail!(
                "server {addr} refuses the bench token: HTTP {s} {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }
}

/// `epr-bench auth-verify`: the cost of one token check, per algorithm, on one core.
#[derive(Parser, Debug)]
#[command(
    name = "epr-bench auth-verify",
    about = "Times token verification per algorithm (no server involved)"
)]
pub struct VerifyArgs {
    /// Algorithms to time.
    #[arg(long, value_delimiter = ',', default_values = ["RS256", "ES256", "EdDSA"])]
    algs: Vec<Alg>,
    /// Seconds per measurement.
    #[arg(long, short, default_value_t = 2.0)]
    duration: f64,
}

/// One row of the `auth-verify` table: mean µs per operation.
struct VerifyRow {
    alg: Alg,
    token_bytes: usize,
    signature_us: f64,
    miss_us: f64,
    hit_us: f64,
}

/// Runs `f` back to back for `secs` (after a tenth of that as warm-up); mean µs per call.
async fn time_loop<F, Fut>(secs: f64, mut f: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let warm = Instant::now() + Duration::from_secs_f64(secs / 10.0);
    while Instant::now() < warm {
        f().await?;
    }
    let (start, mut n) = (Instant::now(), 0u64);
    let end = start + Duration::from_secs_f64(secs);
    // Check the clock every 16 calls: a cache hit is well under a microsecond.
    loop {
        for _ in 0..16 {
            f().await?;
        }
        n += 16;
        let now = Instant::now();
        if now >= end {
            return Ok((now - start).as_secs_f64() * 1e6 / n as f64);
        }
    }
}

/// An [`Auth`] with one tenant of `issuer`, its keys loaded; `cache` verified tokens kept.
async fn loaded_auth(
    issuer: &TestIssuer,
    cache: usize,
    token: &str,
    shutdown: &CancellationToken,
) -> Result<Arc<Auth>> {
    let settings = AuthSettings {
        tenants: vec![TenantSettings {
            id: TENANT.into(),
            issuer: issuer.url().into(),
            ..TenantSettings::default()
        }],
        token_cache_entries: cache,
        ..AuthSettings::default()
    };
    let auth = Auth::new(
        settings,
        TenantId::parse(TENANT).map_err(|e| anyhow!("{e}"))?,
    )
    .map_err(|e| anyhow!(e))?;
    tokio::spawn(auth.clone().run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match auth.authenticate(token).await {
            Ok(_) => return Ok(auth),
            Err(e) if Instant::now() > deadline => bail!("token refused: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

pub async fn verify_cmd(args: VerifyArgs) -> Result<()> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration must be a positive number of seconds");
    }
    let shutdown = CancellationToken::new();
    let mut rows = Vec::new();
    for &alg in &args.algs {
        let ab = AuthBench::start(alg).await;
        let key = alg.key();
        let token = ab.header_lines(0, 1)[0]
            .trim_end()
            .trim_start_matches("Authorization: Bearer ")
            .to_owned();
        // jsonwebtoken alone: signature + claims, as the server's verifier calls it.
        let jwk: Jwk = serde_json::from_value(key.jwk())?;
        let dk = DecodingKey::from_jwk(&jwk).context("decoding key")?;
        let mut v = Validation::new(key.alg());
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.set_issuer(&[ab.issuer.url()]);
        v.set_audience(&["kaa-rest-api"]);
        let signature_us = time_loop(args.duration, || {
            let r = jsonwebtoken::decode::<Value>(black_box(&token), &dk, &v)
                .map(|d| {
                    black_box(d);
                })
                .map_err(|e| anyhow!("decode: {e}"));
            std::future::ready(r)
        })
        .await?;
        // The whole check in epr-auth with the cache off (every call a miss), then on
        // (every call after the first a hit).
        let miss = loaded_auth(&ab.issuer, 0, &token, &shutdown).await?;
        let miss_us = time_loop(args.duration, || {
            let (a, t) = (miss.clone(), token.clone());
            async move {
                black_box(a.authenticate(&t).await.map_err(|e| anyhow!("{e:?}"))?);
                Ok(())
            }
        })
        .await?;
        let hit = loaded_auth(&ab.issuer, 100_000, &token, &shutdown).await?;
        let hit_us = time_loop(args.duration, || {
            let (a, t) = (hit.clone(), token.clone());
            async move {
                black_box(a.authenticate(&t).await.map_err(|e| anyhow!("{e:?}"))?);
                Ok(())
            }
        })
        .await?;
        let row = VerifyRow {
            alg,
            token_bytes: token.len(),
            signature_us,
            miss_us,
            hit_us,
        };
        eprintln!(
            "{}: signature {:.1} µs, miss {:.1} µs, hit {:.2} µs",
            alg.name(),
            signature_us,
            miss_us,
            hit_us
        );
        rows.push(row);
    }
    shutdown.cancel();
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "auth-verify: {} s per measurement, one thread, nproc {nproc}, {}\n",
        args.duration,
        chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
    );
    println!("| alg | token bytes | jsonwebtoken::decode µs | epr-auth check, cache off (miss) µs | epr-auth check, cached (hit) µs | checks/s per core (miss) | checks/s per core (hit) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} |",
            r.alg.name(),
            r.token_bytes,
            r.signature_us,
            r.miss_us,
            r.hit_us,
            1e6 / r.miss_us,
            1e6 / r.hit_us
        );
    }
    Ok(())
}
