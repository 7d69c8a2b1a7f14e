//! Exponential backoff, written once for the token cache's failed refreshes and the managed
//! identity credential's retries. Every step saturates: no setting or count can panic.

use std::time::Duration;

/// The largest number of doublings: 2^20 × even a millisecond is past any cap we accept.
const MAX_DOUBLINGS: u32 = 20;

/// `first`, doubled `doublings` times, capped at `cap`.
pub(crate) fn exponential(first: Duration, doublings: u32, cap: Duration) -> Duration {
    first
        .saturating_mul(1u32 << doublings.min(MAX_DOUBLINGS))
        .min(cap)
}

/// `duration` × `factor` for the jitter factors in use (non-negative), saturating where
/// `Duration::mul_f64` would panic.
pub(crate) fn scaled(duration: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(duration.as_secs_f64() * factor.max(0.0)).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let s = Duration::from_secs;
        let waits: Vec<_> = (0..6).map(|n| exponential(s(1), n, s(16))).collect();
        assert_eq!(waits, [s(1), s(2), s(4), s(8), s(16), s(16)]);
        assert_eq!(exponential(s(1), u32::MAX, s(60)), s(60));
    }

    #[test]
    fn extremes_saturate_instead_of_panicking() {
        assert_eq!(
            exponential(Duration::MAX, u32::MAX, Duration::MAX),
            Duration::MAX
        );
        assert_eq!(scaled(Duration::MAX, 1.2), Duration::MAX);
        assert_eq!(scaled(Duration::from_secs(10), 0.5), Duration::from_secs(5));
        assert_eq!(scaled(Duration::from_secs(10), -1.0), Duration::ZERO);
    }
}
