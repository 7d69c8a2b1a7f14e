//! When to retry a managed identity request, per Microsoft's IMDS guidance.

use std::time::Duration;

use crate::backoff;

/// Default number of retries for transient failures (404, 408, 429, 5xx, timeouts, refused
/// connections); 410 is governed by [`RetryOptions::gone_window`] instead.
pub(crate) const DEFAULT_MAX_RETRIES: u32 = 5;
/// Default first backoff; it doubles on every retry (about 1, 2, 4, 8, 16 s).
pub(crate) const DEFAULT_FIRST_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Default cap on one backoff.
pub(crate) const DEFAULT_MAX_RETRY_BACKOFF: Duration = Duration::from_secs(16);
/// IMDS answers 410 while it restarts and promises to be back within 70 s.
pub(crate) const DEFAULT_GONE_WINDOW: Duration = Duration::from_secs(70);
/// Default limit on one HTTP attempt.
pub(crate) const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// Default limit on one `get_token` call, retries included.
pub(crate) const DEFAULT_DEADLINE: Duration = Duration::from_secs(90);

/// How a managed identity credential retries.
///
/// The defaults follow Microsoft's guidance for IMDS. Tests shrink the backoff so that a fault
/// matrix runs in milliseconds.
#[derive(Debug, Clone)]
pub struct RetryOptions {
    /// Retries for transient failures (404, 408, 429, 5xx, timeouts, refused connections).
    pub max_retries: u32,
    /// The first backoff; doubled on each retry, jittered by ±20 %.
    pub initial_backoff: Duration,
    /// The cap on one backoff (a longer `Retry-After` is still honoured, within the deadline;
    /// no wait longer than a day is ever made: the call ends instead).
    pub max_backoff: Duration,
    /// How long to keep retrying 410 ("IMDS is restarting"), from the first 410.
    pub gone_window: Duration,
    /// The limit on one HTTP attempt.
    pub attempt_timeout: Duration,
    /// The limit on the whole call, retries included.
    pub deadline: Duration,
}

