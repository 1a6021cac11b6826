//! One job from submit to outcome against the real ComfyUI simulator (started in-process on a
//! free port), with a stand-in control plane receiving the uploads.

mod support_execute;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use emp_agent::comfy::{ComfyClient, FileRef};
use emp_agent::config::Secret;
use emp_agent::execute::{
    self, ExecuteSettings, Execution, HttpOutputStore, JobError, Outcome, codes, execute,
    execute_with,
};
use serde_json::{Value, json};
use support_execute::{
    PNG_MAGIC, Proxy, RecordingSink, Sim, TOKEN, UploadServer, WAIT, basic_graph, closed_port,
    execution, first_progress, quick_settings, sleep_graph, slow_image_graph,
};
use tokio_util::sync::CancellationToken;

fn store(server: &UploadServer) -> HttpOutputStore {
    HttpOutputStore::new(&server.url, Some(Secret::new(TOKEN))).expect("store")
}

/// Runs `exec` to its end, bounded.
async fn run(
    exec: &Execution,
    comfy: &ComfyClient,
    sink: &RecordingSink,
    uploads: &UploadServer,
    cancel: CancellationToken,
    settings: ExecuteSettings,
) -> Outcome {
    tokio::time::timeout(
        WAIT,
        execute_with(exec, comfy, sink, &store(uploads), cancel, &settings),
    )
    .await
    .expect("the execution ends in time")
}

fn failed(outcome: Outcome) -> (JobError, bool) {
    match outcome {
        Outcome::Failed { error, retryable } => (error, retryable),
        other => panic!("want a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_job_completes_and_every_execution_uploads_a_fresh_png() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    let graph = basic_graph("cat", 0x00ff_8800);

    let first = execution(graph.clone(), 60);
    let outcome = tokio::time::timeout(
        WAIT,
        execute(
            &first,
            &comfy,
            &sink,
            &store(&uploads),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("ends in time");
    let Outcome::Completed { outputs } = outcome else {
        panic!("want completed, got {outcome:?}")
    };
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert_eq!(outputs[0]["node_id"], "3");

    let received = uploads.received();
    assert_eq!(received.len(), 1);
    let upload = &received[0];
    assert_eq!(upload.execution_id, first.execution_id.to_string());
    assert_eq!(upload.query["node_id"], "3");
    assert_eq!(upload.query["filename"], "cat_00001_.png");
    assert_eq!(upload.query["content_type"], "image/png");
    assert_eq!(upload.query["kind"], "output");
    assert_eq!(
        upload.authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(upload.content_type.as_deref(), Some("image/png"));
    assert!(upload.body.starts_with(PNG_MAGIC), "PNG bytes arrive");
    let on_disk = sim
        .handle
        .output_dir()
        .join(format!("emp/{}/cat_00001_.png", first.execution_id));
    assert_eq!(
        std::fs::read(&on_disk).expect("saved under the execution's folder"),
        upload.body
    );

    // The same graph again: ComfyUI would replay its cached file, but the per-execution prefix
    // makes it save a new one.
    let second = execution(graph, 60);
    let outcome = run(
        &second,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        ExecuteSettings::default(),
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Completed { ref outputs } if outputs.len() == 1),
        "{outcome:?}"
    );
    let received = uploads.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].execution_id, second.execution_id.to_string());
    assert!(received[1].body.starts_with(PNG_MAGIC));
    assert!(
        sim.handle
            .output_dir()
            .join(format!("emp/{}/cat_00001_.png", second.execution_id))
            .is_file(),
        "a new file for the second execution"
    );
}

#[tokio::test]
async fn temp_outputs_are_uploaded_only_when_the_job_asks() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    let graph = |color: u32| {
        let mut graph = basic_graph("both", color);
        graph["4"] = json!({"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}});
        graph
    };

    let without = execution(graph(1), 60);
    let outcome = run(
        &without,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        ExecuteSettings::default(),
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Completed { ref outputs } if outputs.len() == 1),
        "{outcome:?}"
    );

    let mut with = execution(graph(2), 60);
    with.payload.include_temp_outputs = true;
    let outcome = run(
        &with,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        ExecuteSettings::default(),
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Completed { ref outputs } if outputs.len() == 2),
        "{outcome:?}"
    );
    let kinds: Vec<(String, String)> = uploads.received()[1..]
        .iter()
        .map(|r| (r.query["node_id"].clone(), r.query["kind"].clone()))
        .collect();
    assert_eq!(
        kinds,
        [("3".into(), "output".into()), ("4".into(), "temp".into())]
    );
    assert!(
        uploads
            .received()
            .iter()
            .all(|r| r.body.starts_with(PNG_MAGIC))
    );
}

#[tokio::test]
async fn a_refused_graph_fails_for_good_naming_the_node() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    let graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 32, "height": 32, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    });
    let exec = execution(graph, 60);
    let (error, retryable) = failed(
        run(
            &exec,
            &comfy,
            &sink,
            &uploads,
            CancellationToken::new(),
            ExecuteSettings::default(),
        )
        .await,
    );
    assert!(!retryable);
    assert_eq!(error.code, codes::COMFYUI_VALIDATION_ERROR);
    assert_eq!(error.node_id.as_deref(), Some("2"));
    assert_eq!(error.node_type.as_deref(), Some("ImageScale"));
    assert!(error.message.contains("bogus"), "{}", error.message);
    let details = error.details.expect("details");
    assert_eq!(details["type"], "prompt_outputs_failed_validation");
    assert_eq!(
        details["node_errors"][0]["errors"][0]["type"],
        "value_not_in_list"
    );

    // An unknown node type is refused before any node is looked at: no node to name.
    let unknown = execution(json!({"1": {"class_type": "NoSuchNode", "inputs": {}}}), 60);
    let (error, retryable) = failed(
        run(
            &unknown,
            &comfy,
            &sink,
            &uploads,
            CancellationToken::new(),
            ExecuteSettings::default(),
        )
        .await,
    );
    assert!(!retryable);
    assert_eq!(error.code, codes::COMFYUI_VALIDATION_ERROR);
    assert!(error.message.contains("NoSuchNode"), "{}", error.message);
    assert_eq!(error.details.expect("details")["type"], "invalid_prompt");
    assert!(uploads.received().is_empty());
}

