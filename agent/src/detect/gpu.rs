//! GPUs, through NVML behind the [`GpuProbe`] trait so tests (and boxes without NVIDIA) can
//! drive every branch.
//!
//! [`NvmlProbe`] loads `libnvidia-ml.so.1` at run time (nvml-wrapper uses `dlopen`), so the agent
//! starts on a box without the driver; there [`report`] gives no GPUs and a sentence saying
//! why, which `detect` prints as `gpu_error`. [`FakeGpuProbe`] stands in for it in tests.

use emp_shared::capabilities::GpuInfo;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;

/// Bytes in a MiB: NVML counts memory in bytes, the capabilities in MB (MiB).
const MIB: u64 = 1024 * 1024;

/// Library names tried in turn: the versioned one is what the NVIDIA container toolkit
/// mounts; the bare one exists where only the development symlink is installed.
const NVML_LIBRARIES: &[&str] = &["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// Why GPUs could not be listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// NVML cannot be used at all (no driver, no library, no permission); the sentence says
    /// which.
    #[error("{0}")]
    Unavailable(String),
    /// NVML works but a GPU could not be queried.
    #[error("GPU {index} could not be queried: {message}")]
    Device {
        /// NVML's index of the GPU.
        index: u32,
        /// NVML's explanation.
        message: String,
    },
}

/// What changes from second to second on a GPU, for heartbeats and dashboards. Every reading
/// is optional: some boards refuse some queries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuStats {
    /// NVML's index, as in [`GpuInfo::index`].
    pub index: u32,
    /// Share of the last sample period a kernel was running, in percent.
    pub utilization_percent: Option<u32>,
    /// Memory in use, in MB.
    pub memory_used_mb: Option<u64>,
    /// Total memory, in MB, so a reader needs no second source to compute a share.
    pub memory_total_mb: Option<u64>,
    /// Temperature in °C.
    pub temperature_c: Option<u32>,
}

/// A source of GPU facts. Implementations must not panic; a GPU-less box answers with an
/// error, not a crash.
pub trait GpuProbe: Send + Sync {
    /// Every GPU with its static facts, in index order.
    ///
    /// # Errors
    /// [`GpuError::Unavailable`] when the GPU library cannot be used, [`GpuError::Device`] when
    /// GPUs exist but none could be queried.
    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError>;

    /// The live readings of every GPU, in index order.
    ///
    /// # Errors
    /// As for [`GpuProbe::gpus`].
    fn stats(&self) -> Result<Vec<GpuStats>, GpuError>;
}

/// The GPUs for the capabilities: the list, or an empty list and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuReport {
    /// The GPUs found, in index order.
    pub gpus: Vec<GpuInfo>,
    /// Why `gpus` is empty: `gpu_error` in the capabilities. `None` when GPUs were found.
    pub error: Option<String>,
}

/// Asks `probe` for the GPUs and turns every failure, a panic inside the probe included, into
/// [`GpuReport::error`]. A probe that works but finds nothing also says so.
pub fn report(probe: &dyn GpuProbe) -> GpuReport {
    let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| probe.gpus()));
    match answer {
        Ok(Ok(gpus)) if gpus.is_empty() => GpuReport {
            gpus,
            error: Some("NVML is loaded but reports no GPU on this box".to_owned()),
        },
        Ok(Ok(gpus)) => GpuReport { gpus, error: None },
        Ok(Err(error)) => GpuReport {
            gpus: Vec::new(),
            error: Some(error.to_string()),
        },
        Err(_) => GpuReport {
            gpus: Vec::new(),
            error: Some("the GPU probe failed unexpectedly (it panicked)".to_owned()),
        },
    }
}

/// CUDA compute capability as `major.minor` (`"8.9"`).
pub fn compute_capability(major: i32, minor: i32) -> String {
    format!("{major}.{minor}")
}

/// NVML's CUDA driver version number (`12040`) as `major.minor` (`"12.4"`).
pub fn cuda_version(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

/// The real probe: NVML, loaded once when the probe is made and kept for later readings.
pub struct NvmlProbe {
    /// NVML, or the sentence explaining why it could not be loaded.
    nvml: Result<Nvml, String>,
}

impl NvmlProbe {
    /// Loads NVML. Never fails: without NVML every query answers [`GpuError::Unavailable`].
    pub fn new() -> Self {
        Self { nvml: load_nvml() }
    }

    /// Why NVML could not be loaded, `None` when it was.
    pub fn load_error(&self) -> Option<&str> {
        self.nvml.as_ref().err().map(String::as_str)
    }

    fn nvml(&self) -> Result<&Nvml, GpuError> {
        self.nvml
            .as_ref()
            .map_err(|why| GpuError::Unavailable(why.clone()))
    }
}

impl Default for NvmlProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for NvmlProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlProbe")
            .field("loaded", &self.nvml.is_ok())
            .field("load_error", &self.load_error())
            .finish()
    }
}

