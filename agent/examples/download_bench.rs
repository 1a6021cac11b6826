//! Model download throughput: the agent's downloader against `curl -o`, the same file from the
//! same local server, in turns (curl, agent, curl, agent), each into a fresh file.
//!
//! ```text
//! cargo run --release -p emp-agent --example download_bench -- [SIZE_MIB] [PORT]
//! ```
//!
//! Serves `SIZE_MIB` (default 1024) MiB from memory on `127.0.0.1:PORT` (default 0: any free
//! port) and prints each run's time and rate, and the ratio of the best rates (agent / curl).
//! The agent's run includes its `fsync` of the file; curl's does not.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::get;
use emp_agent::models::{Credentials, DownloadRetry, Downloader};
use reqwest::Url;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(Ok(1024), |a| a.parse())?;
    let port: u16 = args.next().map_or(Ok(0), |a| a.parse())?;
    let size = mib << 20;
    let data = Bytes::from(
        (0..size)
            .map(|i| u8::try_from(i.wrapping_mul(31) % 251).unwrap_or(0))
            .collect::<Vec<u8>>(),
    );
    let app = Router::new().route(
        "/files/bench.safetensors",
        get(move || {
            let data = data.clone();
            async move { data }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/files/bench.safetensors");
    let dir = tempfile::tempdir()?;
    let downloader = Downloader::new(
        Credentials::default(),
        DownloadRetry::default(),
        Duration::from_secs(60),
    )?;

    let rate = |secs: f64| {
        #[allow(clippy::cast_precision_loss)]
        let mb = size as f64 / 1e6;
        mb / secs
    };
    let mut best_curl = 0.0_f64;
    let mut best_agent = 0.0_f64;
    for round in 1..=2 {
        let target = dir.path().join(format!("curl-{round}.bin"));
        let began = Instant::now();
        let status = std::process::Command::new("curl")
            .args(["-sS", "-o"])
            .arg(&target)
            .arg(&url)
            .status()?;
        let curl_secs = began.elapsed().as_secs_f64();
        if !status.success() || std::fs::metadata(&target)?.len() != size as u64 {
            return Err("curl failed".into());
        }
        std::fs::remove_file(&target)?;
        best_curl = best_curl.max(rate(curl_secs));
        println!(
            "round {round}: curl  {curl_secs:.2} s  {:.0} MB/s",
            rate(curl_secs)
        );

        let into = dir.path().join(format!("agent-{round}"));
        let began = Instant::now();
        let done = downloader
            .download(&Url::parse(&url)?, &into, None, None, &|_| {})
            .await?;
        let agent_secs = began.elapsed().as_secs_f64();
        if done.size != size as u64 {
            return Err("the agent's download is short".into());
        }
        std::fs::remove_dir_all(&into)?;
        best_agent = best_agent.max(rate(agent_secs));
        println!(
            "round {round}: agent {agent_secs:.2} s  {:.0} MB/s",
            rate(agent_secs)
        );
    }
    println!(
        "{mib} MiB: best curl {best_curl:.0} MB/s, best agent {best_agent:.0} MB/s, agent/curl = {:.2}",
        best_agent / best_curl
    );
    Ok(())
}
