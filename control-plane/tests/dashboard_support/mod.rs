//! A whole system in one test process for the dashboard's browser tests: the control plane
//! (API, dashboard and background duties) on port 0 over the test's own database and a Redis
//! key prefix of its own, ComfyUI simulators with agents in front of them, and headless
//! Chromium driven through chromedriver.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use emp_agent::config::{Config as AgentConfig, ConfigOverrides, Environment};
use emp_agent::detect::gpu::{FakeGpuProbe, GpuError, GpuProbe};
use emp_agent::detect::provider::HostFacts;
use emp_agent::fleet::settings::RetryPolicy;
use emp_agent::fleet::worker::ComfyWorker;
use emp_agent::fleet::{Agent, AgentError, FleetSettings};
use emp_agent::shutdown::Shutdown;
use emp_comfyui_sim::{SimConfig, SimHandle};
use emp_control_plane::config::Config;
use emp_control_plane::db::users::{self, Role};
use emp_control_plane::dispatch::{self, DutyPeriods};
use emp_control_plane::http::AppState;
use emp_control_plane::redis_conn::RedisHandle;
use emp_control_plane::server;
use emp_shared::dispatch::{Dispatch, DispatchConfig};
use fantoccini::{Client, ClientBuilder};
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

const REDIS_URL: &str = "redis://127.0.0.1:6379";
const AGENT_TOKEN: &str = "dashboard-agent-token";

/// The model-free job of the README's quick start: an image, inverted, saved.
pub fn invert_workflow(color: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "dashboard"}}
    })
}

/// A job that sleeps `seconds` in `steps` on the simulator.
pub fn sleep_workflow(seconds: f64, steps: u32) -> Value {
    json!({"1": {"class_type": "EmpSimSleep", "inputs": {"seconds": seconds, "steps": steps}}})
}

/// A running control plane with its agents.
pub struct System {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The test's database.
    pub db: PgPool,
    /// An admin's key.
    pub admin_key: String,
    /// Dispatch under the system's prefix.
    pub dispatch: Dispatch,
    /// A connection to the test Redis.
    pub redis: ConnectionManager,
    http: reqwest::Client,
    shutdown: CancellationToken,
    duties: TaskTracker,
    agents: Vec<RunningAgent>,
    artifact_dir: PathBuf,
}

/// One agent and the simulator it drives.
struct RunningAgent {
    shutdown: Shutdown,
    task: JoinHandle<Result<(), AgentError>>,
    sim: SimHandle,
    _dir: tempfile::TempDir,
}

