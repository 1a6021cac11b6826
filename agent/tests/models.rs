//! Model downloads against real local HTTP servers and the ComfyUI simulator: the boot
//! manifest (checksums, resume), on-demand downloads into the cache (links, sharing, eviction),
//! credentials per host, and the newer model folders in the inventory.

mod model_server;

use std::path::Path;
use std::time::Duration;

use emp_agent::detect::comfy_inventory::ComfyInventory;
use emp_agent::models::{
    Credentials, DownloadRetry, Manifest, ModelCache, ModelError, ModelSettings, prefetch_manifest,
};
use emp_comfyui_sim::SimConfig;
use model_server::{FileServer, bytes, sha256_hex};
use tokio_util::sync::CancellationToken;

/// Settings for `models_dir` with quick retries.
fn settings(models_dir: &Path) -> ModelSettings {
    ModelSettings {
        retry: DownloadRetry {
            attempts: 4,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        },
        progress_every: Duration::from_millis(50),
        ..ModelSettings::for_models_dir(models_dir)
    }
}

fn manifest(json: &serde_json::Value) -> Manifest {
    Manifest::parse(&json.to_string(), false).unwrap()
}

/// Files in `dir` (names only), sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn a_manifest_file_with_the_wrong_sha256_is_refused_and_removed() {
    let server = FileServer::start().await;
    let good = bytes(100_000, 1);
    let bad = bytes(50_000, 2);
    let good_url = server.add("good.safetensors", good.clone());
    let bad_url = server.add("bad.safetensors", bad.clone());
    let models = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(&settings(models.path())).unwrap();
    let manifest = manifest(&serde_json::json!([
        {"url": good_url, "folder": "checkpoints", "sha256": sha256_hex(&good)},
        {"url": bad_url, "folder": "loras", "filename": "renamed.safetensors",
         "sha256": sha256_hex(b"something else")}
    ]));

    let error = prefetch_manifest(&cache, &manifest, &CancellationToken::new())
        .await
        .unwrap_err();
    let ModelError::ManifestIncomplete {
        failed,
        total,
        first,
    } = &error
    else {
        panic!("unexpected error: {error}");
    };
    assert_eq!((*failed, *total), (1, 2));
    assert!(first.contains("sha256"), "{first}");
    // The good file is in place, the bad one is gone without a trace (no .part left).
    assert_eq!(
        std::fs::read(models.path().join("checkpoints/good.safetensors")).unwrap(),
        good
    );
    assert!(names_in(&models.path().join("loras")).is_empty());
    let progress = cache.manifest_progress().unwrap();
    assert!(!progress.ready);
    assert_eq!(
        (
            progress.files_total,
            progress.files_done,
            progress.files_failed
        ),
        (2, 1, 1)
    );
    assert!(progress.error.is_some());
    // A mismatch is not retried: one request for the bad file.
    assert_eq!(server.requests_for("bad.safetensors").len(), 1);
}

#[tokio::test]
async fn an_interrupted_download_resumes_where_it_broke_off() {
    let server = FileServer::start().await;
    let data = bytes(300_000, 3);
    let url = server.add("big.safetensors", data.clone());
    server.break_next("big.safetensors", 120_000);
    let models = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(&settings(models.path())).unwrap();
    let manifest = manifest(&serde_json::json!({"models": [
        {"url": url, "folder": "checkpoints", "sha256": sha256_hex(&data)}
    ]}));

    let progress = prefetch_manifest(&cache, &manifest, &CancellationToken::new())
        .await
        .unwrap();
    assert!(progress.ready);
    assert_eq!(progress.files_done, 1);
    assert_eq!(
        std::fs::read(models.path().join("checkpoints/big.safetensors")).unwrap(),
        data
    );
    let requests = server.requests_for("big.safetensors");
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].range, None);
    // The second asks only for what is missing, and only if the file did not change.
    let resumed_at: usize = requests[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("second request without a Range: {:?}", requests[1]));
    assert!(resumed_at > 0 && resumed_at <= 120_000, "{resumed_at}");
    assert!(requests[1].if_range.is_some());
    // Only the missing bytes travelled again.
    assert_eq!(progress.bytes_downloaded, 300_000);
    assert_eq!(
        names_in(&models.path().join("checkpoints")),
        ["big.safetensors"]
    );

    // A second boot finds the file and downloads nothing.
    let again = prefetch_manifest(&cache, &manifest, &CancellationToken::new())
        .await
        .unwrap();
    assert!(again.ready);
    assert_eq!(server.requests_for("big.safetensors").len(), 2);
}

