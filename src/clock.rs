//! The one source of "now" for token freshness decisions.

use std::fmt;
use std::time::SystemTime;

/// Tells the wall-clock time.
///
/// Token freshness is decided on the wall clock, not a monotonic clock: a laptop that slept
/// past a token's expiry must notice when it wakes. Tests inject a manual clock
/// (`testing::ManualClock`) instead of sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock, read at the kernel tick's resolution.
///
/// On Linux this is `CLOCK_REALTIME_COARSE` from the vDSO: about 3 ns a read against about
/// 25 ns for `SystemTime::now()`, and at most a few milliseconds behind it, which is nothing
/// against refresh margins of minutes. It is still the wall clock, so a machine that slept
/// past a token's refresh point notices at once. Elsewhere it is `SystemTime::now()`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[cfg(target_os = "linux")]
    #[inline]
    fn now(&self) -> SystemTime {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        match (u64::try_from(now.tv_sec), u32::try_from(now.tv_nsec)) {
            (Ok(seconds), Ok(nanos)) => SystemTime::UNIX_EPOCH
                .checked_add(std::time::Duration::new(seconds, nanos))
                .unwrap_or_else(SystemTime::now),
            // A clock set before 1970: rare enough to take the slow, exact path.
            _ => SystemTime::now(),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: std::sync::Arc<std::sync::Mutex<SystemTime>>,
}

#[cfg(any(test, feature = "test-util"))]
impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: std::sync::Arc::new(std::sync::Mutex::new(start)),
        }
    }

    /// A clock standing at the current system time.
    pub fn starting_now() -> Self {
        Self::new(SystemTime::now())
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: std::time::Duration) {
        *crate::lock::lock(&self.now) += by;
    }

    /// Puts the clock at `at` (forward or back).
    pub fn set(&self, at: SystemTime) {
        *crate::lock::lock(&self.now) = at;
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *crate::lock::lock(&self.now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_tells_the_wall_clock_time() {
        for _ in 0..100 {
            let before = SystemTime::now();
            let coarse = SystemClock.now();
            let after = SystemTime::now();
            // Coarse means up to a few kernel ticks behind, never ahead.
            let behind = before.duration_since(coarse).unwrap_or_default();
            assert!(behind < std::time::Duration::from_millis(50), "{behind:?}");
            assert!(coarse <= after);
        }
    }
}
