//! The operator subcommands: `backup`, `restore`, `export`, `import`, `purge-tenant`,
//! `migrate` and `migrate-store` (docs/operations.md, docs/security.md, docs/postgres.md).
//!
//! `backup` and `export` work while a server runs on the data directory: they read through a
//! read-only connection of their own (`epr_store::backup`), never through the server's store.
//! `restore` and `import` write a data directory, so its server must be stopped.
//! On PostgreSQL, `export`, `import` and `purge-tenant` go through the same `Store` trait on
//! the configured database; `backup`/`restore` are the embedded store's (pg_dump does it
//! for PostgreSQL).

use crate::export_format::{self as format, End, EndpointLine, FilterLine, Header, Line};
use crate::Settings;
use anyhow::{bail, Context};
use epr_core::endpoint_filter::{FilterId, FilterStatus};
use epr_core::ids::TenantId;
use epr_core::metadata::Limits;
use epr_core::ports::{Clock, ImportOutcome, ImportRecord, Store};
use epr_store::backup::{self, BackupReport, Overwrite};
use epr_store::{EmbeddedConfig, EmbeddedStore};
use epr_store_pg::{PgConfig, PgStore};
use serde::Serialize;
use serde_json::json;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Endpoints read per export page and records per import transaction.
const CHUNK: usize = 1000;

/// Logs go to stderr: stdout carries the command's result (or the export itself).
pub fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal, as for the server's log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if settings.log.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CopyReport {
    file: PathBuf,
    bytes: u64,
    endpoints: u64,
    filters: u64,
    outbox_events: u64,
    seconds: f64,
}

