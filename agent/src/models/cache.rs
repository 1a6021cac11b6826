//! The on-demand model cache: a model input given as a URL is downloaded once into the cache
//! directory (`<key>/<file name>`, the key being a hash of the URL, so two URLs ending in the
//! same name never clash), linked into ComfyUI's folder for the input (a symlink, else a hard
//! link), and the value ComfyUI expects back is the link's name in that folder.
//!
//! - Concurrent requests for one URL share one download (a spawned task, so a cancelled job
//!   does not cancel the download others wait for).
//! - Downloads at once are bounded (`EMP_MODEL_DOWNLOADS`, shared with the boot manifest).
//! - After each download the cache is trimmed to `EMP_MODEL_CACHE_GB`, least recently used
//!   first, sparing files leased by running jobs ([`ModelLease`]); an evicted file is unlinked
//!   from ComfyUI's folders too. Boot-manifest files are not in the cache, so never evicted.
//! - Every change of ComfyUI's folders is signalled on [`ModelCache::changed`]; the fleet's
//!   inventory task then reads ComfyUI's inventory again, so the box advertises its new models.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use reqwest::Url;
use tokio::sync::{Notify, Semaphore};

use super::download::{Downloader, url_key};
use super::error::{ModelError, shown_url};
use super::index::{CacheEntry, CacheIndex};
use super::prefetch::ManifestProgress;
use super::settings::ModelSettings;
use crate::detect::comfy_inventory::folder_for_input;

/// One download that several requests wait on; yields the cache key.
type SharedDownload = Shared<BoxFuture<'static, Result<String, ModelError>>>;

/// The mutable part of the cache.
#[derive(Default)]
struct State {
    index: CacheIndex,
    in_flight: HashMap<String, SharedDownload>,
    /// Leases per key: leased files are never evicted.
    leases: HashMap<String, usize>,
}

pub(super) struct Inner {
    pub(super) models_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    budget: u64,
    pub(super) downloader: Downloader,
    /// Bounds downloads at once, on-demand and manifest alike.
    pub(super) permits: Semaphore,
    state: Mutex<State>,
    changed: Notify,
    pub(super) progress: Mutex<Option<ManifestProgress>>,
}

/// The model cache; cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct ModelCache {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCache")
            .field("models_dir", &self.inner.models_dir)
            .field("cache_dir", &self.inner.cache_dir)
            .field("budget", &self.inner.budget)
            .finish_non_exhaustive()
    }
}

/// A cached model held for a job: while any lease on it lives, the file is not evicted.
#[derive(Debug)]
pub struct ModelLease {
    cache: ModelCache,
    key: String,
    name: String,
}

impl ModelLease {
    /// The value for the workflow input: the file's name relative to its ComfyUI folder.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ModelLease {
    fn drop(&mut self) {
        let mut state = self.cache.lock();
        if let Some(count) = state.leases.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.leases.remove(&self.key);
            }
        }
    }
}

