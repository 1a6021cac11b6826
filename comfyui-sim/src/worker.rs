//! The single worker: runs queued prompts one at a time, in queue order.
//!
//! Between prompts it applies the flags `/free` left (so `free_memory` empties the cache when
//! idle, or right after the running prompt, never in the middle of one), and after each prompt
//! it writes history, broadcasts the queue size, and only then sends `executing: null`, so a
//! client that reads history on that event finds the entry.

use std::sync::Arc;

use crate::cache::OutputCache;
use crate::executor::Executor;
use crate::py;
use crate::state::AppState;

/// Runs prompts until the simulator shuts down.
pub async fn run(state: Arc<AppState>) {
    let executor = Executor::new(state.clone());
    let mut cache = OutputCache::default();
    loop {
        let took = step(&state, &executor, &mut cache).await;
        match took {
            Step::Stopped => return,
            Step::Ran => {}
            Step::Idle => {
                tokio::select! {
                    () = state.shutdown.cancelled() => return,
                    () = state.queue.changed() => {}
                }
            }
        }
    }
}

enum Step {
    Ran,
    Idle,
    Stopped,
}

/// One turn of the loop: the pending flags, then the next prompt if there is one.
///
/// Flags are applied before taking a prompt as well as after one, so a `/free` sent while idle
/// is in effect for a prompt submitted right after it, however the two requests race.
async fn step(state: &AppState, executor: &Executor, cache: &mut OutputCache) -> Step {
    apply_flags(state, cache);
    if let Some((task, item)) = state.queue.take() {
        tracing::info!(prompt_id = %item.prompt_id, "prompt started");
        let outcome = tokio::select! {
            () = state.shutdown.cancelled() => return Step::Stopped,
            outcome = executor.execute(cache, &item) => outcome,
        };
        tracing::info!(prompt_id = %item.prompt_id, success = outcome.success, "prompt finished");
        state.queue.task_done(task, &outcome);
        executor.finished(&item);
        Step::Ran
    } else {
        Step::Idle
    }
}

/// ComfyUI's worker applies `/free` between prompts: `free_memory` drops every cached result
/// (`unload_models` has nothing to unload here).
fn apply_flags(state: &AppState, cache: &mut OutputCache) {
    let flags = state.queue.take_flags();
    if flags.get("free_memory").is_some_and(py::truthy) {
        tracing::info!(entries = cache.len(), "free_memory: cache emptied");
        cache.clear();
    }
}
