//! Where the API is and which key to use.
//!
//! Each setting comes from the first of: the command-line flag (`--api-url`, `--api-key`),
//! the environment (`EMP_API_URL`, `EMP_API_KEY`; clap reads both into the flags), the config
//! file `emp login` writes. The file is `$EMP_CONFIG`, else `$XDG_CONFIG_HOME/emp/config.toml`,
//! else `~/.config/emp/config.toml`; it is written with mode 0600 since it holds a key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::CliError;

/// The config file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The control plane's base URL (`http://127.0.0.1:8080`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// An API key, `emp_…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

/// The settings a command runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Base URL without a trailing slash.
    pub api_url: String,
    /// The key, when one is configured (`emp login` checks one that is not stored yet).
    pub api_key: Option<String>,
}

/// The config file's path: `$EMP_CONFIG`, `$XDG_CONFIG_HOME/emp/config.toml` or
/// `$HOME/.config/emp/config.toml`; `None` when none of these variables is set.
pub fn config_path() -> Option<PathBuf> {
    config_path_from(|name| std::env::var_os(name).filter(|value| !value.is_empty()))
}

fn config_path_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    if let Some(path) = var("EMP_CONFIG") {
        return Some(PathBuf::from(path));
    }
    let base = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".config")))
        .or_else(|| var("USERPROFILE").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("emp").join("config.toml"))
}

/// Reads the config file; a missing file is an empty config.
pub fn read_file(path: &Path) -> Result<FileConfig, CliError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|error| {
            CliError::Local(format!(
                "config file {} is not valid: {error}\nhint: fix it, or run `emp login` again",
                path.display()
            ))
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(error) => Err(CliError::local(
            format_args!("cannot read {}", path.display()),
            error,
        )),
    }
}

/// Writes the config file (creating its folder), readable by its owner only.
pub fn write_file(path: &Path, config: &FileConfig) -> Result<(), CliError> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|error| {
            CliError::local(format_args!("cannot create {}", dir.display()), error)
        })?;
    }
    let text = toml::to_string(config)
        .map_err(|error| CliError::local("cannot write the config", error))?;
    let cannot = |error: std::io::Error| {
        CliError::local(format_args!("cannot write {}", path.display()), error)
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(cannot)?;
    // The mode above applies only to a new file; an older one is tightened too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(cannot)?;
    }
    file.write_all(text.as_bytes()).map_err(cannot)?;
    Ok(())
}

/// Merges the flags (which already hold the environment) with the config file.
pub fn resolve(
    flag_url: Option<&str>,
    flag_key: Option<&str>,
    file: &FileConfig,
) -> Result<Settings, CliError> {
    // An empty value (`EMP_API_KEY=`) counts as not given.
    let given = |value: Option<&str>| {
        value
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let api_url = given(flag_url)
        .or_else(|| given(file.api_url.as_deref()))
        .ok_or_else(|| CliError::NotConfigured("no API URL configured".into()))?;
    let api_url = normalise_url(&api_url)?;
    let api_key = given(flag_key).or_else(|| given(file.api_key.as_deref()));
    Ok(Settings { api_url, api_key })
}

/// Checks the base URL's shape and drops a trailing slash.
pub fn normalise_url(url: &str) -> Result<String, CliError> {
    let trimmed = url.trim().trim_end_matches('/');
    let valid = reqwest::Url::parse(trimmed)
        .ok()
        .filter(|parsed| matches!(parsed.scheme(), "http" | "https") && parsed.has_host());
    match valid {
        Some(_) => Ok(trimmed.to_owned()),
        None => Err(CliError::Usage(format!(
            "API URL {url:?} is not an http(s) URL such as http://127.0.0.1:8080"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let file = FileConfig {
            api_url: Some("http://file:1".into()),
            api_key: Some("emp_file".into()),
        };
        let settings = resolve(Some("http://flag:2/"), None, &file).unwrap();
        assert_eq!(settings.api_url, "http://flag:2");
        assert_eq!(settings.api_key.as_deref(), Some("emp_file"));
        let settings = resolve(None, Some("emp_flag"), &file).unwrap();
        assert_eq!(settings.api_url, "http://file:1");
        assert_eq!(settings.api_key.as_deref(), Some("emp_flag"));
        // Empty values (an exported but empty variable) fall through to the file.
        let settings = resolve(Some(""), Some(" "), &file).unwrap();
        assert_eq!(settings.api_key.as_deref(), Some("emp_file"));
        assert_eq!(settings.api_url, "http://file:1");
    }

    #[test]
    fn no_url_anywhere_is_a_configuration_error() {
        let error = resolve(None, Some("k"), &FileConfig::default()).unwrap_err();
        assert!(matches!(error, CliError::NotConfigured(_)), "{error}");
        let error = resolve(Some("ftp://x"), None, &FileConfig::default()).unwrap_err();
        assert!(matches!(error, CliError::Usage(_)), "{error}");
    }

    #[test]
    fn the_path_follows_xdg_then_home() {
        let path = config_path_from(|name| match name {
            "XDG_CONFIG_HOME" => Some("/x".into()),
            "HOME" => Some("/h".into()),
            _ => None,
        });
        assert_eq!(path.unwrap(), PathBuf::from("/x/emp/config.toml"));
        let path = config_path_from(|name| (name == "HOME").then(|| "/h".into()));
        assert_eq!(path.unwrap(), PathBuf::from("/h/.config/emp/config.toml"));
    }

    #[test]
    fn the_file_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config.toml");
        assert_eq!(read_file(&path).unwrap(), FileConfig::default());
        let config = FileConfig {
            api_url: Some("http://a:1".into()),
            api_key: Some("emp_x".into()),
        };
        write_file(&path, &config).unwrap();
        assert_eq!(read_file(&path).unwrap(), config);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "api_url = 3").unwrap();
        assert!(matches!(read_file(&path), Err(CliError::Local(_))));
    }
}
