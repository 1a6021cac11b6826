//! Request/response behaviour: discovery, submit-time validation, `/view`, uploads.

mod common;

use std::time::Duration;

use common::{Events, PNG_MAGIC, Sim, basic_graph, unique_prefix};
use emp_comfyui_sim::images::{Image, encode_png};
use serde_json::{Value, json};

#[tokio::test]
async fn discovery_describes_the_box() {
    let sim = Sim::start(Duration::ZERO).await;
    let stats = sim.get_json("/system_stats").await;
    assert_eq!(stats["system"]["comfyui_version"], "0.3.64");
    assert!(stats["devices"][0]["vram_total"].is_u64());
    assert!(stats["devices"][0]["vram_free"].is_u64());

    let info = sim.get_json("/object_info").await;
    for (node, inputs) in [
        (
            "EmptyImage",
            &["width", "height", "batch_size", "color"][..],
        ),
        ("ImageInvert", &["image"]),
        ("ImageBlur", &["image", "blur_radius", "sigma"]),
        (
            "ImageScale",
            &["image", "upscale_method", "width", "height", "crop"],
        ),
        ("SaveImage", &["images", "filename_prefix"]),
    ] {
        for input in inputs {
            assert!(
                info[node]["input"]["required"].get(*input).is_some(),
                "{node}.{input}"
            );
        }
    }
    assert_eq!(info["SaveImage"]["output_node"], true);
    assert_eq!(
        info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0],
        json!(["model_a.safetensors", "model_b.safetensors"])
    );
    assert_eq!(
        sim.get_json("/models/checkpoints").await,
        json!(["model_a.safetensors", "model_b.safetensors"])
    );
    assert!(
        sim.get_json("/models")
            .await
            .as_array()
            .unwrap()
            .contains(&json!("loras"))
    );
    assert_eq!(sim.get("/models/no_such_folder").await.status(), 404);
    assert_eq!(
        sim.get_json("/object_info/KSampler").await["KSampler"]["output"],
        json!(["LATENT"])
    );
    assert_eq!(
        sim.get_json("/api/object_info/Nope").await,
        json!({}),
        "also served under /api"
    );
}

#[tokio::test]
async fn extra_node_types_validate_and_run() {
    let sim = Sim::start_with(Duration::ZERO, |mut config| {
        config
            .add_node_types_json(
                r#"{"FaceRestore": {"input": {"required": {"image": ["IMAGE"], "strength": ["FLOAT", {"min": 0, "max": 1}]}}, "output": ["IMAGE"]}}"#,
            )
            .unwrap();
        config
    })
    .await;
    let mut events = Events::connect(&sim).await;
    let mut graph = basic_graph(&unique_prefix(), 5);
    graph["9"] =
        json!({"class_type": "FaceRestore", "inputs": {"image": ["2", 0], "strength": 0.5}});
    graph["3"]["inputs"]["images"] = json!(["9", 0]);
    let (prompt_id, status, body) = sim.submit(&graph, &events.client_id).await;
    assert_eq!(status, 200, "{body}");
    events.wait_done(&prompt_id).await;
    assert!(
        events
            .timeline(&prompt_id)
            .contains(&"executing:9".to_string())
    );

    graph["9"]["inputs"]["strength"] = json!(3);
    let (_, status, body) = sim.submit(&graph, &events.client_id).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["node_errors"]["9"]["errors"][0]["type"],
        "value_bigger_than_max"
    );
}

