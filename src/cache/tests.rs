//! The cache's state machine, driven by a manual clock and a scripted in-process credential.
//! (The HTTP credentials have their own tests against a real endpoint.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use azure_core::credentials::TokenRequestOptions;
use futures_util::FutureExt as _;
use tokio::sync::Semaphore;

use super::per_thread;
use super::*;
use crate::clock::ManualClock;

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
enum Step {
    /// A token valid for this long from the clock's now.
    Token(Duration),
    /// The same expiry as the previous token.
    SameExpiry,
    /// The previous token again (a credential with its own cache).
    Repeat,
    Fail,
    Panic,
    Hang,
    /// A token that expires at this instant, however far away.
    ExpiresAt(azure_core::time::OffsetDateTime),
}

/// Answers from a script (then with one-hour tokens), optionally held at a gate.
#[derive(Debug)]
struct ScriptedCredential {
    clock: ManualClock,
    script: Mutex<VecDeque<Step>>,
    calls: AtomicUsize,
    issued: AtomicUsize,
    last_expiry: Mutex<Option<azure_core::time::OffsetDateTime>>,
    gate: Option<Arc<Semaphore>>,
}

impl ScriptedCredential {
    fn new(clock: &ManualClock, script: impl IntoIterator<Item = Step>) -> Self {
        Self {
            clock: clock.clone(),
            script: Mutex::new(script.into_iter().collect()),
            calls: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            last_expiry: Mutex::new(None),
            gate: None,
        }
    }

    fn gated(mut self, gate: &Arc<Semaphore>) -> Self {
        self.gate = Some(Arc::clone(gate));
        self
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl TokenCredential for ScriptedCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        assert_eq!(scopes, [PUBLIC_SCOPE]);
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let step = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Step::Token(HOUR));
        if matches!(step, Step::Panic) {
            panic!("scripted panic");
        }
        let mut last = self.last_expiry.lock().unwrap();
        if matches!(step, Step::Repeat) {
            let n = self.issued.load(Ordering::SeqCst) - 1;
            return Ok(AccessToken::new(format!("token-{n}"), last.unwrap()));
        }
        let expires_on = match step {
            Step::Token(lifetime) => {
                azure_core::time::OffsetDateTime::from(self.clock.now() + lifetime)
            }
            Step::SameExpiry => last.expect("a previous token"),
            Step::ExpiresAt(at) => at,
            Step::Fail => {
                return Err(azure_core::Error::with_message(
                    ErrorKind::Credential,
                    "scripted failure",
                ));
            }
            Step::Panic | Step::Repeat => unreachable!(),
            Step::Hang => {
                drop(last);
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        *last = Some(expires_on);
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        Ok(AccessToken::new(format!("token-{n}"), expires_on))
    }
}

fn cache(clock: &ManualClock, credential: &Arc<ScriptedCredential>) -> TokenCache {
    TokenCache::builder(Arc::clone(credential) as Arc<dyn TokenCredential>)
        .clock(Arc::new(clock.clone()))
        .refresh_jitter(Duration::ZERO)
        .build()
        .unwrap()
}

fn secret(token: &Token) -> &str {
    token.secret()
}

#[tokio::test]
async fn fresh_token_is_served_without_asking_again() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(&clock, []));
    let cache = cache(&clock, &credential);
    let first = cache.token().await.unwrap();
    clock.advance(HOUR - DEFAULT_REFRESH_MARGIN - Duration::from_secs(1));
    let again = cache.token().await.unwrap();
    assert_eq!(secret(&first), secret(&again));
    assert_eq!(credential.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_herd_shares_one_credential_call() {
    let clock = ManualClock::starting_now();
    let gate = Arc::new(Semaphore::new(0));
    let credential = Arc::new(ScriptedCredential::new(&clock, []).gated(&gate));
    let cache = cache(&clock, &credential);
    let callers: Vec<_> = (0..1000)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.token().await })
        })
        .collect();
    while credential.calls() == 0 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    for caller in callers {
        assert_eq!(secret(&caller.await.unwrap().unwrap()), "token-0");
    }
    assert_eq!(credential.calls(), 1);
}

