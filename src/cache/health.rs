//! A snapshot of a cache's state for readiness probes and dashboards.

use std::time::SystemTime;

use azure_core::time::OffsetDateTime;

use super::TokenCache;
use crate::observe::{self, RefreshOutcome};

/// What a token cache is doing, read at once: no I/O, no refresh started, no wait beyond a
/// short internal lock. For a readiness probe (`/readyz`) and dashboards. Holds no secret.
///
/// ```no_run
/// # async fn run(connector: pg_entra::Connector) {
/// let health = connector.token_cache().health();
/// if !health.ready {
///     eprintln!(
///         "not ready: {} failures in a row, last: {:?}",
///         health.consecutive_failures, health.last_error
///     );
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Whether a token is cached that is still handed out (before its expiry margin, 30 s by
    /// default): a connect now needs no identity request.
    pub ready: bool,
    /// When the cached token expires.
    pub expires_on: Option<OffsetDateTime>,
    /// When the cached token turns stale and a background refresh is due.
    pub refresh_at: Option<OffsetDateTime>,
    /// Whether a refresh is running now.
    pub refreshing: bool,
    /// When the last refresh ended.
    pub last_refresh_at: Option<OffsetDateTime>,
    /// How the last refresh ended.
    pub last_refresh: Option<RefreshResult>,
    /// The last failed refresh's error, as its `Display` (errors never show a token or a
    /// secret); cleared by a success.
    pub last_error: Option<String>,
    /// Failed refreshes in a row; 0 after a success.
    pub consecutive_failures: u32,
    /// After failures, no refresh starts before this.
    pub backing_off_until: Option<OffsetDateTime>,
    /// The credential the cache asks: for `DefaultAzureCredential`, the member that produced
    /// the token once one has (`ManagedIdentityCredential`, …); else what
    /// [`TokenCacheBuilder::credential_name`](super::TokenCacheBuilder::credential_name) set.
    pub credential: &'static str,
}

/// How a refresh ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshResult {
    /// A newer token was stored.
    Refreshed,
    /// The credential answered with no newer token (an endpoint serving its own cache); the
    /// cache backs off before asking again.
    NoNewerToken,
    /// The credential failed.
    Failed,
}

impl TokenCache {
    /// A snapshot of the cache's state: whether a usable token is cached, when it expires and
    /// will be refreshed, how the last refresh went, failures in a row, backoff. Also sets the
    /// `pg_entra.token.time_to_expiry` gauge (feature `metrics`).
    pub fn health(&self) -> Health {
        let inner = &self.inner;
        let now = inner.clock.now();
        let entry = inner.current.load_full();
        let state = inner.lock_state();
        let last = state.last_refresh;
        let health = Health {
            ready: entry.as_deref().is_some_and(|e| now < e.usable_until),
            expires_on: entry.as_deref().map(|e| e.token.expires_on()),
            refresh_at: entry.as_deref().map(|e| date(e.refresh_at)),
            refreshing: state.in_flight.is_some(),
            last_refresh_at: last.map(|l| date(l.at)),
            last_refresh: last.map(|l| match l.outcome {
                RefreshOutcome::Success => RefreshResult::Refreshed,
                RefreshOutcome::NoProgress => RefreshResult::NoNewerToken,
                RefreshOutcome::Failure => RefreshResult::Failed,
            }),
            last_error: state.last_error.as_ref().map(|e| e.to_string()),
            consecutive_failures: state.consecutive_failures,
            backing_off_until: state.not_before.filter(|t| *t > now).map(date),
            credential: last.map_or_else(|| inner.credential_name(), |l| l.credential),
        };
        drop(state);
        if let Some(entry) = entry.as_deref() {
            observe::time_to_expiry(entry.expires_in(now));
        }
        health
    }
}

fn date(at: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(at)
}
