//! `emp` against a real control plane: the binary is run as a user would, with EMP_API_URL and
//! EMP_API_KEY, against the control plane, the ComfyUI simulator and one agent started
//! in-process (see `support`). Exit codes are checked as scripts rely on them.

mod support;

use serde_json::{Value, json};
use sqlx::PgPool;
use support::{System, run_emp};

/// The README's quick-start graph: needs no model file.
fn quickstart_workflow() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16_711_680}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "clitest"}}
    })
}

#[sqlx::test(migrations = "../migrations")]
async fn submit_wait_runs_a_job_to_completed_and_downloads_its_png(db: PgPool) {
    let system = System::start(db).await;
    let dir = tempfile::tempdir().unwrap();
    let workflow = dir.path().join("workflow.json");
    std::fs::write(&workflow, quickstart_workflow().to_string()).unwrap();
    let out = dir.path().join("out");
    let key = system.admin_key.clone();

    let run = system
        .emp_with(
            &[
                "submit",
                workflow.to_str().unwrap(),
                "--priority",
                "20",
                "--wait",
                "--json",
                "--output-dir",
                out.to_str().unwrap(),
            ],
            &[("EMP_API_KEY", &key)],
            None,
        )
        .await;
    run.expect_code(0);
    let job = run.json();
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert_eq!(job["priority"], 20);
    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{job}");
    let filename = outputs[0]["filename"].as_str().unwrap();
    let png = std::fs::read(out.join(filename)).expect("the output was downloaded");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert_eq!(png.len() as u64, outputs[0]["size"].as_u64().unwrap());
    assert!(run.stderr.contains("saved "), "{}", run.stderr);
    let id = job["id"].as_str().unwrap().to_owned();

    // The same job through the other commands, as JSON and as tables.
    let got = system.emp(&["jobs", "get", &id, "--json"]).await;
    assert_eq!(got.expect_code(0).json()["status"], "COMPLETED");
    let table = system.emp(&["jobs", "get", &id]).await;
    assert!(
        table.expect_code(0).stdout.contains("COMPLETED"),
        "{}",
        table.stdout
    );
    let list = system
        .emp(&["jobs", "list", "--status", "completed", "--json"])
        .await;
    let items = list.expect_code(0).json()["items"].clone();
    assert!(
        items
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.as_str()),
        "{items}"
    );
    let executions = system.emp(&["jobs", "executions", &id, "--json"]).await;
    let executions = executions.expect_code(0).json();
    assert_eq!(
        executions["items"][0]["status"], "COMPLETED",
        "{executions}"
    );
    let machines = system.emp(&["machines", "list", "--json"]).await;
    assert_eq!(
        machines.expect_code(0).json()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let stats = system.emp(&["stats", "--json"]).await;
    assert_eq!(stats.expect_code(0).json()["jobs"]["COMPLETED"], 1);

    // `jobs outputs --download` fetches the same file again.
    let again = dir.path().join("again");
    let download = system
        .emp(&[
            "jobs",
            "outputs",
            &id,
            "--download",
            "--output-dir",
            again.to_str().unwrap(),
        ])
        .await;
    download.expect_code(0);
    assert_eq!(std::fs::read(again.join(filename)).unwrap(), png);

    // Without --wait, stdout is the job id alone.
    let plain = system
        .emp(&[
            "submit",
            workflow.to_str().unwrap(),
            "--require",
            "gpu=NoSuchGpu",
        ])
        .await;
    let queued = plain.expect_code(0).stdout.trim().to_owned();
    assert!(queued.parse::<uuid::Uuid>().is_ok(), "{}", plain.stdout);
    // Waiting on a job that gets cancelled ends with the unsuccessful-job code.
    let cancel = system.emp(&["jobs", "cancel", &queued, "--json"]).await;
    assert_eq!(cancel.expect_code(0).json()["status"], "CANCELLED");
    let waited = system.emp(&["jobs", "wait", &queued]).await;
    waited.expect_code(3);
    assert!(waited.stderr.contains("CANCELLED"), "{}", waited.stderr);
    // A second cancel is refused: the job is finished (409).
    system
        .emp(&["jobs", "cancel", &queued])
        .await
        .expect_code(7);

    system.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn refusals_exit_with_their_codes(db: PgPool) {
    let system = System::start(db).await;
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "{}").unwrap();
    let workflow = dir.path().join("workflow.json");
    std::fs::write(&workflow, quickstart_workflow().to_string()).unwrap();

    // Unknown job: not found.
    let unknown = system
        .emp(&["jobs", "get", "0190b7a6-0000-7000-8000-000000000000"])
        .await;
    unknown.expect_code(5);
    assert!(unknown.stderr.contains("not_found"), "{}", unknown.stderr);

    // A key the API does not know: auth.
    let bad_key = system
        .emp_with(
            &["jobs", "list"],
            &[("EMP_API_KEY", &format!("emp_{}", "0".repeat(64)))],
            None,
        )
        .await;
    bad_key.expect_code(4);
    assert!(bad_key.stderr.contains("EMP_API_KEY"), "{}", bad_key.stderr);

    // A workflow the API refuses (an empty graph; a priority out of range): invalid input,
    // with the field named.
    let refused = system.emp(&["submit", empty.to_str().unwrap()]).await;
    refused.expect_code(6);
    assert!(
        refused.stderr.contains("validation_failed"),
        "{}",
        refused.stderr
    );
    let priority = system
        .emp(&["submit", workflow.to_str().unwrap(), "--priority", "500"])
        .await;
    priority.expect_code(6);
    assert!(priority.stderr.contains("priority"), "{}", priority.stderr);

    // A requirement key that does not exist: usage, naming the valid ones.
    let usage = system
        .emp(&[
            "submit",
            workflow.to_str().unwrap(),
            "--require",
            "colour=red",
        ])
        .await;
    usage.expect_code(2);
    assert!(usage.stderr.contains("gpu (gpu_model)"), "{}", usage.stderr);

    // A user on an admin route: auth (403).
    let user_key = system
        .emp(&["keys", "create", "ci"])
        .await
        .expect_code(0)
        .stdout
        .trim()
        .to_owned();
    assert!(user_key.starts_with("emp_"), "{user_key}");
    let (_, user) = emp_control_plane::db::users::create_with_key(
        &system.db,
        "user@example.com",
        None,
        emp_control_plane::db::users::Role::User,
        "cli",
    )
    .await
    .unwrap();
    system
        .emp_with(
            &["machines", "list"],
            &[("EMP_API_KEY", &user.plaintext)],
            None,
        )
        .await
        .expect_code(4);

    system.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn templates_are_managed_and_submitted_with_parameters(db: PgPool) {
    let system = System::start(db).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("template.json");
    let mut workflow = quickstart_workflow();
    workflow["1"]["inputs"]["color"] = json!("{{color}}");
    workflow["3"]["inputs"]["filename_prefix"] = json!("tpl_{{name}}");
    std::fs::write(&file, workflow.to_string()).unwrap();

    let created = system
        .emp(&[
            "templates",
            "create",
            "--name",
            "square",
            "--file",
            file.to_str().unwrap(),
            "--json",
        ])
        .await;
    let template = created.expect_code(0).json();
    let id = template["id"].as_str().unwrap().to_owned();
    let list = system.emp(&["templates", "list"]).await;
    assert!(
        list.expect_code(0).stdout.contains("square"),
        "{}",
        list.stdout
    );
    system
        .emp(&["templates", "update", &id, "--public", "true"])
        .await
        .expect_code(0);
    let got = system.emp(&["templates", "get", &id, "--json"]).await;
    assert_eq!(got.expect_code(0).json()["is_public"], true);

    let out = dir.path().join("out");
    let run = system
        .emp(&[
            "submit",
            "--template",
            &id,
            "--param",
            "color=255",
            "--param",
            "name=blue",
            "--wait",
            "--json",
            "--output-dir",
            out.to_str().unwrap(),
        ])
        .await;
    let job = run.expect_code(0).json();
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert_eq!(job["workflow"]["1"]["inputs"]["color"], 255, "{job}");
    let filename = job["outputs"][0]["filename"].as_str().unwrap();
    assert!(filename.starts_with("tpl_blue"), "{filename}");
    assert!(out.join(filename).is_file());

    // A parameter the template needs and the submit lacks: invalid input.
    system
        .emp(&["submit", "--template", &id, "--param", "color=1"])
        .await
        .expect_code(6);
    system
        .emp(&["templates", "delete", &id])
        .await
        .expect_code(0);
    system.emp(&["templates", "get", &id]).await.expect_code(5);

    system.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn login_checks_the_key_and_later_commands_use_the_config_file(db: PgPool) {
    let system = System::start(db).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("emp").join("config.toml");
    let config_var = config.to_str().unwrap().to_owned();

    // A key the API refuses is not stored.
    let refused = system
        .emp_with(
            &["login"],
            &[
                ("EMP_CONFIG", &config_var),
                ("EMP_API_KEY", &format!("emp_{}", "1".repeat(64))),
            ],
            None,
        )
        .await;
    refused.expect_code(4);
    assert!(!config.exists());

    let login = system
        .emp_with(
            &["login"],
            &[
                ("EMP_CONFIG", &config_var),
                ("EMP_API_KEY", &system.admin_key),
            ],
            None,
        )
        .await;
    login.expect_code(0);
    assert!(
        login.stdout.contains("admin@example.com"),
        "{}",
        login.stdout
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&config).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // No URL or key in the environment: both come from the file.
    let env = [("EMP_CONFIG".to_owned(), config_var.clone())];
    let list = run_emp(&["keys", "list", "--json"], &env, None).await;
    assert!(list.expect_code(0).json()["items"].is_array());

    system.stop().await;
}

#[tokio::test]
async fn an_unreachable_api_and_a_missing_configuration_have_their_codes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = [
        ("EMP_API_URL".to_owned(), format!("http://127.0.0.1:{port}")),
        ("EMP_API_KEY".to_owned(), "emp_x".to_owned()),
    ];
    let refused = run_emp(&["jobs", "list"], &env, None).await;
    refused.expect_code(8);
    assert!(refused.stderr.contains("EMP_API_URL"), "{}", refused.stderr);

    let unconfigured = run_emp(&["jobs", "list"], &[], None).await;
    unconfigured.expect_code(2);
    assert!(
        unconfigured.stderr.contains("emp login"),
        "{}",
        unconfigured.stderr
    );

    let bad_flag = run_emp(&["jobs", "list", "--no-such-flag"], &env, None).await;
    bad_flag.expect_code(2);

    let bad_status = run_emp(&["jobs", "list", "--status", "DONE"], &env, None).await;
    bad_status.expect_code(2);

    let help = run_emp(&["--help"], &[], None).await;
    help.expect_code(0);
    assert!(
        help.stdout.contains("Exit codes") && help.stdout.contains("130"),
        "{}",
        help.stdout
    );

    let completions = run_emp(&["completions", "bash"], &[], None).await;
    completions.expect_code(0);
    assert!(completions.stdout.contains("emp"), "{}", completions.stdout);
}
