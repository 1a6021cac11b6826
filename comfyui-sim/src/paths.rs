//! File-name rules shared by `/view`, `/upload/image`, `SaveImage` and `LoadImage`.
//!
//! These mirror Python's `os.path` (lexically, without touching the disk), because ComfyUI's
//! answers depend on exactly how it normalises: `..` inside a file name is a 400, a subfolder
//! that climbs out is a 403, and `SaveImage` numbers files by scanning the folder.

use std::path::{Component, Path, PathBuf};

/// The three directories ComfyUI serves, by their `type` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirKind {
    Input,
    Output,
    Temp,
}

impl DirKind {
    pub fn from_name(name: &str) -> Option<DirKind> {
        match name {
            "input" => Some(DirKind::Input),
            "output" => Some(DirKind::Output),
            "temp" => Some(DirKind::Temp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DirKind::Input => "input",
            DirKind::Output => "output",
            DirKind::Temp => "temp",
        }
    }
}

/// The absolute directories of one simulated box.
#[derive(Clone, Debug)]
pub struct Dirs {
    pub input: PathBuf,
    pub output: PathBuf,
    pub temp: PathBuf,
}

impl Dirs {
    pub fn get(&self, kind: DirKind) -> &Path {
        match kind {
            DirKind::Input => &self.input,
            DirKind::Output => &self.output,
            DirKind::Temp => &self.temp,
        }
    }
}

/// Splits ComfyUI's `name [output]` annotation off a file name.
pub fn annotated(name: &str) -> (&str, Option<DirKind>) {
    for kind in [DirKind::Output, DirKind::Input, DirKind::Temp] {
        if let Some(stripped) = name.strip_suffix(&format!(" [{}]", kind.name())) {
            return (stripped, Some(kind));
        }
    }
    (name, None)
}

/// `os.path.normpath` for POSIX paths.
pub fn normpath(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let leading = path.len() - path.trim_start_matches('/').len();
    let root = match leading {
        0 => "",
        2 => "//",
        _ => "/",
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if root.is_empty() {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = format!("{root}{}", parts.join("/"));
    if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

/// `os.path.dirname`.
pub fn dirname(path: &str) -> &str {
    match path.rfind('/') {
        None => "",
        Some(i) => {
            let head = &path[..=i];
            let trimmed = head.trim_end_matches('/');
            if trimmed.is_empty() { head } else { trimmed }
        }
    }
}

/// `os.path.basename`.
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `os.path.abspath(os.path.join(base, relative))` for an absolute `base`.
pub fn join_abs(base: &Path, relative: &str) -> PathBuf {
    let joined = if relative.starts_with('/') {
        PathBuf::from(relative)
    } else {
        base.join(relative)
    };
    let mut out = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// `os.path.commonpath((base, path)) == base` for absolute, normalised paths.
pub fn is_within(base: &Path, path: &Path) -> bool {
    path.starts_with(base)
}

/// Where `SaveImage` will write and the first counter it will use.
#[derive(Debug)]
pub struct SaveTarget {
    pub folder: PathBuf,
    pub filename: String,
    pub subfolder: String,
    pub counter: u64,
}

/// ComfyUI's `get_save_image_path`: `%width%`-style variables, a subfolder taken from the
/// prefix, and a counter one past the highest `<name>_<digits>_` already in the folder.
///
/// # Errors
/// The text of ComfyUI's exception when the prefix climbs out of `output_dir`, or when the
/// folder cannot be created.
pub fn save_target(
    output_dir: &Path,
    prefix: &str,
    width: usize,
    height: usize,
) -> Result<SaveTarget, String> {
    let prefix = if prefix.contains('%') {
        expand_vars(prefix, width, height)
    } else {
        prefix.to_string()
    };
    let normalised = normpath(&prefix);
    let subfolder = dirname(&normalised).to_string();
    let filename = basename(&normalised).to_string();
    let folder = join_abs(output_dir, &subfolder);
    if !is_within(output_dir, &folder) {
        return Err(format!(
            "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {}\n         commonpath: {}",
            folder.display(),
            output_dir.display(),
            common_prefix(output_dir, &folder).display()
        ));
    }
    let prefix_len = basename(&prefix).chars().count();
    let counter = if let Ok(entries) = std::fs::read_dir(&folder) {
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let head: String = name.chars().take(prefix_len + 1).collect();
                let mut head_chars = head.chars();
                let last = head_chars.next_back()?;
                if head_chars.as_str() != filename || last != '_' {
                    return None;
                }
                let tail: String = name.chars().skip(prefix_len + 1).collect();
                Some(
                    tail.split('_')
                        .next()
                        .and_then(|d| d.parse::<u64>().ok())
                        .unwrap_or(0),
                )
            })
            .max()
            .map_or(1, |highest| highest + 1)
    } else {
        std::fs::create_dir_all(&folder)
            .map_err(|e| format!("[Errno] {e}: '{}'", folder.display()))?;
        1
    };
    Ok(SaveTarget {
        folder,
        filename,
        subfolder,
        counter,
    })
}

fn expand_vars(prefix: &str, width: usize, height: usize) -> String {
    let (year, month, day, hour, minute, second) = civil_now();
    prefix
        .replace("%width%", &width.to_string())
        .replace("%height%", &height.to_string())
        .replace("%year%", &year.to_string())
        .replace("%month%", &format!("{month:02}"))
        .replace("%day%", &format!("{day:02}"))
        .replace("%hour%", &format!("{hour:02}"))
        .replace("%minute%", &format!("{minute:02}"))
        .replace("%second%", &format!("{second:02}"))
}

/// The current UTC date and time (the simulator has no time-zone database; ComfyUI uses local
/// time, which is UTC on the containers it usually runs in).
fn civil_now() -> (i64, u32, u32, u32, u32, u32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil conversion.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

fn common_prefix(a: &Path, b: &Path) -> PathBuf {
    a.components()
        .zip(b.components())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normpath_matches_python() {
        assert_eq!(normpath(""), ".");
        assert_eq!(normpath("a//b/./c/.."), "a/b");
        assert_eq!(normpath("../x"), "../x");
        assert_eq!(normpath("/../x"), "/x");
        assert_eq!(normpath("a/"), "a");
        assert_eq!(dirname("a/b/c"), "a/b");
        assert_eq!(dirname("c"), "");
        assert_eq!(basename("a/b/c.png"), "c.png");
    }

    #[test]
    fn subfolders_must_stay_inside() {
        let base = Path::new("/srv/out");
        assert!(is_within(base, &join_abs(base, "")));
        assert!(is_within(base, &join_abs(base, "a/../b")));
        assert!(!is_within(base, &join_abs(base, "../x")));
        assert!(!is_within(base, &join_abs(base, "/etc")));
        assert!(!is_within(base, &join_abs(base, "../outside")));
    }

    #[test]
    fn annotations_pick_the_directory() {
        assert_eq!(annotated("a.png [temp]"), ("a.png", Some(DirKind::Temp)));
        assert_eq!(annotated("a.png"), ("a.png", None));
    }

    #[test]
    fn save_counter_continues_after_existing_files() {
        let dir = std::env::temp_dir().join(format!("emp-sim-paths-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = save_target(&dir, "run", 1, 1).unwrap();
        assert_eq!((first.counter, first.subfolder.as_str()), (1, ""));
        std::fs::write(dir.join("run_00001_.png"), b"x").unwrap();
        std::fs::write(dir.join("run_00007_.png"), b"x").unwrap();
        std::fs::write(dir.join("runner_00009_.png"), b"x").unwrap();
        assert_eq!(save_target(&dir, "run", 1, 1).unwrap().counter, 8);
        let nested = save_target(&dir, "sub/run", 1, 1).unwrap();
        assert_eq!((nested.counter, nested.subfolder.as_str()), (1, "sub"));
        assert!(save_target(&dir, "../escape", 1, 1).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