impl Default for RetryOptions {
    fn default() -> Self {
        Self {
            max_retries: DEFAULT_MAX_RETRIES,
            initial_backoff: DEFAULT_FIRST_RETRY_BACKOFF,
            max_backoff: DEFAULT_MAX_RETRY_BACKOFF,
            gone_window: DEFAULT_GONE_WINDOW,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// How one attempt failed, as far as retrying cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttemptFailure {
    /// The endpoint answered with this status.
    Status(u16),
    /// No answer within the attempt timeout.
    Timeout,
    /// The connection could not be made or broke.
    Connection,
}

impl AttemptFailure {
    pub(crate) fn is_transient(self) -> bool {
        match self {
            AttemptFailure::Status(status) => crate::status::is_transient(status),
            AttemptFailure::Timeout | AttemptFailure::Connection => true,
        }
    }
}

/// What the retry loop knows when an attempt has failed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryState {
    /// Retries already made for transient failures (410 does not count).
    pub transient_retries: u32,
    /// Retries already made for any reason; sets the backoff's exponent.
    pub total_retries: u32,
    /// Time since the first 410, when there was one.
    pub gone_for: Option<Duration>,
    /// The endpoint's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
    /// A factor in [0.8, 1.2] to spread clients apart.
    pub jitter: f64,
}

impl RetryOptions {
    /// The wait before the next attempt, or `None` to give up.
    pub(crate) fn delay_before_retry(
        &self,
        failure: AttemptFailure,
        state: RetryState,
    ) -> Option<Duration> {
        let within_budget = match failure {
            AttemptFailure::Status(410) => state.gone_for.unwrap_or_default() < self.gone_window,
            other if other.is_transient() => state.transient_retries < self.max_retries,
            _ => false,
        };
        if !within_budget {
            return None;
        }
        let capped =
            backoff::exponential(self.initial_backoff, state.total_retries, self.max_backoff);
        let backoff = backoff::scaled(capped, state.jitter.clamp(0.8, 1.2));
        Some(match state.retry_after {
            Some(after) => backoff.max(after),
            None => backoff,
        })
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (RFC 7231), relative to `now`.
pub(crate) fn parse_retry_after(value: &str, now: time::OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    Some((date - now).try_into().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(retries: u32) -> RetryState {
        RetryState {
            transient_retries: retries,
            total_retries: retries,
            gone_for: None,
            retry_after: None,
            jitter: 1.0,
        }
    }

    #[test]
    fn transient_statuses_back_off_exponentially() {
        let options = RetryOptions::default();
        for status in [404, 408, 429, 500, 502, 503, 504] {
            let delays: Vec<_> = (0..5)
                .map(|n| options.delay_before_retry(AttemptFailure::Status(status), state(n)))
                .collect();
            assert_eq!(
                delays,
                [1, 2, 4, 8, 16].map(|s| Some(Duration::from_secs(s))),
                "status {status}"
            );
            assert_eq!(
                options.delay_before_retry(AttemptFailure::Status(status), state(5)),
                None
            );
        }
    }

    #[test]
    fn client_errors_are_not_retried() {
        let options = RetryOptions::default();
        for status in [400, 401, 403, 405, 409] {
            assert_eq!(
                options.delay_before_retry(AttemptFailure::Status(status), state(0)),
                None,
                "status {status}"
            );
        }
    }

    #[test]
    fn timeouts_and_refused_connections_are_retried() {
        let options = RetryOptions::default();
        assert!(
            options
                .delay_before_retry(AttemptFailure::Timeout, state(0))
                .is_some()
        );
        assert!(
            options
                .delay_before_retry(AttemptFailure::Connection, state(4))
                .is_some()
        );
    }

    #[test]
    fn gone_is_retried_for_seventy_seconds_regardless_of_count() {
        let options = RetryOptions::default();
        let gone = |retries, seconds| RetryState {
            gone_for: Some(Duration::from_secs(seconds)),
            ..state(retries)
        };
        assert_eq!(
            options.delay_before_retry(AttemptFailure::Status(410), gone(12, 69)),
            Some(DEFAULT_MAX_RETRY_BACKOFF)
        );
        assert_eq!(
            options.delay_before_retry(AttemptFailure::Status(410), gone(3, 70)),
            None
        );
    }

    #[test]
    fn retry_after_is_a_floor_not_a_cap() {
        let options = RetryOptions::default();
        let with_after = |seconds| RetryState {
            retry_after: Some(Duration::from_secs(seconds)),
            ..state(0)
        };
        assert_eq!(
            options.delay_before_retry(AttemptFailure::Status(429), with_after(7)),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            options.delay_before_retry(AttemptFailure::Status(429), with_after(0)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn jitter_spreads_within_twenty_percent() {
        let options = RetryOptions::default();
        let jittered = |jitter| RetryState { jitter, ..state(1) };
        assert_eq!(
            options.delay_before_retry(AttemptFailure::Status(500), jittered(0.1)),
            Some(Duration::from_millis(1600))
        );
        assert_eq!(
            options.delay_before_retry(AttemptFailure::Status(500), jittered(1.2)),
            Some(Duration::from_millis(2400))
        );
    }

    #[test]
    fn huge_settings_and_headers_saturate_instead_of_panicking() {
        let options = RetryOptions {
            initial_backoff: Duration::MAX,
            max_backoff: Duration::MAX,
            ..RetryOptions::default()
        };
        let jittered = RetryState {
            jitter: 1.2,
            retry_after: Some(Duration::from_secs(u64::MAX)),
            ..state(3)
        };
        assert_eq!(
            options.delay_before_retry(AttemptFailure::Status(503), jittered),
            Some(Duration::MAX)
        );
        let now = time::macros::datetime!(2015-10-21 07:28:00 UTC);
        assert_eq!(
            parse_retry_after("18446744073709551615", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_retry_after("99999999999999999999999", now), None);
    }

    #[test]
    fn retry_after_forms() {
        let now = time::macros::datetime!(2015-10-21 07:28:00 UTC);
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn any_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::MAX),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            (0u64..100_000).prop_map(Duration::from_millis),
        ]
    }

    proptest! {
        #[test]
        fn retry_after_never_panics(value in ".{0,64}", seconds in any::<i64>()) {
            let now = time::OffsetDateTime::from_unix_timestamp(seconds.clamp(-377_705_116_800, 253_402_300_799)).unwrap();
            let _ = parse_retry_after(&value, now);
        }

        #[test]
        fn any_settings_and_state_give_a_delay_or_none(
            initial in any_duration(), max in any_duration(), window in any_duration(),
            retry_after in proptest::option::of(any_duration()), gone_for in proptest::option::of(any_duration()),
            retries in any::<u32>(), max_retries in any::<u32>(), status in any::<u16>(), jitter in any::<f64>(),
        ) {
            let options = RetryOptions {
                max_retries,
                initial_backoff: initial,
                max_backoff: max,
                gone_window: window,
                ..RetryOptions::default()
            };
            let state = RetryState { transient_retries: retries, total_retries: retries, gone_for, retry_after, jitter };
            for failure in [AttemptFailure::Status(status), AttemptFailure::Timeout, AttemptFailure::Connection] {
                let _ = options.delay_before_retry(failure, state);
            }
        }
    }
}