impl ModelCache {
    /// A cache as `settings` say; reads the cache index when there is a cache directory.
    ///
    /// A cache directory that cannot be created turns on-demand downloads off (logged).
    ///
    /// # Errors
    /// When the download client cannot be built.
    pub fn new(settings: &ModelSettings) -> Result<Self, ModelError> {
        let downloader = Downloader::new(
            settings.credentials.clone(),
            settings.retry,
            settings.progress_every,
        )
        .map_err(|reason| ModelError::Io {
            action: "start".to_owned(),
            path: "the download client".to_owned(),
            reason,
        })?;
        let mut cache_dir = settings.effective_cache_dir();
        let mut index = CacheIndex::default();
        if let Some(dir) = &cache_dir {
            match std::fs::create_dir_all(dir) {
                Ok(()) => index = CacheIndex::load(dir),
                Err(error) => {
                    // Not fatal: the box still runs jobs whose models it has.
                    tracing::warn!(path = %dir.display(), %error, "the model cache directory cannot be created; on-demand model downloads are off");
                    cache_dir = None;
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                models_dir: settings.models_dir.clone(),
                cache_dir,
                budget: settings.cache_bytes,
                downloader,
                permits: Semaphore::new(settings.parallel.max(1)),
                state: Mutex::new(State {
                    index,
                    ..State::default()
                }),
                changed: Notify::new(),
                progress: Mutex::new(None),
            }),
        })
    }

    /// Signalled whenever a model was linked into or removed from ComfyUI's folders.
    pub fn changed(&self) -> &Notify {
        &self.inner.changed
    }

    /// Downloads `url` if it is not cached yet, links it into the ComfyUI folder for
    /// `input_name` (`ckpt_name` → `checkpoints`, `lora_name` → `loras`, …) and returns the
    /// value for the workflow input (the name relative to that folder).
    ///
    /// The file is not leased: a job that must keep it from eviction while it runs uses
    /// [`ModelCache::lease_url`] and holds the lease until the job ends.
    ///
    /// # Errors
    /// [`ModelError`]: an input without a known folder, a bad URL, no models directory, a
    /// failed download or link.
    pub async fn ensure_url(&self, input_name: &str, url: &str) -> Result<String, ModelError> {
        let lease = self.lease_url(None, input_name, url).await?;
        Ok(lease.name.clone())
    }

    /// As [`ModelCache::ensure_url`], knowing the node type too (`CLIPVisionLoader`'s
    /// `clip_name` is a `clip_vision` model, `UpscaleModelLoader`'s `model_name` an upscaler),
    /// and keeping the file from eviction while the returned lease lives.
    ///
    /// # Errors
    /// As [`ModelCache::ensure_url`].
    pub async fn lease_url(
        &self,
        node_type: Option<&str>,
        input_name: &str,
        url: &str,
    ) -> Result<ModelLease, ModelError> {
        let folder =
            folder_for_input(node_type.unwrap_or_default(), input_name).ok_or_else(|| {
                ModelError::UnknownInput {
                    input: input_name.to_owned(),
                }
            })?;
        self.lease_in_folder(folder, url).await
    }

    /// Downloads `url` if needed and links it into `folder` (relative to the models
    /// directory), leased.
    ///
    /// # Errors
    /// As [`ModelCache::ensure_url`].
    pub async fn lease_in_folder(&self, folder: &str, url: &str) -> Result<ModelLease, ModelError> {
        let (Some(models_dir), Some(cache_dir)) = (&self.inner.models_dir, &self.inner.cache_dir)
        else {
            return Err(ModelError::NotConfigured);
        };
        let url = parse_model_url(url)?;
        let key = url_key(&url);
        let download = {
            let mut state = self.lock();
            *state.leases.entry(key.clone()).or_default() += 1;
            if state.index.entries.contains_key(&key) {
                None
            } else {
                Some(
                    state
                        .in_flight
                        .entry(key.clone())
                        .or_insert_with(|| self.start_download(url.clone(), key.clone()))
                        .clone(),
                )
            }
        };
        // From here the lease exists: dropping it (also on error) gives it back.
        let mut lease = ModelLease {
            cache: self.clone(),
            key: key.clone(),
            name: String::new(),
        };
        if let Some(download) = download {
            download.await?;
        }
        lease.name = self.link(models_dir, cache_dir, folder, &key)?;
        Ok(lease)
    }

    /// Starts the shared download of `url` into the cache.
    fn start_download(&self, url: Url, key: String) -> SharedDownload {
        let cache = self.clone();
        let task = tokio::spawn(async move {
            let result = cache.download(&url, &key).await;
            if result.is_err() {
                cache.lock().in_flight.remove(&key);
            }
            result.map(|()| key)
        });
        async move {
            task.await.unwrap_or_else(|_| {
                Err(ModelError::Io {
                    action: "download".to_owned(),
                    path: "a model".to_owned(),
                    reason: "the download task failed".to_owned(),
                })
            })
        }
        .boxed()
        .shared()
    }

    /// Downloads into `<cache>/<key>/`, records it and trims the cache.
    async fn download(&self, url: &Url, key: &str) -> Result<(), ModelError> {
        let Some(cache_dir) = &self.inner.cache_dir else {
            return Err(ModelError::NotConfigured);
        };
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| ModelError::Stopped)?;
        tracing::info!(url = %shown_url(url), "downloading a model on demand");
        let downloaded = self
            .inner
            .downloader
            .download(url, &cache_dir.join(key), None, None, &|_| {})
            .await?;
        let mut state = self.lock();
        let last_used = state.index.next_stamp();
        state.index.entries.insert(
            key.to_owned(),
            CacheEntry {
                file: format!("{key}/{}", downloaded.file_name),
                size: downloaded.size,
                last_used,
                links: Vec::new(),
                source: shown_url(url),
            },
        );
        state.in_flight.remove(key);
        let evicted = self.evict(&mut state, key);
        self.save(&state);
        drop(state);
        if evicted > 0 {
            self.inner.changed.notify_one();
        }
        Ok(())
    }

    /// Links the cached file of `key` into `folder` (unless it already is) and returns its
    /// name there; marks it used.
    fn link(
        &self,
        models_dir: &Path,
        cache_dir: &Path,
        folder: &str,
        key: &str,
    ) -> Result<String, ModelError> {
        let mut state = self.lock();
        let stamp = state.index.next_stamp();
        let Some(entry) = state.index.entries.get_mut(key) else {
            // Evicted between the download and now: only when the budget is smaller than
            // the files leased at once.
            return Err(ModelError::Io {
                action: "link".to_owned(),
                path: key.to_owned(),
                reason: "the file was evicted before it could be linked; raise EMP_MODEL_CACHE_GB"
                    .to_owned(),
            });
        };
        entry.last_used = stamp;
        let target = cache_dir.join(&entry.file);
        let prefix = format!("{folder}/");
        let existing = entry
            .links
            .iter()
            .filter_map(|link| link.strip_prefix(&prefix))
            .find(|name| is_link_to(&models_dir.join(folder).join(name), &target))
            .map(str::to_owned);
        let name = if let Some(name) = existing {
            name
        } else {
            let file_name = entry.file.rsplit('/').next().unwrap_or(&entry.file);
            let folder_dir = models_dir.join(folder);
            std::fs::create_dir_all(&folder_dir)
                .map_err(|e| ModelError::io("create", &folder_dir, &e))?;
            let mut name = file_name.to_owned();
            let path = folder_dir.join(&name);
            if path.symlink_metadata().is_ok()
                && !is_link_to(&path, &target)
                && !is_stale_link(&path, cache_dir)
            {
                // Another file has this name: keep both, ours with the key in its name.
                name = with_suffix(file_name, &key[..8]);
            }
            let path = folder_dir.join(&name);
            if !is_link_to(&path, &target) {
                if path.symlink_metadata().is_ok() {
                    // Only a stale link into the cache is replaced; anything else is not ours.
                    if !is_stale_link(&path, cache_dir) {
                        return Err(ModelError::Io {
                            action: "link".to_owned(),
                            path: path.display().to_string(),
                            reason: "another file already has this name".to_owned(),
                        });
                    }
                    std::fs::remove_file(&path)
                        .map_err(|e| ModelError::io("replace", &path, &e))?;
                }
                make_link(&target, &path)?;
            }
            let link = format!("{folder}/{name}");
            if !entry.links.contains(&link) {
                entry.links.push(link);
            }
            self.inner.changed.notify_one();
            name
        };
        self.save(&state);
        Ok(name)
    }

    /// Evicts least recently used entries until the cache fits its budget, sparing `keep`,
    /// leased entries and downloads in flight. Returns how many were evicted.
    fn evict(&self, state: &mut State, keep: &str) -> usize {
        let (Some(cache_dir), budget) = (&self.inner.cache_dir, self.inner.budget) else {
            return 0;
        };
        let mut evicted = 0;
        while state.index.total_bytes() > budget {
            let victim = state
                .index
                .entries
                .iter()
                .filter(|(key, _)| {
                    key.as_str() != keep
                        && !state.leases.contains_key(*key)
                        && !state.in_flight.contains_key(*key)
                })
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(key, _)| key.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    bytes = state.index.total_bytes(),
                    budget,
                    "the model cache is over EMP_MODEL_CACHE_GB, but every file left is in use"
                );
                break;
            };
            let Some(entry) = state.index.entries.remove(&victim) else {
                break;
            };
            let target = cache_dir.join(&entry.file);
            if let Some(models_dir) = &self.inner.models_dir {
                for link in &entry.links {
                    let path = models_dir.join(link);
                    if is_link_to(&path, &target) {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            let _ = std::fs::remove_dir_all(cache_dir.join(&victim));
            tracing::info!(
                source = entry.source,
                bytes = entry.size,
                "evicted a model from the cache"
            );
            evicted += 1;
        }
        evicted
    }

    fn save(&self, state: &State) {
        if let Some(dir) = &self.inner.cache_dir {
            if let Err((path, error)) = state.index.save(dir) {
                tracing::warn!(path = %path.display(), %error, "could not save the model cache index");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached files (relative to the cache directory) and their sizes, for tests and
    /// diagnostics.
    pub fn cached(&self) -> Vec<(String, u64)> {
        self.lock()
            .index
            .entries
            .values()
            .map(|entry| (entry.file.clone(), entry.size))
            .collect()
    }
}

/// Checks a model URL: `http` or `https` with a host.
fn parse_model_url(text: &str) -> Result<Url, ModelError> {
    let bad = |reason: &str| ModelError::BadUrl {
        url: Url::parse(text.trim()).map_or_else(|_| "(unparsable)".to_owned(), |u| shown_url(&u)),
        reason: reason.to_owned(),
    };
    let url = Url::parse(text.trim()).map_err(|_| bad("not a URL"))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(bad("only http:// and https:// URLs are downloaded"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(url)
}

/// Whether `path` is a symlink to `target` or the same file (a hard link).
fn is_link_to(path: &Path, target: &Path) -> bool {
    let Ok(meta) = path.symlink_metadata() else {
        return false;
    };
    if meta.file_type().is_symlink() {
        return std::fs::read_link(path).is_ok_and(|to| to == target);
    }
    same_file(path, target)
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

/// Whether `path` is a link into the cache whose file is gone (left by an eviction the
/// agent did not finish): safe to replace.
fn is_stale_link(path: &Path, cache_dir: &Path) -> bool {
    std::fs::read_link(path).is_ok_and(|to| to.starts_with(cache_dir) && !to.exists())
}

/// A symlink to `target` at `path`, else a hard link.
fn make_link(target: &Path, path: &Path) -> Result<(), ModelError> {
    #[cfg(unix)]
    let symlinked = std::os::unix::fs::symlink(target, path);
    #[cfg(not(unix))]
    let symlinked: std::io::Result<()> = Err(std::io::Error::other("no symlinks here"));
    match symlinked {
        Ok(()) => Ok(()),
        Err(symlink_error) => std::fs::hard_link(target, path).map_err(|e| ModelError::Io {
            action: "link".to_owned(),
            path: path.display().to_string(),
            reason: format!("symlink: {symlink_error}; hard link: {e}"),
        }),
    }
}

/// `name` with `-<suffix>` before its extension (`a.safetensors` → `a-1234abcd.safetensors`).
fn with_suffix(name: &str, suffix: &str) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{suffix}.{ext}"),
        _ => format!("{name}-{suffix}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_keep_the_extension() {
        assert_eq!(with_suffix("a.safetensors", "1234"), "a-1234.safetensors");
        assert_eq!(with_suffix("a.b.ckpt", "1234"), "a.b-1234.ckpt");
        assert_eq!(with_suffix("noext", "1234"), "noext-1234");
    }

    #[test]
    fn model_urls_are_checked() {
        assert!(parse_model_url("https://h.example/m.safetensors").is_ok());
        assert!(parse_model_url(" http://127.0.0.1:9/m.ckpt ").is_ok());
        for bad in [
            "ftp://h/m.ckpt",
            "m.safetensors",
            "asset://x",
            "file:///etc/passwd",
        ] {
            assert!(
                matches!(parse_model_url(bad), Err(ModelError::BadUrl { .. })),
                "{bad}"
            );
        }
    }
}
