//! The token cache: refreshes ahead of expiry without making callers wait.
//!
//! [`TokenCache`] (also at the crate root) is built with [`TokenCacheBuilder`], whose setters
//! state each default; [`Clock`] is where it reads the time.
//!
//! States, decided on the wall clock of the injected [`Clock`]:
//! - **fresh** (before the refresh point): the cached token is returned at once: no lock, no
//!   allocation, no `.await`. [`TokenCache::with_token`] reads it in place through the
//!   thread's own reference (one shared atomic load, no reference count moved);
//!   [`TokenCache::token`] hands out a reference-counted clone.
//! - **stale** (refresh point .. expiry minus a safety margin): the cached token is returned at
//!   once and one background refresh is started, unless one is running or the cache is backing
//!   off after a failure.
//! - **expired or absent**: callers wait for the one refresh in flight; while backing off after
//!   a failure they get a typed error at once instead.
//!
//! The cache knows nothing about where tokens come from: it wraps any
//! [`TokenCredential`].

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use azure_core::credentials::{AccessToken, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::time::OffsetDateTime;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::watch;
use tracing::Instrument as _;

pub use crate::clock::{Clock, SystemClock};

use crate::backoff;
use crate::cloud::{PUBLIC_SCOPE, resource_for_scope};
use crate::credential::Scope;
use crate::error::Error;
use crate::jitter::unit_random;
use crate::observe::{self, Trigger};
use crate::token::Token;

/// Default time before expiry at which a token turns stale and is refreshed.
const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Default upper bound of the random extra margin that spreads replicas' refreshes apart.
const DEFAULT_REFRESH_JITTER: Duration = Duration::from_secs(60);
/// Default time before expiry after which a token is no longer handed out: it must still be
/// valid when the server checks it, after DNS, TCP and TLS.
const DEFAULT_EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Default first wait after a failed refresh; it doubles per failure.
const DEFAULT_MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Default cap on the wait after failed refreshes.
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Default limit on one credential call, so that a hung credential cannot wedge the cache.
const DEFAULT_REFRESH_TIMEOUT: Duration = Duration::from_secs(120);
/// Default shortest time between two refreshes forced by the server refusing a token, so that
/// a misconfigured role cannot turn every connect into an identity-endpoint call.
const DEFAULT_FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// The background task re-reads the wall clock at least this often (a suspended machine's
/// monotonic timers do not notice the time it slept).
const BACKGROUND_MAX_SLEEP: Duration = Duration::from_secs(60);
/// The error of a refresh whose runtime shut down before it finished (told apart by its
/// type, inside the `azure_core` error the refresh ends with).
#[derive(Debug)]
struct RefreshCancelled;

impl fmt::Display for RefreshCancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the token refresh was cancelled (its runtime shut down)")
    }
}

impl std::error::Error for RefreshCancelled {}

fn cancelled() -> Arc<azure_core::Error> {
    Arc::new(azure_core::Error::new(
        ErrorKind::Credential,
        RefreshCancelled,
    ))
}

/// How waiting for a refresh ended without a token.
enum RefreshWait {
    /// Its runtime shut down: worth one more try on the caller's runtime.
    Cancelled,
    Failed(Error),
}

impl RefreshWait {
    fn into_error(self, inner: &Inner) -> Error {
        match self {
            RefreshWait::Cancelled => inner.failure(Some(cancelled())),
            RefreshWait::Failed(error) => error,
        }
    }
}

/// Entra tokens live at most a day (managed identities); a margin, backoff or timeout longer
/// than that cannot work, so the builder refuses it.
const LONGEST_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// Caches the access token for one scope and refreshes it ahead of expiry.
///
/// Cloning is cheap and clones share the token. However many callers ask at once, at most one
/// credential call is in flight; a caller that gives up does not cancel it.
///
/// ```no_run
/// # async fn run() -> Result<(), pg_entra::Error> {
/// use std::sync::Arc;
/// use pg_entra::{Cloud, TokenCache};
/// use pg_entra::credential::ImdsCredential;
///
/// let cache = TokenCache::builder(Arc::new(ImdsCredential::from_env()?))
///     .scope(Cloud::Public.scope())
///     .build()?;
/// let token = cache.token().await?;
/// println!("token valid until {}", token.expires_on());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    /// Moves on every stored token: a thread's reference to an entry of an older generation is
    /// not used.
    generation: AtomicU64,
    credential: Arc<dyn TokenCredential>,
    /// Names the credential for spans, metrics and health (a chain names its member).
    credential_name: Option<CredentialName>,
    fallback_name: &'static str,
    scope: String,
    policy: RefreshPolicy,
    clock: Arc<dyn Clock>,
    current: ArcSwapOption<Entry>,
    state: Mutex<RefreshState>,
    /// Every stored token, for [`TokenCache::updates`]' listeners.
    updates: watch::Sender<Option<Token>>,
    /// Dropped with the cache, which ends the background task.
    _stop_background: Option<watch::Sender<()>>,
}

