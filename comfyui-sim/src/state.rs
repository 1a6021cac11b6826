//! What the HTTP handlers, the WebSocket sessions and the worker share.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::config::SimConfig;
use crate::hub::Hub;
use crate::nodes::catalog::{Catalog, Sources};
use crate::paths::Dirs;
use crate::queue::PromptQueue;

/// Which client the worker is serving and which node it is on: a client that reconnects with
/// the same id is told the current node, as ComfyUI does.
#[derive(Debug, Default)]
pub struct Session {
    pub client_id: Option<String>,
    pub last_node_id: Option<String>,
}

pub struct AppState {
    pub config: SimConfig,
    /// The configured directories, made absolute once so path checks compare like with like.
    pub dirs: Dirs,
    pub queue: Arc<PromptQueue>,
    pub hub: Arc<Hub>,
    /// ComfyUI's global "processing interrupted" flag: set by `/interrupt`, read by the running
    /// node at its check points, cleared when the next prompt starts.
    pub interrupt: Arc<AtomicBool>,
    pub session: Mutex<Session>,
    /// Cancelled to stop the server, the worker and every WebSocket session.
    pub shutdown: CancellationToken,
}

/// Image files `LoadImage` offers: files directly in the input directory, by extension.
fn input_images(dirs: &Dirs) -> Vec<String> {
    const IMAGE_EXTENSIONS: &[&str] = &[
        ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff",
    ];
    let mut files: Vec<String> = std::fs::read_dir(&dirs.input)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            let lower = name.to_ascii_lowercase();
            IMAGE_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
        })
        .collect();
    files.sort();
    files
}

impl AppState {
    /// The node catalogue as it stands now (ComfyUI rescans its folders on every request).
    pub fn catalog(&self) -> Catalog {
        let models = self.config.current_models();
        Catalog::build(&Sources {
            models: &models,
            input_files: input_images(&self.dirs),
            extra: &self.config.extra_node_types,
        })
    }

    pub fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
