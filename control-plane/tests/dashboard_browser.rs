//! The dashboard in headless Chromium against a whole running system: the page asks for the
//! admin key (a wrong one is refused with a clear message), shows the machine in the fleet
//! panel, and a job submitted through the API appears and reaches COMPLETED on screen without
//! a reload. Each run saves a screenshot; `EMP_UPDATE_SCREENSHOT=1` also writes
//! docs/dashboard.png.
//!
//! Needs `chromium` and `chromedriver` on PATH (`apt-get install -y chromium chromium-driver`);
//! `EMP_SKIP_BROWSER_TESTS=1` skips.

mod dashboard_support;

use std::time::Duration;

use dashboard_support::{AgentLook, Browser, System, invert_workflow, sleep_workflow};
use fantoccini::Locator;
use sqlx::PgPool;

/// How long the page may take to show what the system did.
const ON_SCREEN: Duration = Duration::from_secs(60);

#[sqlx::test(migrations = "../migrations")]
async fn a_submitted_job_reaches_completed_on_the_dashboard(db: PgPool) {
    if dashboard_support::skipped() {
        eprintln!("EMP_SKIP_BROWSER_TESTS=1: skipped");
        return;
    }
    let mut system = System::start(db).await;
    system
        .add_agent(AgentLook {
            external_id: "box-dashboard-1".into(),
            provider: "salad",
            region: "us-east",
            gpus: vec![("NVIDIA GeForce RTX 4090", 24_564)],
        })
        .await;
    let browser = Browser::start().await;
    let page = &browser.client;

    page.goto(&system.base).await.unwrap();
    // A wrong key is refused in words.
    page.wait()
        .at_most(ON_SCREEN)
        .for_element(Locator::Css("#key-input"))
        .await
        .unwrap()
        .send_keys("emp_0000000000000000000000000000000000000000000000000000000000000000")
        .await
        .unwrap();
    page.find(Locator::Css("#key-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let refusal = page
        .wait()
        .at_most(ON_SCREEN)
        .for_element(Locator::XPath(
            "//p[@id='key-error' and contains(., 'refused')]",
        ))
        .await
        .unwrap();
    assert!(refusal.text().await.unwrap().contains("401"));

    // The right key opens the board.
    let input = page.find(Locator::Css("#key-input")).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(&system.admin_key).await.unwrap();
    page.find(Locator::Css("#key-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The machine shows in the fleet panel with its GPU.
    let machine = page
        .wait()
        .at_most(ON_SCREEN)
        .for_element(Locator::Css(
            "#machines tr[data-external-id='box-dashboard-1']",
        ))
        .await
        .unwrap();
    let row = machine.text().await.unwrap();
    assert!(row.contains("RTX 4090"), "{row}");
    assert!(
        !page
            .find(Locator::Css("#login"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap(),
        "the key form is gone once connected"
    );
    assert!(row.contains("salad"), "{row}");

    // A job submitted through the API appears, then reaches COMPLETED, without a reload.
    let job = system.submit(invert_workflow(0xff_0000), 10).await;
    let listed = format!("#jobs tr[data-job-id='{job}']");
    page.wait()
        .at_most(ON_SCREEN)
        .for_element(Locator::Css(&listed))
        .await
        .unwrap();
    let completed = format!("#jobs tr[data-job-id='{job}'][data-status='COMPLETED']");
    let row = page
        .wait()
        .at_most(ON_SCREEN)
        .for_element(Locator::Css(&completed))
        .await
        .unwrap();
    assert!(row.text().await.unwrap().contains("COMPLETED"));
    // Its detail shows the execution and the output's preview.
    row.click().await.unwrap();
    page.wait()
        .at_most(ON_SCREEN)
        .for_element(Locator::Css("#detail-body .outputs img"))
        .await
        .unwrap();
    let detail = page
        .find(Locator::Css("#detail-body"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(detail.contains("dashboard_00001_.png"), "{detail}");

    let shots = tempfile::tempdir().unwrap();
    let shot = shots.path().join("dashboard.png");
    browser.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
    eprintln!("screenshot: {}", shot.display());
    if dashboard_support::update_screenshot() {
        browser
            .screenshot(&dashboard_support::readme_screenshot())
            .await;
    }
    // Keep the screenshot when asked, for a look.
    if std::env::var_os("EMP_KEEP_SCREENSHOT").is_some() {
        let _ = shots.keep();
    }

    browser.stop().await;
    system.stop().await;
}

/// The README's screenshot: several machines, jobs done, failed, running and waiting.
/// `EMP_UPDATE_SCREENSHOT=1 cargo nextest run -p emp-control-plane --run-ignored only -E 'test(readme_screenshot)'`
#[sqlx::test(migrations = "../migrations")]
#[ignore = "writes the README's screenshot; run by hand"]
async fn readme_screenshot(db: PgPool) {
    let mut system = System::start(db).await;
    let boxes = [
        (
            "salad-7f3a21",
            "salad",
            "us-east",
            vec![("NVIDIA GeForce RTX 4090", 24_564)],
        ),
        (
            "salad-b81c0e",
            "salad",
            "eu-west",
            vec![("NVIDIA GeForce RTX 3090", 24_576)],
        ),
        (
            "vast-2210931",
            "vastai",
            "us-west",
            vec![
                ("NVIDIA A100-SXM4-80GB", 81_920),
                ("NVIDIA A100-SXM4-80GB", 81_920),
            ],
        ),
        ("lab-gpu-04", "local", "home", vec![("NVIDIA L4", 23_034)]),
    ];
    for (external_id, provider, region, gpus) in boxes {
        system
            .add_agent(AgentLook {
                external_id: external_id.into(),
                provider,
                region,
                gpus,
            })
            .await;
    }
    // Finished work for the charts, one failure among it.
    let mut done = Vec::new();
    for n in 0..10 {
        done.push(system.submit(invert_workflow(0x10_0000 * n), 10).await);
        done.push(system.submit(sleep_workflow(0.4, 4), 10).await);
    }
    let fails = system
        .submit(
            serde_json::json!({"1": {"class_type": "EmpSimFail", "inputs": {"message": "out of memory"}}}),
            10,
        )
        .await;
    system.wait_job(fails, "FAILED", ON_SCREEN).await;
    for job in &done {
        system.wait_job(*job, "COMPLETED", ON_SCREEN).await;
    }
    // Running and waiting work.
    for _ in 0..4 {
        system.submit(sleep_workflow(120.0, 60), 20).await;
    }
    for priority in [5, 10, 10, 50] {
        system.submit(sleep_workflow(30.0, 10), priority).await;
    }
    // Jobs for a model no box has: they wait in a class of their own.
    for _ in 0..2 {
        let needs_model = serde_json::json!({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "2": {"class_type": "EmpSimSleep", "inputs": {"seconds": 0.1, "steps": 1, "value": ["1", 0]}}
        });
        system.submit(needs_model, 10).await;
    }

    // An hour of history for the charts: ended jobs spread over the last 55 minutes.
    sqlx::query(
        "INSERT INTO job_requests (user_id, custom_workflow, status, attempts, created_at, started_at, completed_at, failed_at)
         SELECT u.id, '{\"1\": {\"class_type\": \"EmpSimSleep\", \"inputs\": {}}}'::jsonb,
                CASE WHEN t.fail THEN 'FAILED'::job_status ELSE 'COMPLETED'::job_status END, 1,
                t.ended - t.run - t.wait, t.ended - t.run,
                CASE WHEN t.fail THEN NULL ELSE t.ended END, CASE WHEN t.fail THEN t.ended END
         FROM (SELECT now() - make_interval(secs => 120 + random() * 3180) AS ended,
                      make_interval(secs => 2 + random() * random() * 20) AS run,
                      make_interval(secs => random() * random() * 8) AS wait,
                      random() < 0.05 AS fail
               FROM generate_series(1, 900)) t,
              (SELECT id FROM users WHERE role = 'admin' LIMIT 1) u",
    )
    .execute(&system.db)
    .await
    .unwrap();

    let browser = Browser::start().await;
    let page = &browser.client;
    page.goto(&system.base).await.unwrap();
    let input = page
        .wait()
        .at_most(ON_SCREEN)
        .for_element(Locator::Css("#key-input"))
        .await
        .unwrap();
    input.send_keys(&system.admin_key).await.unwrap();
    page.find(Locator::Css("#key-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page.wait()
        .at_most(ON_SCREEN)
        .for_element(Locator::Css("#jobs tr[data-status='PROCESSING']"))
        .await
        .unwrap();
    page.set_window_size(1400, 1700).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let target = if dashboard_support::update_screenshot() {
        dashboard_support::readme_screenshot()
    } else {
        std::env::temp_dir().join("emp-dashboard-readme.png")
    };
    browser.screenshot(&target).await;
    eprintln!("screenshot: {}", target.display());
    browser.stop().await;
    system.stop().await;
}
