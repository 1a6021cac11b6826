//! Whether this box should take jobs, and why not.
//!
//! Two things can make a registered box unfit: the GPU pre-flight (the environment promises
//! GPUs, NVML shows none) and a local ComfyUI that stopped answering. An unfit box stays
//! registered and keeps heartbeating, so operators see it and its leases stay alive, but it
//! claims nothing and says why in every heartbeat's `gpu_stats` (`healthy: false` and
//! `unhealthy_reason`).

use crate::config::Environment;
use crate::detect::gpu::GpuReport;
use crate::detect::provider;

/// The checks that can fail, each with the sentence that explains the failure. Plain data:
/// the fleet keeps the current value in its status and heartbeats print it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The GPU pre-flight failed: the environment promises GPUs that NVML cannot see. Set once
    /// at start; a box in that state needs an operator (driver, container runtime), not time.
    pub gpu: Option<String>,
    /// The local ComfyUI stopped answering mid-run; cleared when it answers again.
    pub comfyui: Option<String>,
}

impl Health {
    /// Whether every check passes.
    pub fn is_healthy(&self) -> bool {
        self.gpu.is_none() && self.comfyui.is_none()
    }

    /// One sentence with every failing check, `None` when healthy.
    pub fn reason(&self) -> Option<String> {
        let parts: Vec<String> = [
            self.gpu
                .as_ref()
                .map(|why| format!("GPU pre-flight failed: {why}")),
            self.comfyui.as_ref().map(|why| format!("ComfyUI: {why}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Why this box must have a GPU, when its environment says so: vast.ai sets `GPU_COUNT` to the
/// GPUs it rented out, and SaladCloud only runs GPU containers. `None` for a laptop or a
/// bare-metal box, which may legitimately run CPU-only.
pub fn gpu_promise(env: &Environment, provider_name: &str) -> Option<String> {
    if let Some(count) = env.get("GPU_COUNT") {
        if count.parse::<u64>().is_ok_and(|n| n > 0) {
            return Some(format!("GPU_COUNT={count} promises GPUs"));
        }
    }
    (provider_name == provider::SALAD).then(|| "provider salad runs only on GPU nodes".to_owned())
}

/// The GPU pre-flight: a box whose environment promises GPUs (`promise`) but whose NVML shows
/// none is unfit; the answer says why, with NVML's own reason. A box with GPUs, or without a
/// promise, passes.
pub fn gpu_preflight(promise: Option<&str>, report: &GpuReport) -> Option<String> {
    let promise = promise?;
    if !report.gpus.is_empty() {
        return None;
    }
    let nvml = report
        .error
        .as_deref()
        .unwrap_or("NVML reports no GPU on this box");
    Some(format!(
        "{promise}, but none is usable: {nvml}; this box claims no job until it is fixed"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::gpu::{FakeGpuProbe, GpuError, report};

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn promises_come_from_vastai_gpu_count_and_salad() {
        assert!(gpu_promise(&env(&[("GPU_COUNT", "2")]), "vastai").is_some());
        assert!(gpu_promise(&env(&[("GPU_COUNT", "0")]), "vastai").is_none());
        assert!(gpu_promise(&env(&[("GPU_COUNT", "many")]), "local").is_none());
        assert!(gpu_promise(&env(&[]), "salad").is_some());
        assert!(gpu_promise(&env(&[]), "local").is_none());
    }

    #[test]
    fn a_promise_without_gpus_fails_with_nvmls_reason() {
        let broken = report(&FakeGpuProbe::failing(GpuError::Unavailable(
            "libnvidia-ml.so.1: cannot open shared object file".into(),
        )));
        let why = gpu_preflight(Some("GPU_COUNT=1 promises GPUs"), &broken).unwrap();
        assert!(why.contains("GPU_COUNT=1"), "{why}");
        assert!(why.contains("libnvidia-ml.so.1"), "{why}");
        // No promise: a CPU-only laptop is fine.
        assert_eq!(gpu_preflight(None, &broken), None);
        // GPUs found: fine.
        let fine = report(&FakeGpuProbe::with_gpus(vec![FakeGpuProbe::gpu(
            0,
            "NVIDIA L4",
            23_034,
        )]));
        assert_eq!(gpu_preflight(Some("salad"), &fine), None);
    }

    #[test]
    fn the_reason_names_every_failing_check() {
        let mut health = Health::default();
        assert!(health.is_healthy());
        assert_eq!(health.reason(), None);
        health.gpu = Some("no GPU".into());
        health.comfyui = Some("does not answer".into());
        let reason = health.reason().unwrap();
        assert!(reason.contains("no GPU") && reason.contains("does not answer"));
        assert!(!health.is_healthy());
    }
}