impl From<BackupReport> for CopyReport {
    fn from(r: BackupReport) -> Self {
        Self {
            file: r.file,
            bytes: r.bytes,
            endpoints: r.endpoints,
            filters: r.filters,
            outbox_events: r.outbox,
            seconds: r.took.as_secs_f64(),
        }
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// `backup` and `restore` copy the embedded store's file: on PostgreSQL the database's own
/// tools do it.
fn embedded_only(settings: &Settings, command: &str) -> anyhow::Result<()> {
    if settings.is_postgres() {
        bail!(
            "`epr {command}` copies the embedded store's file; with store.backend 'postgres' use \
             pg_dump / pg_restore (docs/postgres.md), or `epr export` / `epr import`"
        );
    }
    Ok(())
}

/// `epr backup --to FILE`.
pub fn backup(settings: &Settings, to: &Path) -> anyhow::Result<()> {
    embedded_only(settings, "backup")?;
    let report = backup::backup(&settings.store.data_dir, to).with_context(|| {
        format!(
            "backing up the store in '{}'",
            settings.store.data_dir.display()
        )
    })?;
    print_json(&CopyReport::from(report))
}

/// `epr restore --from FILE [--force]`.
pub fn restore(settings: &Settings, from: &Path, force: bool) -> anyhow::Result<()> {
    embedded_only(settings, "restore")?;
    let overwrite = if force {
        Overwrite::Store
    } else {
        Overwrite::Never
    };
    let report = backup::restore(from, &settings.store.data_dir, overwrite).with_context(|| {
        format!(
            "restoring '{}' into '{}'",
            from.display(),
            settings.store.data_dir.display()
        )
    })?;
    print_json(&CopyReport::from(report))
}

/// The server's store configuration, with a small reader pool and no back-fill throttle (an
/// operator command is the store's only user).
fn store_config(settings: &Settings, data_dir: &Path) -> EmbeddedConfig {
    let mut cfg = settings.embedded_config(data_dir);
    cfg.readers = 2;
    cfg.backfill.pause = Duration::ZERO;
    cfg
}

/// The PostgreSQL store for an operator command: a small pool, one writer, no back-fill
/// throttle; migrations at open as `store.postgres.migrate_on_start` says.
fn pg_config(settings: &Settings, url: &str) -> PgConfig {
    let mut cfg = settings.postgres_config();
    cfg.url = url.to_owned();
    cfg.pool_size = 2;
    cfg.writers = 1;
    cfg.backfill.pause = Duration::ZERO;
    cfg
}

async fn open_pg(cfg: PgConfig) -> anyhow::Result<PgStore> {
    let url = crate::config::redact_database_url(&cfg.url);
    PgStore::open(cfg)
        .await
        .map_err(|e| anyhow::anyhow!("opening the PostgreSQL store at {url}: {e}"))
}

/// The store an operator command writes: the configured backend (for the embedded one, its
/// server must be stopped: the data directory lock says so).
async fn open_configured(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    if settings.is_postgres() {
        let url = settings.store.postgres.url.clone();
        return Ok(Arc::new(open_pg(pg_config(settings, &url)).await?));
    }
    let store = EmbeddedStore::open(store_config(settings, &settings.store.data_dir))
        .with_context(|| {
            format!(
                "opening the store in '{}' (is its server stopped?)",
                settings.store.data_dir.display()
            )
        })?;
    Ok(Arc::new(store))
}

/// What an export wrote.
#[derive(Serialize, Default)]
pub struct Counts {
    pub filters: u64,
    pub endpoints: u64,
}

/// `epr export [--to FILE]`: a consistent export taken from a snapshot (a backup into a
/// temporary directory, opened as a store), so it works beside a running server.
pub async fn export(settings: &Settings, to: Option<&Path>) -> anyhow::Result<()> {
    let started = Instant::now();
    if settings.is_postgres() {
        // Read in pages beside the running replicas (no snapshot file to take).
        let mut cfg = pg_config(settings, &settings.store.postgres.url);
        cfg.record_events = false;
        let store = open_pg(cfg).await?;
        let result = export_somewhere(&store, to).await;
        store.shutdown().await;
        return report_export(result?, to, started);
    }
    let data_dir = &settings.store.data_dir;
    let tmp = tempfile::Builder::new()
        .prefix("epr-export-")
        .tempdir()
        .context("creating a temporary directory for the snapshot (set TMPDIR)")?;
    backup::backup(data_dir, &backup::database_file(tmp.path()))
        .with_context(|| format!("taking a snapshot of '{}'", data_dir.display()))?;
    let mut cfg = store_config(settings, tmp.path());
    // Nothing publishes the snapshot's events.
    cfg.record_events = false;
    let store = EmbeddedStore::open(cfg).context("opening the snapshot")?;
    let result = export_somewhere(&store, to).await;
    store.shutdown().await;
    report_export(result?, to, started)
}

async fn export_somewhere(store: &dyn Store, to: Option<&Path>) -> anyhow::Result<Counts> {
    match to {
        None => {
            let stdout = std::io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            export_to(store, &mut out).await
        }
        Some(path) => export_to_file(store, path).await,
    }
}

fn report_export(counts: Counts, to: Option<&Path>, started: Instant) -> anyhow::Result<()> {
    let seconds = started.elapsed().as_secs_f64();
    match to {
        // Standard output carries the export itself.
        None => eprintln!(
            "exported {} filters and {} endpoints in {seconds:.1} s",
            counts.filters, counts.endpoints
        ),
        Some(file) => print_json(&json!({
            "file": file,
            "filters": counts.filters,
            "endpoints": counts.endpoints,
            "seconds": seconds,
        }))?,
    }
    Ok(())
}

async fn export_to_file(store: &dyn Store, path: &Path) -> anyhow::Result<Counts> {
    if path.exists() {
        bail!(
            "'{}' exists; an export never overwrites a file",
            path.display()
        );
    }
    // Written under a temporary name and renamed once complete.
    let mut partial = path.as_os_str().to_owned();
    partial.push(format!(".partial-{}", std::process::id()));
    let partial = PathBuf::from(partial);
    let result = async {
        let file = std::fs::File::create(&partial)
            .with_context(|| format!("creating '{}'", partial.display()))?;
        let mut out = BufWriter::new(file);
        let counts = export_to(store, &mut out).await?;
        let file = out.into_inner().context("writing the export")?;
        file.sync_all().context("syncing the export")?;
        std::fs::rename(&partial, path)
            .with_context(|| format!("renaming to '{}'", path.display()))?;
        Ok(counts)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn write_line(out: &mut dyn Write, line: &Line) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n").context("writing the export")?;
    Ok(())
}

/// Writes every tenant's filters and endpoints through the [`Store`] trait (any backend).
pub async fn export_to(store: &dyn Store, out: &mut dyn Write) -> anyhow::Result<Counts> {
    write_line(
        out,
        &Line::Header(Header {
            format: format::FORMAT.into(),
            version: format::VERSION,
            exported_at: crate::SystemClock.now().0,
            store_id: store.store_id(),
        }),
    )?;
    let mut counts = Counts::default();
    for tenant in store.export_tenants().await? {
        for f in store.export_filters(&tenant).await? {
            write_line(out, &Line::Filter(FilterLine::new(&tenant, &f)))?;
            counts.filters += 1;
        }
        let mut after = 0;
        loop {
            let page = store.export_endpoints(&tenant, after, CHUNK).await?;
            let Some(last) = page.last() else { break };
            after = last.endpoint.incarnation;
            for e in &page {
                write_line(out, &Line::Endpoint(EndpointLine::from(e)))?;
            }
            counts.endpoints += page.len() as u64;
        }
    }
    write_line(
        out,
        &Line::End(End {
            filters: counts.filters,
            endpoints: counts.endpoints,
        }),
    )?;
    out.flush().context("writing the export")?;
    Ok(counts)
}

#[derive(Serialize, Default)]
struct Tally {
    imported: u64,
    existing: u64,
    refused: u64,
}

#[derive(Serialize, Default)]
struct ImportReport {
    filters: Tally,
    endpoints: Tally,
    seconds: f64,
}

/// `epr import [--from FILE]`: the server of the data directory must be stopped.
pub async fn import(settings: &Settings, from: Option<&Path>) -> anyhow::Result<()> {
    let started = Instant::now();
    let limits = settings.registry_settings().limits;
    // Two passes (validate everything, then write), so stdin is spooled to a file first.
    let spooled;
    let path = match from {
        Some(p) => p.to_path_buf(),
        None => {
            let mut file = tempfile::NamedTempFile::new().context("spooling stdin")?;
            std::io::copy(&mut std::io::stdin().lock(), &mut file).context("reading stdin")?;
            spooled = file;
            spooled.path().to_path_buf()
        }
    };
    // Pass 1: a file with any bad line changes nothing.
    let open = || -> anyhow::Result<Box<dyn Read>> {
        Ok(Box::new(std::fs::File::open(&path).with_context(|| {
            format!("opening '{}'", path.display())
        })?))
    };
    validate_all(open()?, &limits)?;
    let store = open_configured(settings).await?;
    let result = import_into(store.as_ref(), open()?, &limits).await;
    store.shutdown().await;
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    print_json(&report)?;
    let refused = report.filters.refused + report.endpoints.refused;
    if refused > 0 {
        bail!("{refused} records were refused (listed above); the others are imported");
    }
    Ok(())
}

/// `epr purge-tenant --tenant X`: deletes a removed tenant's filters and endpoints, as the
/// server does on a 21/TLE `unregistered` event with `auth.removed_tenant_data: purge`
/// (finishes a purge a restart interrupted). The server of the data directory must be
/// stopped. The deletions' events wait in the outbox for the server's next start.
pub async fn purge_tenant(
    settings: &Settings,
    tenant: &str,
    per_second: u32,
) -> anyhow::Result<()> {
    let tenant = TenantId::parse(tenant).map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
    if settings
        .auth
        .tenants
        .iter()
        .any(|t| t.id == tenant.as_str())
    {
        bail!("--tenant: '{tenant}' is configured in auth.tenants; remove it there first");
    }
    if !settings.auth.enabled() && tenant == settings.tenant()? {
        bail!("--tenant: '{tenant}' is tenant.default, the tenant of every request while authentication is off");
    }
    if per_second == 0 {
        bail!("--rate must be at least 1");
    }
    let started = Instant::now();
    let store = open_configured(settings).await?;
    let registry = epr_core::registry::Registry::new(
        store.clone(),
        settings.catalog()?,
        settings.registry_settings(),
        std::sync::Arc::new(crate::SystemClock),
        std::sync::Arc::new(crate::UuidIds),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        on_signal.cancel();
    });
    let pace = crate::purge::PurgePace {
        per_second,
        ..Default::default()
    };
    let report = crate::purge::purge_tenant(&registry, &tenant, pace, &stop, || true).await;
    store.shutdown().await;
    print_json(&json!({
        "tenant": tenant.as_str(),
        "filtersDeleted": report.filters_deleted,
        "endpointsDeleted": report.endpoints_deleted,
        "complete": report.complete,
        "seconds": started.elapsed().as_secs_f64(),
    }))?;
    if !report.complete {
        bail!("interrupted: run the command again to finish");
    }
    Ok(())
}

/// The lines of an export with their numbers (from 1), checking the frame: a header of a
/// known version first, an `end` line with the right counts last.
struct Lines {
    reader: BufReader<Box<dyn Read>>,
    buf: String,
    number: usize,
    seen: (u64, u64),
    ended: bool,
}

impl Lines {
    fn new(input: Box<dyn Read>) -> Self {
        Self {
            reader: BufReader::new(input),
            buf: String::new(),
            number: 0,
            seen: (0, 0),
            ended: false,
        }
    }

    /// The next line; `None` at the end of a complete export.
    fn next(&mut self) -> anyhow::Result<Option<(usize, Line)>> {
        self.buf.clear();
        let n = self
            .reader
            .read_line(&mut self.buf)
            .with_context(|| format!("line {}: cannot be read (not UTF-8?)", self.number + 1))?;
        if n == 0 {
            if self.number == 0 {
                bail!("the input is empty");
            }
            if !self.ended {
                bail!(
                    "the input ends at line {} without an end line: it is truncated",
                    self.number
                );
            }
            return Ok(None);
        }
        self.number += 1;
        let number = self.number;
        if self.ended {
            bail!("line {number}: content after the end line");
        }
        let text = self.buf.trim_end_matches(['\n', '\r']);
        let line = format::parse(text).map_err(|e| anyhow::anyhow!("line {number}: {e}"))?;
        match &line {
            Line::Header(h) => {
                if number != 1 {
                    bail!("line {number}: a header may only be the first line");
                }
                if h.format != format::FORMAT {
                    bail!(
                        "line 1: format '{}' is not an EPR export ('{}')",
                        h.format,
                        format::FORMAT
                    );
                }
                if !(format::OLDEST_VERSION..=format::VERSION).contains(&h.version) {
                    bail!(
                        "line 1: export format version {} is not supported (this build reads \
                         {} to {})",
                        h.version,
                        format::OLDEST_VERSION,
                        format::VERSION
                    );
                }
            }
            _ if number == 1 => bail!("line 1: the first line must be the header"),
            Line::Filter(_) => self.seen.0 += 1,
            Line::Endpoint(_) => self.seen.1 += 1,
            Line::End(end) => {
                if (end.filters, end.endpoints) != self.seen {
                    bail!(
                        "line {number}: the end line counts {} filters and {} endpoints, the \
                         file has {} and {}",
                        end.filters,
                        end.endpoints,
                        self.seen.0,
                        self.seen.1
                    );
                }
                self.ended = true;
            }
        }
        Ok(Some((number, line)))
    }
}

/// The record of a line (`None` for the header and end), validated.
fn record(number: usize, line: Line, limits: &Limits) -> anyhow::Result<Option<ImportRecord>> {
    match line {
        Line::Filter(f) => f.validate().map(Some),
        Line::Endpoint(e) => e.validate(limits).map(Some),
        Line::Header(_) | Line::End(_) => Ok(None),
    }
    .map_err(|e| anyhow::anyhow!("line {number}: {e}"))
}

fn validate_all(input: Box<dyn Read>, limits: &Limits) -> anyhow::Result<()> {
    let mut lines = Lines::new(input);
    while let Some((number, line)) = lines.next()? {
        record(number, line, limits)?;
    }
    Ok(())
}

/// Imports a validated export through the [`Store`] trait, [`CHUNK`] records per transaction,
/// then waits until every imported filter is active (its back-fill done).
async fn import_into(
    store: &dyn Store,
    input: Box<dyn Read>,
    limits: &Limits,
) -> anyhow::Result<ImportReport> {
    let mut report = ImportReport::default();
    let mut filters = Vec::new();
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut lines = Lines::new(input);
    while let Some((number, line)) = lines.next()? {
        if let Some(r) = record(number, line, limits)? {
            chunk.push((format!("line {number}"), r));
        }
        if chunk.len() == CHUNK {
            import_chunk(store, std::mem::take(&mut chunk), &mut report, &mut filters).await?;
        }
    }
    import_chunk(store, chunk, &mut report, &mut filters).await?;
    wait_backfills(store, filters).await?;
    Ok(report)
}

/// Back-fills are waited for, so the imported store is complete when the command ends;
/// a store that refuses writes (found damaged) never finishes them.
async fn wait_backfills(
    store: &dyn Store,
    filters: Vec<(TenantId, FilterId)>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + BACKFILL_WAIT;
    for (tenant, id) in filters {
        while let Some(f) = store.get_filter(&tenant, &id).await? {
            if f.status != FilterStatus::Pending {
                break;
            }
            store.ping().await?;
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "filter {id} is still being back-filled after {} s; the imported data is \
                     committed, and the back-fill resumes when a server starts on this directory",
                    BACKFILL_WAIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// How long `epr import` waits for the back-fills of imported filters.
const BACKFILL_WAIT: Duration = Duration::from_secs(600);

async fn import_chunk(
    store: &dyn Store,
    chunk: Vec<(String, ImportRecord)>,
    report: &mut ImportReport,
    filters: &mut Vec<(TenantId, FilterId)>,
) -> anyhow::Result<()> {
    if chunk.is_empty() {
        return Ok(());
    }
    let (labels, records): (Vec<String>, Vec<ImportRecord>) = chunk.into_iter().unzip();
    let kinds: Vec<Option<(TenantId, FilterId)>> = records
        .iter()
        .map(|r| match r {
            ImportRecord::Filter { tenant, filter } => Some((tenant.clone(), filter.id.clone())),
            ImportRecord::Endpoint(_) => None,
        })
        .collect();
    let outcomes = store.import(records).await?;
    for ((label, kind), outcome) in labels.into_iter().zip(kinds).zip(outcomes) {
        let tally = if kind.is_some() {
            &mut report.filters
        } else {
            &mut report.endpoints
        };
        match outcome {
            ImportOutcome::Imported => {
                tally.imported += 1;
                filters.extend(kind);
            }
            ImportOutcome::Exists => tally.existing += 1,
            ImportOutcome::Conflict(why) => {
                tally.refused += 1;
                eprintln!("{label}: refused: {why}");
            }
        }
    }
    Ok(())
}

/// `epr migrate`: applies the schema migrations `store.postgres.url` lacks (safe beside
/// running replicas: each migration runs under an advisory lock) and prints the versions
/// applied. The embedded store migrates itself when it opens.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    if !settings.is_postgres() {
        print_json(&json!({
            "backend": settings.store.backend,
            "applied": [],
            "message": "nothing to do: the embedded store migrates its file when it opens",
        }))?;
        return Ok(());
    }
    let url = &settings.store.postgres.url;
    let shown = crate::config::redact_database_url(url);
    let mut pg: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("store.postgres.url '{shown}'"))?;
    pg.connect_timeout(Duration::from_millis(
        settings.store.postgres.connect_timeout_ms,
    ));
    pg.application_name("epr migrate");
    let (mut client, connection) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {shown}"))?;
    let conn = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the migration connection ended");
        }
    });
    let applied = epr_store_pg::schema::migrate(&mut client)
        .await
        .map_err(|e| anyhow::anyhow!("migrating {shown}: {e}"))?;
    drop(client);
    let _ = conn.await;
    print_json(&json!({
        "backend": "postgres",
        "database": shown,
        "applied": applied,
        "version": epr_store_pg::schema::latest(),
    }))
}