#[tokio::test]
async fn a_graph_comfyui_accepts_only_in_part_fails_and_is_taken_back() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    let mut graph = basic_graph("good", 7);
    graph["4"] = json!({"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 32, "height": 32, "crop": "disabled"}});
    graph["5"] = json!({"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "bad"}});
    // Keep the valid branch busy so it is still queued or running when the agent takes it back.
    graph["2"] = json!({"class_type": "EmpSimSleep", "inputs": {"seconds": 20.0, "steps": 200, "value": ["1", 0]}});

    let exec = execution(graph, 60);
    let started = Instant::now();
    let (error, retryable) = failed(
        run(
            &exec,
            &comfy,
            &sink,
            &uploads,
            CancellationToken::new(),
            ExecuteSettings::default(),
        )
        .await,
    );
    assert!(!retryable);
    assert_eq!(error.code, codes::COMFYUI_VALIDATION_ERROR);
    assert_eq!(error.node_id.as_deref(), Some("4"));
    assert_eq!(error.node_type.as_deref(), Some("ImageScale"));
    assert!(started.elapsed() < Duration::from_secs(10));
    // The valid half does not keep running unattended.
    sim.wait_for_queue("the accepted half to be gone", |running, pending| {
        running.is_empty() && pending.is_empty()
    })
    .await;
    assert!(uploads.received().is_empty());
}

#[tokio::test]
async fn a_node_that_raises_fails_the_job_with_its_exception() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    let graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "EmpSimFail", "inputs": {"message": "the model file is corrupt", "value": ["1", 0]}},
    });
    let exec = execution(graph, 60);
    let (error, retryable) = failed(
        run(
            &exec,
            &comfy,
            &sink,
            &uploads,
            CancellationToken::new(),
            ExecuteSettings::default(),
        )
        .await,
    );
    assert!(!retryable);
    assert_eq!(error.code, codes::COMFYUI_EXECUTION_ERROR);
    assert_eq!(error.message, "the model file is corrupt");
    assert_eq!(error.node_id.as_deref(), Some("2"));
    assert_eq!(error.node_type.as_deref(), Some("EmpSimFail"));
    let details = error.details.expect("details");
    assert_eq!(details["exception_type"], "RuntimeError");
    assert!(
        details["traceback"]
            .as_str()
            .unwrap()
            .contains("EmpSimFail")
    );

    // Running out of GPU memory may go better elsewhere: retryable.
    let oom = execution(
        json!({"1": {"class_type": "EmpSimFail", "inputs": {"message": "Allocation on device", "exception_type": "torch.OutOfMemoryError"}}}),
        60,
    );
    let (error, retryable) = failed(
        run(
            &oom,
            &comfy,
            &sink,
            &uploads,
            CancellationToken::new(),
            ExecuteSettings::default(),
        )
        .await,
    );
    assert!(retryable);
    assert_eq!(error.code, codes::COMFYUI_EXECUTION_ERROR);
    assert!(error.message.starts_with("Allocation on device"));
}