/// A cached token and when it turns stale and expired.
struct Entry {
    token: Token,
    refresh_at: SystemTime,
    usable_until: SystemTime,
}

impl Entry {
    /// Time left at `now` before the token expires (zero once it has).
    fn expires_in(&self, now: SystemTime) -> Duration {
        system_time(self.token.expires_on())
            .and_then(|expires| expires.duration_since(now).ok())
            .unwrap_or_default()
    }
}

/// Reads a credential's name when asked (a chain's answer changes once a member answers).
pub(crate) type CredentialName = Arc<dyn Fn() -> Option<&'static str> + Send + Sync>;

/// What one refresh ends with. The error is shared: every waiting caller gets it.
type RefreshOutcome = Result<Token, Arc<azure_core::Error>>;
type SharedRefresh = Shared<BoxFuture<'static, RefreshOutcome>>;

#[derive(Default)]
struct RefreshState {
    in_flight: Option<SharedRefresh>,
    /// Tells a finished refresh whether it is still the one in flight.
    generation: u64,
    consecutive_failures: u32,
    /// No new refresh before this (backoff after a failure or a refresh that made no progress).
    not_before: Option<SystemTime>,
    last_error: Option<Arc<azure_core::Error>>,
    /// When the last refresh forced by a refused token started (for the rate limit).
    last_forced: Option<SystemTime>,
    last_refresh: Option<LastRefresh>,
}

impl RefreshState {
    fn backing_off(&self, now: SystemTime) -> bool {
        self.not_before.is_some_and(|t| now < t)
    }
}

#[derive(Debug, Clone)]
struct RefreshPolicy {
    margin: Duration,
    jitter: Duration,
    expiry_margin: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    refresh_timeout: Duration,
    forced_interval: Duration,
}

/// Why a refresh runs: a forced one accepts any token other than the refused one, even if it
/// expires no later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshKind {
    Ahead,
    Forced,
}

impl RefreshKind {
    fn of(trigger: Trigger) -> Self {
        match trigger {
            Trigger::Forced => Self::Forced,
            Trigger::Background | Trigger::OnDemand => Self::Ahead,
        }
    }
}

/// When the last refresh ended, and how.
#[derive(Debug, Clone, Copy)]
struct LastRefresh {
    at: SystemTime,
    outcome: observe::RefreshOutcome,
    credential: &'static str,
}

impl RefreshPolicy {
    /// When a token obtained at `now` turns stale and stops being handed out. `random` in
    /// [0, 1) places the refresh point within the jitter. Short-lived tokens scale the margins
    /// down (refresh no earlier than half-way, stop handing out in the last quarter), so that
    /// a five-minute token is not refreshed on every call.
    fn schedule(
        &self,
        expires: SystemTime,
        now: SystemTime,
        random: f64,
    ) -> (SystemTime, SystemTime) {
        let lifetime = expires.duration_since(now).unwrap_or(Duration::ZERO);
        let safety = self.expiry_margin.min(lifetime / 4);
        let ahead = self
            .margin
            .saturating_add(self.jitter.mul_f64(unit(random)))
            .min(lifetime / 2)
            .max(safety);
        // Both are at most half the lifetime, so neither reaches back before `now`.
        (
            expires.checked_sub(ahead).unwrap_or(now),
            expires.checked_sub(safety).unwrap_or(now),
        )
    }

    /// The wait after the `failures`-th consecutive failure: exponential, capped, jittered
    /// down by up to half so that replicas spread out.
    fn backoff(&self, failures: u32, random: f64) -> Duration {
        let capped = backoff::exponential(
            self.min_backoff,
            failures.saturating_sub(1),
            self.max_backoff,
        );
        backoff::scaled(capped, 0.5 + 0.5 * unit(random))
    }
}

impl TokenCache {
    /// A builder for a cache over `credential`, for the public cloud's PostgreSQL scope unless
    /// told otherwise.
    pub fn builder(credential: Arc<dyn TokenCredential>) -> TokenCacheBuilder {
        TokenCacheBuilder::new(credential)
    }