/// One side of `epr migrate-store`: `embedded:DIR` or `postgres:URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Embedded(PathBuf),
    Postgres(String),
}

impl StoreLocation {
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        // A bare database URL names its backend already.
        let spec = if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            std::borrow::Cow::Owned(format!("postgres:{spec}"))
        } else {
            std::borrow::Cow::Borrowed(spec)
        };
        match spec.split_once(':') {
            Some(("embedded", dir)) if !dir.is_empty() => Ok(Self::Embedded(dir.into())),
            Some(("postgres", url)) if !url.is_empty() => {
                url.parse::<tokio_postgres::Config>().with_context(|| {
                    format!(
                        "'{}' is not a database URL",
                        crate::config::redact_database_url(url)
                    )
                })?;
                Ok(Self::Postgres(url.to_owned()))
            }
            _ => bail!(
                "'{}' is not embedded:DIR or postgres:URL",
                crate::config::redact_database_url(&spec)
            ),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Embedded(dir) => format!("embedded:{}", dir.display()),
            Self::Postgres(url) => format!("postgres:{}", crate::config::redact_database_url(url)),
        }
    }
}

/// What `epr migrate-store` did.
#[derive(Serialize, Default)]
pub struct MigrateReport {
    pub from: String,
    pub to: String,
    pub tenants: u64,
    pub filters: MigrateTally,
    pub endpoints: MigrateTally,
    pub seconds: f64,
}