#[tokio::test]
async fn stale_window_answers_at_once_while_one_refresh_runs() {
    let clock = ManualClock::starting_now();
    let gate = Arc::new(Semaphore::new(1));
    let credential = Arc::new(ScriptedCredential::new(&clock, []).gated(&gate));
    let cache = cache(&clock, &credential);
    assert_eq!(secret(&cache.token().await.unwrap()), "token-0");

    clock.advance(HOUR - DEFAULT_REFRESH_MARGIN + Duration::from_secs(1));
    for _ in 0..100 {
        // `now_or_never`: the answer must be ready on the first poll, without waiting.
        let token = cache
            .token()
            .now_or_never()
            .expect("answered at once")
            .unwrap();
        assert_eq!(secret(&token), "token-0");
    }
    // Let the spawned refresh reach the gate: exactly one is waiting there.
    while credential.calls() < 2 {
        tokio::task::yield_now().await;
    }
    assert_eq!(credential.calls(), 2);

    gate.add_permits(1);
    while secret(&cache.cached().unwrap()) != "token-1" {
        tokio::task::yield_now().await;
    }
    assert_eq!(secret(&cache.token().await.unwrap()), "token-1");
    assert_eq!(credential.calls(), 2);
}

#[tokio::test]
async fn failing_refresh_keeps_serving_the_valid_token_and_backs_off() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(
        &clock,
        [Step::Token(HOUR), Step::Fail, Step::Fail],
    ));
    let cache = cache(&clock, &credential);
    cache.token().await.unwrap();
    clock.advance(HOUR - DEFAULT_REFRESH_MARGIN + Duration::from_secs(1));

    assert_eq!(secret(&cache.token().await.unwrap()), "token-0");
    settle(&cache, &credential, 2).await;
    // Backing off: more calls in the stale window do not reach the credential.
    for _ in 0..50 {
        assert_eq!(secret(&cache.token().await.unwrap()), "token-0");
    }
    tokio::task::yield_now().await;
    assert_eq!(credential.calls(), 2);

    // The first backoff is at most DEFAULT_MIN_BACKOFF; after it, one more attempt (fails).
    clock.advance(DEFAULT_MIN_BACKOFF);
    assert_eq!(secret(&cache.token().await.unwrap()), "token-0");
    settle(&cache, &credential, 3).await;
    // The second backoff is longer than the first one's jitter floor allows to skip.
    clock.advance(DEFAULT_MIN_BACKOFF / 2);
    cache.token().await.unwrap();
    tokio::task::yield_now().await;
    assert_eq!(credential.calls(), 3);

    // Heals: the next allowed attempt replaces the token.
    clock.advance(2 * DEFAULT_MIN_BACKOFF);
    cache.token().await.unwrap();
    settle(&cache, &credential, 4).await;
    assert_eq!(secret(&cache.token().await.unwrap()), "token-1");
}

#[tokio::test]
async fn expired_token_with_failing_credential_is_a_fast_typed_error_then_recovers() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(
        &clock,
        [Step::Token(HOUR), Step::Fail],
    ));
    let cache = cache(&clock, &credential);
    let first = cache.token().await.unwrap();
    clock.advance(HOUR);

    let error = cache.token().await.unwrap_err();
    let Error::TokenExpired {
        expired_at,
        last_cause: Some(cause),
    } = &error
    else {
        panic!("expected TokenExpired with a cause, got {error:?}");
    };
    assert_eq!(*expired_at, first.expires_on());
    assert!(cause.to_string().contains("scripted failure"));

    // While backing off: the same error at once, and no call to the credential.
    for _ in 0..100 {
        let again = cache.token().now_or_never().expect("at once").unwrap_err();
        assert!(matches!(again, Error::TokenExpired { .. }));
    }
    assert_eq!(credential.calls(), 2);

    clock.advance(DEFAULT_MIN_BACKOFF);
    assert_eq!(secret(&cache.token().await.unwrap()), "token-1");
    assert_eq!(credential.calls(), 3);
}