    /// The current token: at once while it is fresh or stale; after one shared refresh when it
    /// is expired or absent.
    ///
    /// # Errors
    /// [`Error::TokenExpired`] at once while the cache backs off after failed refreshes and the
    /// last token has expired; [`Error::TokenUnavailable`] or
    /// [`Error::TokenRefused`] when there never was a token.
    pub async fn token(&self) -> Result<Token, Error> {
        let now = self.inner.clock.now();
        {
            let current = self.inner.current.load();
            if let Some(entry) = current.as_deref() {
                if now < entry.refresh_at {
                    return Ok(entry.token.clone());
                }
                if now < entry.usable_until {
                    let token = entry.token.clone();
                    drop(current);
                    self.inner.refresh_in_background(now);
                    return Ok(token);
                }
            }
        }
        Inner::wait_for_refresh(&self.inner).await
    }

    /// Runs `read` on the current token and returns what it returns: like
    /// [`token`](Self::token), but while the token is fresh this writes no memory shared with
    /// other threads (each thread keeps its own reference to the current token; no reference
    /// count moves), so readers on many cores do not slow each other down. For callers that only
    /// copy something out of the token, as a connect copies the secret.
    ///
    /// ```no_run
    /// # async fn run(cache: pg_entra::TokenCache) -> Result<(), pg_entra::Error> {
    /// let password: Vec<u8> = cache.with_token(|token| token.secret().as_bytes().to_vec()).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`token`](Self::token).
    pub async fn with_token<R>(&self, read: impl FnOnce(&Token) -> R) -> Result<R, Error> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let generation = inner.generation.load(Ordering::Acquire);
        let read = match per_thread::read_fresh(inner, generation, now, read) {
            Ok(value) => return Ok(value),
            Err(read) => read,
        };
        // This thread has no reference to the current entry yet, or it is not fresh: the
        // shared entry, loaded after the generation, so at least as new as it.
        if let Some(entry) = inner.current.load_full()
            && now < entry.usable_until
        {
            if now < entry.refresh_at {
                let value = read(&entry.token);
                per_thread::remember(inner, generation, entry);
                return Ok(value);
            }
            inner.refresh_in_background(now);
            return Ok(read(&entry.token));
        }
        let token = Inner::wait_for_refresh(inner).await?;
        Ok(read(&token))
    }

    /// The scope tokens are requested for.
    pub fn scope(&self) -> &str {
        &self.inner.scope
    }

    /// A cache for another scope over the same credential, with the same refresh policy and
    /// clock (lazy refresh).
    pub(crate) fn for_scope(&self, scope: &str) -> Result<TokenCache, Error> {
        TokenCacheBuilder {
            credential: Arc::clone(&self.inner.credential),
            name: self.inner.fallback_name,
            credential_name: self.inner.credential_name.clone(),
            scope: scope.to_owned(),
            policy: self.inner.policy.clone(),
            clock: Arc::clone(&self.inner.clock),
            background: false,
        }
        .build()
    }

    /// A listener for the tokens this cache stores from now on, for code that must push each new
    /// token somewhere (a pool's connect options, say) instead of asking for it per connect.
    ///
    /// With background refresh on (off by default) a new token arrives ahead of the old
    /// one's expiry without anyone asking; without it, tokens arrive when callers' requests
    /// refresh them. Forced refreshes after a refused login arrive either way.
    pub fn updates(&self) -> TokenUpdates {
        TokenUpdates {
            receiver: self.inner.updates.subscribe(),
        }
    }

    /// Refreshes ahead of expiry on a timer, as [`TokenCacheBuilder::background_refresh`]
    /// does, until the returned guard is dropped; for holders of a token that nobody asks the
    /// cache for (a sqlx pool's options). `None` when the cache does so already. Needs a Tokio
    /// runtime.
    #[cfg(feature = "sqlx")]
    pub(crate) fn keep_fresh(&self) -> Option<watch::Sender<()>> {
        if self.inner._stop_background.is_some() {
            return None;
        }
        let (stop, stopped) = watch::channel(());
        tokio::spawn(keep_fresh(Arc::downgrade(&self.inner), stopped));
        Some(stop)
    }

    /// The cached token, if any, without refreshing or waiting (it may be expired).
    pub fn cached(&self) -> Option<Token> {
        self.inner
            .current
            .load()
            .as_deref()
            .map(|entry| entry.token.clone())
    }

    /// After the server refused `rejected` at login: a different token to retry with, or
    /// `None` when there is nothing better to try.
    ///
    /// If the cache already holds another usable token (someone else refreshed), that one is
    /// returned without I/O. Otherwise one refresh is forced past the backoff, at most once per
    /// [`forced_refresh_interval`](TokenCacheBuilder::forced_refresh_interval); concurrent
    /// callers share it. `None` means the rate limit applies or the credential handed back the
    /// refused token again: report the login failure instead of retrying.
    ///
    /// # Errors
    /// [`Error::TokenUnavailable`] or [`Error::TokenRefused`] when the forced refresh
    /// fails.
    pub async fn refresh_rejected(&self, rejected: &Token) -> Result<Option<Token>, Error> {
        let refresh = {
            let mut state = self.inner.lock_state();
            let now = self.inner.clock.now();
            if let Some(entry) = self.inner.current.load().as_deref()
                && entry.token.secret() != rejected.secret()
                && now < entry.usable_until
            {
                return Ok(Some(entry.token.clone()));
            }
            match &state.in_flight {
                Some(in_flight) => {
                    observe::forced_refresh(observe::Forced::Joined);
                    in_flight.clone()
                }
                None => {
                    let interval = self.inner.policy.forced_interval;
                    let recently =
                        |t: SystemTime| t.checked_add(interval).is_none_or(|end| now < end);
                    if state.last_forced.is_some_and(recently) {
                        tracing::debug!("a forced token refresh ran recently; not forcing another");
                        observe::forced_refresh(observe::Forced::RateLimited);
                        return Ok(None);
                    }
                    state.last_forced = Some(now);
                    tracing::info!("the server refused the cached token; forcing a refresh");
                    observe::forced_refresh(observe::Forced::Started);
                    self.inner.start_refresh(&mut state, Trigger::Forced)?
                }
            }
        };
        match refresh.await {
            Ok(token) if token.secret() != rejected.secret() => Ok(Some(token)),
            Ok(_) => Ok(None),
            // Not `failure()`: the refused token may still be far from expiry.
            Err(cause) => Err(Error::from_credential(cause)),
        }
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.inner.current.load();
        f.debug_struct("TokenCache")
            .field("scope", &self.inner.scope)
            .field("credential", &self.inner.credential)
            .field(
                "expires_on",
                &current.as_deref().map(|e| e.token.expires_on()),
            )
            .finish_non_exhaustive()
    }
}