#[derive(Serialize, Default)]
pub struct MigrateTally {
    pub imported: u64,
    pub existing: u64,
    pub refused: u64,
}

/// `epr migrate-store --from … --to … [--resume]`: copies every tenant's filters and
/// endpoints through the `Store` trait (export pages → import), then waits for the imported
/// filters' back-fills. The target must be empty unless `--resume` (a re-run after an
/// interruption: records already copied are skipped). An embedded source is read from a
/// snapshot (safe beside its server); a PostgreSQL source is read in pages, so stop writes
/// to it for a complete copy. The target's servers must be stopped.
pub async fn migrate_store(
    settings: &Settings,
    from: &str,
    to: &str,
    resume: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let from = StoreLocation::parse(from).context("--from")?;
    let to = StoreLocation::parse(to).context("--to")?;
    if from == to {
        bail!("--from and --to name the same store");
    }
    let mut snapshot = None;
    let source: Arc<dyn Store> = match &from {
        StoreLocation::Embedded(dir) => {
            let tmp = tempfile::Builder::new()
                .prefix("epr-migrate-")
                .tempdir()
                .context("creating a temporary directory for the snapshot (set TMPDIR)")?;
            backup::backup(dir, &backup::database_file(tmp.path()))
                .with_context(|| format!("taking a snapshot of '{}'", dir.display()))?;
            let mut cfg = store_config(settings, tmp.path());
            cfg.record_events = false;
            let store = EmbeddedStore::open(cfg).context("opening the snapshot")?;
            snapshot = Some(tmp);
            Arc::new(store)
        }
        StoreLocation::Postgres(url) => {
            let mut cfg = pg_config(settings, url);
            // A source is only read; it is not migrated behind its servers' backs.
            cfg.migrate = false;
            cfg.record_events = false;
            Arc::new(open_pg(cfg).await?)
        }
    };
    let target: Arc<dyn Store> = match &to {
        StoreLocation::Embedded(dir) => Arc::new(
            EmbeddedStore::open(store_config(settings, dir)).with_context(|| {
                format!(
                    "opening the store in '{}' (is its server stopped?)",
                    dir.display()
                )
            })?,
        ),
        StoreLocation::Postgres(url) => {
            let mut cfg = pg_config(settings, url);
            // A fresh database gets its schema here.
            cfg.migrate = true;
            Arc::new(open_pg(cfg).await?)
        }
    };
    let result = copy_store(source.as_ref(), target.as_ref(), resume).await;
    source.shutdown().await;
    target.shutdown().await;
    drop(snapshot);
    let mut report = result?;
    report.from = from.describe();
    report.to = to.describe();
    report.seconds = started.elapsed().as_secs_f64();
    print_json(&report)?;
    let refused = report.filters.refused + report.endpoints.refused;
    if refused > 0 {
        bail!("{refused} records were refused (listed above); the others are copied");
    }
    Ok(())
}