#[tokio::test]
async fn validation_refuses_like_comfyui() {
    let sim = Sim::start(Duration::ZERO).await;

    let mut no_output = basic_graph(&unique_prefix(), 1);
    no_output.as_object_mut().unwrap().remove("3");
    let (_, status, body) = sim.submit(&no_output, "c").await;
    assert_eq!(
        (status, &body["error"]["type"]),
        (400, &json!("prompt_no_outputs"))
    );

    let mut unknown = basic_graph(&unique_prefix(), 1);
    unknown["2"]["class_type"] = json!("NoSuchNodeType");
    let (_, status, body) = sim.submit(&unknown, "c").await;
    assert_eq!(
        (status, &body["error"]["type"]),
        (400, &json!("invalid_prompt"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("NoSuchNodeType")
    );

    let mut missing_model = basic_graph(&unique_prefix(), 1);
    missing_model["4"] = json!({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "gone.safetensors"}});
    missing_model["5"] =
        json!({"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["4", 2]}});
    missing_model["6"] = json!({"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}});
    missing_model["7"] =
        json!({"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "m"}});
    missing_model.as_object_mut().unwrap().remove("3");
    let (_, status, body) = sim.submit(&missing_model, "c").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    let node = &body["node_errors"]["4"];
    assert_eq!(node["class_type"], "CheckpointLoaderSimple");
    assert_eq!(node["dependent_outputs"], json!(["7"]));
    assert_eq!(node["errors"][0]["type"], "value_not_in_list");
    assert_eq!(
        node["errors"][0]["details"],
        "ckpt_name: 'gone.safetensors' not in ['model_a.safetensors', 'model_b.safetensors']"
    );

    let response = sim
        .http
        .post(sim.url("/prompt"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(sim.get("/system_stats").await.status(), 200);

    let response = sim.post_json("/prompt", &json!({"client_id": "x"})).await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["type"],
        "no_prompt"
    );
}

#[tokio::test]
async fn a_partly_valid_graph_runs_only_its_valid_branch() {
    let sim = Sim::start(Duration::ZERO).await;
    let mut events = Events::connect(&sim).await;
    let mut graph = basic_graph(&unique_prefix(), 2);
    graph["4"] = json!({"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus",
        "width": 128, "height": 128, "crop": "disabled"}});
    graph["5"] = json!({"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": unique_prefix()}});
    let (prompt_id, status, body) = sim.submit(&graph, &events.client_id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["node_errors"]["4"]["errors"][0]["type"],
        "value_not_in_list"
    );
    assert_eq!(body["node_errors"]["4"]["dependent_outputs"], json!(["5"]));
    events.wait_done(&prompt_id).await;
    let outputs = &sim.history(&prompt_id).await[&prompt_id]["outputs"];
    assert_eq!(
        outputs.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["3"]
    );
}

#[tokio::test]
async fn view_refuses_paths_that_escape_and_missing_files() {
    let sim = Sim::start(Duration::ZERO).await;
    std::fs::create_dir_all(sim.handle.output_dir().join("sub")).unwrap();
    std::fs::write(
        sim.handle.output_dir().join("sub/a.png"),
        b"\x89PNG\r\n\x1a\nrest",
    )
    .unwrap();
    for (query, want) in [
        ("filename=../comfyui.log&type=output", 400),
        ("filename=/etc/passwd", 400),
        ("filename=a.png&subfolder=../..&type=output", 403),
        ("filename=a.png&subfolder=/etc", 403),
        ("filename=missing.png&type=output", 404),
        ("filename=a.png&type=bogus", 400),
        ("type=output", 404),
        ("filename=a.png&subfolder=sub&type=output", 200),
        ("filename=a.png [output]&subfolder=sub", 200),
    ] {
        let response = sim.get(&format!("/view?{query}")).await;
        assert_eq!(response.status(), want, "/view?{query}");
    }
}

fn png(width: usize, height: usize, color: [u8; 3]) -> Vec<u8> {
    encode_png(&Image::solid(width, height, color), &[]).unwrap()
}

async fn upload(sim: &Sim, name: &str, bytes: Vec<u8>) -> Value {
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(name.to_string())
        .mime_str("image/png")
        .unwrap();
    let form = reqwest::multipart::Form::new()
        .part("image", part)
        .text("type", "input");
    let response = sim
        .http
        .post(sim.url("/upload/image"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn an_uploaded_image_can_be_loaded_and_saved() {
    let sim = Sim::start(Duration::ZERO).await;
    let answer = upload(&sim, "photo.png", png(20, 10, [9, 8, 7])).await;
    assert_eq!(
        answer,
        json!({"name": "photo.png", "subfolder": "", "type": "input"})
    );
    assert_eq!(
        upload(&sim, "photo.png", png(20, 10, [9, 8, 7])).await["name"],
        "photo.png",
        "same bytes"
    );
    assert_eq!(
        upload(&sim, "photo.png", png(4, 4, [1, 1, 1])).await["name"],
        "photo (1).png",
        "renamed"
    );
    let info = sim.get_json("/object_info/LoadImage").await;
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["photo (1).png", "photo.png"])
    );

    let mut events = Events::connect(&sim).await;
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "lanczos",
            "width": 40, "height": 0, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loaded/out"}},
    });
    let (prompt_id, status, body) = sim.submit(&graph, &events.client_id).await;
    assert_eq!(status, 200, "{body}");
    events.wait_done(&prompt_id).await;
    let image = events.one(&prompt_id, "executed")["output"]["images"][0].clone();
    assert_eq!(
        image,
        json!({"filename": "out_00001_.png", "subfolder": "loaded", "type": "output"})
    );
    let bytes = sim
        .get("/view?filename=out_00001_.png&subfolder=loaded&type=output")
        .await
        .bytes()
        .await
        .unwrap();
    assert!(bytes.starts_with(PNG_MAGIC));
    let decoded = emp_comfyui_sim::images::decode_png(&bytes).unwrap();
    assert_eq!(
        (decoded.image.width, decoded.image.height),
        (40, 20),
        "aspect kept"
    );
    assert_eq!(&decoded.image.rgb[..3], &[9, 8, 7]);

    let mut missing = graph.clone();
    missing["1"]["inputs"]["image"] = json!("nope.png");
    let (_, status, body) = sim.submit(&missing, &events.client_id).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["node_errors"]["1"]["errors"][0]["type"],
        "custom_validation_failed"
    );
}
