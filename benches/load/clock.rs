//! A process-wide monotonic clock in microseconds, shared by publishers and the receiver.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the first call (never 0).
pub fn micros() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

/// Percentile (0..=100) of sorted microsecond samples, in milliseconds.
pub fn percentile_ms(sorted: &[u32], percentile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((percentile / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank] as f64 / 1000.0
}
