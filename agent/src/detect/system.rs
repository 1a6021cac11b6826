//! The host around the GPUs: CPU, memory and free disk, through `sysinfo`.
//!
//! Inside a container the numbers that matter are the container's: memory is capped by the
//! cgroup limit when there is one, and free disk is measured on the filesystem that holds
//! [`crate::config::Config::disk_path`] (where ComfyUI keeps models and outputs), not on `/`.

use std::path::{Path, PathBuf};

use emp_shared::capabilities::CpuInfo;
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// Bytes in a MiB.
const MIB: u64 = 1024 * 1024;
/// Bytes in a GiB.
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What the host offers besides GPUs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SystemInfo {
    /// CPU brand and logical cores.
    pub cpu: CpuInfo,
    /// Memory in MB: the cgroup limit when it is below the host's memory.
    pub memory_total_mb: u64,
    /// Free space in GB (GiB, one decimal) on the disk holding the configured path; `None`
    /// when no mounted filesystem holds it.
    pub disk_free_gb: Option<f64>,
}

/// Reads CPU, memory and the free space under `disk_path`. Never fails: what cannot be read
/// is empty, zero or `None`.
pub fn probe_system(disk_path: &Path) -> SystemInfo {
    let system = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let model = system
        .cpus()
        .iter()
        .map(|cpu| cpu.brand().trim())
        .find(|brand| !brand.is_empty())
        .unwrap_or_default()
        .to_owned();
    let cores = u32::try_from(system.cpus().len()).unwrap_or(u32::MAX);
    let host_memory = system.total_memory();
    let memory = match system.cgroup_limits() {
        Some(limits) if limits.total_memory > 0 => host_memory.min(limits.total_memory),
        _ => host_memory,
    };

    let disks = Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage());
    let mounts: Vec<(PathBuf, u64)> = disks
        .list()
        .iter()
        .map(|disk| (disk.mount_point().to_path_buf(), disk.available_space()))
        .collect();
    let disk_free_gb = free_space_at(&existing_ancestor(disk_path), &mounts).map(bytes_to_gb);

    SystemInfo {
        cpu: CpuInfo { model, cores },
        memory_total_mb: memory / MIB,
        disk_free_gb,
    }
}

/// `path` made absolute and resolved, or its nearest existing ancestor: the models directory
/// may not exist yet when the agent starts, but its disk does.
fn existing_ancestor(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    absolute
        .ancestors()
        .find_map(|candidate| candidate.canonicalize().ok())
        .unwrap_or(absolute)
}

/// The free bytes of the mount that holds `path`: the mount point that is the longest
/// ancestor of it (so `/workspace` wins over `/` for `/workspace/models`).
pub fn free_space_at(path: &Path, mounts: &[(PathBuf, u64)]) -> Option<u64> {
    mounts
        .iter()
        .filter(|(mount_point, _)| path.starts_with(mount_point))
        .max_by_key(|(mount_point, _)| mount_point.components().count())
        .map(|(_, free)| *free)
}

/// Bytes as GiB with one decimal.
pub fn bytes_to_gb(bytes: u64) -> f64 {
    (bytes as f64 / GIB * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_mount_point_holding_the_path_wins() {
        let mounts = vec![
            (PathBuf::from("/"), 10),
            (PathBuf::from("/workspace"), 20),
            (PathBuf::from("/workspace/models-cache"), 30),
            (PathBuf::from("/data"), 40),
        ];
        assert_eq!(
            free_space_at(Path::new("/workspace/models"), &mounts),
            Some(20)
        );
        assert_eq!(free_space_at(Path::new("/workspace"), &mounts), Some(20));
        assert_eq!(
            free_space_at(Path::new("/workspace/models-cache/x"), &mounts),
            Some(30)
        );
        assert_eq!(free_space_at(Path::new("/home/user"), &mounts), Some(10));
        // Components, not string prefixes: /database is not under /data.
        assert_eq!(free_space_at(Path::new("/database"), &mounts), Some(10));
        assert_eq!(free_space_at(Path::new("/x"), &[]), None);
    }

    #[test]
    fn gigabytes_have_one_decimal() {
        assert!((bytes_to_gb(0) - 0.0).abs() < f64::EPSILON);
        assert!((bytes_to_gb(1024 * 1024 * 1024) - 1.0).abs() < f64::EPSILON);
        assert!((bytes_to_gb(1_610_612_736) - 1.5).abs() < f64::EPSILON);
        assert!((bytes_to_gb(1_100_000_000) - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn a_missing_path_is_measured_on_its_nearest_existing_parent() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not/yet/created");
        let resolved = existing_ancestor(&missing);
        assert_eq!(resolved, dir.path().canonicalize().unwrap());
    }

    #[test]
    fn this_host_has_cores_memory_and_a_disk() {
        let info = probe_system(Path::new("."));
        assert!(info.cpu.cores >= 1, "{info:?}");
        assert!(info.memory_total_mb > 0, "{info:?}");
        assert!(info.disk_free_gb.is_some(), "{info:?}");
    }
}
