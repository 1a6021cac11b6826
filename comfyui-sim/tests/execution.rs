//! A prompt's life over the wire: event order, history, the one-prompt cache, `/free`, and
//! runtime errors.

mod common;

use std::time::Duration;

use common::{Events, PNG_MAGIC, Sim, basic_graph, unique_prefix};
use serde_json::{Value, json};

#[tokio::test]
async fn a_fresh_prompt_sends_comfyui_events_in_order_and_lands_in_history() {
    let sim = Sim::start(Duration::ZERO).await;
    let mut events = Events::connect(&sim).await;
    let graph = basic_graph(&unique_prefix(), 0x12_34_56);
    let (prompt_id, status, body) = sim.submit(&graph, &events.client_id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prompt_id"], json!(prompt_id));
    assert!(body["number"].is_i64());
    assert_eq!(body["node_errors"], json!({}));
    events.wait_done(&prompt_id).await;

    assert_eq!(
        events.timeline(&prompt_id),
        [
            "execution_start",
            "execution_cached",
            "executing:1",
            "executing:2",
            "executing:3",
            "executed",
            "execution_success",
            "executing:null"
        ]
    );
    assert_eq!(
        events.one(&prompt_id, "execution_cached")["nodes"],
        json!([])
    );
    let last = events.of(&prompt_id).last().cloned().unwrap();
    assert_eq!(last.0, "executing");
    assert_eq!(
        last.1,
        json!({"node": null, "prompt_id": prompt_id}),
        "no display_node on the last one"
    );

    let executed = events.one(&prompt_id, "executed");
    assert_eq!(executed["node"], "3");
    let images = executed["output"]["images"].clone();
    assert_eq!(images[0]["type"], "output");
    assert_eq!(images[0]["subfolder"], "");

    let history = sim.history(&prompt_id).await;
    let entry = &history[&prompt_id];
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    assert_eq!(entry["outputs"]["3"]["images"], images);
    assert_eq!(entry["prompt"][1], json!(prompt_id));
    assert_eq!(entry["prompt"][2], graph);
    assert_eq!(entry["prompt"][3]["client_id"], json!(events.client_id));

    let name = images[0]["filename"].as_str().unwrap();
    let view = sim
        .get(&format!("/view?filename={name}&subfolder=&type=output"))
        .await;
    assert_eq!(view.status(), 200);
    assert_eq!(view.headers()["content-type"], "image/png");
    let bytes = view.bytes().await.unwrap();
    assert!(bytes.starts_with(PNG_MAGIC));
    let decoded = emp_comfyui_sim::images::decode_png(&bytes).unwrap();
    assert_eq!((decoded.image.width, decoded.image.height), (64, 64));
    assert_eq!(
        &decoded.image.rgb[..3],
        &[0xff - 0x12, 0xff - 0x34, 0xff - 0x56],
        "inverted colour"
    );
}

#[tokio::test]
async fn an_identical_resubmission_replays_the_cached_output() {
    let sim = Sim::start(Duration::ZERO).await;
    let mut events = Events::connect(&sim).await;
    let prefix = unique_prefix();
    let graph = basic_graph(&prefix, 7);
    let (first, ..) = sim.submit(&graph, &events.client_id).await;
    let (second, ..) = sim.submit(&graph, &events.client_id).await;
    events.wait_done(&first).await;
    events.wait_done(&second).await;

    let original = events.one(&first, "executed")["output"]["images"].clone();
    assert_eq!(
        original[0]["filename"],
        json!(format!("{prefix}_00001_.png"))
    );
    assert_eq!(
        events.timeline(&second),
        [
            "execution_start",
            "execution_cached",
            "executed",
            "execution_success",
            "executing:null"
        ]
    );
    assert_eq!(
        events.one(&second, "execution_cached")["nodes"],
        json!(["1", "2", "3"])
    );
    assert_eq!(
        events.one(&second, "executed")["output"]["images"],
        original
    );
    assert_eq!(
        sim.history(&second).await[&second]["outputs"]["3"]["images"],
        original
    );
    assert!(
        sim.handle
            .output_dir()
            .join(format!("{prefix}_00001_.png"))
            .is_file()
    );
    assert!(
        !sim.handle
            .output_dir()
            .join(format!("{prefix}_00002_.png"))
            .exists()
    );

    // Changing only the last node reuses the upstream ones and writes the next number.
    let mut changed = graph.clone();
    changed["3"]["inputs"]["filename_prefix"] = json!(format!("{prefix}_b"));
    let (third, ..) = sim.submit(&changed, &events.client_id).await;
    events.wait_done(&third).await;
    assert_eq!(
        events.one(&third, "execution_cached")["nodes"],
        json!(["1", "2"])
    );
    assert_eq!(
        events.timeline(&third),
        [
            "execution_start",
            "execution_cached",
            "executing:3",
            "executed",
            "execution_success",
            "executing:null"
        ]
    );
}

#[tokio::test]
async fn free_memory_empties_the_cache_before_the_next_prompt() {
    let sim = Sim::start(Duration::ZERO).await;
    let mut events = Events::connect(&sim).await;
    let graph = basic_graph(&unique_prefix(), 99);
    let (first, ..) = sim.submit(&graph, &events.client_id).await;
    events.wait_done(&first).await;

    let response = sim.post_json("/free", &json!({"free_memory": true})).await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap().is_empty());
    let (second, ..) = sim.submit(&graph, &events.client_id).await;
    events.wait_done(&second).await;
    assert_eq!(events.one(&second, "execution_cached")["nodes"], json!([]));
    let second_file = &events.one(&second, "executed")["output"]["images"][0]["filename"];
    assert!(
        second_file.as_str().unwrap().ends_with("_00002_.png"),
        "ran again: {second_file}"
    );

    // `unload_models` alone keeps cached results.
    sim.post_json("/free", &json!({"unload_models": true}))
        .await;
    let (third, ..) = sim.submit(&graph, &events.client_id).await;
    events.wait_done(&third).await;
    assert_eq!(
        events.one(&third, "execution_cached")["nodes"],
        json!(["1", "2", "3"])
    );
}

