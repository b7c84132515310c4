//! `epr` server child processes (for what an in-process server cannot show: SIGKILL, SIGTERM,
//! process limits, one process per data directory, the log output).

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A TCP port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How to start `epr --listen 127.0.0.1:PORT --data-dir DIR` on a free port, with
/// `EPR_CONFIG` removed from the environment.
pub struct EprCommand {
    data_dir: OsString,
    prelude: Option<String>,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    capture: bool,
}

impl EprCommand {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.into(),
            prelude: None,
            args: Vec::new(),
            envs: vec![("EPR_CONFIG".into(), None)],
            capture: false,
        }
    }

    /// Runs `epr` under bash, after these shell commands (e.g. `ulimit -n 256`).
    pub fn shell_prelude(mut self, commands: impl Into<String>) -> Self {
        self.prelude = Some(commands.into());
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().into());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().into(), Some(value.as_ref().into())));
        self
    }

    pub fn envs<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().into(), None));
        self
    }

    /// Collects stdout and stderr line by line (see [`Epr::finish_output`]); without it
    /// stdout is discarded and stderr goes to the test's.
    pub fn capture_output(mut self) -> Self {
        self.capture = true;
        self
    }

    /// Starts the process without waiting for it.
    pub fn spawn(self) -> Epr {
        let port = free_port();
        let bin = env!("CARGO_BIN_EXE_epr");
        let mut cmd = match &self.prelude {
            None => Command::new(bin),
            Some(prelude) => {
                let mut c = Command::new("bash");
                // Ignored signals stay ignored across exec.
                c.args(["-c", &format!("{prelude} && exec \"$@\""), "epr", bin]);
                c
            }
        };
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .stdin(Stdio::null());
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if self.capture {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        }
        let mut child = cmd.spawn().expect("the epr binary starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if self.capture {
            let collect = |pipe: Box<dyn std::io::Read + Send>| {
                let lines = output.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        lines.lock().unwrap().push(line);
                    }
                })
            };
            readers.push(collect(Box::new(child.stdout.take().unwrap())));
            readers.push(collect(Box::new(child.stderr.take().unwrap())));
        }
        Epr {
            child,
            port,
            output,
            readers,
        }
    }

    /// Starts the process and waits until it is ready.
    pub async fn start(self) -> Epr {
        let mut epr = self.spawn();
        epr.wait_ready().await;
        epr
    }
}

/// A running `epr` child process; killed (SIGKILL) when dropped.
pub struct Epr {
    child: Child,
    port: u16,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Epr {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Epr {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT`
    pub fn base(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// Waits (30 s at most) until `/health/ready` answers with success; panics with the
    /// output if the process exits first.
    pub async fn wait_ready(&mut self) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(self.url("/health/ready")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("epr exited with {status}: {}", self.finish_output());
            }
            assert!(Instant::now() < deadline, "epr did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Waits for the process to exit, however long it takes.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM works");
    }

    /// Stops the process gracefully (SIGTERM) and waits (30 s at most) for it.
    pub fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait_exit(Duration::from_secs(30))
            .expect("epr stops on SIGTERM")
    }

    /// Kills the process with SIGKILL (as dropping it does).
    pub fn kill(self) {
        drop(self);
    }

    /// Everything the process wrote, with [`EprCommand::capture_output`] (it is killed if
    /// still running).
    pub fn finish_output(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        self.output.lock().unwrap().join("\n")
    }
}