/// The tokens a [`TokenCache`] stores, from [`TokenCache::updates`].
///
/// A slow listener does not hold the cache up: it sees the newest token, not every one.
#[derive(Debug)]
pub struct TokenUpdates {
    receiver: watch::Receiver<Option<Token>>,
}

impl TokenUpdates {
    /// Waits for a token stored after the last one this listener saw (or after it was made)
    /// and returns the newest; `None` once the cache is dropped.
    pub async fn next(&mut self) -> Option<Token> {
        loop {
            self.receiver.changed().await.ok()?;
            if let Some(token) = self.receiver.borrow_and_update().clone() {
                return Some(token);
            }
        }
    }
}

impl Inner {
    fn lock_state(&self) -> MutexGuard<'_, RefreshState> {
        crate::lock::lock(&self.state)
    }

    /// Stale path: start one refresh if none is running and the cache is not backing off.
    /// Never waits: if another caller holds the state lock, that caller is deciding already.
    fn refresh_in_background(self: &Arc<Self>, now: SystemTime) {
        let Ok(mut state) = self.state.try_lock() else {
            return;
        };
        if state.in_flight.is_some() || state.backing_off(now) {
            return;
        }
        if let Err(error) = self.start_refresh(&mut state, Trigger::Background) {
            tracing::warn!(%error, "cannot start a background token refresh");
        }
    }

    /// Expired or absent path: join the refresh in flight, start one, or fail fast.
    async fn wait_for_refresh(self: &Arc<Self>) -> Result<Token, Error> {
        match self.wait_for_refresh_once().await {
            // The refresh ran on a runtime that has shut down since (a cache shared by the
            // process outlives any one runtime): this caller's runtime runs a new one.
            Err(RefreshWait::Cancelled) => self
                .wait_for_refresh_once()
                .await
                .map_err(|wait| wait.into_error(self)),
            other => other.map_err(|wait| wait.into_error(self)),
        }
    }

    async fn wait_for_refresh_once(self: &Arc<Self>) -> Result<Token, RefreshWait> {
        let refresh = {
            let mut state = self.lock_state();
            let now = self.clock.now();
            // A refresh may have landed between the caller's look and this lock.
            if let Some(entry) = self.current.load().as_deref()
                && now < entry.usable_until
            {
                return Ok(entry.token.clone());
            }
            match &state.in_flight {
                Some(in_flight) => in_flight.clone(),
                None if state.backing_off(now) => {
                    return Err(RefreshWait::Failed(self.failure(state.last_error.clone())));
                }
                None => self
                    .start_refresh(&mut state, Trigger::OnDemand)
                    .map_err(RefreshWait::Failed)?,
            }
        };
        refresh.await.map_err(|cause| {
            let was_cancelled = cause
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<RefreshCancelled>().is_some());
            if was_cancelled {
                RefreshWait::Cancelled
            } else {
                RefreshWait::Failed(self.failure(Some(cause)))
            }
        })
    }

    /// The error for a caller who needs a token and cannot have one.
    fn failure(&self, cause: Option<Arc<azure_core::Error>>) -> Error {
        match (self.current.load().as_deref(), cause) {
            (Some(entry), last_cause) => Error::TokenExpired {
                expired_at: entry.token.expires_on(),
                last_cause,
            },
            (None, Some(cause)) => Error::from_credential(cause),
            (None, None) => Error::from_credential(Arc::new(azure_core::Error::with_message(
                ErrorKind::Credential,
                "no token has been obtained yet",
            ))),
        }
    }

    /// Spawns the one refresh. The task, not the callers, owns the credential call, so a
    /// caller that times out or is dropped does not cancel it.
    fn start_refresh(
        self: &Arc<Self>,
        state: &mut RefreshState,
        trigger: Trigger,
    ) -> Result<SharedRefresh, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::missing(
                "Tokio runtime",
                "the token cache must be used inside a Tokio runtime",
            )
        })?;
        state.generation += 1;
        let generation = state.generation;
        let task = runtime.spawn(Arc::clone(self).run_refresh(generation, trigger));
        let weak = Arc::downgrade(self);
        let refresh = async move {
            match task.await {
                Ok(outcome) => outcome,
                // The task panicked outside the credential call: free the slot and back off
                // like any failure, or the next caller (and the background task) would start
                // another refresh at once. Cancelled (its runtime shut down): free the slot
                // only; a caller on a live runtime starts the next one.
                Err(join_error) => {
                    let error = if join_error.is_panic() {
                        Arc::new(azure_core::Error::with_message(
                            ErrorKind::Credential,
                            "the token refresh panicked",
                        ))
                    } else {
                        cancelled()
                    };
                    if let Some(inner) = weak.upgrade() {
                        let now = inner.clock.now();
                        let mut state = inner.lock_state();
                        if state.generation == generation && state.in_flight.is_some() {
                            inner.finish_in_flight(&mut state, generation);
                            if join_error.is_panic() {
                                inner.back_off(&mut state, now);
                                state.last_error = Some(Arc::clone(&error));
                            }
                        }
                    }
                    Err(error)
                }
            }
        }
        .boxed()
        .shared();
        state.in_flight = Some(refresh.clone());
        Ok(refresh)
    }

    /// Whether the credential was refused at its last refresh and no usable token is cached.
    pub(crate) fn refused_without_token(&self) -> bool {
        let now = self.clock.now();
        let usable = self
            .current
            .load()
            .as_deref()
            .is_some_and(|entry| now < entry.usable_until);
        !usable
            && self.lock_state().last_error.as_ref().is_some_and(|error| {
                matches!(
                    Error::from_credential(Arc::clone(error)),
                    Error::TokenRefused { .. }
                )
            })
    }

    fn finish_in_flight(&self, state: &mut RefreshState, generation: u64) {
        if state.generation == generation {
            state.in_flight = None;
        }
    }

    async fn run_refresh(self: Arc<Self>, generation: u64, trigger: Trigger) -> RefreshOutcome {
        let kind = RefreshKind::of(trigger);
        let credential = self.credential_name();
        let span = observe::refresh_span(trigger, &self.scope, credential);
        let started = std::time::Instant::now();
        let result = async {
            tracing::debug!(scope = %self.scope, ?kind, "refreshing access token");
            let scopes = [self.scope.as_str()];
            let call = AssertUnwindSafe(self.credential.get_token(&scopes, None));
            tokio::time::timeout(self.policy.refresh_timeout, call.catch_unwind()).await
        }
        .instrument(span.clone())
        .await;
        let _entered = span.enter();
        let result = match result {
            Ok(Ok(Ok(token))) => Ok(token),
            Ok(Ok(Err(error))) => Err(Arc::new(error)),
            Ok(Err(_panic)) => Err(Arc::new(azure_core::Error::with_message(
                ErrorKind::Credential,
                "the credential panicked",
            ))),
            Err(_elapsed) => Err(Arc::new(azure_core::Error::with_message(
                ErrorKind::Credential,
                format!(
                    "the credential did not answer within {:?}",
                    self.policy.refresh_timeout
                ),
            ))),
        };
        let now = self.clock.now();
        let mut state = self.lock_state();
        self.finish_in_flight(&mut state, generation);
        // The name once more: a chain knows which member answered only now.
        let credential = self.credential_name();
        let (outcome, result) = match result.and_then(|token| self.accept(token, now, kind)) {
            Ok(Accepted::New(token)) => {
                state.consecutive_failures = 0;
                state.not_before = None;
                state.last_error = None;
                (observe::RefreshOutcome::Success, Ok(token))
            }
            Ok(Accepted::NoProgress(token)) => {
                self.back_off(&mut state, now);
                tracing::debug!("the credential returned no newer token; backing off");
                (observe::RefreshOutcome::NoProgress, Ok(token))
            }
            Err(error) => {
                let delay = self.back_off(&mut state, now);
                state.last_error = Some(Arc::clone(&error));
                tracing::warn!(
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "access token refresh failed"
                );
                (observe::RefreshOutcome::Failure, Err(error))
            }
        };
        state.last_refresh = Some(LastRefresh {
            at: now,
            outcome,
            credential,
        });
        drop(state);
        observe::token_refreshed(trigger, outcome, credential, started.elapsed());
        if let Some(entry) = self.current.load().as_deref() {
            observe::time_to_expiry(entry.expires_in(now));
        }
        result
    }

    /// The credential's name for spans, metrics and health: the member of a chain that
    /// produced the token once one has, else what the builder was told.
    fn credential_name(&self) -> &'static str {
        self.credential_name
            .as_ref()
            .and_then(|name| name())
            .unwrap_or(self.fallback_name)
    }

    fn back_off(&self, state: &mut RefreshState, now: SystemTime) -> Duration {
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        let delay = self
            .policy
            .backoff(state.consecutive_failures, unit_random());
        // The builder caps the backoff at a day, so this cannot overflow; saturate regardless.
        let mut until = now.checked_add(delay).unwrap_or(now);
        // While the cached token is still usable, no wait runs past the point where it stops
        // being usable: a managed identity endpoint serves its own cached token until its
        // renewal point, and the attempt after that must come while callers are still served
        // (the Azure SDKs keep a valid token and retry while it lasts). The last wait ends
        // one minimum backoff before that point, and after it one more attempt is allowed at
        // the point itself.
        if let Some(entry) = self.current.load().as_deref()
            && now < entry.usable_until
        {
            let last_chance = entry
                .usable_until
                .checked_sub(self.policy.min_backoff)
                .unwrap_or(entry.usable_until);
            let cap = if now < last_chance {
                last_chance
            } else {
                entry.usable_until
            };
            until = until.min(cap);
        }
        state.not_before = Some(until);
        until.duration_since(now).unwrap_or_default()
    }

    /// Stores a newer token; refuses one that is expired on arrival; reports a token that is no
    /// newer than the cached one as no progress (a refresh must not loop on it). A forced
    /// refresh takes any token other than the cached one, since the server refused that.
    fn accept(
        &self,
        access: AccessToken,
        now: SystemTime,
        kind: RefreshKind,
    ) -> Result<Accepted, Arc<azure_core::Error>> {
        let token = Token::from(access);
        let current = self.current.load_full();
        if let Some(entry) = &current
            && match kind {
                RefreshKind::Ahead => token.expires_on() <= entry.token.expires_on(),
                RefreshKind::Forced => token.secret() == entry.token.secret(),
            }
        {
            return if now < entry.usable_until {
                Ok(Accepted::NoProgress(entry.token.clone()))
            } else {
                Err(Arc::new(azure_core::Error::with_message(
                    ErrorKind::Credential,
                    "the credential returned no token newer than the expired one",
                )))
            };
        }
        let Some(expires) = system_time(token.expires_on()) else {
            return Err(Arc::new(azure_core::Error::with_message(
                ErrorKind::Credential,
                format!(
                    "the credential returned a token that expires at {}, which this system's clock cannot represent",
                    token.expires_on()
                ),
            )));
        };
        let (refresh_at, usable_until) = self.policy.schedule(expires, now, unit_random());
        if now >= usable_until {
            return Err(Arc::new(azure_core::Error::with_message(
                ErrorKind::Credential,
                format!(
                    "the credential returned a token that expires at {}, too soon to use",
                    token.expires_on()
                ),
            )));
        }
        // Exactly: a trailing `/` is enough for the server to refuse the token.
        if let Some(audience) = token.audience() {
            let expected = resource_for_scope(&self.scope);
            if audience != expected {
                tracing::warn!(
                    audience,
                    expected,
                    "the token's audience is not exactly the requested resource; the server will \
                     likely refuse it"
                );
            }
        }
        tracing::info!(
            expires_on = %token.expires_on(),
            refresh_in_s = refresh_at.duration_since(now).unwrap_or_default().as_secs(),
            username = token.username().unwrap_or("-"),
            "access token refreshed"
        );
        self.current.store(Some(Arc::new(Entry {
            token: token.clone(),
            refresh_at,
            usable_until,
        })));
        // After the store: a reader that sees the new generation also sees the new entry.
        self.generation.fetch_add(1, Ordering::Release);
        self.updates.send_replace(Some(token.clone()));
        Ok(Accepted::New(token))
    }

    /// When the background task should next act.
    fn next_due(&self, state: &RefreshState, now: SystemTime) -> SystemTime {
        let due = self
            .current
            .load()
            .as_deref()
            .map_or(now, |entry| entry.refresh_at);
        state.not_before.map_or(due, |backoff| due.max(backoff))
    }
}