#[tokio::test]
async fn a_failing_node_ends_the_prompt_with_execution_error() {
    let sim = Sim::start(Duration::ZERO).await;
    let mut events = Events::connect(&sim).await;
    let mut graph = basic_graph(&unique_prefix(), 1);
    graph["4"] = json!({"class_type": "EmpSimFail", "inputs": {
        "message": "CUDA error: device-side assert triggered", "value": ["2", 0]}});
    let (prompt_id, status, body) = sim.submit(&graph, &events.client_id).await;
    assert_eq!(status, 200, "{body}");
    events.wait_done(&prompt_id).await;

    let timeline = events.timeline(&prompt_id);
    assert_eq!(
        timeline[timeline.len() - 2..],
        ["execution_error", "executing:null"]
    );
    assert!(!timeline.contains(&"execution_success".to_string()));
    let error = events.one(&prompt_id, "execution_error");
    assert_eq!(error["node_id"], "4");
    assert_eq!(error["node_type"], "EmpSimFail");
    assert_eq!(error["exception_type"], "RuntimeError");
    assert_eq!(
        error["exception_message"],
        "CUDA error: device-side assert triggered\n"
    );
    assert!(
        error["traceback"]
            .as_array()
            .is_some_and(|lines| !lines.is_empty())
    );
    assert_eq!(
        error["current_inputs"]["message"],
        json!(["CUDA error: device-side assert triggered"])
    );
    assert!(error["executed"].as_array().unwrap().contains(&json!("2")));
    assert!(error["timestamp"].is_u64());

    let entry = &sim.history(&prompt_id).await[&prompt_id];
    assert_eq!(entry["status"]["status_str"], "error");
    assert_eq!(entry["status"]["completed"], false);
    let kinds: Vec<&Value> = entry["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m[0])
        .collect();
    assert_eq!(
        kinds,
        [
            &json!("execution_start"),
            &json!("execution_cached"),
            &json!("execution_error")
        ]
    );
}

#[tokio::test]
async fn out_of_memory_errors_carry_comfyui_tips() {
    let sim = Sim::start(Duration::ZERO).await;
    let mut events = Events::connect(&sim).await;
    let graph = json!({"1": {"class_type": "EmpSimFail", "inputs": {
        "message": "Allocation on device", "exception_type": "torch.OutOfMemoryError"}}});
    let (prompt_id, ..) = sim.submit(&graph, &events.client_id).await;
    events.wait_done(&prompt_id).await;
    let error = events.one(&prompt_id, "execution_error");
    assert_eq!(error["exception_type"], "torch.OutOfMemoryError");
    let message = error["exception_message"].as_str().unwrap();
    assert!(
        message.starts_with("Allocation on device\nThis error means you ran out of memory"),
        "{message}"
    );
}

#[tokio::test]
async fn a_txt2img_graph_runs_with_sampler_progress() {
    let sim = Sim::start(Duration::ZERO).await;
    let mut events = Events::connect(&sim).await;
    let graph = json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model_a.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 96, "batch_size": 2}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 42u64, "steps": 5, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": unique_prefix(), "images": ["8", 0]}},
    });
    let (prompt_id, status, body) = sim.submit(&graph, &events.client_id).await;
    assert_eq!(status, 200, "{body}");
    events.wait_done(&prompt_id).await;

    let progress: Vec<Value> = events
        .of(&prompt_id)
        .into_iter()
        .filter(|(kind, _)| kind == "progress")
        .map(|(_, data)| json!([data["value"], data["max"], data["node"]]))
        .collect();
    let want: Vec<Value> = (1..=5).map(|step| json!([step, 5, "3"])).collect();
    assert_eq!(progress, want, "one progress event per sampler step");
    let images = &events.one(&prompt_id, "executed")["output"]["images"];
    assert_eq!(
        images.as_array().unwrap().len(),
        2,
        "one file per batch item"
    );
    let bytes = std::fs::read(
        sim.handle
            .output_dir()
            .join(images[0]["filename"].as_str().unwrap()),
    )
    .unwrap();
    let decoded = emp_comfyui_sim::images::decode_png(&bytes).unwrap();
    assert_eq!((decoded.image.width, decoded.image.height), (128, 96));
}