#[tokio::test]
async fn progress_is_forwarded_at_most_four_times_a_second() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    // 80 steps in 2 s: 40 progress events a second.
    let exec = execution(sleep_graph(2.0, 80), 60);
    let outcome = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        ExecuteSettings::default(),
    )
    .await;
    assert_eq!(outcome, Outcome::Completed { outputs: vec![] });

    let calls = sink.calls();
    assert!((3..=12).contains(&calls.len()), "{} calls", calls.len());
    for pair in calls.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap >= Duration::from_millis(240), "reports {gap:?} apart");
        assert!(pair[1].1.value >= pair[0].1.value);
    }
    for (_, progress) in &calls {
        assert_eq!(progress.max, 80);
        assert_eq!(progress.node.as_deref(), Some("1"));
    }
    assert_eq!(calls[0].1.value, 1, "the first step goes out at once");
}

#[tokio::test]
async fn a_cancel_while_running_interrupts_the_prompt() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, mut seen) = RecordingSink::new();
    let exec = execution(slow_image_graph(30.0, 300), 60);
    let cancel = CancellationToken::new();
    let running = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        cancel.clone(),
        ExecuteSettings::default(),
    );
    let canceller = async {
        first_progress(&mut seen).await;
        cancel.cancel();
        Instant::now()
    };
    let (outcome, cancelled_at) = tokio::join!(running, canceller);
    assert_eq!(outcome, Outcome::Cancelled);
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "stopped promptly"
    );
    let (running, pending) = sim.queue_ids().await;
    assert!(running.is_empty() && pending.is_empty());
    // ComfyUI recorded the prompt as interrupted.
    let history = sim.get_json("/history").await;
    let entries: Vec<&Value> = history.as_object().unwrap().values().collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["status"]["status_str"], "error");
    assert!(uploads.received().is_empty());
}

#[tokio::test]
async fn a_cancel_asked_in_a_progress_reply_stops_the_job() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::cancelling_from(Some(2));
    let exec = execution(sleep_graph(30.0, 300), 60);
    let started = Instant::now();
    let outcome = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        ExecuteSettings::default(),
    )
    .await;
    assert_eq!(outcome, Outcome::Cancelled);
    assert_eq!(
        sink.calls().len(),
        2,
        "nothing is forwarded once the stop began"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let (running, pending) = sim.queue_ids().await;
    assert!(running.is_empty() && pending.is_empty());
}