/// `random` forced into [0, 1]: `mul_f64` panics on NaN and on results past `Duration::MAX`.
fn unit(random: f64) -> f64 {
    if random.is_nan() {
        0.0
    } else {
        random.clamp(0.0, 1.0)
    }
}

/// A wall-clock time as `SystemTime`, or `None` when the platform cannot hold it (`time` dates
/// reach years ±9999; converting with `From` panics where `SystemTime` is narrower).
fn system_time(at: OffsetDateTime) -> Option<SystemTime> {
    let seconds = at.unix_timestamp();
    let whole = Duration::from_secs(seconds.unsigned_abs());
    let time = if seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(whole)?
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(whole)?
    };
    time.checked_add(Duration::from_nanos(u64::from(at.nanosecond())))
}

enum Accepted {
    New(Token),
    NoProgress(Token),
}

/// Keeps the token fresh without callers asking; ends when the cache is dropped.
async fn keep_fresh(cache: Weak<Inner>, mut stop: watch::Receiver<()>) {
    loop {
        let step = {
            let Some(inner) = cache.upgrade() else {
                return;
            };
            let now = inner.clock.now();
            let mut state = inner.lock_state();
            let due = inner.next_due(&state, now);
            if due > now {
                Err(due
                    .duration_since(now)
                    .unwrap_or_default()
                    .min(BACKGROUND_MAX_SLEEP))
            } else {
                match &state.in_flight {
                    Some(refresh) => Ok(refresh.clone()),
                    None => match inner.start_refresh(&mut state, Trigger::Background) {
                        Ok(refresh) => Ok(refresh),
                        Err(_) => return,
                    },
                }
            }
        };
        match step {
            Ok(refresh) => {
                tokio::select! {
                    _ = refresh => {}
                    _ = stop.changed() => return,
                }
            }
            Err(wait) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Builds a [`TokenCache`].
pub struct TokenCacheBuilder {
    credential: Arc<dyn TokenCredential>,
    name: &'static str,
    credential_name: Option<CredentialName>,
    scope: String,
    policy: RefreshPolicy,
    clock: Arc<dyn Clock>,
    background: bool,
}

impl fmt::Debug for TokenCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCacheBuilder")
            .field("credential", &self.credential)
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("policy", &self.policy)
            .field("background", &self.background)
            .finish_non_exhaustive()
    }
}

impl TokenCacheBuilder {
    fn new(credential: Arc<dyn TokenCredential>) -> Self {
        Self {
            credential,
            name: "custom",
            credential_name: None,
            scope: PUBLIC_SCOPE.to_owned(),
            policy: RefreshPolicy {
                margin: DEFAULT_REFRESH_MARGIN,
                jitter: DEFAULT_REFRESH_JITTER,
                expiry_margin: DEFAULT_EXPIRY_MARGIN,
                min_backoff: DEFAULT_MIN_BACKOFF,
                max_backoff: DEFAULT_MAX_BACKOFF,
                refresh_timeout: DEFAULT_REFRESH_TIMEOUT,
                forced_interval: DEFAULT_FORCED_REFRESH_INTERVAL,
            },
            clock: Arc::new(SystemClock),
            background: false,
        }
    }

    /// What spans, metrics and [`Health`] call the credential (default `custom`): its kind,
    /// as `ManagedIdentityCredential` or `WorkloadIdentityCredential`. Never a secret.
    pub fn credential_name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Names the credential by asking `name` (a chain answers once a member has answered).
    pub(crate) fn credential_name_from(mut self, name: CredentialName) -> Self {
        self.credential_name = Some(name);
        self
    }

    /// The scope to request (default: the public cloud's, `https://ossrdbms-aad.database.windows.net/.default`).
    ///
    /// A resource (`https://ossrdbms-aad.database.windows.net`), the same with a trailing slash,
    /// or a `/.default` scope all mean the same: [`build`](Self::build) turns them into
    /// `<resource>/.default`, which every credential sends in its own form (the resource, with
    /// no trailing slash, to managed identity endpoints). Anything else is refused with a
    /// [`ConfigError`](crate::error::ConfigError) that shows the expected form.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// How long before expiry a token turns stale (default 5 minutes; at most half a token's
    /// lifetime is used). With the jitter, at most 24 hours: [`build`](Self::build) refuses
    /// more.
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.policy.margin = margin;
        self
    }

    /// The bound of the random extra margin added per token (default 60 s; zero for none).
    pub fn refresh_jitter(mut self, jitter: Duration) -> Self {
        self.policy.jitter = jitter;
        self
    }

    /// How long before expiry a token stops being handed out (default 30 s; at most a quarter
    /// of a token's lifetime is used).
    pub fn expiry_margin(mut self, margin: Duration) -> Self {
        self.policy.expiry_margin = margin;
        self
    }

    /// The first and the largest wait after failed refreshes (defaults 1 s and 60 s; the
    /// largest at most 24 hours).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.policy.min_backoff = min;
        self.policy.max_backoff = max;
        self
    }

    /// The limit on one credential call (default 120 s, at most 24 hours).
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.policy.refresh_timeout = timeout;
        self
    }

    /// The shortest time between two refreshes forced by refused logins (default 30 s, at most
    /// 24 hours); see
    /// [`TokenCache::refresh_rejected`].
    pub fn forced_refresh_interval(mut self, interval: Duration) -> Self {
        self.policy.forced_interval = interval;
        self
    }

    /// The clock that decides freshness (default: the system's wall clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Keep the token fresh from a background task instead of on demand (default: on demand).
    /// The task fetches the first token at once and ends when the cache is dropped. Needs a
    /// Tokio runtime when [`build`](Self::build) is called.
    pub fn background_refresh(mut self, enabled: bool) -> Self {
        self.background = enabled;
        self
    }

    /// Checks the settings and builds the cache.
    pub fn build(self) -> Result<TokenCache, Error> {
        let policy = self.policy;
        let scope = Scope::parse(&self.scope)
            .map_err(|problem| Error::invalid("scope", problem))?
            .scope();
        if policy.margin <= policy.expiry_margin {
            return Err(Error::conflict(
                "refresh_margin",
                format!(
                    "the refresh margin ({:?}) must be longer than the expiry margin ({:?}), or callers \
                 would wait for every refresh",
                    policy.margin, policy.expiry_margin
                ),
            ));
        }
        if policy.min_backoff.is_zero() || policy.min_backoff > policy.max_backoff {
            return Err(Error::invalid(
                "backoff",
                "the backoff must be positive and its minimum no larger than its maximum",
            ));
        }
        if policy.refresh_timeout.is_zero() {
            return Err(Error::invalid(
                "refresh_timeout",
                "the refresh timeout must be positive",
            ));
        }
        let too_long = [
            (
                "refresh margin plus jitter",
                policy.margin.saturating_add(policy.jitter),
            ),
            ("maximum backoff", policy.max_backoff),
            ("refresh timeout", policy.refresh_timeout),
            ("forced refresh interval", policy.forced_interval),
        ]
        .into_iter()
        .find(|(_, value)| *value > LONGEST_TOKEN_LIFETIME);
        if let Some((setting, value)) = too_long {
            return Err(Error::invalid(
                setting.replace(' ', "_"),
                format!(
                    "the {setting} ({value:?}) is longer than any Entra token lives (24 hours); \
                 use a shorter one"
                ),
            ));
        }
        let runtime = if self.background {
            Some(tokio::runtime::Handle::try_current().map_err(|_| {
                Error::missing(
                    "Tokio runtime",
                    "background refresh needs a Tokio runtime when the cache is built",
                )
            })?)
        } else {
            None
        };
        let (stop, stopped) = watch::channel(());
        let inner = Arc::new(Inner {
            credential: self.credential,
            credential_name: self.credential_name,
            fallback_name: self.name,
            scope,
            policy,
            clock: self.clock,
            generation: AtomicU64::new(0),
            current: ArcSwapOption::empty(),
            state: Mutex::new(RefreshState::default()),
            updates: watch::Sender::new(None),
            _stop_background: runtime.is_some().then_some(stop),
        });
        if let Some(runtime) = runtime {
            runtime.spawn(keep_fresh(Arc::downgrade(&inner), stopped));
        }
        Ok(TokenCache { inner })
    }
}

mod health;
mod per_thread;
pub(crate) mod registry;

pub use health::{Health, RefreshResult};
#[cfg(test)]
mod tests;