/// How an extra agent presents itself.
pub struct AgentLook {
    /// `EMP_MACHINE_ID`.
    pub external_id: String,
    /// `EMP_PROVIDER`.
    pub provider: &'static str,
    /// `EMP_REGION`.
    pub region: &'static str,
    /// Its GPUs (`(name, memory MiB)`); none: a box without NVML.
    pub gpus: Vec<(&'static str, u64)>,
}

impl System {
    /// Starts the control plane with its duties and an admin.
    pub async fn start(db: PgPool) -> Self {
        let prefix = format!("t-{}", Uuid::new_v4().simple());
        let artifact_dir = std::env::temp_dir().join(format!("emp-dashboard-{prefix}"));
        let vars = [
            ("EMP_REDIS_PREFIX", prefix.clone()),
            ("EMP_AGENT_TOKEN", AGENT_TOKEN.to_owned()),
            ("EMP_ARTIFACT_DIR", artifact_dir.display().to_string()),
            ("REDIS_URL", REDIS_URL.to_owned()),
        ];
        let config = Config::from_lookup(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.clone())
        })
        .unwrap();
        let dispatch = Dispatch::new(&config.redis_prefix).unwrap();
        let client = redis::Client::open(REDIS_URL).unwrap();
        let mut redis = ConnectionManager::new(client.clone()).await.unwrap();
        dispatch.load_all(&mut redis).await.unwrap();
        dispatch
            .set_config(&mut redis, &DispatchConfig::default())
            .await
            .unwrap();
        dispatch.init_epoch(&mut redis, "e1").await.unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState::new(
            db.clone(),
            RedisHandle::from_connection(redis.clone()),
            config,
        );
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
        tokio::spawn(server::run(
            listener,
            state,
            shutdown.clone(),
            Duration::from_secs(1),
        ));
        let (_, key) =
            users::create_with_key(&db, "admin@example.com", None, Role::Admin, "dashboard")
                .await
                .unwrap();
        Self {
            base,
            db,
            admin_key: key.plaintext,
            dispatch,
            redis,
            http: reqwest::Client::new(),
            shutdown,
            duties,
            agents: Vec::new(),
            artifact_dir,
        }
    }

    /// Starts a simulator and an agent in front of it (heartbeat every second, so a new job
    /// class is picked up at once).
    pub async fn add_agent(&mut self, look: AgentLook) {
        let dir = tempfile::tempdir().unwrap();
        let sim = emp_comfyui_sim::spawn_local(SimConfig::new(dir.path()))
            .await
            .unwrap();
        let pairs: Vec<(String, String)> = vec![
            ("EMP_REDIS_URL".into(), REDIS_URL.into()),
            (
                "EMP_REDIS_PREFIX".into(),
                self.dispatch
                    .keys()
                    .hash_tag()
                    .trim_matches(['{', '}'])
                    .to_owned(),
            ),
            ("COMFYUI_URL".into(), sim.url()),
            ("EMP_CONTROL_PLANE_URL".into(), self.base.clone()),
            ("EMP_AGENT_TOKEN".into(), AGENT_TOKEN.into()),
            ("EMP_MACHINE_ID".into(), look.external_id),
            ("EMP_PROVIDER".into(), look.provider.into()),
            ("EMP_REGION".into(), look.region.into()),
            ("EMP_HEARTBEAT_INTERVAL_SECS".into(), "1".into()),
        ];
        let env = Environment::from_pairs(pairs);
        let host = HostFacts {
            machine_id_file: None,
            hostname: Some("dashboard-test".into()),
        };
        let config = AgentConfig::load(&ConfigOverrides::default(), &env, &host).unwrap();
        let mut settings = FleetSettings::from_env(&env, &config).unwrap();
        settings.startup_retry = RetryPolicy {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            max_attempts: Some(3),
        };
        settings.retry =
            RetryPolicy::forever(Duration::from_millis(50), Duration::from_millis(500));
        settings.wake_timeout = Duration::from_secs(1);
        settings.release_wait = Duration::from_secs(2);
        settings.final_reports_wait = Duration::from_secs(2);
        let gpu: Arc<dyn GpuProbe> = if look.gpus.is_empty() {
            Arc::new(FakeGpuProbe::failing(GpuError::Unavailable(
                "NVML could not be loaded".into(),
            )))
        } else {
            Arc::new(FakeGpuProbe::with_gpus(
                look.gpus
                    .iter()
                    .enumerate()
                    .map(|(index, (name, mb))| {
                        FakeGpuProbe::gpu(u32::try_from(index).unwrap(), name, *mb)
                    })
                    .collect(),
            ))
        };
        let worker = ComfyWorker::new(&config).unwrap();
        let agent = Agent::new(config, settings, gpu, worker);
        let shutdown = Shutdown::new();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        self.agents.push(RunningAgent {
            shutdown,
            task,
            sim,
            _dir: dir,
        });
    }

    /// `POST /api/v1/jobs` as the admin; the job's id.
    pub async fn submit(&self, workflow: Value, priority: u8) -> Uuid {
        let answer = self
            .http
            .post(format!("{}/api/v1/jobs", self.base))
            .bearer_auth(&self.admin_key)
            .json(&json!({"workflow": workflow, "priority": priority, "max_attempts": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201);
        let job: Value = answer.json().await.unwrap();
        Uuid::parse_str(job["id"].as_str().unwrap()).unwrap()
    }

    /// `GET path` as the admin.
    pub async fn get(&self, path: &str) -> Value {
        let answer = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        answer.json().await.unwrap()
    }

    /// Waits until `GET /api/v1/jobs/{id}` says `status`.
    pub async fn wait_job(&self, id: Uuid, status: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let job = self.get(&format!("/api/v1/jobs/{id}")).await;
            if job["status"] == status {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} is {}, not {status}",
                job["status"]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the agents, the simulators and the control plane, and removes the Redis keys.
    pub async fn stop(mut self) {
        for agent in self.agents.drain(..) {
            agent.shutdown.begin();
            let _ = tokio::time::timeout(Duration::from_secs(20), agent.task).await;
            let _ = agent.sim.stop().await;
        }
        self.shutdown.cancel();
        self.duties.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.duties.wait()).await;
        let _ =
            emp_shared::dispatch::bench::delete_prefix(&mut self.redis, self.dispatch.keys()).await;
        let _ = std::fs::remove_dir_all(&self.artifact_dir);
    }
}

/// Finds `name` on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Whether the browser tests should be skipped (`EMP_SKIP_BROWSER_TESTS=1`).
pub fn skipped() -> bool {
    std::env::var("EMP_SKIP_BROWSER_TESTS").is_ok_and(|value| value == "1")
}

/// Headless Chromium behind a chromedriver of its own.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a Chromium session; panics with the install command when either
    /// is missing.
    pub async fn start() -> Self {
        let missing = "chromium and chromedriver must be on PATH for the dashboard's browser \
                       tests: `apt-get install -y chromium chromium-driver` (Debian), or set \
                       EMP_SKIP_BROWSER_TESTS=1 to skip them";
        let driver_path = on_path("chromedriver").expect(missing);
        let chromium = on_path("chromium")
            .or_else(|| on_path("chromium-browser"))
            .or_else(|| on_path("google-chrome"))
            .expect(missing);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let webdriver = format!("http://127.0.0.1:{port}");
        let mut last_error = String::new();
        for _ in 0..100 {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&webdriver)
                .await
            {
                Ok(client) => {
                    return Self {
                        client,
                        driver,
                        _profile: profile,
                    };
                }
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no Chromium session through chromedriver: {last_error}");
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session and chromedriver.
    pub async fn stop(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

/// Where the README's screenshot lives.
pub fn readme_screenshot() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png")
}

/// Whether to update the README's screenshot (`EMP_UPDATE_SCREENSHOT=1`).
pub fn update_screenshot() -> bool {
    std::env::var("EMP_UPDATE_SCREENSHOT").is_ok_and(|value| value == "1")
}