#[tokio::test]
async fn a_cancel_while_pending_deletes_the_prompt_from_the_queue() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    let blocker = sim.submit_as_other_client(&sleep_graph(30.0, 300)).await;
    sim.wait_for_queue("the blocker to run", |running, _| {
        running.contains(&blocker)
    })
    .await;

    let exec = execution(basic_graph("queued", 3), 60);
    let cancel = CancellationToken::new();
    let running = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        cancel.clone(),
        ExecuteSettings::default(),
    );
    let canceller = async {
        sim.wait_for_queue("our prompt to wait behind the blocker", |_, pending| {
            pending.len() == 1
        })
        .await;
        let (_, pending) = sim.queue_ids().await;
        cancel.cancel();
        pending[0].clone()
    };
    let (outcome, ours) = tokio::join!(running, canceller);
    assert_eq!(outcome, Outcome::Cancelled);
    let (running, pending) = sim.queue_ids().await;
    assert_eq!(
        running,
        std::slice::from_ref(&blocker),
        "the other client's prompt is untouched"
    );
    assert!(pending.is_empty(), "ours was deleted");
    assert_eq!(sim.get_json(&format!("/history/{ours}")).await, json!({}));
    assert!(uploads.received().is_empty());
    comfy.interrupt(Some(&blocker)).await.expect("clean up");
}

#[tokio::test]
async fn a_job_past_its_timeout_is_interrupted() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    let exec = execution(slow_image_graph(30.0, 300), 1);
    let started = Instant::now();
    let outcome = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        ExecuteSettings::default(),
    )
    .await;
    assert_eq!(outcome, Outcome::TimedOut);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let (running, pending) = sim.queue_ids().await;
    assert!(
        running.is_empty() && pending.is_empty(),
        "the prompt was stopped"
    );
}

#[tokio::test]
async fn a_comfyui_that_stops_mid_job_fails_it_retryably() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, mut seen) = RecordingSink::new();
    let exec = execution(slow_image_graph(30.0, 300), 60);
    let settings = quick_settings();
    let running = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        settings.clone(),
    );
    let Sim { handle, dir, .. } = sim;
    let stopper = async {
        first_progress(&mut seen).await;
        handle.stop().await.expect("the simulator stops");
        Instant::now()
    };
    let (outcome, stopped_at) = tokio::join!(running, stopper);
    let (error, retryable) = failed(outcome);
    assert!(retryable);
    assert_eq!(error.code, codes::COMFYUI_UNAVAILABLE);
    let waited = stopped_at.elapsed();
    assert!(
        waited >= settings.unavailable_after
            && waited < settings.unavailable_after + Duration::from_secs(5),
        "{waited:?}"
    );
    drop(dir);
}

#[tokio::test]
async fn a_comfyui_that_is_down_fails_the_job_retryably_at_once() {
    let comfy = ComfyClient::new(&format!("http://127.0.0.1:{}", closed_port())).unwrap();
    let uploads = UploadServer::start().await;
    let (sink, _) = RecordingSink::new();
    let exec = execution(basic_graph("x", 0), 60);
    let started = Instant::now();
    let (error, retryable) = failed(
        run(
            &exec,
            &comfy,
            &sink,
            &uploads,
            CancellationToken::new(),
            quick_settings(),
        )
        .await,
    );
    assert!(retryable);
    assert_eq!(error.code, codes::COMFYUI_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!comfy.ready().await);
}

