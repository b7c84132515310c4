//! Test support: a fresh database per test on a shared PostgreSQL server, dropped after.

use tokio_postgres::NoTls;

/// A database created for one test. [`TestDb::drop_db`] removes it; databases a crashed
/// run left behind are removed by the next run's [`TestDb::create`] once they are an hour old.
pub struct TestDb {
    /// The server's maintenance URL (the `postgres` database).
    admin_url: String,
    pub name: String,
    /// The URL of the test database.
    pub url: String,
}

/// `EPR_TEST_DATABASE_URL`, set by `scripts/services-up.sh`. Tests that need PostgreSQL
/// fail (they are never skipped) when it is missing.
pub fn admin_url() -> String {
    std::env::var("EPR_TEST_DATABASE_URL").expect(
        "EPR_TEST_DATABASE_URL is not set: run the tests through scripts/test.sh, or \
         eval \"$(scripts/services-up.sh)\" first",
    )
}

impl TestDb {
    /// Creates `epr_test_<random>` on the server of `EPR_TEST_DATABASE_URL`.
    pub async fn create() -> Self {
        let admin_url = admin_url();
        let name = format!("epr_test_{}", uuid::Uuid::new_v4().simple());
        let client = admin(&admin_url).await;
        // Leftovers of killed runs (the name carries no time: use the catalog's).
        let stale = client
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'epr_test_%' \
                 AND (pg_stat_file('base/'||oid||'/PG_VERSION')).modification \
                     < now() - interval '1 hour'",
                &[],
            )
            .await
            .unwrap_or_default();
        for row in stale {
            let old: String = row.get(0);
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{old}\" WITH (FORCE)"))
                .await;
        }
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("creating a test database");
        let url = with_database(&admin_url, &name);
        Self {
            admin_url,
            name,
            url,
        }
    }

    /// Drops the database (closing its connections).
    pub async fn drop_db(self) {
        let client = admin(&self.admin_url).await;
        let _ = client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL at {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// `url` with its database replaced by `db` (URL form: `postgres://…/db?…`).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A PostgreSQL server of a test's own (its own data directory and port), for tests that
/// stop and restart the server: the shared server of [`TestDb`] must stay up for the
/// others. Made with the newest `/usr/lib/postgresql/*/bin` (or `EPR_TEST_PG_BIN`); as root,
/// the server programs run as the `postgres` user (`initdb` refuses root), as in
/// `scripts/services-up.sh`. Stopped and removed on drop.
pub struct PrivatePg {
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    port: u16,
}

impl PrivatePg {
    /// `initdb` into a fresh temporary directory and start the server on a free loopback
    /// port (blocking: a second or two).
    pub fn start() -> Self {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(format!("epr-private-pg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("creating the private PostgreSQL directory");
        if is_root() {
            run(std::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(&dir));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("finding a free port")
            .port();
        let pg = Self { bin, dir, port };
        run(pg
            .as_pg("initdb")
            .arg("-D")
            .arg(pg.data())
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .arg("--no-instructions"));
        pg.start_again();
        pg
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are ended, as in a restart).
    pub fn stop(&self) {
        run(self
            .as_pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "-m", "fast", "stop"]));
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`: no checkpoint; the
    /// next start recovers from the WAL).
    pub fn crash(&self) {
        run(self.as_pg("pg_ctl").arg("-D").arg(self.data()).args([
            "-w",
            "-t",
            "60",
            "-m",
            "immediate",
            "stop",
        ]));
    }

    /// Starts the stopped server again, same data, same port; returns once it accepts
    /// connections.
    pub fn start_again(&self) {
        run(self
            .as_pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("pg.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=100",
                self.port,
                self.dir.display()
            ))
            .arg("start"));
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.join("data")
    }

    fn as_pg(&self, program: &str) -> std::process::Command {
        let program = self.bin.join(program);
        if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        }
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .as_pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `EPR_TEST_PG_BIN`, else the newest `/usr/lib/postgresql/<version>/bin`.
fn pg_bin() -> std::path::PathBuf {
    if let Ok(b) = std::env::var("EPR_TEST_PG_BIN") {
        return b.into();
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server programs in /usr/lib/postgresql (scripts/services-up.sh)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: Vec<u32> = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .max();
    newest.expect("no /usr/lib/postgresql/*/bin/initdb").1
}

fn is_root() -> bool {
    // As `id -u` tells: no libc dependency for one test helper.
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