#[tokio::test]
async fn first_failure_is_a_credential_error_and_is_not_retried_during_backoff() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(&clock, [Step::Fail]));
    let cache = cache(&clock, &credential);
    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, Error::TokenUnavailable { .. }), "{error:?}");
    assert!(matches!(
        cache.token().await.unwrap_err(),
        Error::TokenUnavailable { .. }
    ));
    assert_eq!(credential.calls(), 1);
    clock.advance(DEFAULT_MIN_BACKOFF);
    cache.token().await.unwrap();
}

#[tokio::test]
async fn a_refresh_that_makes_no_progress_does_not_loop() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(
        &clock,
        [Step::Token(HOUR), Step::SameExpiry, Step::SameExpiry],
    ));
    let cache = cache(&clock, &credential);
    cache.token().await.unwrap();
    clock.advance(HOUR - DEFAULT_REFRESH_MARGIN + Duration::from_secs(1));
    for _ in 0..20 {
        cache.token().await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(credential.calls(), 2, "one refresh, then backoff");
    assert_eq!(secret(&cache.token().await.unwrap()), "token-0");
}

#[tokio::test]
async fn a_caller_that_gives_up_does_not_cancel_the_refresh() {
    let clock = ManualClock::starting_now();
    let gate = Arc::new(Semaphore::new(0));
    let credential = Arc::new(ScriptedCredential::new(&clock, []).gated(&gate));
    let cache = cache(&clock, &credential);
    let gave_up = tokio::time::timeout(Duration::from_millis(5), cache.token()).await;
    assert!(gave_up.is_err());
    gate.add_permits(1);
    settle(&cache, &credential, 1).await;
    assert_eq!(secret(&cache.token().await.unwrap()), "token-0");
    assert_eq!(credential.calls(), 1);
}

#[tokio::test]
async fn a_token_expired_on_arrival_is_refused() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(
        &clock,
        [Step::Token(Duration::ZERO)],
    ));
    let cache = cache(&clock, &credential);
    let error = cache.token().await.unwrap_err();
    let text = format!("{:?}", std::error::Error::source(&error));
    assert!(text.contains("too soon to use"), "{text}");
    assert!(cache.cached().is_none());
}

#[tokio::test]
async fn a_panicking_credential_does_not_wedge_the_cache() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(&clock, [Step::Panic]));
    let cache = cache(&clock, &credential);
    assert!(cache.token().await.is_err());
    clock.advance(DEFAULT_MIN_BACKOFF);
    assert_eq!(secret(&cache.token().await.unwrap()), "token-0");
}

#[tokio::test(start_paused = true)]
async fn a_hung_credential_times_out() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(&clock, [Step::Hang]));
    let cache = cache(&clock, &credential);
    let error = cache.token().await.unwrap_err();
    let cause = std::error::Error::source(&error).unwrap().to_string();
    assert!(cause.contains("did not answer within"), "{cause}");
    clock.advance(DEFAULT_MIN_BACKOFF);
    assert!(cache.token().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn background_refresh_keeps_the_token_fresh_and_stops_with_the_cache() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(&clock, []));
    let cache = TokenCache::builder(Arc::clone(&credential) as Arc<dyn TokenCredential>)
        .clock(Arc::new(clock.clone()))
        .refresh_jitter(Duration::ZERO)
        .background_refresh(true)
        .build()
        .unwrap();
    settle(&cache, &credential, 1).await;

    clock.advance(HOUR - DEFAULT_REFRESH_MARGIN);
    tokio::time::sleep(BACKGROUND_MAX_SLEEP).await;
    settle(&cache, &credential, 2).await;
    while secret(&cache.cached().unwrap()) != "token-1" {
        tokio::task::yield_now().await;
    }
    // The caller never had to trigger anything: the token it gets is fresh.
    assert_eq!(
        secret(&cache.token().now_or_never().unwrap().unwrap()),
        "token-1"
    );

    drop(cache);
    clock.advance(10 * HOUR);
    tokio::time::sleep(10 * BACKGROUND_MAX_SLEEP).await;
    assert_eq!(credential.calls(), 2);
    assert_eq!(
        Arc::strong_count(&credential),
        1,
        "the task let go of the cache"
    );
}

