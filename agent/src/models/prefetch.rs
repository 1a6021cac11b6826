//! The boot step: every file of the manifest downloaded (in parallel, at most
//! `EMP_MODEL_DOWNLOADS` at once, each resumable and checked) before the box may become ready.
//! Progress is logged every few seconds and kept in [`ManifestProgress`], which the heartbeat
//! carries so the machine's reported state shows it.

use std::sync::PoisonError;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cache::ModelCache;
use super::error::{ModelError, shown_url};
use super::manifest::{Manifest, ManifestEntry};

/// How far the boot manifest is; the `models` object of the heartbeat's `gpu_stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ManifestProgress {
    /// Every file is there.
    pub ready: bool,
    /// Files in the manifest.
    pub files_total: usize,
    /// Files there (downloaded now or found already present).
    pub files_done: usize,
    /// Files that could not be downloaded.
    pub files_failed: usize,
    /// Bytes downloaded so far by this boot.
    pub bytes_downloaded: u64,
    /// The first failure, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ModelCache {
    /// The boot manifest's progress, once [`prefetch_manifest`] has started.
    pub fn manifest_progress(&self) -> Option<ManifestProgress> {
        self.inner
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update_progress(&self, change: impl FnOnce(&mut ManifestProgress)) {
        let mut progress = self
            .inner
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        change(progress.get_or_insert_with(ManifestProgress::default));
    }
}

/// Downloads every file of `manifest` that is not in ComfyUI's models directory yet. All are
/// tried even when one fails.
///
/// # Errors
/// [`ModelError::NotConfigured`] without a models directory, [`ModelError::Stopped`] when
/// `stop` comes first (partial files stay, to be resumed), [`ModelError::ManifestIncomplete`]
/// when any file failed (a sha256 mismatch included: that file is removed).
pub async fn prefetch_manifest(
    cache: &ModelCache,
    manifest: &Manifest,
    stop: &CancellationToken,
) -> Result<ManifestProgress, ModelError> {
    let Some(models_dir) = cache.inner.models_dir.clone() else {
        return Err(ModelError::NotConfigured);
    };
    let total = manifest.entries.len();
    cache.update_progress(|progress| {
        *progress = ManifestProgress {
            files_total: total,
            ..ManifestProgress::default()
        };
    });
    let mut tasks = JoinSet::new();
    for entry in manifest.entries.clone() {
        let dir = models_dir.join(&entry.folder);
        if dir.join(&entry.filename).is_file() {
            cache.update_progress(|progress| progress.files_done += 1);
            continue;
        }
        let cache = cache.clone();
        tasks.spawn(async move {
            let result = fetch_entry(&cache, &entry, &dir).await;
            (entry, result)
        });
    }
    if !tasks.is_empty() {
        tracing::info!(
            files = total,
            to_download = tasks.len(),
            "downloading the model manifest before taking work"
        );
    }
    let began = Instant::now();
    let every = cache.inner.downloader.progress_every();
    let mut ticker = tokio::time::interval_at(began + every, every);
    let mut failures = Vec::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                tasks.shutdown().await;
                return Err(ModelError::Stopped);
            }
            _ = ticker.tick() => {
                if let Some(progress) = cache.manifest_progress() {
                    tracing::info!(
                        files_done = progress.files_done,
                        files_total = progress.files_total,
                        bytes = progress.bytes_downloaded,
                        "model manifest progress"
                    );
                }
            }
            next = tasks.join_next() => {
                let Some(joined) = next else { break };
                match joined {
                    Ok((_, Ok(()))) => cache.update_progress(|progress| progress.files_done += 1),
                    Ok((entry, Err(error))) => {
                        tracing::error!(
                            url = %shown_url(&entry.url),
                            folder = entry.folder,
                            file = entry.filename,
                            %error,
                            "a manifest model could not be downloaded"
                        );
                        failures.push(error.to_string());
                        cache.update_progress(|progress| progress.files_failed += 1);
                    }
                    Err(_) => {
                        failures.push("a download task failed".to_owned());
                        cache.update_progress(|progress| progress.files_failed += 1);
                    }
                }
            }
        }
    }
    if let Some(first) = failures.first() {
        let error = ModelError::ManifestIncomplete {
            failed: failures.len(),
            total,
            first: first.clone(),
        };
        cache.update_progress(|progress| progress.error = Some(error.to_string()));
        return Err(error);
    }
    cache.update_progress(|progress| progress.ready = true);
    let progress = cache.manifest_progress().unwrap_or_default();
    tracing::info!(
        files = total,
        bytes = progress.bytes_downloaded,
        secs = began.elapsed().as_secs(),
        "model manifest ready"
    );
    if progress.bytes_downloaded > 0 {
        cache.changed().notify_one();
    }
    Ok(progress)
}

/// Downloads one manifest file into its folder.
async fn fetch_entry(
    cache: &ModelCache,
    entry: &ManifestEntry,
    dir: &std::path::Path,
) -> Result<(), ModelError> {
    let _permit = cache
        .inner
        .permits
        .acquire()
        .await
        .map_err(|_| ModelError::Stopped)?;
    let counter = cache.clone();
    cache
        .inner
        .downloader
        .download(
            &entry.url,
            dir,
            Some(&entry.filename),
            entry.sha256.as_deref(),
            &move |bytes| counter.update_progress(|progress| progress.bytes_downloaded += bytes),
        )
        .await
        .map(|_| ())
}
