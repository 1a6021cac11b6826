//! A real emp system in-process for the CLI's end-to-end tests: the control plane (REST API
//! and its background duties) over the test's own PostgreSQL database and a Redis key prefix of
//! its own on the shared Redis, the ComfyUI simulator, and one agent; plus an admin key and a
//! way to run the real `emp` binary against it.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use emp_agent::config::{Config as AgentConfig, ConfigOverrides, Environment};
use emp_agent::detect::gpu::{FakeGpuProbe, GpuError};
use emp_agent::detect::provider::HostFacts;
use emp_agent::fleet::settings::RetryPolicy;
use emp_agent::fleet::worker::ComfyWorker;
use emp_agent::fleet::{Agent, AgentPhase, FleetSettings};
use emp_agent::shutdown::Shutdown;
use emp_comfyui_sim::{SimConfig, SimHandle};
use emp_control_plane::config::Config;
use emp_control_plane::db::users::{self, Role};
use emp_control_plane::dispatch::{self, DutyPeriods};
use emp_control_plane::http::AppState;
use emp_control_plane::redis_conn::RedisHandle;
use emp_control_plane::server;
use emp_shared::dispatch::Dispatch;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

const AGENT_TOKEN: &str = "cli-test-agent-token";

/// The shared test Redis (`EMP_TEST_REDIS_URL`, default 127.0.0.1:6379).
fn redis_url() -> String {
    std::env::var("EMP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A running system.
pub struct System {
    /// `http://127.0.0.1:<port>`.
    pub api_url: String,
    /// An admin's key.
    pub admin_key: String,
    /// The database.
    pub db: PgPool,
    shutdown: CancellationToken,
    duties: TaskTracker,
    agent_shutdown: Shutdown,
    agent_task: tokio::task::JoinHandle<Result<(), emp_agent::fleet::AgentError>>,
    _sim: SimHandle,
    redis: ConnectionManager,
    dispatch: Dispatch,
    _dirs: Vec<tempfile::TempDir>,
}

impl System {
    /// Starts the control plane, the simulator and one agent, and waits until the agent is
    /// ready to claim.
    pub async fn start(db: PgPool) -> Self {
        let artifacts = tempfile::tempdir().unwrap();
        let prefix = format!("cli-{}", Uuid::new_v4().simple());
        let vars = [
            ("REDIS_URL".to_owned(), redis_url()),
            ("EMP_REDIS_PREFIX".to_owned(), prefix.clone()),
            (
                "EMP_ARTIFACT_DIR".to_owned(),
                artifacts.path().display().to_string(),
            ),
            ("EMP_AGENT_TOKEN".to_owned(), AGENT_TOKEN.to_owned()),
        ];
        let config = Config::from_lookup(|name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .unwrap();
        let client = redis::Client::open(redis_url()).unwrap();
        let redis = ConnectionManager::new(client.clone()).await.unwrap();
        let dispatch = Dispatch::new(&prefix).unwrap();
        let shutdown = CancellationToken::new();
        let duties = TaskTracker::new();
        dispatch::start_duties(
            &db,
            &redis,
            &client,
            &dispatch,
            DutyPeriods::default(),
            &duties,
            &shutdown,
        )
        .await
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_url = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState::new(
            db.clone(),
            RedisHandle::from_connection(redis.clone()),
            config,
        );
        duties.spawn(server::run(
            listener,
            state,
            shutdown.clone(),
            Duration::from_secs(1),
        ));

        let sim_dir = tempfile::tempdir().unwrap();
        let sim = emp_comfyui_sim::spawn_local(SimConfig::new(sim_dir.path()))
            .await
            .unwrap();
        let (agent_shutdown, agent_task) = spawn_agent(&prefix, &sim, &api_url).await;

        let (_, key) = users::create_with_key(&db, "admin@example.com", None, Role::Admin, "cli")
            .await
            .unwrap();
        Self {
            api_url,
            admin_key: key.plaintext,
            db,
            shutdown,
            duties,
            agent_shutdown,
            agent_task,
            _sim: sim,
            redis,
            dispatch,
            _dirs: vec![artifacts, sim_dir],
        }
    }

    /// Runs `emp args…` with this system's URL and the admin key.
    pub async fn emp(&self, args: &[&str]) -> Run {
        self.emp_with(args, &[("EMP_API_KEY", &self.admin_key)], None)
            .await
    }

    /// Runs `emp args…` with this system's URL and the given environment, in `dir`.
    pub async fn emp_with(&self, args: &[&str], env: &[(&str, &str)], dir: Option<&Path>) -> Run {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        env.push(("EMP_API_URL".into(), self.api_url.clone()));
        run_emp(args, &env, dir).await
    }

    /// Stops everything and removes the Redis keys.
    pub async fn stop(mut self) {
        self.agent_shutdown.begin();
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.agent_task).await;
        self.shutdown.cancel();
        self.duties.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.duties.wait()).await;
        let _ =
            emp_shared::dispatch::bench::delete_prefix(&mut self.redis, self.dispatch.keys()).await;
    }
}

/// Starts an agent on `sim` under `prefix` that uploads to `api_url`, heartbeating every
/// second (so a new requirement class is learnt quickly); waits until it is ready.
async fn spawn_agent(
    prefix: &str,
    sim: &SimHandle,
    api_url: &str,
) -> (
    Shutdown,
    tokio::task::JoinHandle<Result<(), emp_agent::fleet::AgentError>>,
) {
    let pairs: Vec<(String, String)> = vec![
        ("EMP_REDIS_URL".into(), redis_url()),
        ("EMP_REDIS_PREFIX".into(), prefix.to_owned()),
        ("COMFYUI_URL".into(), sim.url()),
        ("EMP_CONTROL_PLANE_URL".into(), api_url.to_owned()),
        ("EMP_AGENT_TOKEN".into(), AGENT_TOKEN.into()),
        (
            "EMP_MACHINE_ID".into(),
            format!("cli-box-{}", Uuid::new_v4().simple()),
        ),
        ("EMP_HEARTBEAT_INTERVAL_SECS".into(), "1".into()),
    ];
    let env = Environment::from_pairs(pairs);
    let host = HostFacts {
        machine_id_file: None,
        hostname: Some("cli-test-host".into()),
    };
    let config = AgentConfig::load(&ConfigOverrides::default(), &env, &host).unwrap();
    let mut settings = FleetSettings::from_env(&env, &config).unwrap();
    settings.startup_retry = RetryPolicy {
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        max_attempts: Some(3),
    };
    settings.retry = RetryPolicy::forever(Duration::from_millis(50), Duration::from_millis(500));
    settings.wake_timeout = Duration::from_secs(1);
    let worker = ComfyWorker::new(&config).unwrap();
    let gpu = Arc::new(FakeGpuProbe::failing(GpuError::Unavailable(
        "no NVML in tests".into(),
    )));
    let agent = Agent::new(config, settings, gpu, worker);
    let mut handle = agent.handle();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(agent.run(shutdown.clone()));
    let ready = tokio::time::timeout(
        Duration::from_secs(30),
        handle.wait_for(|s| s.machine_id.is_some() && s.phase == AgentPhase::Ready),
    )
    .await;
    assert!(ready.is_ok(), "agent not ready within 30 s");
    (shutdown, task)
}

/// The outcome of one `emp` run.
#[derive(Debug)]
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Asserts the exit code, showing the output when it differs.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Standard output as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|error| panic!("stdout is not JSON ({error}):\n{}", self.stdout))
    }
}

/// Runs the `emp` binary with a clean configuration (no config file, no inherited EMP_*
/// variables) plus `env`, off the async runtime so the in-process system keeps serving.
pub async fn run_emp(args: &[&str], env: &[(String, String)], dir: Option<&Path>) -> Run {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env = env.to_vec();
    let dir = dir.map(Path::to_path_buf);
    let output: Output = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_emp"));
        command
            .args(&args)
            .env_remove("EMP_API_URL")
            .env_remove("EMP_API_KEY")
            .env("EMP_CONFIG", "/nonexistent/emp-cli-test/config.toml")
            .envs(env);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        command.output().expect("emp runs")
    })
    .await
    .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
