//! The server the benchmark drives: the control plane's router and state, as the tests build
//! them, in a child process of its own (this binary again, `emp-bench api --serve-child`), so
//! that its CPU time is its own.
//!
//! The child runs a multi-threaded Tokio runtime (one worker per CPU unless told otherwise, as
//! `emp-control-plane serve`), logs as the control plane does ([`telemetry::init`]: `info`)
//! into a file, uses the production pool ([`db::connect_lazy`], `DB_CONNECTION_LIMIT` =
//! `--pool`) and Redis connection ([`RedisHandle::connect_in_background`]), but none of the
//! background duties (the reconciler would queue the filled QUEUED jobs). It prints its address
//! on stdout and stops when its stdin closes, so it also goes away when the benchmark dies.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use emp_control_plane::config::Config;
use emp_control_plane::db;
use emp_control_plane::http::AppState;
use emp_control_plane::redis_conn::RedisHandle;
use emp_control_plane::{server, telemetry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Args;
use super::load::Endpoint;

/// How long the server may take to listen and then to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The server process, killed if dropped while running.
pub struct Server {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    pub pid: u32,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    log: PathBuf,
    /// The log's length once the server was ready: what it logged while starting (a 503 from
    /// `/ready` before Redis answered, say) is not counted as a problem.
    ready_at: usize,
}

/// What the server logged.
#[derive(Debug)]
pub struct LogSummary {
    pub lines: usize,
    pub bytes: u64,
    /// WARN and ERROR lines once it was ready.
    pub problems: usize,
    /// The first of them.
    pub first_problem: Option<String>,
    /// Where it is, when kept.
    pub kept: Option<PathBuf>,
}

impl Server {
    /// Starts the server on `prefix` (prepared already) and waits until `/ready` says yes.
    ///
    /// # Errors
    /// It cannot be started, or does not get ready in time (its log's end is in the error).
    pub async fn spawn(args: &Args, prefix: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this program to run it again")?;
        let log = std::env::temp_dir().join(format!("emp-bench-api-{prefix}.log"));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(exe);
        command
            .args(["api", "--serve-child", "--database-url", &args.database_url])
            .args(["--redis-url", &args.redis_url, "--redis-prefix", prefix])
            .args(["--pool", &args.pool.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file);
        if let Some(threads) = args.server_threads {
            command.args(["--server-threads", &threads.to_string()]);
        }
        let mut child = command.spawn().context("cannot start the server process")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut server = Self {
            pid: child.id(),
            stdin: child.stdin.take(),
            child: Some(child),
            base: String::new(),
            log,
            ready_at: 0,
        };
        let line = tokio::time::timeout(
            START_TIMEOUT,
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await;
        let address = match line {
            Ok(Ok(Ok(line))) if !line.trim().is_empty() => line.trim().to_owned(),
            _ => bail!(
                "the server did not start; the end of its log:\n{}",
                server.log_tail()
            ),
        };
        server.base = format!("http://{address}");
        server.wait_ready().await?;
        server.ready_at = std::fs::metadata(&server.log).map_or(0, |meta| meta.len() as usize);
        Ok(server)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let ready = client
                .get(format!("{}/ready", self.base))
                .send()
                .await
                .is_ok_and(|response| response.status().is_success());
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the server did not get ready in {START_TIMEOUT:?}; the end of its log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server-side sum (seconds) and count of `endpoint`'s requests so far, every status,
    /// from `/metrics` (which also runs the gauges' queries: call it outside measured windows).
    pub async fn route_totals(
        &self,
        client: &reqwest::Client,
        endpoint: Endpoint,
    ) -> Option<(f64, u64)> {
        let text = client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let (method, route) = endpoint.route();
        let labels = [format!("method=\"{method}\""), format!("route=\"{route}\"")];
        let mut sum = 0.0;
        let mut count = 0.0;
        for line in text.lines() {
            let Some((name, rest)) = line.split_once('{') else {
                continue;
            };
            if !labels.iter().all(|label| rest.contains(label.as_str())) {
                continue;
            }
            let value: f64 = match rest.rsplit_once(' ') {
                Some((_, value)) => value.parse().ok()?,
                None => continue,
            };
            match name {
                "emp_http_request_duration_seconds_sum" => sum += value,
                "emp_http_request_duration_seconds_count" => count += value,
                _ => {}
            }
        }
        Some((sum, count as u64))
    }

    /// Closes the server's stdin, waits for it to stop (kills it after 10 s) and reads its log,
    /// which is deleted unless `keep`.
    ///
    /// # Errors
    /// The log cannot be read.
    pub async fn stop(mut self, keep: bool) -> anyhow::Result<LogSummary> {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    child.kill()?;
                    child.wait()?;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("cannot read {}", self.log.display()))?;
        let problems: Vec<&str> = text
            .get(self.ready_at..)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("WARN") || line.contains("ERROR"))
            .collect();
        let summary = LogSummary {
            lines: text.lines().count(),
            bytes: text.len() as u64,
            problems: problems.len(),
            first_problem: problems.first().map(|line| without_ansi(line)),
            kept: keep.then(|| self.log.clone()),
        };
        if !keep {
            let _ = std::fs::remove_file(&self.log);
        }
        Ok(summary)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// `line` without its ANSI colour sequences (`ESC [ … letter`).
fn without_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The child's side: serves until stdin closes (or SIGTERM/SIGINT).
///
/// # Errors
/// Bad arguments, or the server cannot start.
pub async fn serve_child(args: &Args) -> anyhow::Result<()> {
    // This process's runtime is single-threaded (the load generator's); the server gets a
    // multi-threaded one of its own, as `emp-control-plane serve` has.
    let (done, finished) = tokio::sync::oneshot::channel();
    let args = args.clone();
    std::thread::Builder::new()
        .name("emp-server".into())
        .spawn(move || {
            let result = (|| {
                let mut runtime = tokio::runtime::Builder::new_multi_thread();
                if let Some(threads) = args.server_threads {
                    runtime.worker_threads(threads);
                }
                runtime.enable_all().build()?.block_on(serve(&args))
            })();
            let _ = done.send(result);
        })?;
    finished.await.context("the server thread died")?
}

async fn serve(args: &Args) -> anyhow::Result<()> {
    telemetry::init();
    let prefix = args
        .redis_prefix
        .clone()
        .context("--serve-child needs --redis-prefix")?;
    let pool_size = args.pool.to_string();
    let vars = [
        ("DATABASE_URL", args.database_url.as_str()),
        ("REDIS_URL", args.redis_url.as_str()),
        ("EMP_REDIS_PREFIX", prefix.as_str()),
        ("DB_CONNECTION_LIMIT", pool_size.as_str()),
        ("EMP_LISTEN", "127.0.0.1:0"),
    ];
    let config = Config::from_lookup(|name| {
        vars.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| (*value).to_owned())
    })
    .map_err(|error| anyhow!("{error}"))?;
    let shutdown = CancellationToken::new();
    let pool = db::connect_lazy(&config)?;
    let redis = RedisHandle::connect_in_background(&config.redis_url, shutdown.clone())?;
    let listener = TcpListener::bind(config.listen).await?;
    println!("{}", listener.local_addr()?);

    let stop = shutdown.clone();
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            stop.cancel();
        })?;
    server::cancel_on_signal(shutdown.clone());
    let state = AppState::new(pool, redis, config);
    server::run(listener, state, shutdown, Duration::from_secs(2)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colours() {
        assert_eq!(
            without_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x"),
            "2026  WARN x"
        );
    }
}
