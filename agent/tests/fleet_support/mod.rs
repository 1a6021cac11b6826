//! What the fleet tests share: a control-plane stand-in driving `Dispatch` directly (random key
//! prefix on the shared Redis, or a private `redis-server` a test may kill and restart), agents
//! started in-process against the ComfyUI simulator, and a tiny output store.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::post;
use emp_agent::config::{Config, ConfigOverrides, Environment};
use emp_agent::detect::gpu::{FakeGpuProbe, GpuError, GpuProbe};
use emp_agent::detect::provider::HostFacts;
use emp_agent::fleet::settings::RetryPolicy;
use emp_agent::fleet::worker::ComfyWorker;
use emp_agent::fleet::{Agent, AgentError, AgentHandle, FleetSettings};
use emp_agent::shutdown::Shutdown;
use emp_comfyui_sim::{SimConfig, SimHandle};
use emp_shared::dispatch::bench;
use emp_shared::dispatch::{
    Dispatch, DispatchConfig, EnqueueOutcome, Event, JobState, JobStatus, MachineState, NewJob,
    QueueLimit,
};
use emp_shared::payload::JobPayload;
use emp_shared::workflow::derive_requirements;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The shared test Redis (`EMP_TEST_REDIS_URL`, default 127.0.0.1:6379).
pub fn shared_redis_url() -> String {
    std::env::var("EMP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Log lines of the agent under test, shown by nextest for failing tests.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "emp_agent=debug,info".to_owned()),
        )
        .with_test_writer()
        .try_init();
}

/// The control plane's side: a prefix of its own, scripts loaded, config and epoch set.
pub struct ControlPlane {
    pub dispatch: Dispatch,
    pub con: ConnectionManager,
    pub redis_url: String,
    pub prefix: String,
    pub config: DispatchConfig,
}

impl ControlPlane {
    pub async fn new(redis_url: &str, config: DispatchConfig) -> Self {
        let client = redis::Client::open(redis_url).unwrap();
        let mut con = bench::connection_manager(&client, Duration::from_secs(10))
            .await
            .expect("Redis reachable");
        let prefix = bench::random_prefix("agent");
        let dispatch = Dispatch::new(&prefix).unwrap();
        bench::prepare(&dispatch, &mut con, &config).await.unwrap();
        Self {
            dispatch,
            con,
            redis_url: redis_url.to_owned(),
            prefix,
            config,
        }
    }

    /// Prepares again (scripts, config, epoch): what the reconciler does after a Redis loss.
    /// The first command after a Redis restart may fail (the connection noticed it was dropped
    /// and reconnects), hence the retries.
    pub async fn restore(&mut self) {
        for _ in 0..50 {
            if bench::prepare(&self.dispatch, &mut self.con, &self.config)
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not restore Redis");
    }

    /// Queues `workflow` with the requirements it implies; returns the job id.
    pub async fn submit(&mut self, workflow: Value) -> Uuid {
        self.submit_with(workflow, 3, 600).await
    }

    pub async fn submit_with(
        &mut self,
        workflow: Value,
        max_attempts: u32,
        timeout_seconds: u32,
    ) -> Uuid {
        let requirements = derive_requirements(&workflow).into_canonical();
        let payload = JobPayload {
            workflow,
            timeout_seconds,
            include_temp_outputs: false,
        };
        let job = NewJob {
            job_id: Uuid::now_v7(),
            user_id: Uuid::now_v7(),
            class_id: requirements.class_id(),
            requirements_json: requirements.canonical_json(),
            priority: 10,
            max_attempts,
            timeout_ms: u64::from(timeout_seconds) * 1000,
            payload: payload.to_json(),
        };
        let outcome = self
            .dispatch
            .enqueue(&mut self.con, &job, QueueLimit::Enforce)
            .await
            .unwrap();
        assert!(
            matches!(outcome, EnqueueOutcome::Queued { .. }),
            "{outcome:?}"
        );
        job.job_id
    }

    pub async fn job(&mut self, job_id: Uuid) -> JobState {
        self.dispatch
            .job(&mut self.con, &job_id)
            .await
            .unwrap()
            .expect("job in Redis")
    }

    pub async fn machine(&mut self, machine_id: Uuid) -> Option<MachineState> {
        self.dispatch
            .machine(&mut self.con, &machine_id)
            .await
            .unwrap()
    }

    /// The machine's last `gpu_stats` JSON; `null` before its first heartbeat carries any.
    pub async fn gpu_stats(&mut self, machine_id: Uuid) -> Value {
        let text: Option<String> = redis::cmd("HGET")
            .arg(self.dispatch.keys().machine(&machine_id))
            .arg("gpu_stats")
            .query_async(&mut self.con)
            .await
            .unwrap();
        text.map_or(Value::Null, |text| serde_json::from_str(&text).unwrap())
    }

    /// Waits for the job to reach `status`; panics after `within`.
    pub async fn wait_status(
        &mut self,
        job_id: Uuid,
        status: JobStatus,
        within: Duration,
    ) -> JobState {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let state = self.job(job_id).await;
            if state.status == status {
                return state;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {job_id} still {:?} (want {status:?}) after {within:?}: {state:?}",
                state.status
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The job's events, in order.
    pub async fn events_of(&mut self, job_id: Uuid) -> Vec<Event> {
        self.dispatch
            .events()
            .range(&mut self.con, "-", "+", 100_000)
            .await
            .unwrap()
            .into_iter()
            .flat_map(|e| e.expect("well-formed entry"))
            .filter(|e| e.job_id == Some(job_id))
            .collect()
    }

    pub async fn event_types_of(&mut self, job_id: Uuid) -> Vec<String> {
        self.events_of(job_id)
            .await
            .iter()
            .map(|e| e.event_type.as_str().to_owned())
            .collect()
    }

    pub async fn cleanup(mut self) {
        let _ = bench::delete_prefix(&mut self.con, self.dispatch.keys()).await;
    }
}

/// A workflow the simulator runs without models: sleep `seconds` in `steps`, no outputs.
pub fn sleep_workflow(seconds: f64, steps: u32) -> Value {
    json!({"1": {"class_type": "EmpSimSleep", "inputs": {"seconds": seconds, "steps": steps}}})
}

/// A workflow that saves one small image (an output to upload).
pub fn image_workflow() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "fleet"}}
    })
}

