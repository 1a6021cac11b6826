//! The `emp-agent run` binary from outside: exit codes, systemd notifications and SIGTERM.

mod fleet_support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use emp_shared::dispatch::{DispatchConfig, JobStatus};
use fleet_support::{
    ControlPlane, free_port, init_logging, shared_redis_url, simulator, sleep_workflow,
};

fn agent() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_emp-agent"));
    command
        .arg("run")
        .env_clear()
        .env(
            "EMP_MACHINE_ID",
            format!("bin-{}", uuid::Uuid::new_v4().simple()),
        )
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    command
}

#[test]
fn a_bad_setting_exits_64_and_names_it() {
    for (name, value) in [
        ("EMP_HEARTBEAT_INTERVAL_SECS", "0"),
        ("EMP_REDIS_PREFIX", "a{b}"),
        ("EMP_COMFYUI_WAIT_SECS", "soon"),
    ] {
        let output = agent().env(name, value).output().unwrap();
        assert_eq!(output.status.code(), Some(64), "{name}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(name), "{name}: {stderr}");
    }
}

#[test]
fn redis_unreachable_at_start_exits_69() {
    let output = agent()
        .env(
            "EMP_REDIS_URL",
            format!("redis://127.0.0.1:{}", free_port()),
        )
        .env("EMP_REDIS_CONNECT_ATTEMPTS", "2")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("attempt"), "{stderr}");
}

/// Reads notify datagrams until one contains `want` (or `within` passes).
fn expect_notification(socket: &UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0_u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            ))
            .unwrap();
        let Ok(n) = socket.recv(&mut buf) else {
            break;
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let found = text.lines().any(|line| line == want);
        seen.push(text);
        if found {
            return seen;
        }
    }
    panic!("no {want} within {within:?}; saw {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_tells_systemd_runs_jobs_and_stops_cleanly_on_sigterm() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();

    let mut child = agent()
        .env("EMP_REDIS_URL", &cp.redis_url)
        .env("EMP_REDIS_PREFIX", &cp.prefix)
        .env("COMFYUI_URL", sim.url())
        .env("EMP_HEARTBEAT_INTERVAL_SECS", "1")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "30000000")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    let socket = tokio::task::spawn_blocking(move || {
        expect_notification(&socket, "READY=1", Duration::from_secs(30));
        expect_notification(&socket, "WATCHDOG=1", Duration::from_secs(10));
        socket
    })
    .await
    .unwrap();

    let job = cp.submit(sleep_workflow(0.2, 2)).await;
    cp.wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let seen = tokio::task::spawn_blocking(move || {
        expect_notification(&socket, "STOPPING=1", Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert!(!seen.is_empty());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    cp.cleanup().await;
}