/// Tries each library name; the first error is the one worth reporting.
fn load_nvml() -> Result<Nvml, String> {
    let mut first_error = None;
    for library in NVML_LIBRARIES {
        match Nvml::builder()
            .lib_path(std::ffi::OsStr::new(library))
            .init()
        {
            Ok(nvml) => return Ok(nvml),
            Err(error) => {
                first_error.get_or_insert_with(|| explain_init_error(library, &error));
            }
        }
    }
    Err(first_error.unwrap_or_else(|| "NVML could not be loaded".to_owned()))
}

/// A sentence for `gpu_error`: what failed and what it usually means.
fn explain_init_error(library: &str, error: &NvmlError) -> String {
    match error {
        NvmlError::LibloadingError(cause) => format!(
            "NVML could not be loaded ({cause}): no NVIDIA driver is installed, or it is not \
             visible to this container"
        ),
        NvmlError::FailedToLoadSymbol(symbol) => {
            format!("{library} is too old or not NVIDIA's NVML (missing symbol {symbol})")
        }
        NvmlError::DriverNotLoaded => {
            "NVML is installed but the NVIDIA kernel driver is not loaded".to_owned()
        }
        NvmlError::NoPermission => {
            "NVML is installed but has no permission to talk to the NVIDIA driver".to_owned()
        }
        other => format!("NVML failed to start: {other}"),
    }
}

impl GpuProbe for NvmlProbe {
    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let nvml = self.nvml()?;
        let count = nvml
            .device_count()
            .map_err(|e| GpuError::Unavailable(format!("NVML could not count the GPUs: {e}")))?;
        // Box-wide facts, repeated on every GPU as the contract's shape has it.
        let driver_version = nvml.sys_driver_version().ok();
        let cuda = nvml.sys_cuda_driver_version().ok().map(cuda_version);

        let mut gpus = Vec::new();
        let mut first_failure = None;
        for index in 0..count {
            match nvml_gpu(nvml, index, driver_version.as_ref(), cuda.as_ref()) {
                Ok(gpu) => gpus.push(gpu),
                Err(error) => {
                    // One broken GPU should not hide the healthy ones.
                    tracing::warn!(gpu_index = index, %error, "skipping a GPU NVML cannot query");
                    first_failure.get_or_insert(GpuError::Device {
                        index,
                        message: error.to_string(),
                    });
                }
            }
        }
        match first_failure {
            Some(error) if gpus.is_empty() => Err(error),
            _ => Ok(gpus),
        }
    }

    fn stats(&self) -> Result<Vec<GpuStats>, GpuError> {
        let nvml = self.nvml()?;
        let count = nvml
            .device_count()
            .map_err(|e| GpuError::Unavailable(format!("NVML could not count the GPUs: {e}")))?;
        let mut stats = Vec::new();
        for index in 0..count {
            let device = nvml.device_by_index(index).map_err(|e| GpuError::Device {
                index,
                message: e.to_string(),
            })?;
            let memory = device.memory_info().ok();
            stats.push(GpuStats {
                index,
                utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                memory_used_mb: memory.as_ref().map(|m| m.used / MIB),
                memory_total_mb: memory.as_ref().map(|m| m.total / MIB),
                temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
            });
        }
        Ok(stats)
    }
}

/// One GPU's facts. Identity and memory are required; the rest is `None` where the board
/// refuses the query (consumer cards refuse several).
fn nvml_gpu(
    nvml: &Nvml,
    index: u32,
    driver_version: Option<&String>,
    cuda: Option<&String>,
) -> Result<GpuInfo, NvmlError> {
    let device = nvml.device_by_index(index)?;
    let memory = device.memory_info()?;
    Ok(GpuInfo {
        index,
        uuid: device.uuid()?,
        name: device.name()?,
        memory_total_mb: memory.total / MIB,
        memory_free_mb: memory.free / MIB,
        compute_capability: device
            .cuda_compute_capability()
            .ok()
            .map(|cc| compute_capability(cc.major, cc.minor)),
        driver_version: driver_version.cloned(),
        cuda_version: cuda.cloned(),
        pcie_gen: device.current_pcie_link_gen().ok(),
        pcie_width: device.current_pcie_link_width().ok(),
        temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
        // NVML reports milliwatts.
        power_limit_w: device
            .enforced_power_limit()
            .ok()
            .map(|milliwatts| (milliwatts + 500) / 1000),
        // NVML_DEVICE_MIG_ENABLE is 1; boards without MIG refuse the query.
        mig_enabled: device.mig_mode().is_ok_and(|mode| mode.current == 1),
    })
}

/// A probe with canned answers, for tests of everything above the GPU layer.
#[derive(Debug, Clone)]
pub struct FakeGpuProbe {
    /// What [`GpuProbe::gpus`] answers.
    pub gpus: Result<Vec<GpuInfo>, GpuError>,
    /// What [`GpuProbe::stats`] answers.
    pub stats: Result<Vec<GpuStats>, GpuError>,
}

impl FakeGpuProbe {
    /// A box with these GPUs; their stats show them idle with the memory not free in use.
    pub fn with_gpus(gpus: Vec<GpuInfo>) -> Self {
        let stats = gpus
            .iter()
            .map(|gpu| GpuStats {
                index: gpu.index,
                utilization_percent: Some(0),
                memory_used_mb: Some(gpu.memory_total_mb.saturating_sub(gpu.memory_free_mb)),
                memory_total_mb: Some(gpu.memory_total_mb),
                temperature_c: gpu.temperature_c,
            })
            .collect();
        Self {
            gpus: Ok(gpus),
            stats: Ok(stats),
        }
    }

