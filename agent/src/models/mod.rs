//! Models on the box: what ComfyUI needs, downloaded by the agent.
//!
//! - **Boot manifest** (`EMP_MODEL_MANIFEST`, [`manifest`]): files downloaded before the box
//!   becomes ready ([`prefetch_manifest`]), in parallel, resumable, checked against their
//!   sha256, with progress in the logs and in the heartbeat ([`ManifestProgress`]).
//! - **On demand** ([`ModelCache::ensure_url`], and as the input stage's model resolver in
//!   [`resolver`], leased for the run): a model input given as a URL is downloaded
//!   into the cache (`EMP_MODEL_CACHE_DIR`, trimmed to `EMP_MODEL_CACHE_GB` least recently used
//!   first), linked into ComfyUI's folder for the input, shared by concurrent requests.
//! - **Credentials** per host ([`auth`]): `HF_TOKEN` for Hugging Face, `EMP_DOWNLOAD_AUTH`
//!   rules by URL pattern; never sent to another host, redirects included.
//!
//! Downloads themselves (resume, retries, checks, progress) are in [`download`].

pub mod auth;
pub mod cache;
pub mod download;
pub mod error;
pub mod index;
pub mod manifest;
pub mod prefetch;
pub mod resolver;
pub mod settings;

pub use auth::Credentials;
pub use cache::{ModelCache, ModelLease};
pub use download::{DownloadRetry, Downloaded, Downloader};
pub use error::ModelError;
pub use manifest::{Manifest, ManifestEntry};
pub use prefetch::{ManifestProgress, prefetch_manifest};
pub use settings::ModelSettings;
