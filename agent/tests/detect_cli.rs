//! The built `emp-agent` binary, as an operator runs it.

mod common;

use std::process::{Command, Output};

use serde_json::Value;

/// Variables of the developer's or CI's shell that would change what the agent detects.
const AMBIENT: &[&str] = &[
    "EMP_REDIS_URL",
    "REDIS_URL",
    "REDIS_PASSWORD",
    "EMP_CONTROL_PLANE_URL",
    "EMP_AGENT_TOKEN",
    "COMFYUI_URL",
    "EMP_MACHINE_ID",
    "EMP_PROVIDER",
    "EMP_REGION",
    "EMP_HEARTBEAT_INTERVAL_SECS",
    "EMP_MAX_CONCURRENT_JOBS",
    "EMP_SHUTDOWN_GRACE_SECS",
    "RUST_LOG",
    "EMP_LOG_FORMAT",
    "EMP_DISK_PATH",
    "SALAD_MACHINE_ID",
    "CONTAINER_ID",
    "VAST_CONTAINERLABEL",
];

fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_emp-agent"));
    for name in AMBIENT {
        command.env_remove(name);
    }
    command.args(args).envs(env.iter().copied());
    command.output().expect("emp-agent runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn detect_without_comfyui_prints_every_contract_field_and_exits_0() {
    let comfyui = format!("http://127.0.0.1:{}", common::closed_port());
    let output = agent(
        &["detect"],
        &[("COMFYUI_URL", &comfyui), ("EMP_MACHINE_ID", "test-box-1")],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let caps: Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");

    for field in [
        "machine_id",
        "provider",
        "region",
        "agent_version",
        "gpus",
        "gpu_count",
        "total_vram_gb",
        "cpu",
        "memory_total_mb",
        "disk_free_gb",
        "comfyui",
    ] {
        assert!(caps.get(field).is_some(), "missing {field}: {caps:#}");
    }
    assert_eq!(caps["machine_id"], "test-box-1");
    assert_eq!(caps["provider"], "local");
    assert_eq!(caps["region"], "unknown");
    assert_eq!(caps["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(caps["cpu"]["model"].is_string());
    assert!(caps["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(caps["memory_total_mb"].as_u64().unwrap() > 0);
    for field in ["url", "reachable", "version", "node_types_count", "models"] {
        assert!(
            caps["comfyui"].get(field).is_some(),
            "missing comfyui.{field}"
        );
    }
    assert_eq!(caps["comfyui"]["url"], comfyui.as_str());
    assert_eq!(caps["comfyui"]["reachable"], false);
    assert_eq!(caps["comfyui"]["node_types_count"], 0);

    let gpus = caps["gpus"].as_array().unwrap();
    assert_eq!(caps["gpu_count"].as_u64().unwrap(), gpus.len() as u64);
    if gpus.is_empty() {
        // The normal case on a box without NVIDIA driver: a reason, not a failure.
        let why = caps["gpu_error"]
            .as_str()
            .expect("gpu_error explains the empty list");
        assert!(!why.is_empty());
        assert_eq!(caps["total_vram_gb"], 0.0);
    } else {
        for field in [
            "index",
            "uuid",
            "name",
            "memory_total_mb",
            "memory_free_mb",
            "compute_capability",
            "driver_version",
            "cuda_version",
            "pcie_gen",
            "pcie_width",
            "temperature_c",
            "power_limit_w",
            "mig_enabled",
        ] {
            assert!(gpus[0].get(field).is_some(), "missing gpus[0].{field}");
        }
    }
    // Logs went to stderr, so stdout held nothing but the JSON.
    assert!(
        stderr(&output).contains("detection finished"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detect_reads_a_running_comfyui() {
    let addr = common::start(common::Canned::default()).await;
    let comfyui = format!("http://{addr}");
    let output = tokio::task::spawn_blocking(move || {
        agent(
            &["detect", "--comfyui-url", &comfyui, "--region", "eu-west"],
            &[("SALAD_MACHINE_ID", "salad-42"), ("EMP_LOG_FORMAT", "json")],
        )
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let caps: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(caps["provider"], "salad");
    assert_eq!(caps["machine_id"], "salad-42");
    assert_eq!(caps["region"], "eu-west");
    assert_eq!(caps["comfyui"]["reachable"], true);
    assert_eq!(caps["comfyui"]["version"], "0.3.64");
    assert_eq!(caps["comfyui"]["node_types_count"], 6);
    assert_eq!(
        caps["comfyui"]["models"]["checkpoints"],
        serde_json::json!(["sd15/v1-5-pruned.ckpt", "sd_xl_base_1.0.safetensors"])
    );
    // Plain output leaves the node type names out (see emp_shared::capabilities).
    assert!(caps["comfyui"].get("node_types").is_none());
    // JSON log lines on stderr.
    let first_line = stderr(&output)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        serde_json::from_str::<Value>(&first_line).is_ok(),
        "not a JSON log line: {first_line}"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_variable() {
    let output = agent(&["detect"], &[("EMP_HEARTBEAT_INTERVAL_SECS", "soon")]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("EMP_HEARTBEAT_INTERVAL_SECS"),
        "{}",
        stderr(&output)
    );
    assert!(output.stdout.is_empty());

    let output = agent(&["detect", "--comfyui-url", "ftp://x"], &[]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("COMFYUI_URL"),
        "{}",
        stderr(&output)
    );
}