#[tokio::test]
async fn the_fresh_path_takes_no_lock() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(&clock, []));
    let cache = cache(&clock, &credential);
    cache.token().await.unwrap();
    let _held = cache.inner.state.lock().unwrap();
    let token = cache.token().now_or_never().expect("no wait").unwrap();
    assert_eq!(secret(&token), "token-0");
    let borrowed = cache
        .with_token(|token| token.secret().to_owned())
        .now_or_never()
        .expect("no wait")
        .unwrap();
    assert_eq!(borrowed, "token-0");
}

#[tokio::test]
async fn a_borrowed_read_moves_no_reference_count_and_follows_the_cache() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(
        &clock,
        [Step::Token(HOUR), Step::Token(2 * HOUR)],
    ));
    let cache = cache(&clock, &credential);
    let owned = cache.token().await.unwrap();
    let read = || {
        cache
            .with_token(|token| token.secret().to_owned())
            .now_or_never()
            .expect("ready at once")
            .unwrap()
    };
    assert_eq!(read(), "token-0");
    // This thread now holds its own reference to the entry; later reads move no count.
    let count = || Arc::strong_count(&owned.inner);
    let entries = || Arc::strong_count(&cache.inner.current.load_full().unwrap()) - 1;
    let (tokens_before, entries_before) = (count(), entries());
    assert_eq!(per_thread::slots_on_this_thread(), 1);
    for _ in 0..100 {
        assert_eq!(read(), "token-0");
    }
    assert_eq!((count(), entries()), (tokens_before, entries_before));
    // Stale: still served at once while the refresh runs; then the new token, not the old one.
    clock.advance(HOUR - Duration::from_secs(60));
    assert_eq!(read(), "token-0");
    settle(&cache, &credential, 2).await;
    assert_eq!(read(), "token-1");
    assert_eq!(per_thread::slots_on_this_thread(), 1);
    // A dropped cache's reference is forgotten when this thread next remembers one.
    let other = self::cache(&clock, &Arc::new(ScriptedCredential::new(&clock, [])));
    other.token().await.unwrap();
    drop(cache);
    other.with_token(|_| ()).await.unwrap();
    assert_eq!(per_thread::slots_on_this_thread(), 1);
}

#[test]
fn schedule_for_long_and_short_tokens() {
    let policy = TokenCacheBuilder::new(Arc::new(ScriptedCredential::new(
        &ManualClock::starting_now(),
        [],
    )))
    .policy;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);

    let (refresh_at, usable_until) = policy.schedule(now + 24 * HOUR, now, 0.5);
    assert_eq!(
        refresh_at,
        now + 24 * HOUR - Duration::from_secs(5 * 60 + 30)
    );
    assert_eq!(usable_until, now + 24 * HOUR - DEFAULT_EXPIRY_MARGIN);

    let minute = Duration::from_secs(60);
    let (refresh_at, usable_until) = policy.schedule(now + minute, now, 0.9);
    assert_eq!(refresh_at, now + minute / 2);
    assert_eq!(usable_until, now + minute - minute / 4);
}

#[test]
fn backoff_doubles_and_caps() {
    let policy = TokenCacheBuilder::new(Arc::new(ScriptedCredential::new(
        &ManualClock::starting_now(),
        [],
    )))
    .policy;
    let top = |n| policy.backoff(n, 0.999_999);
    assert!(top(1) <= Duration::from_secs(1));
    assert!(top(2) > Duration::from_millis(1990) && top(2) <= Duration::from_secs(2));
    assert!(top(10) <= DEFAULT_MAX_BACKOFF);
    assert_eq!(policy.backoff(3, 0.0), Duration::from_secs(2));
}

