//! Watching the local ComfyUI while the agent runs: every `inventory_interval` its inventory is
//! read again, and at once when the agent itself linked or removed a model
//! ([`crate::models::ModelCache::changed`]). New or removed node types or models update the
//! capabilities (the box registers again and recomputes its classes); a ComfyUI that stops answering makes the box unhealthy
//! (it claims nothing) until it answers again.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::session;
use super::state::Shared;
use super::worker::Worker;
use crate::detect::comfy_inventory::InventoryReport;

/// Failed reads in a row before ComfyUI counts as down: one slow answer while it loads a
/// model is not an outage.
const FAILURES_BEFORE_UNHEALTHY: u32 = 2;

/// Re-reads the inventory until `stop` is cancelled.
pub async fn run<W: Worker>(shared: Arc<Shared>, worker: Arc<W>, stop: CancellationToken) {
    let mut failures = 0_u32;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(shared.settings.inventory_interval) => {}
            () = shared.models.changed().notified() => {}
        }
        let report = tokio::select! {
            () = stop.cancelled() => return,
            report = worker.inventory() => report,
        };
        check(&shared, report, &mut failures);
    }
}

/// Applies one inventory read: health, then capabilities when the nodes or models changed.
pub fn check(shared: &Shared, report: InventoryReport, failures: &mut u32) {
    if !report.comfyui.reachable {
        *failures += 1;
        tracing::warn!(
            attempt = *failures,
            comfyui_url = shared.config.comfyui_url,
            "ComfyUI does not answer"
        );
        if *failures >= FAILURES_BEFORE_UNHEALTHY {
            let url = shared.config.comfyui_url.clone();
            shared.update_health(|health| {
                health.comfyui = Some(format!(
                    "ComfyUI at {url} does not answer; claiming nothing until it does"
                ));
            });
        }
        return;
    }
    *failures = 0;
    shared.update_health(|health| health.comfyui = None);

    let changed = {
        let mut capabilities = Shared::lock(&shared.capabilities);
        let now = &report.comfyui;
        let before = &capabilities.comfyui;
        if before.node_types == now.node_types && before.models == now.models {
            false
        } else {
            tracing::info!(
                node_types_before = before.node_types.len(),
                node_types_now = now.node_types.len(),
                model_folders_now = now.models.len(),
                "ComfyUI's nodes or models changed: updating this box's capabilities"
            );
            capabilities.comfyui = report.comfyui;
            capabilities.recompute_totals();
            true
        }
    };
    if changed {
        session::recompute_classes(shared);
        shared.request_registration();
    }
}
