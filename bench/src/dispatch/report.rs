//! The Markdown report: one row per figure with its target, then details and the conditions
//! (machine, load average, Redis version) the figures were taken under.

use std::fmt::Write as _;

use emp_shared::dispatch::bench::BenchReport;
use redis::aio::ConnectionManager;

/// How a figure compares with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// No target: shown for context.
    Info,
}

impl Verdict {
    pub fn at_least(value: f64, target: f64) -> Self {
        if value >= target {
            Self::Met
        } else {
            Self::Missed
        }
    }

    pub fn at_most(value: f64, target: f64) -> Self {
        if value < target || (value - target).abs() < f64::EPSILON {
            Self::Met
        } else {
            Self::Missed
        }
    }

    fn mark(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "**missed**",
            Self::Info => "",
        }
    }
}

struct Row {
    part: &'static str,
    measure: String,
    result: String,
    target: String,
    verdict: Verdict,
}

/// The report being built.
pub struct Report {
    rows: Vec<Row>,
    details: Vec<String>,
    pub load_start: String,
    load_end: String,
    redis_version: String,
    cpus: usize,
}

impl Report {
    /// Starts a report: reads the load average and the Redis version.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn new(con: &mut ConnectionManager) -> anyhow::Result<Self> {
        let info: String = redis::cmd("INFO").arg("server").query_async(con).await?;
        let redis_version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        Ok(Self {
            rows: Vec::new(),
            details: Vec::new(),
            load_start: load_average(),
            load_end: String::new(),
            redis_version,
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        })
    }

    pub fn row(
        &mut self,
        part: &'static str,
        measure: impl Into<String>,
        result: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        self.rows.push(Row {
            part,
            measure: measure.into(),
            result: result.into(),
            target: target.into(),
            verdict,
        });
    }

    pub fn detail(&mut self, line: String) {
        self.details.push(line);
    }

    /// Says when the server ran more script calls during a run than this client sent: another
    /// client used the same Redis then, and the Redis-wide counters include its work.
    pub fn note_foreign(&mut self, run: &str, r: &BenchReport) {
        let server = r.command_deltas.get("fcall").copied().unwrap_or(0);
        let ours = (r.client_commands_per_job * r.cycles.max(1) as f64).round() as u64;
        if server > ours {
            self.details.push(format!(
                "{run}: Redis ran {} more FCALL than this client sent: another client was \
                 busy on the same Redis, and its commands and CPU are in these counters.",
                server - ours
            ));
        }
    }

    /// Reads the final load average.
    pub fn finish(&mut self) {
        self.load_end = load_average();
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## emp-bench dispatch\n");
        let _ = writeln!(
            out,
            "Redis {} on {} CPUs; load average (1, 5, 15 min) {} at start, {} at the end.\n",
            self.redis_version, self.cpus, self.load_start, self.load_end
        );
        let _ = writeln!(out, "| | measure | result | target | |");
        let _ = writeln!(out, "|---|---|---:|---|---|");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                r.part,
                r.measure,
                r.result,
                r.target,
                r.verdict.mark()
            );
        }
        if !self.details.is_empty() {
            let _ = writeln!(out);
            for d in &self.details {
                let _ = writeln!(out, "- {d}");
            }
        }
        out
    }
}

/// `/proc/loadavg`'s first three figures, or `?` where there is none.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// Milliseconds with two decimals.
pub fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

/// A whole number with thousands separators.
pub fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(ms(0.456), "0.46 ms");
    }

    #[test]
    fn verdicts_compare_with_targets() {
        assert_eq!(Verdict::at_least(30_000.0, 30_000.0), Verdict::Met);
        assert_eq!(Verdict::at_least(29_999.0, 30_000.0), Verdict::Missed);
        assert_eq!(Verdict::at_most(1.19, 1.2), Verdict::Met);
        assert_eq!(Verdict::at_most(1.21, 1.2), Verdict::Missed);
    }
}