    /// A box where every query fails with `error`.
    pub fn failing(error: GpuError) -> Self {
        Self {
            gpus: Err(error.clone()),
            stats: Err(error),
        }
    }

    /// A plausible GPU for tests: `name` with `memory_total_mb`, 512 MB in use, on a 12.4
    /// driver.
    pub fn gpu(index: u32, name: &str, memory_total_mb: u64) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index:08x}-1111-2222-3333-444444444444"),
            name: name.to_owned(),
            memory_total_mb,
            memory_free_mb: memory_total_mb.saturating_sub(512),
            compute_capability: Some(compute_capability(8, 9)),
            driver_version: Some("550.54.15".to_owned()),
            cuda_version: Some(cuda_version(12_040)),
            pcie_gen: Some(4),
            pcie_width: Some(16),
            temperature_c: Some(40),
            power_limit_w: Some(450),
            mig_enabled: false,
        }
    }
}

impl GpuProbe for FakeGpuProbe {
    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        self.gpus.clone()
    }

    fn stats(&self) -> Result<Vec<GpuStats>, GpuError> {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_formatted_as_major_dot_minor() {
        assert_eq!(compute_capability(8, 9), "8.9");
        assert_eq!(compute_capability(9, 0), "9.0");
        assert_eq!(compute_capability(12, 0), "12.0");
        assert_eq!(cuda_version(12_040), "12.4");
        assert_eq!(cuda_version(12_020), "12.2");
        assert_eq!(cuda_version(11_080), "11.8");
        assert_eq!(cuda_version(13_000), "13.0");
        assert_eq!(cuda_version(12_090), "12.9");
    }

    #[test]
    fn several_gpus_are_reported_in_order() {
        let probe = FakeGpuProbe::with_gpus(vec![
            FakeGpuProbe::gpu(0, "NVIDIA GeForce RTX 4090", 24_564),
            FakeGpuProbe::gpu(1, "NVIDIA RTX A6000", 49_140),
        ]);
        let answer = report(&probe);
        assert_eq!(answer.error, None);
        assert_eq!(answer.gpus.len(), 2);
        assert_eq!(answer.gpus[1].name, "NVIDIA RTX A6000");
        assert_eq!(answer.gpus[0].compute_capability.as_deref(), Some("8.9"));
        assert_eq!(answer.gpus[0].cuda_version.as_deref(), Some("12.4"));
        let stats = probe.stats().unwrap();
        assert_eq!(stats[1].memory_used_mb, Some(512));
        assert_eq!(stats[1].memory_total_mb, Some(49_140));
    }

    #[test]
    fn failures_become_a_sentence() {
        let answer = report(&FakeGpuProbe::failing(GpuError::Unavailable(
            "NVML could not be loaded (libnvidia-ml.so.1: cannot open shared object file)"
                .to_owned(),
        )));
        assert!(answer.gpus.is_empty());
        assert!(
            answer
                .error
                .as_deref()
                .unwrap()
                .contains("libnvidia-ml.so.1"),
            "{answer:?}"
        );

        let answer = report(&FakeGpuProbe::failing(GpuError::Device {
            index: 2,
            message: "GPU is lost".to_owned(),
        }));
        assert_eq!(
            answer.error.as_deref(),
            Some("GPU 2 could not be queried: GPU is lost")
        );
    }

    #[test]
    fn no_gpu_behind_a_working_nvml_is_explained_too() {
        let answer = report(&FakeGpuProbe::with_gpus(Vec::new()));
        assert!(answer.gpus.is_empty());
        assert!(answer.error.unwrap().contains("no GPU"));
    }

    #[test]
    fn a_panicking_probe_is_contained() {
        struct Panics;
        impl GpuProbe for Panics {
            fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
                panic!("driver exploded")
            }
            fn stats(&self) -> Result<Vec<GpuStats>, GpuError> {
                Ok(Vec::new())
            }
        }
        let answer = report(&Panics);
        assert!(answer.gpus.is_empty());
        assert!(answer.error.unwrap().contains("panicked"));
    }

    /// The real NVML: on a box without the driver (this one, CI) it must explain, not crash;
    /// on a GPU box it must list GPUs with their identity filled in.
    #[test]
    fn the_real_nvml_probe_reports_gpus_or_a_reason() {
        let probe = NvmlProbe::new();
        let answer = report(&probe);
        if answer.gpus.is_empty() {
            let why = answer.error.expect("an empty list comes with a reason");
            assert!(!why.trim().is_empty());
            assert!(probe.stats().is_err() || probe.load_error().is_none());
        } else {
            assert_eq!(answer.error, None);
            for gpu in &answer.gpus {
                assert!(!gpu.name.is_empty());
                assert!(gpu.memory_total_mb > 0);
            }
            assert_eq!(probe.stats().unwrap().len(), answer.gpus.len());
        }
    }
}