#[test]
fn builder_refuses_settings_no_token_can_satisfy() {
    let credential: Arc<dyn TokenCredential> =
        Arc::new(ScriptedCredential::new(&ManualClock::starting_now(), []));
    let day = Duration::from_secs(24 * 3600);
    type Setting = fn(TokenCacheBuilder) -> TokenCacheBuilder;
    let settings: [(&str, Setting); 5] = [
        ("refresh margin", |b| {
            b.refresh_margin(Duration::from_secs(25 * 3600))
        }),
        ("refresh margin", |b| b.refresh_jitter(Duration::MAX)),
        ("maximum backoff", |b| {
            b.backoff(Duration::from_secs(1), Duration::MAX)
        }),
        ("refresh timeout", |b| b.refresh_timeout(Duration::MAX)),
        ("forced refresh interval", |b| {
            b.forced_refresh_interval(Duration::MAX)
        }),
    ];
    for (name, setting) in settings {
        let error = setting(TokenCache::builder(Arc::clone(&credential)))
            .build()
            .unwrap_err();
        assert!(matches!(error, Error::Config(_)), "{name}: {error:?}");
        assert!(error.to_string().contains(name), "{name}: {error}");
    }
    // A day exactly is allowed.
    TokenCache::builder(credential)
        .refresh_margin(day - DEFAULT_REFRESH_JITTER)
        .backoff(Duration::from_secs(1), day)
        .build()
        .unwrap();
}

#[tokio::test]
async fn far_and_ancient_expiries_are_handled_without_panicking() {
    use azure_core::time::OffsetDateTime;
    let clock = ManualClock::starting_now();
    let far = OffsetDateTime::parse(
        "9999-12-31T23:59:59Z",
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ancient = OffsetDateTime::from_unix_timestamp(-377_705_116_800).unwrap();
    let credential = Arc::new(ScriptedCredential::new(
        &clock,
        [Step::ExpiresAt(ancient), Step::ExpiresAt(far)],
    ));
    let cache = cache(&clock, &credential);
    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, Error::TokenUnavailable { .. }), "{error:?}");
    clock.advance(DEFAULT_MAX_BACKOFF);
    assert_eq!(cache.token().await.unwrap().expires_on(), far);
}

/// A refresh whose runtime shuts down under it (a cache shared by the process outlives any
/// one runtime): the next caller, on a live runtime, gets a token from a new refresh, with no
/// backoff in between.
#[tokio::test]
async fn a_refresh_cancelled_with_its_runtime_is_run_again_by_the_next_caller() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(&clock, [Step::Hang]));
    let cache = cache(&clock, &credential);
    // The refresh is spawned on another runtime, which then shuts down under it.
    let (elsewhere, called) = (cache.clone(), Arc::clone(&credential));
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Until the refresh task has called the (hanging) credential.
            tokio::select! {
                _ = elsewhere.token() => panic!("the credential hangs"),
                _ = async { while called.calls() == 0 { tokio::task::yield_now().await } } => {}
            }
        });
    })
    .join()
    .unwrap();
    assert_eq!(credential.calls(), 1);
    // This caller finds the cancelled refresh and runs a new one on its own runtime.
    assert_eq!(secret(&cache.token().await.unwrap()), "token-0");
    assert_eq!(credential.calls(), 2);
}

#[test]
fn builder_refuses_margins_that_would_block_callers() {
    let credential: Arc<dyn TokenCredential> =
        Arc::new(ScriptedCredential::new(&ManualClock::starting_now(), []));
    let error = TokenCache::builder(credential)
        .refresh_margin(Duration::from_secs(10))
        .build()
        .unwrap_err();
    assert!(matches!(error, Error::Config(_)));
}

