//! The Markdown report: latency and throughput beside the targets, then who used the CPU and
//! what each request cost the database, then what that means on a shared machine.

use std::fmt::Write as _;

use super::load::{Endpoint, Outcome};
use super::server::LogSummary;
use super::setup::{Bench, Prepared};
use super::usage::Usage;
use super::{Args, Measured};

/// The report.
pub fn render(
    args: &Args,
    bench: &Bench,
    prepared: &Prepared,
    measured: &[Measured],
    log: Option<&LogSummary>,
) -> String {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut out = String::new();
    let mode = match args.rate {
        Some(rate) => format!("paced at {rate} requests/s in all (open loop)"),
        None => "closed loop".to_owned(),
    };
    let _ = writeln!(
        out,
        "## emp-bench api: {} jobs; {} connections, {} s per endpoint, {mode}\n",
        thousands(bench.fill.jobs),
        args.connections,
        args.duration
    );
    let statuses = prepared
        .statuses
        .iter()
        .map(|(status, n)| format!("{status} {}", thousands(*n)))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "Server: the control plane's router in a child process (this release build), {} Tokio \
         workers, PostgreSQL pool of {} (`connect_lazy`), logging at `info` to a file, no \
         background duties. Client: reqwest on one Tokio thread, HTTP/1.1 keep-alive, {} s \
         warm-up first. {cpus} CPUs shared by client, server, PostgreSQL {}, Redis {} and \
         whatever else runs. Data as of {} ({} users); the caller is the fill's busiest user \
         (role {}), {} jobs ({statuses}), with a new key; GETs pick among its jobs uniformly.\n",
        args.server_threads
            .map_or_else(|| format!("{cpus} (one per CPU)"), |n| n.to_string()),
        args.pool,
        args.warmup,
        bench.server_version,
        bench.redis_version,
        bench.fill.as_of,
        thousands(i64::from(bench.fill.users)),
        prepared.role,
        thousands(prepared.ids.len() as i64),
    );

    let _ = writeln!(
        out,
        "| endpoint | requests | req/s | p50 ms | p99 ms | max ms | p99 target | | errors | load avg (start → end) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---|---|---|");
    for m in measured {
        let o = &m.outcome;
        let p99 = o.latency.p99_ms();
        let target = m.endpoint.target_p99_ms();
        let successes = o.statuses.get(&m.endpoint.success()).copied().unwrap_or(0);
        let verdict = if successes == 0 {
            "**no successes**"
        } else if p99 < target {
            "met"
        } else {
            "**missed**"
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | < {target:.0} ms | {verdict} | {} | {} → {} |",
            m.endpoint.label(),
            thousands(o.completed() as i64),
            o.completed() as f64 / o.window.as_secs_f64(),
            o.latency.p50_ms(),
            p99,
            o.latency.max_ms(),
            errors(m.endpoint, o),
            m.before.load,
            m.after.load
        );
    }

    let _ = writeln!(
        out,
        "\n### CPU over the measured window: cores busy (CPU ms per request)\n"
    );
    let _ = writeln!(
        out,
        "| endpoint | client (load generator) | server | its PG backends | Redis (all clients) | rest of the machine | machine busy |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let usages: Vec<Usage> = measured
        .iter()
        .map(|m| Usage::between(&m.before, &m.after))
        .collect();
    for (m, usage) in measured.iter().zip(&usages) {
        let requests = m.outcome.completed().max(1) as f64;
        let cell = |cpu: Option<f64>| match cpu {
            Some(seconds) => format!(
                "{:.2} ({:.3})",
                seconds / usage.seconds,
                seconds * 1000.0 / requests
            ),
            None => "?".into(),
        };
        let machine = match (usage.machine, usage.capacity) {
            (Some(busy), Some(all)) if all > 0.0 => {
                format!(
                    "{:.2} of {cpus} ({:.0} %)",
                    busy / usage.seconds,
                    busy / all * 100.0
                )
            }
            _ => "?".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} ×{} | {} | {} | {machine} |",
            m.endpoint.label(),
            cell(usage.client),
            cell(usage.server),
            cell(usage.backends),
            usage.backend_count,
            cell(usage.redis),
            cell(usage.rest()),
        );
    }

    let _ = writeln!(out, "\n### Per request\n");
    let _ = writeln!(
        out,
        "| endpoint | PG transactions | PG rows fetched | PG blocks hit | PG blocks read | PG rows inserted | Redis commands (all clients) | server-side mean ms | client-side mean ms |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (m, usage) in measured.iter().zip(&usages) {
        let requests = m.outcome.completed().max(1) as f64;
        let per = |n: i64| format!("{:.2}", n as f64 / requests);
        let db = usage.db;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
            m.endpoint.label(),
            per(db.xact_commit + db.xact_rollback),
            per(db.tup_fetched),
            per(db.blks_hit),
            per(db.blks_read),
            per(db.tup_inserted),
            usage
                .redis_commands
                .map_or_else(|| "?".into(), |n| format!("{:.2}", n as f64 / requests)),
            m.server_mean_ms
                .map_or_else(|| "?".into(), |ms| format!("{ms:.2}")),
            m.outcome.mean_ms,
        );
    }
    let _ = writeln!(
        out,
        "\nPG counters are `pg_stat_database` deltas of the whole database (backends flush them \
         about once a second, so ± a second's worth); one transaction is one statement here, \
         the handlers run no explicit transactions on these paths. \"Blocks read\" came from \
         the OS page cache or the disk (shared_buffers missed). The server-side mean is the \
         route's own histogram (`/metrics`), over warm-up and run; the client-side mean adds \
         the HTTP client, the loopback and the wait to be scheduled on a busy machine.\n"
    );

    let _ = writeln!(out, "### Reading it\n");
    for (m, usage) in measured.iter().zip(&usages) {
        let o = &m.outcome;
        let rate = o.completed() as f64 / o.window.as_secs_f64();
        let label = m.endpoint.label();
        if args.rate.is_none() && rate > 0.0 {
            let _ = writeln!(
                out,
                "- {label}: closed loop, so the mean latency is about connections / throughput = \
                 {} / {rate:.0} = {:.1} ms (Little's law): at saturation the latency is mostly \
                 the wait of {} connections for {cpus} CPUs, not the work of one request.",
                args.connections,
                args.connections as f64 * 1000.0 / rate,
                args.connections
            );
        }
        let serving = usage
            .server
            .zip(usage.backends)
            .map(|(server, backends)| server + backends + usage.redis.unwrap_or(0.0));
        if let (Some(serving), Some(client)) = (serving, usage.client)
            && serving > 0.0
        {
            let per_request = serving / o.completed().max(1) as f64;
            let _ = writeln!(
                out,
                "  The serving side (server + its backends + Redis) used {:.3} CPU ms a request; \
                 the load generator took {:.0} % of what the machine did ({:.2} cores). With \
                 the client elsewhere and nothing else running, these {cpus} CPUs could serve \
                 at most about {:.0} requests/s of this kind.",
                per_request * 1000.0,
                usage.machine.map_or(0.0, |busy| client / busy * 100.0),
                client / usage.seconds,
                cpus as f64 / per_request
            );
        }
        if let (Some(rest), Some(machine)) = (usage.rest(), usage.machine)
            && rest / usage.seconds > 0.2
        {
            let _ = writeln!(
                out,
                "  Other processes (other users' work, PostgreSQL's background writers, the \
                 kernel) kept {:.2} of the {cpus} CPUs busy ({:.0} % of what the machine did): \
                 these figures are what was left over.",
                rest / usage.seconds,
                rest / machine * 100.0
            );
        }
        if let Some(failure) = &o.first_failure {
            let _ = writeln!(out, "  First transport failure: {failure}");
        }
    }
    if let Some(log) = log {
        let _ = writeln!(
            out,
            "\nServer log: {} lines ({} bytes), {} WARN/ERROR{}{}.",
            thousands(log.lines as i64),
            thousands(log.bytes as i64),
            log.problems,
            log.first_problem
                .as_deref()
                .map(|line| format!("; first: `{}`", line.trim()))
                .unwrap_or_default(),
            log.kept
                .as_deref()
                .map(|path| format!("; kept at {}", path.display()))
                .unwrap_or_default()
        );
    }
    out
}

/// Non-success answers and failures, or "none".
fn errors(endpoint: Endpoint, outcome: &Outcome) -> String {
    let mut parts: Vec<String> = outcome
        .statuses
        .iter()
        .filter(|(status, _)| **status != endpoint.success())
        .map(|(status, n)| format!("{status}: {}", thousands(*n as i64)))
        .collect();
    parts.extend(
        outcome
            .failures
            .iter()
            .map(|(kind, n)| format!("{kind}: {}", thousands(*n as i64))),
    );
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(-1000), "-1,000");
    }
}
