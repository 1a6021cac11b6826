//! A benchmark's own multi-threaded runtime, sized by its `--threads`, so its load generators
//! do not share the command's runtime.

use std::future::Future;

/// Runs the future `run` makes on a runtime of `threads` workers in a thread of its own, and
/// waits for it without blocking the caller's runtime. `what` names the run in the error a
/// panic gives.
///
/// # Errors
/// The run's own error, a runtime that cannot be built, or a panic.
pub async fn on_own_runtime<F, Fut>(threads: usize, what: &str, run: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let worker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .enable_all()
            .build()?;
        runtime.block_on(run())
    });
    tokio::task::spawn_blocking(move || worker.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the {what} panicked"))?
}
