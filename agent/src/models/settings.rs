//! The model variables: where ComfyUI's models live, the on-demand cache and its budget, the
//! boot manifest, download parallelism and credentials.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::auth::Credentials;
use super::download::DownloadRetry;
use super::manifest::Manifest;
use crate::config::{ConfigError, Environment};

/// `EMP_MODEL_CACHE_GB` when unset.
pub const DEFAULT_CACHE_GB: f64 = 50.0;
/// `EMP_MODEL_DOWNLOADS` when unset: files downloaded at once.
pub const DEFAULT_PARALLEL_DOWNLOADS: usize = 4;
const MAX_PARALLEL_DOWNLOADS: usize = 32;
/// The cache folder's name under the models directory when `EMP_MODEL_CACHE_DIR` is unset:
/// hidden, so ComfyUI lists nothing from it, and on the same disk, so links are cheap.
pub const DEFAULT_CACHE_FOLDER: &str = ".emp-cache";

/// Settings of model downloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSettings {
    /// ComfyUI's models directory (`EMP_COMFYUI_MODELS_DIR`, else `$COMFYUI_PATH/models`, else
    /// `$COMFYUI_DIR/models`); `None` turns downloads off.
    pub models_dir: Option<PathBuf>,
    /// `EMP_MODEL_CACHE_DIR`: where on-demand downloads are kept.
    pub cache_dir: Option<PathBuf>,
    /// `EMP_MODEL_CACHE_GB` in bytes: the on-demand cache is trimmed to this.
    pub cache_bytes: u64,
    /// `EMP_MODEL_MANIFEST`, parsed: downloaded before the box is ready.
    pub manifest: Option<(PathBuf, Manifest)>,
    /// `EMP_MODEL_DOWNLOADS`: downloads at once.
    pub parallel: usize,
    /// `HF_TOKEN` and `EMP_DOWNLOAD_AUTH`.
    pub credentials: Credentials,
    /// Retries of one download.
    pub retry: DownloadRetry,
    /// How often a running download logs its progress.
    pub progress_every: Duration,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            models_dir: None,
            cache_dir: None,
            cache_bytes: gb_to_bytes(DEFAULT_CACHE_GB),
            manifest: None,
            parallel: DEFAULT_PARALLEL_DOWNLOADS,
            credentials: Credentials::default(),
            retry: DownloadRetry::default(),
            progress_every: Duration::from_secs(5),
        }
    }
}

impl ModelSettings {
    /// Settings for a models directory, everything else at its default (tests, embedding).
    pub fn for_models_dir(models_dir: impl Into<PathBuf>) -> Self {
        Self {
            models_dir: Some(models_dir.into()),
            ..Self::default()
        }
    }

    /// The cache directory in use: `EMP_MODEL_CACHE_DIR`, else a hidden folder in the models
    /// directory.
    pub fn effective_cache_dir(&self) -> Option<PathBuf> {
        self.cache_dir.clone().or_else(|| {
            self.models_dir
                .as_deref()
                .map(|dir| dir.join(DEFAULT_CACHE_FOLDER))
        })
    }

