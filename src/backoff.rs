//! Exponential back-off with full jitter: attempt `n` sleeps a random time in
//! `[0, min(max, base * 2^n)]`, so retrying tasks spread out instead of stampeding.

use rand::Rng;
use std::time::Duration;

/// The ceiling for attempt `n` (0-based): `min(max, base * 2^n)`.
pub fn ceiling(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

/// A random delay in `[0, ceiling(attempt)]`.
pub fn full_jitter(attempt: u32, base: Duration, max: Duration) -> Duration {
    let cap = ceiling(attempt, base, max);
    if cap.is_zero() {
        return cap;
    }
    let nanos = rand::rng().random_range(0..=cap.as_nanos().min(u64::MAX as u128) as u64);
    Duration::from_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        assert_eq!(ceiling(0, b, m), Duration::from_millis(100));
        assert_eq!(ceiling(1, b, m), Duration::from_millis(200));
        assert_eq!(ceiling(3, b, m), Duration::from_millis(800));
        assert_eq!(ceiling(4, b, m), m);
        assert_eq!(ceiling(200, b, m), m);
    }

    #[test]
    fn jitter_stays_under_ceiling() {
        for attempt in 0..10 {
            let d = full_jitter(attempt, Duration::from_millis(50), Duration::from_secs(2));
            assert!(d <= ceiling(attempt, Duration::from_millis(50), Duration::from_secs(2)));
        }
    }
}
