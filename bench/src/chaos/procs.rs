//! The processes the chaos scenario runs, kills and restarts: a private `redis-server`, a
//! private PostgreSQL cluster (initdb + `pg_ctl`), `emp-control-plane serve` and `emp-agent run`.
//! Each is ours alone, on a free port, with its log in the run's directory; none of them ever
//! touches the shared services of the machine.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use tokio::process::{Child, Command};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Whether this process runs as root (PostgreSQL's programs then run as `postgres`).
fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}

/// Opens `path` for a child's stdout and stderr (appending: a restarted process keeps its
/// earlier lines).
fn log_file(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok((Stdio::from(file.try_clone()?), Stdio::from(file)))
}

/// Sends `signal` (`TERM`, `KILL`) to `pid`.
async fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// A child process that is SIGKILLed when dropped.
pub struct Proc {
    child: Child,
    pid: u32,
}

impl Proc {
    fn spawn(command: &mut Command, what: &str) -> anyhow::Result<Self> {
        let child = command
            .kill_on_drop(true)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let pid = child.id().context("a just-started child has an id")?;
        Ok(Self { child, pid })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL, and wait for it to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, up to `grace` for a clean exit, then SIGKILL.
    pub async fn terminate(&mut self, grace: Duration) {
        signal(self.pid, "TERM").await;
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.kill().await;
        }
    }

    /// Its exit status, when it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// A `redis-server` without persistence on a port of its own.
pub struct PrivateRedis {
    pub port: u16,
    proc: Option<Proc>,
    log: PathBuf,
}

impl PrivateRedis {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut redis = Self {
            port: free_port()?,
            proc: None,
            log: dir.join("redis.log"),
        };
        redis.launch().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let (out, err) = log_file(&self.log)?;
        let proc = Proc::spawn(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(out)
                .stderr(err),
            "redis-server (is it installed? scripts/test installs it)",
        )?;
        self.proc = Some(proc);
        let client = redis::Client::open(self.url())?;
        for _ in 0..200 {
            if let Ok(mut con) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut con)
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the private redis-server on port {} did not start",
            self.port
        )
    }

    /// FLUSHALL, then SIGKILL and a fresh start on the same port: everything Redis held is gone
    /// and every connection to it is cut.
    pub async fn flush_and_restart(&mut self) -> anyhow::Result<()> {
        if let Ok(client) = redis::Client::open(self.url()) {
            if let Ok(mut con) = client.get_multiplexed_async_connection().await {
                let _: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut con).await;
            }
        }
        if let Some(mut proc) = self.proc.take() {
            proc.kill().await;
        }
        self.launch().await
    }

    pub async fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill().await;
        }
    }
}

/// A PostgreSQL cluster of our own: initdb into the run's directory, `pg_ctl` on a free port.
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    running: bool,
}