/// Copies every tenant's filters, then its endpoints in pages of [`CHUNK`], from `source`
/// to `target` through the [`Store`] trait.
pub async fn copy_store(
    source: &dyn Store,
    target: &dyn Store,
    resume: bool,
) -> anyhow::Result<MigrateReport> {
    if !resume && !target.export_tenants().await?.is_empty() {
        bail!(
            "the target store is not empty; pass --resume to continue an interrupted copy \
             (records already there are skipped)"
        );
    }
    let mut tally = ImportReport::default();
    let mut filters = Vec::new();
    let tenants = source.export_tenants().await?;
    for tenant in &tenants {
        let chunk: Vec<(String, ImportRecord)> = source
            .export_filters(tenant)
            .await?
            .into_iter()
            .map(|filter| {
                (
                    format!("filter {} of tenant {tenant}", filter.id),
                    ImportRecord::Filter {
                        tenant: tenant.clone(),
                        filter,
                    },
                )
            })
            .collect();
        let mut chunk = chunk.into_iter().peekable();
        while chunk.peek().is_some() {
            let part = chunk.by_ref().take(CHUNK).collect();
            import_chunk(target, part, &mut tally, &mut filters).await?;
        }
        let mut after = 0;
        loop {
            let page = source.export_endpoints(tenant, after, CHUNK).await?;
            let Some(last) = page.last() else { break };
            after = last.endpoint.incarnation;
            let chunk = page
                .into_iter()
                .map(|e| {
                    (
                        format!("endpoint {} of tenant {tenant}", e.endpoint.id),
                        ImportRecord::Endpoint(e),
                    )
                })
                .collect();
            import_chunk(target, chunk, &mut tally, &mut filters).await?;
        }
    }
    wait_backfills(target, filters).await?;
    let t = |t: &Tally| MigrateTally {
        imported: t.imported,
        existing: t.existing,
        refused: t.refused,
    };
    Ok(MigrateReport {
        tenants: tenants.len() as u64,
        filters: t(&tally.filters),
        endpoints: t(&tally.endpoints),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_locations() {
        assert_eq!(
            StoreLocation::parse("embedded:/var/lib/epr").unwrap(),
            StoreLocation::Embedded("/var/lib/epr".into())
        );
        for url in ["postgres://epr:pw@db/epr", "postgresql://db/epr"] {
            let want = StoreLocation::Postgres(url.into());
            assert_eq!(StoreLocation::parse(url).unwrap(), want);
            assert_eq!(
                StoreLocation::parse(&format!("postgres:{url}")).unwrap(),
                want
            );
        }
        assert_eq!(
            StoreLocation::parse("postgres:postgres://epr:pw@db/epr")
                .unwrap()
                .describe(),
            "postgres:postgres://epr:***@db/epr"
        );
        for bad in ["", "embedded:", "postgres:", "sqlite:/x", "/var/lib/epr"] {
            let e = format!("{:#}", StoreLocation::parse(bad).unwrap_err());
            assert!(e.contains("embedded:DIR or postgres:URL"), "{bad}: {e}");
        }
        let e = format!(
            "{:#}",
            StoreLocation::parse("postgres://u:secret@h:port/db").unwrap_err()
        );
        assert!(
            e.contains("not a database URL") && !e.contains("secret"),
            "{e}"
        );
    }
}
