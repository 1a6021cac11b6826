//! Latency histograms: microsecond resolution, three significant digits, read out in ms.

use std::time::Duration;

use hdrhistogram::Histogram;

/// The latencies of one measured operation.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram for 1 µs to 10 minutes.
    pub fn new() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// Adds one sample (clamped into the histogram's range).
    pub fn record(&mut self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(micros.max(1));
    }

    /// The latency at `quantile` (0.0 to 1.0), in milliseconds.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        self.histogram.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// The median, in milliseconds.
    pub fn p50_ms(&self) -> f64 {
        self.quantile_ms(0.5)
    }

    /// The 99th percentile, in milliseconds.
    pub fn p99_ms(&self) -> f64 {
        self.quantile_ms(0.99)
    }

    /// The slowest sample, in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.histogram.max() as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_quantiles_in_milliseconds() {
        let mut latency = Latency::new();
        for micros in 1..=1000 {
            latency.record(Duration::from_micros(micros));
        }
        assert!(
            (latency.p50_ms() - 0.5).abs() < 0.001,
            "{}",
            latency.p50_ms()
        );
        assert!(
            (latency.p99_ms() - 0.99).abs() < 0.001,
            "{}",
            latency.p99_ms()
        );
        assert!(
            (latency.max_ms() - 1.0).abs() < 0.001,
            "{}",
            latency.max_ms()
        );
    }

    #[test]
    fn clamps_below_one_microsecond() {
        let mut latency = Latency::new();
        latency.record(Duration::from_nanos(10));
        assert!((latency.max_ms() - 0.001).abs() < f64::EPSILON);
    }
}