#[tokio::test]
async fn a_dropped_socket_is_replaced_by_history_polling() {
    let sim = Sim::start().await;
    let proxy = Proxy::start(sim.handle.addr()).await;
    let uploads = UploadServer::start().await;
    let comfy = ComfyClient::new(&proxy.url).unwrap();
    let (sink, mut seen) = RecordingSink::new();
    let exec = execution(slow_image_graph(1.5, 3), 60);
    let running = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        quick_settings(),
    );
    let cutter = async {
        first_progress(&mut seen).await;
        // The socket goes and cannot come back: only the history can tell the end.
        proxy.cut_sockets(true);
    };
    let (outcome, ()) = tokio::join!(running, cutter);
    assert!(
        matches!(outcome, Outcome::Completed { ref outputs } if outputs.len() == 1),
        "{outcome:?}"
    );
    assert!(proxy.sockets_refused() >= 1, "the agent tried to reconnect");
    assert_eq!(proxy.sockets_opened(), 1);
    let received = uploads.received();
    assert_eq!(received[0].query["filename"], "slow_00001_.png");
    assert!(received[0].body.starts_with(PNG_MAGIC));
}

#[tokio::test]
async fn a_dropped_socket_is_reconnected() {
    let sim = Sim::start().await;
    let proxy = Proxy::start(sim.handle.addr()).await;
    let uploads = UploadServer::start().await;
    let comfy = ComfyClient::new(&proxy.url).unwrap();
    let (sink, mut seen) = RecordingSink::new();
    let exec = execution(slow_image_graph(2.0, 40), 60);
    // ComfyUI forgets a client id when any of its sockets closes, even after a newer one took
    // the id over: leave the server time to see the old socket close before reconnecting.
    let settings = ExecuteSettings {
        reconnect_min_delay: Duration::from_millis(300),
        ..quick_settings()
    };
    let running = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        settings,
    );
    let cutter = async {
        first_progress(&mut seen).await;
        proxy.cut_sockets(false);
        // Progress flows again once the socket is back.
        let before = sink.calls().len();
        tokio::time::timeout(WAIT, async {
            while sink.calls().len() <= before + 1 {
                seen.recv().await.expect("the sink is alive");
            }
        })
        .await
        .expect("progress after the reconnect");
    };
    let (outcome, ()) = tokio::join!(running, cutter);
    assert!(
        matches!(outcome, Outcome::Completed { ref outputs } if outputs.len() == 1),
        "{outcome:?}"
    );
    assert!(proxy.sockets_opened() >= 2, "reconnected");
}

