//! The on-demand cache's index, `index.json` in the cache directory: for each cached URL (by
//! key, the hash of its URL) the file, its size, when it was last used and where it is linked
//! into ComfyUI's folders. Written whole to a temporary file and renamed, so a crash leaves the
//! old index or the new one, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The file name of the index in the cache directory.
pub const INDEX_FILE: &str = "index.json";

/// One cached download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The file, relative to the cache directory (`<key>/<name>`).
    pub file: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last asked for: Unix milliseconds, made strictly increasing across the
    /// index so two uses in the same millisecond still have an order.
    pub last_used: u64,
    /// Where it is linked, relative to the models directory (`loras/x.safetensors`).
    #[serde(default)]
    pub links: Vec<String>,
    /// The URL without its query, for people reading the index.
    #[serde(default)]
    pub source: String,
}

/// Every cached download by key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheIndex {
    /// By key.
    pub entries: BTreeMap<String, CacheEntry>,
}

impl CacheIndex {
    /// Reads the index of `cache_dir`, keeping only entries whose file is still there. A
    /// missing or unreadable index is an empty one (the files are then downloaded again).
    pub fn load(cache_dir: &Path) -> Self {
        let path = cache_dir.join(INDEX_FILE);
        let mut index: Self = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(path = %path.display(), %error, "the model cache index is unreadable; starting a new one");
                Self::default()
            }),
            Err(_) => Self::default(),
        };
        index
            .entries
            .retain(|_, entry| cache_dir.join(&entry.file).is_file());
        index
    }

    /// Writes the index into `cache_dir`.
    ///
    /// # Errors
    /// The I/O error, with the path.
    pub fn save(&self, cache_dir: &Path) -> Result<(), (PathBuf, std::io::Error)> {
        let path = cache_dir.join(INDEX_FILE);
        let temporary = cache_dir.join(format!(".{INDEX_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::write(&temporary, bytes).map_err(|e| (temporary.clone(), e))?;
        std::fs::rename(&temporary, &path).map_err(|e| (path, e))
    }

    /// A `last_used` stamp for now, later than every stamp in the index.
    pub fn next_stamp(&self) -> u64 {
        let latest = self.entries.values().map(|entry| entry.last_used).max();
        now_millis().max(latest.map_or(0, |latest| latest + 1))
    }

    /// Bytes held by every entry.
    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|entry| entry.size).sum()
    }
}

/// Now in Unix milliseconds.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_drops_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("k1")).unwrap();
        std::fs::write(dir.path().join("k1/a.safetensors"), b"abc").unwrap();
        let mut index = CacheIndex::default();
        for (key, file) in [("k1", "k1/a.safetensors"), ("k2", "k2/gone.ckpt")] {
            index.entries.insert(
                key.to_owned(),
                CacheEntry {
                    file: file.to_owned(),
                    size: 3,
                    last_used: 7,
                    links: vec!["loras/a.safetensors".to_owned()],
                    source: String::new(),
                },
            );
        }
        index.save(dir.path()).unwrap();
        let loaded = CacheIndex::load(dir.path());
        assert_eq!(loaded.entries.len(), 1);
        assert_eq!(loaded.entries["k1"], index.entries["k1"]);
        assert_eq!(loaded.total_bytes(), 3);
        assert!(loaded.next_stamp() > 7);
        std::fs::write(dir.path().join(INDEX_FILE), b"{not json").unwrap();
        assert!(CacheIndex::load(dir.path()).entries.is_empty());
    }
}