/// A workflow that needs the checkpoint `model`.
pub fn model_workflow(model: &str) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
        "2": {"class_type": "EmpSimSleep", "inputs": {"seconds": 0.1, "steps": 1, "value": ["1", 0]}}
    })
}

/// A simulator in a temporary directory, with `checkpoints`.
pub async fn simulator(checkpoints: &[&str]) -> (SimHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SimConfig::new(dir.path());
    if !checkpoints.is_empty() {
        config = config.with_models("checkpoints", checkpoints.iter().copied());
    }
    let sim = emp_comfyui_sim::spawn_local(config).await.unwrap();
    (sim, dir)
}

/// A control plane's output endpoint that accepts every upload (`201` with an output JSON).
pub async fn output_store() -> SocketAddr {
    let app = Router::new().route(
        "/api/v1/agent/executions/{execution_id}/outputs",
        post(
            |Path(execution_id): Path<String>, body: axum::body::Bytes| async move {
                (
                    StatusCode::CREATED,
                    axum::Json(json!({
                        "id": Uuid::now_v7(),
                        "execution_id": execution_id,
                        "size": body.len(),
                    })),
                )
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// How to start a test agent.
pub struct AgentSpec {
    pub redis_url: String,
    pub prefix: String,
    pub comfyui_url: String,
    pub control_plane_url: String,
    /// Extra environment (`SALAD_MACHINE_ID`, `GPU_COUNT`, `EMP_SHUTDOWN_GRACE_SECS`…).
    pub env: Vec<(String, String)>,
    pub gpu: Arc<dyn GpuProbe>,
    /// Applied to the settings after they are read.
    pub tweak: fn(&mut FleetSettings),
}

impl AgentSpec {
    pub fn new(cp: &ControlPlane, sim: &SimHandle) -> Self {
        Self {
            redis_url: cp.redis_url.clone(),
            prefix: cp.prefix.clone(),
            comfyui_url: sim.url(),
            control_plane_url: "http://127.0.0.1:9".to_owned(),
            env: vec![("EMP_HEARTBEAT_INTERVAL_SECS".into(), "1".into())],
            gpu: Arc::new(no_nvml()),
            tweak: |_| {},
        }
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// A GPU probe like a box without the NVIDIA driver.
pub fn no_nvml() -> FakeGpuProbe {
    FakeGpuProbe::failing(GpuError::Unavailable(
        "NVML could not be loaded (libnvidia-ml.so.1: cannot open shared object file)".into(),
    ))
}

/// Short timings for tests (production's are minutes and tens of seconds).
pub fn test_settings(settings: &mut FleetSettings) {
    settings.startup_retry = RetryPolicy {
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        max_attempts: Some(3),
    };
    settings.retry = RetryPolicy::forever(Duration::from_millis(50), Duration::from_millis(500));
    settings.redis_timeout = Duration::from_secs(3);
    settings.wake_timeout = Duration::from_secs(1);
    settings.release_wait = Duration::from_secs(5);
    settings.final_reports_wait = Duration::from_secs(5);
}

/// A running test agent.
pub struct TestAgent {
    pub handle: AgentHandle,
    pub shutdown: Shutdown,
    pub task: JoinHandle<Result<(), AgentError>>,
    pub external_id: String,
}

impl TestAgent {
    /// Starts an agent; does not wait for it to be ready.
    pub fn spawn(spec: AgentSpec) -> Self {
        let external_id = format!("box-{}", Uuid::new_v4().simple());
        let mut pairs: Vec<(String, String)> = vec![
            ("EMP_REDIS_URL".into(), spec.redis_url.clone()),
            ("EMP_REDIS_PREFIX".into(), spec.prefix.clone()),
            ("COMFYUI_URL".into(), spec.comfyui_url.clone()),
            (
                "EMP_CONTROL_PLANE_URL".into(),
                spec.control_plane_url.clone(),
            ),
            ("EMP_AGENT_TOKEN".into(), "test-agent-token".into()),
            ("EMP_MACHINE_ID".into(), external_id.clone()),
        ];
        pairs.extend(spec.env.iter().cloned());
        let env = Environment::from_pairs(pairs);
        let host = HostFacts {
            machine_id_file: None,
            hostname: Some("test-host".into()),
        };
        let config = Config::load(&ConfigOverrides::default(), &env, &host).unwrap();
        let mut settings = FleetSettings::from_env(&env, &config).unwrap();
        test_settings(&mut settings);
        (spec.tweak)(&mut settings);
        let worker = ComfyWorker::new(&config).unwrap();
        let agent = Agent::new(config, settings, spec.gpu, worker);
        let handle = agent.handle();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        Self {
            handle,
            shutdown,
            task,
            external_id,
        }
    }

    /// Starts an agent and waits until it claims (registered, ready, healthy, with classes
    /// or not).
    pub async fn ready(spec: AgentSpec) -> Self {
        let mut agent = Self::spawn(spec);
        agent.wait_ready().await;
        agent
    }

    pub async fn wait_ready(&mut self) {
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            self.handle.wait_for(|s| {
                s.machine_id.is_some() && s.phase == emp_agent::fleet::AgentPhase::Ready
            }),
        )
        .await;
        assert!(
            waited.is_ok(),
            "agent not ready within 30 s: {:?}",
            *self.handle.status.borrow()
        );
    }

    pub fn machine_id(&self) -> Uuid {
        self.handle.status.borrow().machine_id.expect("registered")
    }

    /// Waits until the agent's matching classes include `class_id`.
    pub async fn wait_class(&mut self, class_id: &str) {
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            self.handle
                .wait_for(|s| s.classes.iter().any(|c| c == class_id)),
        )
        .await;
        assert!(waited.is_ok(), "class {class_id} never matched");
    }

    /// SIGTERM: stop and wait for `run` to return.
    pub async fn stop(self) -> Result<(), AgentError> {
        self.shutdown.begin();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("agent stopped within 60 s")
            .expect("agent task did not panic")
    }

    /// `kill -9`: drop everything, tell nobody.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private `redis-server` on its own port, without persistence, that a test may kill and
/// start again.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            child: None,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..100 {
            if let Ok(mut con) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut con).await;
                if pong.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Total commands Redis has run so far (`INFO commandstats`), minus the INFO calls.
    pub async fn commands_so_far(&self) -> (u64, Vec<(String, u64)>) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut con)
            .await
            .unwrap();
        let mut total = 0;
        let mut per_command = Vec::new();
        for line in info.lines() {
            let Some(rest) = line.strip_prefix("cmdstat_") else {
                continue;
            };
            let (name, stats) = rest.split_once(':').unwrap();
            let calls: u64 = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .unwrap()
                .parse()
                .unwrap();
            if name != "info" {
                total += calls;
                per_command.push((name.to_owned(), calls));
            }
        }
        (total, per_command)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