/// Waits until the credential has been called `calls` times and no refresh is in flight.
async fn settle(cache: &TokenCache, credential: &ScriptedCredential, calls: usize) {
    while credential.calls() < calls || cache.inner.lock_state().in_flight.is_some() {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_refused_token_forces_one_shared_refresh() {
    let clock = ManualClock::starting_now();
    let gate = Arc::new(Semaphore::new(1));
    let credential = Arc::new(ScriptedCredential::new(&clock, []).gated(&gate));
    let cache = cache(&clock, &credential);
    let refused = cache.token().await.unwrap();

    let retries: Vec<_> = (0..10)
        .map(|_| {
            let cache = cache.clone();
            let refused = refused.clone();
            tokio::spawn(async move { cache.refresh_rejected(&refused).await })
        })
        .collect();
    tokio::task::yield_now().await;
    gate.add_permits(1);
    for retry in retries {
        let token = retry.await.unwrap().unwrap().expect("a new token");
        assert_eq!(secret(&token), "token-1");
    }
    assert_eq!(credential.calls(), 2);
    // A latecomer still holding the refused token gets the new one without a call.
    let late = cache.refresh_rejected(&refused).await.unwrap().unwrap();
    assert_eq!(secret(&late), "token-1");
    assert_eq!(credential.calls(), 2);
    assert_eq!(secret(&cache.token().await.unwrap()), "token-1");
}

#[tokio::test]
async fn forced_refreshes_are_rate_limited() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(&clock, []));
    let cache = TokenCache::builder(Arc::clone(&credential) as Arc<dyn TokenCredential>)
        .clock(Arc::new(clock.clone()))
        .forced_refresh_interval(Duration::from_secs(30))
        .build()
        .unwrap();
    let first = cache.token().await.unwrap();
    let second = cache.refresh_rejected(&first).await.unwrap().unwrap();
    assert_eq!(credential.calls(), 2);

    // The new token is refused too (a misconfigured role): no second call within the interval.
    assert!(cache.refresh_rejected(&second).await.unwrap().is_none());
    clock.advance(Duration::from_secs(29));
    assert!(cache.refresh_rejected(&second).await.unwrap().is_none());
    assert_eq!(credential.calls(), 2);

    clock.advance(Duration::from_secs(1));
    let third = cache.refresh_rejected(&second).await.unwrap().unwrap();
    assert_eq!(secret(&third), "token-2");
    assert_eq!(credential.calls(), 3);
}

#[tokio::test]
async fn a_credential_that_repeats_the_refused_token_gives_nothing_to_retry() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(
        &clock,
        [Step::Token(HOUR), Step::Repeat],
    ));
    let cache = cache(&clock, &credential);
    let refused = cache.token().await.unwrap();
    assert!(cache.refresh_rejected(&refused).await.unwrap().is_none());
    assert_eq!(credential.calls(), 2);
    // The cache keeps serving the token it has; the caller reports the login failure.
    assert_eq!(secret(&cache.token().await.unwrap()), "token-0");
}

#[tokio::test]
async fn a_forced_refresh_takes_a_different_token_with_the_same_expiry() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(
        &clock,
        [Step::Token(HOUR), Step::SameExpiry],
    ));
    let cache = cache(&clock, &credential);
    let refused = cache.token().await.unwrap();
    let next = cache.refresh_rejected(&refused).await.unwrap().unwrap();
    assert_eq!(secret(&next), "token-1");
    assert_eq!(secret(&cache.token().await.unwrap()), "token-1");
}

#[tokio::test]
async fn a_forced_refresh_ignores_the_backoff_and_reports_its_failure() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(
        &clock,
        [Step::Token(HOUR), Step::Fail, Step::Fail, Step::Token(HOUR)],
    ));
    let cache = TokenCache::builder(Arc::clone(&credential) as Arc<dyn TokenCredential>)
        .clock(Arc::new(clock.clone()))
        .refresh_jitter(Duration::ZERO)
        .forced_refresh_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let refused = cache.token().await.unwrap();
    // Stale: the background refresh fails and the cache backs off.
    clock.advance(HOUR - Duration::from_secs(120));
    cache.token().await.unwrap();
    settle(&cache, &credential, 2).await;

    let error = cache.refresh_rejected(&refused).await.unwrap_err();
    assert!(matches!(error, Error::TokenUnavailable { .. }), "{error:?}");
    assert_eq!(credential.calls(), 3);
    clock.advance(Duration::from_secs(1));
    let next = cache.refresh_rejected(&refused).await.unwrap().unwrap();
    assert_eq!(secret(&next), "token-1");
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Durations up to a day: what the builder lets through.
    fn allowed() -> impl Strategy<Value = Duration> {
        (0u64..=24 * 3600 * 1000).prop_map(Duration::from_millis)
    }

    proptest! {
        #[test]
        fn schedules_and_backoffs_never_panic(
            margin in allowed(), jitter in allowed(), expiry_margin in allowed(),
            min in allowed(), max in allowed(), random in any::<f64>(), failures in any::<u32>(),
            now_s in 0u64..=253_402_300_799, expires_s in 0u64..=253_402_300_799,
        ) {
            let policy = RefreshPolicy {
                margin,
                jitter,
                expiry_margin,
                min_backoff: min,
                max_backoff: max,
                refresh_timeout: DEFAULT_REFRESH_TIMEOUT,
                forced_interval: DEFAULT_FORCED_REFRESH_INTERVAL,
            };
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_s);
            let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(expires_s);
            let (refresh_at, usable_until) = policy.schedule(expires, now, random);
            prop_assert!(refresh_at <= usable_until || expires <= now);
            prop_assert!(policy.backoff(failures, random) <= max.max(min));
        }
    }
}