    /// Reads the model variables.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the bad variable; a manifest that cannot be read or parsed is
    /// one (`EMP_MODEL_MANIFEST`).
    pub fn from_env(env: &Environment) -> Result<Self, ConfigError> {
        let error = |variable: &str, problem: String| ConfigError {
            variable: variable.to_owned(),
            problem,
        };
        let mut settings = Self {
            credentials: Credentials::from_env(env)?,
            ..Self::default()
        };
        settings.models_dir = env
            .get("EMP_COMFYUI_MODELS_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                ["COMFYUI_PATH", "COMFYUI_DIR"]
                    .iter()
                    .find_map(|name| env.get(name))
                    .map(|root| Path::new(root).join("models"))
            });
        settings.cache_dir = env.get("EMP_MODEL_CACHE_DIR").map(PathBuf::from);
        if let Some(text) = env.get("EMP_MODEL_CACHE_GB") {
            let gb: f64 = text
                .parse()
                .ok()
                .filter(|gb: &f64| gb.is_finite() && (0.0..=1_000_000.0).contains(gb))
                .ok_or_else(|| {
                    error(
                        "EMP_MODEL_CACHE_GB",
                        format!("{text:?} is not a size in GB from 0 to 1000000"),
                    )
                })?;
            settings.cache_bytes = gb_to_bytes(gb);
        }
        if let Some(text) = env.get("EMP_MODEL_DOWNLOADS") {
            settings.parallel = text
                .parse()
                .ok()
                .filter(|n| (1..=MAX_PARALLEL_DOWNLOADS).contains(n))
                .ok_or_else(|| {
                    error(
                        "EMP_MODEL_DOWNLOADS",
                        format!(
                            "{text:?} is not a whole number from 1 to {MAX_PARALLEL_DOWNLOADS}"
                        ),
                    )
                })?;
        }
        if let Some(path) = env.get("EMP_MODEL_MANIFEST") {
            if settings.models_dir.is_none() {
                return Err(error(
                    "EMP_MODEL_MANIFEST",
                    "needs ComfyUI's models directory: set EMP_COMFYUI_MODELS_DIR (or COMFYUI_PATH)"
                        .to_owned(),
                ));
            }
            let path = PathBuf::from(path);
            let manifest = Manifest::load(&path).map_err(|problem| {
                error(
                    "EMP_MODEL_MANIFEST",
                    format!("{}: {problem}", path.display()),
                )
            })?;
            settings.manifest = Some((path, manifest));
        }
        Ok(settings)
    }
}

/// GB (10^9 bytes, as disks are sold) to bytes.
fn gb_to_bytes(gb: f64) -> u64 {
    // In range by the check above; `as` saturates anyway.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bytes = (gb * 1e9).round() as u64;
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<ModelSettings, ConfigError> {
        ModelSettings::from_env(&Environment::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn defaults_and_fallbacks() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.models_dir, None);
        assert_eq!(settings.effective_cache_dir(), None);
        assert_eq!(settings.cache_bytes, 50_000_000_000);
        assert_eq!(settings.parallel, 4);

        let settings = load(&[("COMFYUI_PATH", "/opt/ComfyUI")]).unwrap();
        assert_eq!(
            settings.models_dir,
            Some(PathBuf::from("/opt/ComfyUI/models"))
        );
        assert_eq!(
            settings.effective_cache_dir(),
            Some(PathBuf::from("/opt/ComfyUI/models/.emp-cache"))
        );
        let settings = load(&[
            ("COMFYUI_PATH", "/opt/ComfyUI"),
            ("EMP_COMFYUI_MODELS_DIR", "/data/models"),
            ("EMP_MODEL_CACHE_DIR", "/cache"),
            ("EMP_MODEL_CACHE_GB", "0.5"),
            ("EMP_MODEL_DOWNLOADS", "8"),
        ])
        .unwrap();
        assert_eq!(settings.models_dir, Some(PathBuf::from("/data/models")));
        assert_eq!(
            settings.effective_cache_dir(),
            Some(PathBuf::from("/cache"))
        );
        assert_eq!(settings.cache_bytes, 500_000_000);
        assert_eq!(settings.parallel, 8);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("EMP_MODEL_CACHE_GB", "lots"),
            ("EMP_MODEL_CACHE_GB", "-1"),
            ("EMP_MODEL_DOWNLOADS", "0"),
            ("EMP_MODEL_MANIFEST", "/nonexistent/manifest.json"),
            ("EMP_DOWNLOAD_AUTH", "[1]"),
        ] {
            let error = load(&[(name, value), ("COMFYUI_PATH", "/x")]).unwrap_err();
            assert_eq!(error.variable, name, "{name}={value}: {error}");
        }
        let error = load(&[("EMP_MODEL_MANIFEST", "/m.json")]).unwrap_err();
        assert!(
            error.to_string().contains("EMP_COMFYUI_MODELS_DIR"),
            "{error}"
        );
    }
}