#[tokio::test]
async fn a_url_input_is_downloaded_linked_and_offered_by_comfyui() {
    let server = FileServer::start().await;
    let lora = bytes(40_000, 4);
    let url = server.add("styles/detail.safetensors", lora.clone());
    let other_url = server.add("other/detail.safetensors", bytes(1_000, 5));
    let base = tempfile::tempdir().unwrap();
    let models_dir = base.path().join("models");
    std::fs::create_dir_all(&models_dir).unwrap();
    let mut sim_config = SimConfig::new(base.path());
    sim_config.models_dir = Some(models_dir.clone());
    let sim = emp_comfyui_sim::spawn_local(sim_config).await.unwrap();
    let cache = ModelCache::new(&settings(&models_dir)).unwrap();

    let name = cache.ensure_url("lora_name", &url).await.unwrap();
    assert_eq!(name, "detail.safetensors");
    let linked = models_dir.join("loras").join(&name);
    assert_eq!(std::fs::read(&linked).unwrap(), lora);
    assert!(linked.symlink_metadata().unwrap().file_type().is_symlink());

    // Asked again: served from the cache, same name, no new request.
    assert_eq!(cache.ensure_url("lora_name", &url).await.unwrap(), name);
    assert_eq!(server.requests_for("styles/detail.safetensors").len(), 1);

    // Another URL with the same file name does not replace it.
    let other = cache.ensure_url("lora_name", &other_url).await.unwrap();
    assert_ne!(other, name);
    assert!(
        Path::new(&other)
            .extension()
            .is_some_and(|ext| ext == "safetensors")
    );
    assert_eq!(std::fs::read(&linked).unwrap(), lora);

    // ComfyUI (the simulator rescans like ComfyUI) offers both to LoraLoader.
    let report = ComfyInventory::new(&sim.url()).fetch().await;
    let loras = &report.comfyui.models["loras"];
    assert!(loras.contains(&name) && loras.contains(&other), "{loras:?}");
    // The cache folder itself is hidden from ComfyUI.
    assert!(
        report
            .comfyui
            .models
            .keys()
            .all(|folder| !folder.starts_with('.'))
    );

    // Inputs without a model folder and bad URLs are refused clearly.
    assert!(matches!(
        cache.ensure_url("seed", &url).await,
        Err(ModelError::UnknownInput { .. })
    ));
    assert!(matches!(
        cache.ensure_url("ckpt_name", "ftp://x/m.ckpt").await,
        Err(ModelError::BadUrl { .. })
    ));
    let missing = cache
        .ensure_url("ckpt_name", &server.url("missing.ckpt"))
        .await
        .unwrap_err();
    assert_eq!(
        missing,
        ModelError::Http {
            url: server.url("missing.ckpt"),
            status: 404
        }
    );
}

#[tokio::test]
async fn concurrent_requests_for_one_url_download_it_once() {
    let server = FileServer::start().await;
    let data = bytes(64_000, 6);
    let url = server.add("shared.safetensors", data.clone());
    server.slow("shared.safetensors", Duration::from_millis(20));
    let models = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(&settings(models.path())).unwrap();

    let calls = (0..5).map(|_| {
        let cache = cache.clone();
        let url = url.clone();
        tokio::spawn(async move { cache.ensure_url("ckpt_name", &url).await })
    });
    let names: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|joined| joined.unwrap().unwrap())
        .collect();
    assert!(
        names.iter().all(|name| name == "shared.safetensors"),
        "{names:?}"
    );
    assert_eq!(server.requests_for("shared.safetensors").len(), 1);
    assert_eq!(
        std::fs::read(models.path().join("checkpoints/shared.safetensors")).unwrap(),
        data
    );
    assert_eq!(cache.cached().len(), 1);
}

#[tokio::test]
async fn the_cache_evicts_least_recently_used_files_beyond_its_budget() {
    let server = FileServer::start().await;
    let size = 10_000;
    let urls: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            server.add(
                &format!("{name}.safetensors"),
                bytes(size, u8::try_from(i).unwrap()),
            )
        })
        .collect();
    let models = tempfile::tempdir().unwrap();
    let mut settings = settings(models.path());
    // Room for one and a half files.
    settings.cache_bytes = 15_000;
    let cache = ModelCache::new(&settings).unwrap();
    let loras = models.path().join("loras");

    cache.ensure_url("lora_name", &urls[0]).await.unwrap();
    cache.ensure_url("lora_name", &urls[1]).await.unwrap();
    // a is the least recently used: evicted, and unlinked from ComfyUI's folder.
    assert_eq!(names_in(&loras), ["b.safetensors"]);
    assert_eq!(cache.cached().len(), 1);

    // A file leased by a running job is not evicted, even over budget.
    let lease = cache.lease_url(None, "lora_name", &urls[1]).await.unwrap();
    assert_eq!(lease.name(), "b.safetensors");
    cache.ensure_url("lora_name", &urls[2]).await.unwrap();
    assert_eq!(names_in(&loras), ["b.safetensors", "c.safetensors"]);
    drop(lease);

    cache.ensure_url("lora_name", &urls[3]).await.unwrap();
    assert_eq!(names_in(&loras), ["d.safetensors"]);

    // The index is persisted: a restarted agent knows what it has and downloads nothing.
    let restarted = ModelCache::new(&settings).unwrap();
    assert_eq!(restarted.cached().len(), 1);
    restarted.ensure_url("lora_name", &urls[3]).await.unwrap();
    assert_eq!(server.requests_for("d.safetensors").len(), 1);
    // An evicted one comes back on demand.
    restarted.ensure_url("lora_name", &urls[0]).await.unwrap();
    assert_eq!(server.requests_for("a.safetensors").len(), 2);
}