#[tokio::test]
async fn listeners_hear_each_stored_token_and_stop_with_the_cache() {
    let clock = ManualClock::starting_now();
    let credential = Arc::new(ScriptedCredential::new(&clock, [Step::Fail]));
    let cache = cache(&clock, &credential);
    let mut updates = cache.updates();

    // A failed refresh stores nothing, so there is nothing to hear.
    assert!(cache.token().await.is_err());
    assert!(updates.next().now_or_never().is_none());

    clock.advance(Duration::from_secs(2)); // past the first backoff
    let first = cache.token().await.unwrap();
    assert_eq!(secret(&updates.next().await.unwrap()), secret(&first));
    // Heard once: a fresh token served again is no news.
    assert_eq!(secret(&cache.token().await.unwrap()), secret(&first));
    assert!(updates.next().now_or_never().is_none());

    let forced = cache.refresh_rejected(&first).await.unwrap().unwrap();
    // A listener made late starts from the next token, not the current one.
    let mut late = cache.updates();
    assert_eq!(secret(&updates.next().await.unwrap()), secret(&forced));
    assert!(late.next().now_or_never().is_none());

    drop(cache);
    assert!(updates.next().await.is_none());
    assert!(late.next().await.is_none());
}

/// An endpoint that serves its own cached token (expiring at t0 + 360 s) until its renewal
/// point (t0 + 300 s as in the report, and as late as t0 + 329 s), then new ones: the cache's
/// backoff after each no-progress refresh never runs past the point where the token stops
/// being usable (t0 + 330 s), so no caller is ever refused, second by second over the whole
/// stretch, on the manual clock with default settings.
#[tokio::test]
async fn a_token_the_endpoint_keeps_serving_is_replaced_before_it_becomes_unusable() {
    for renewal in [300, 329] {
        the_endpoint_renews_at(Duration::from_secs(renewal)).await;
    }
}

async fn the_endpoint_renews_at(renewal: Duration) {
    #[derive(Debug)]
    struct RenewsLate {
        clock: ManualClock,
        renews_at: SystemTime,
        start: SystemTime,
        calls: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl TokenCredential for RenewsLate {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.clock.now();
            let at = |t: SystemTime| azure_core::time::OffsetDateTime::from(t);
            if now < self.renews_at {
                Ok(AccessToken::new(
                    "served-from-the-endpoints-cache",
                    at(self.start + Duration::from_secs(360)),
                ))
            } else {
                Ok(AccessToken::new(format!("renewed-{n}"), at(now + HOUR)))
            }
        }
    }

    let clock = ManualClock::starting_now();
    let credential = Arc::new(RenewsLate {
        clock: clock.clone(),
        renews_at: clock.now() + renewal,
        start: clock.now(),
        calls: AtomicUsize::new(0),
    });
    let cache = TokenCache::builder(Arc::clone(&credential) as Arc<dyn TokenCredential>)
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let mut refused = Vec::new();
    for second in 0..=420u64 {
        if let Err(error) = cache.token().await {
            refused.push((second, error.to_string()));
        }
        // Let a background refresh run to its end.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        clock.advance(Duration::from_secs(1));
    }
    assert!(
        refused.is_empty(),
        "renewal at {renewal:?}, refused: {refused:?}"
    );
    assert!(secret(&cache.token().await.unwrap()).starts_with("renewed-"));
    // Backing off still: a few dozen attempts over seven minutes, not one per second.
    let calls = credential.calls.load(Ordering::SeqCst);
    assert!(calls < 30, "{calls} calls");
}