#[tokio::test]
async fn a_restarted_comfyui_that_forgot_the_prompt_fails_it_retryably() {
    let sim = Sim::start().await;
    let restarted = Sim::start().await;
    let proxy = Proxy::start(sim.handle.addr()).await;
    let uploads = UploadServer::start().await;
    let comfy = ComfyClient::new(&proxy.url).unwrap();
    let (sink, mut seen) = RecordingSink::new();
    let exec = execution(slow_image_graph(30.0, 300), 60);
    let running = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        CancellationToken::new(),
        quick_settings(),
    );
    let restarter = async {
        first_progress(&mut seen).await;
        proxy.switch_to(restarted.handle.addr());
    };
    let (outcome, ()) = tokio::join!(running, restarter);
    let (error, retryable) = failed(outcome);
    assert!(retryable);
    assert_eq!(error.code, codes::COMFYUI_UNAVAILABLE);
    assert!(
        error.message.contains("no longer knows"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn an_upload_the_store_refuses_fails_the_job_retryably() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    uploads.fail_with(StatusCode::SERVICE_UNAVAILABLE);
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    let exec = execution(basic_graph("lost", 9), 60);
    let (error, retryable) = failed(
        run(
            &exec,
            &comfy,
            &sink,
            &uploads,
            CancellationToken::new(),
            ExecuteSettings::default(),
        )
        .await,
    );
    assert!(retryable);
    assert_eq!(error.code, codes::OUTPUT_UPLOAD_FAILED);
    assert!(error.message.contains("503"), "{}", error.message);
}

#[tokio::test]
async fn a_job_cancelled_before_it_starts_submits_nothing() {
    let sim = Sim::start().await;
    let uploads = UploadServer::start().await;
    let comfy = sim.client();
    let (sink, _) = RecordingSink::new();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let exec = execution(basic_graph("never", 1), 60);
    let outcome = run(
        &exec,
        &comfy,
        &sink,
        &uploads,
        cancel,
        ExecuteSettings::default(),
    )
    .await;
    assert_eq!(outcome, Outcome::Cancelled);
    assert_eq!(sim.get_json("/history").await, json!({}));
}

#[tokio::test]
async fn a_submit_answered_with_plain_text_500_is_a_failure_not_a_crash() {
    // A stand-in whose `/prompt` handler "raises", as aiohttp answers then; no event socket.
    let app = axum::Router::new().route(
        "/prompt",
        axum::routing::post(|| async {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "text/plain; charset=utf-8")],
                "500 Internal Server Error\n\nServer got itself in trouble",
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let comfy = ComfyClient::new(&url).unwrap();
    let uploads = UploadServer::start().await;
    let (sink, _) = RecordingSink::new();
    let exec = execution(basic_graph("x", 0), 60);
    let (error, retryable) = failed(
        run(
            &exec,
            &comfy,
            &sink,
            &uploads,
            CancellationToken::new(),
            quick_settings(),
        )
        .await,
    );
    assert!(!retryable);
    assert_eq!(error.code, codes::COMFYUI_ERROR);
    assert!(error.message.contains("500"), "{}", error.message);
}

#[tokio::test]
async fn the_client_covers_the_rest_of_comfyuis_api() {
    let sim = Sim::start().await;
    let comfy = sim.client();
    assert!(comfy.ready().await);

    let stored = comfy
        .upload_image(
            "in.png",
            reqwest::Body::from(images_png()),
            "emp",
            "input",
            false,
        )
        .await
        .expect("uploaded");
    assert_eq!(
        (
            stored.name.as_str(),
            stored.subfolder.as_str(),
            stored.kind.as_str()
        ),
        ("in.png", "emp", "input")
    );
    assert!(sim.handle.input_dir().join("emp/in.png").is_file());

    let viewed = comfy
        .view(&FileRef {
            filename: "in.png".into(),
            subfolder: "emp".into(),
            kind: "input".into(),
        })
        .await
        .expect("served");
    assert_eq!(viewed.content_type.as_deref(), Some("image/png"));
    let missing = comfy
        .view(&FileRef {
            filename: "nope.png".into(),
            subfolder: String::new(),
            kind: "output".into(),
        })
        .await
        .expect_err("missing");
    assert!(
        matches!(
            missing,
            emp_agent::comfy::ComfyError::Status { status: 404, .. }
        ),
        "{missing:?}"
    );

    comfy.free(false, true).await.expect("free");
    assert_eq!(comfy.history("unknown").await.unwrap(), None);
    assert_eq!(
        comfy.queue().await.unwrap(),
        emp_agent::comfy::QueueSnapshot::default()
    );
    comfy
        .delete_from_queue(&["unknown"])
        .await
        .expect("delete answers 200");
    comfy
        .interrupt(Some("unknown"))
        .await
        .expect("interrupt answers 200");
}

/// A tiny valid PNG, from the simulator's own encoder.
fn images_png() -> Vec<u8> {
    let image = emp_comfyui_sim::images::Image::solid(2, 2, [1, 2, 3]);
    emp_comfyui_sim::images::encode_png(&image, &[]).expect("a PNG")
}

#[test]
fn the_execution_future_can_be_spawned() {
    fn assert_send<T: Send>(_: &T) {}
    let comfy = ComfyClient::new("http://127.0.0.1:1").unwrap();
    let (sink, _) = RecordingSink::new();
    let store = HttpOutputStore::new("http://127.0.0.1:1", None).unwrap();
    let exec = execution(json!({}), 1);
    let future = execute::execute(&exec, &comfy, &sink, &store, CancellationToken::new());
    assert_send(&future);
}