#[tokio::test]
async fn credentials_go_only_to_matching_hosts_and_never_follow_redirects() {
    let private = FileServer::start().await;
    let public = FileServer::start().await;
    let public_url = public.add("public.safetensors", bytes(2_000, 7));
    private.add("private.safetensors", bytes(3_000, 8));
    let rules = serde_json::json!([
        {"match": format!("http://{}/*", private.addr), "header": "Authorization", "value": "Bearer private-token"},
        {"match": format!("http://{}/files/*", private.addr), "header": "X-Key", "value": "key-1"}
    ]);
    let models = tempfile::tempdir().unwrap();
    let mut settings = settings(models.path());
    settings.credentials = Credentials::new(Some("hf_token"), Some(&rules.to_string())).unwrap();
    let cache = ModelCache::new(&settings).unwrap();

    // The matching host gets its headers.
    cache
        .ensure_url("ckpt_name", &private.url("private.safetensors"))
        .await
        .unwrap();
    let seen = &private.requests_for("private.safetensors")[0];
    assert_eq!(seen.authorization.as_deref(), Some("Bearer private-token"));
    assert_eq!(seen.x_key.as_deref(), Some("key-1"));

    // A redirect from the matching host to another host: the other host gets nothing.
    let redirect = format!(
        "http://{}/redirect?to={}",
        private.addr,
        public_url.replace(':', "%3A").replace('/', "%2F")
    );
    let name = cache.ensure_url("vae_name", &redirect).await.unwrap();
    assert_eq!(name, "public.safetensors");
    let hop = private
        .requests()
        .into_iter()
        .find(|seen| seen.path == "/redirect")
        .unwrap();
    assert_eq!(hop.authorization.as_deref(), Some("Bearer private-token"));
    assert_eq!(hop.x_key, None, "the X-Key rule matches /files/* only");
    for seen in public.requests() {
        assert_eq!(seen.authorization, None, "{seen:?}");
        assert_eq!(seen.x_key, None, "{seen:?}");
    }
    assert!(!public.requests().is_empty());
}

#[tokio::test]
async fn newer_model_folders_are_found_and_advertised() {
    let server = FileServer::start().await;
    let unet_url = server.add("flux1-dev.safetensors", bytes(5_000, 9));
    let clip_url = server.add("t5xxl_fp8.safetensors", bytes(5_000, 10));
    let base = tempfile::tempdir().unwrap();
    let models_dir = base.path().join("models");
    for (folder, file) in [
        ("diffusion_models", "wan2.1_t2v.safetensors"),
        ("text_encoders", "umt5_xxl.safetensors"),
        ("clip", "clip_l.safetensors"),
        ("unet", "old_unet.safetensors"),
        ("audio_encoders", "wav2vec.safetensors"),
        ("model_patches", "patch.safetensors"),
    ] {
        std::fs::create_dir_all(models_dir.join(folder)).unwrap();
        std::fs::write(models_dir.join(folder).join(file), b"x").unwrap();
    }
    let mut sim_config = SimConfig::new(base.path());
    sim_config.models_dir = Some(models_dir.clone());
    let sim = emp_comfyui_sim::spawn_local(sim_config).await.unwrap();
    let cache = ModelCache::new(&settings(&models_dir)).unwrap();
    assert_eq!(
        cache.ensure_url("unet_name", &unet_url).await.unwrap(),
        "flux1-dev.safetensors"
    );
    assert_eq!(
        cache.ensure_url("clip_name1", &clip_url).await.unwrap(),
        "t5xxl_fp8.safetensors"
    );

    let report = ComfyInventory::new(&sim.url()).fetch().await;
    let models = &report.comfyui.models;
    let files = |folder: &str| -> Vec<&str> {
        models
            .get(folder)
            .map(|files| files.iter().map(String::as_str).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        files("diffusion_models"),
        [
            "flux1-dev.safetensors",
            "old_unet.safetensors",
            "wan2.1_t2v.safetensors"
        ]
    );
    assert_eq!(
        files("text_encoders"),
        [
            "clip_l.safetensors",
            "t5xxl_fp8.safetensors",
            "umt5_xxl.safetensors"
        ]
    );
    assert_eq!(files("audio_encoders"), ["wav2vec.safetensors"]);
    assert_eq!(files("model_patches"), ["patch.safetensors"]);
}