impl PrivatePostgres {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let dir = dir.join("pg");
        std::fs::create_dir_all(&dir)?;
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .await?;
            ensure!(status.success(), "chown of {} failed", dir.display());
        }
        let bin = bin_dir()?;
        let data = dir.join("data");
        run_pg(
            &bin.join("initdb"),
            &[
                "-D",
                path_str(&data)?,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )
        .await
        .context("initdb")?;
        let mut pg = Self {
            port: free_port()?,
            dir,
            bin,
            running: false,
        };
        pg.resume().await?;
        Ok(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again) on the same port and data.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 \
             -c shared_preload_libraries=pg_stat_statements",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        run_pg(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                path_str(&data)?,
                "-o",
                &options,
                "-l",
                path_str(&log)?,
                "-w",
                "start",
            ],
        )
        .await
        .context("pg_ctl start")?;
        self.running = true;
        Ok(())
    }

    /// Fast shutdown: connections are cut, the server is gone until [`Self::resume`].
    pub async fn pause(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        run_pg(
            &self.bin.join("pg_ctl"),
            &["-D", path_str(&data)?, "-m", "fast", "-w", "stop"],
        )
        .await
        .context("pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// Immediate shutdown, at the end of the run.
    pub async fn stop(&mut self) {
        if self.running {
            let data = self.dir.join("data");
            if let Ok(data) = path_str(&data) {
                let _ = run_pg(
                    &self.bin.join("pg_ctl"),
                    &["-D", data, "-m", "immediate", "-w", "stop"],
                )
                .await;
            }
            self.running = false;
        }
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL's programs are not under /usr/lib/postgresql")?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no initdb under /usr/lib/postgresql/*/bin")
}

/// Runs a PostgreSQL program to its end (as `postgres` when we are root: initdb refuses root).
async fn run_pg(program: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut command = if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    };
    let out = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// What a control plane process is started with.
#[derive(Clone)]
pub struct ControlPlaneEnv {
    pub binary: PathBuf,
    pub database_url: String,
    pub redis_url: String,
    pub prefix: String,
    pub port: u16,
    pub agent_token: String,
    pub artifact_dir: PathBuf,
    pub lease_ms: u64,
    pub reconcile_ms: u64,
    pub log: PathBuf,
}

impl ControlPlaneEnv {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", &self.redis_url)
            .env("EMP_REDIS_PREFIX", &self.prefix)
            .env("EMP_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("EMP_AGENT_TOKEN", &self.agent_token)
            .env("EMP_ARTIFACT_DIR", &self.artifact_dir)
            .env("EMP_LEASE_MS", self.lease_ms.to_string())
            .env("EMP_RECONCILE_INTERVAL_MS", self.reconcile_ms.to_string())
            .env("EMP_SHUTDOWN_GRACE_SECS", "2")
            .env("DB_QUERY_TIMEOUT", "5000")
            .env("RUST_LOG", "info");
        command
    }

    /// `emp-control-plane migrate`, then `admin create-user --admin`: the new admin's key.
    pub async fn bootstrap_admin(&self) -> anyhow::Result<String> {
        let out = self.command().arg("migrate").output().await?;
        ensure!(
            out.status.success(),
            "emp-control-plane migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = self
            .command()
            .args([
                "admin",
                "create-user",
                "--email",
                "chaos@example.com",
                "--admin",
            ])
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "emp-control-plane admin create-user: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find(|word| word.starts_with("emp_"))
            .map(str::to_owned)
            .context("admin create-user printed no key")?;
        Ok(key)
    }

    /// Starts `serve` and waits (up to 60 s) until `/ready` answers 200.
    pub async fn serve(&self, http: &reqwest::Client) -> anyhow::Result<Proc> {
        let (out, err) = log_file(&self.log)?;
        let mut proc = Proc::spawn(
            self.command().arg("serve").stdout(out).stderr(err),
            "emp-control-plane serve",
        )?;
        let ready = format!("{}/ready", self.base_url());
        for _ in 0..600 {
            if let Some(status) = proc.exited() {
                bail!("emp-control-plane serve exited at start: {status}");
            }
            let answer = http
                .get(&ready)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(proc);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("emp-control-plane serve was not ready within 60 s")
    }
}

/// What agent processes are started with.
#[derive(Clone)]
pub struct AgentEnv {
    pub binary: PathBuf,
    pub redis_url: String,
    pub prefix: String,
    pub control_plane_url: String,
    pub agent_token: String,
    pub dir: PathBuf,
}

impl AgentEnv {
    /// Starts `emp-agent run` as `external_id` against the ComfyUI at `comfyui_url`, one-second
    /// heartbeats.
    pub fn spawn(&self, external_id: &str, comfyui_url: &str) -> anyhow::Result<Proc> {
        let (out, err) = log_file(&self.dir.join(format!("{external_id}.log")))?;
        Proc::spawn(
            Command::new(&self.binary)
                .arg("run")
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("EMP_REDIS_URL", &self.redis_url)
                .env("EMP_REDIS_PREFIX", &self.prefix)
                .env("COMFYUI_URL", comfyui_url)
                .env("EMP_CONTROL_PLANE_URL", &self.control_plane_url)
                .env("EMP_AGENT_TOKEN", &self.agent_token)
                .env("EMP_MACHINE_ID", external_id)
                .env("EMP_PROVIDER", "local")
                .env("EMP_HEARTBEAT_INTERVAL_SECS", "1")
                .env("EMP_SHUTDOWN_GRACE_SECS", "2")
                .env("RUST_LOG", "info")
                .stdout(out)
                .stderr(err),
            "emp-agent run",
        )
    }
}

/// `name` next to this executable (the same `cargo build` output), or in `dir` when given.
pub fn binary(dir: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    let path = match dir {
        Some(dir) => dir.join(name),
        None => std::env::current_exe()
            .context("locating emp-bench")?
            .with_file_name(name),
    };
    ensure!(
        path.is_file(),
        "{} not found: build it with `cargo build --workspace --bins` (or pass --bin-dir)",
        path.display()
    );
    Ok(path)
}
