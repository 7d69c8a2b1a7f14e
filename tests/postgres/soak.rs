//! A pool workload on a bad day: both pools (deadpool and bb8, 16 workers each on a pool of 8,
//! short-lived connections, 6 s tokens) while the identity endpoint answers 503 in a burst,
//! 429 with `Retry-After`, 410 for a few seconds and takes 2.5 s for one token; PostgreSQL is
//! stopped for a few seconds and started again; and one token is revoked behind the cache.
//!
//! Nothing may be lost: every query outside the server's down window succeeds, those inside
//! it fail with typed errors, the pools recover within seconds of the restart on their own,
//! identity requests stay bounded, and no token reaches a log line at TRACE.
//!
//! `soak_with_faults` runs 30 s in the normal test run; `soak_with_faults_long` (ignored;
//! `cargo test --all-features --test postgres -- --ignored soak --nocapture`) runs the same
//! fault cycle for 5 minutes and prints the figures the README's Reliability table shows.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_entra::Error;
use pg_entra::pool::deadpool::Runtime;
use pg_entra::pool::deadpool::managed::{Pool, PoolError};
use pg_entra::pool::{Bb8Manager, DeadpoolManager, DeadpoolPool};
use pg_entra::testing::{Reply, TestBed};
use time::OffsetDateTime;

use super::Captured;

const WORKERS_PER_POOL: usize = 16;
const POOL_SIZE: u32 = 8;
const TOKEN_LIFETIME: Duration = Duration::from_secs(6);
/// How soon after PostgreSQL is back every pool must be serving again.
const RECOVERY_BOUND: Duration = Duration::from_secs(5);
/// One round of identity-endpoint faults.
const CYCLE: Duration = Duration::from_secs(30);

#[test]
fn soak_with_faults() {
    let report = soak(Duration::from_secs(30));
    eprintln!("{report}");
}

#[test]
#[ignore = "five minutes; run for the README's Reliability figures"]
fn soak_with_faults_long() {
    let report = soak(Duration::from_secs(300));
    println!("{report}");
}

/// What one pool worker saw of one checkout and query.
struct Outcome {
    started: Instant,
    finished: Instant,
    /// `None` on success; else the kind of typed error.
    failure: Option<String>,
}

/// What the run measured.
struct Report {
    duration: Duration,
    queries: usize,
    failures_inside: usize,
    failures_outside: usize,
    down_for: Duration,
    recovery: Duration,
    identity_requests: usize,
    request_bound: usize,
    tokens_issued: usize,
    scripted_faults: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "soak: {:?} with faults, both pools", self.duration)?;
        writeln!(f, "  queries:                       {}", self.queries)?;
        writeln!(
            f,
            "  failures inside the down window: {} (server down {:.1} s)",
            self.failures_inside,
            self.down_for.as_secs_f64()
        )?;
        writeln!(
            f,
            "  failures outside it:           {}",
            self.failures_outside
        )?;
        writeln!(
            f,
            "  recovery after the restart:    {:.2} s",
            self.recovery.as_secs_f64()
        )?;
        writeln!(
            f,
            "  identity requests:             {} (bound {}; {} of them scripted faults)",
            self.identity_requests, self.request_bound, self.scripted_faults
        )?;
        write!(f, "  tokens issued (rotations):     {}", self.tokens_issued)
    }
}

fn soak(duration: Duration) -> Report {
    // Every thread of this test's runtime logs at TRACE into `captured`, whatever the other
    // tests of this binary set as the global subscriber.
    let captured = Captured::default();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(captured.clone())
            .with_ansi(false)
            .finish(),
    );
    let runtime = super::logging_runtime(&dispatch);
    let _main = crate::log_to(&dispatch);
    let report = runtime.block_on(run(duration));
    drop(runtime);

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("access token refreshed"),
        "TRACE was captured"
    );
    let (report, tokens) = report;
    for token in &tokens {
        for part in token.split('.') {
            let needle = &part[part.len().saturating_sub(24)..];
            assert!(!logs.contains(needle), "part of a token reached the logs");
        }
    }
    report
}

async fn run(duration: Duration) -> (Report, HashSet<String>) {
    let bed = Arc::new(super::bed().await);
    bed.identity().set_token_lifetime(TOKEN_LIFETIME);
    let connector = bed.connector_builder().build().unwrap();
    connector.config().await.unwrap();
    let requests_before = bed.identity().requests();

    let deadpool: DeadpoolPool = Pool::builder(
        DeadpoolManager::new(connector.clone()).max_lifetime(Some(Duration::from_millis(500))),
    )
    .max_size(POOL_SIZE as usize)
    .runtime(Runtime::Tokio1)
    .wait_timeout(Some(Duration::from_secs(10)))
    .create_timeout(Some(Duration::from_secs(10)))
    .build()
    .unwrap();
    let bb8 = pg_entra::pool::bb8::Pool::builder()
        .max_size(POOL_SIZE)
        .max_lifetime(Some(Duration::from_millis(500)))
        .reaper_rate(Duration::from_millis(100))
        .connection_timeout(Duration::from_secs(10))
        .build(Bb8Manager::new(connector.clone()))
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..WORKERS_PER_POOL {
        let (pool, done, seen) = (deadpool.clone(), stop.clone(), outcomes.clone());
        workers.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let started = Instant::now();
                let failure = match pool.get().await {
                    Ok(client) => query(&client).await,
                    Err(PoolError::Backend(error)) => Some(format!("deadpool: {}", kind(&error))),
                    Err(other) => Some(format!("deadpool: {other}")),
                };
                record(&seen, started, failure);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
        let (pool, done, seen) = (bb8.clone(), stop.clone(), outcomes.clone());
        workers.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let started = Instant::now();
                let failure = match pool.get().await {
                    Ok(client) => query(&client).await,
                    Err(pg_entra::pool::bb8::RunError::User(error)) => {
                        Some(format!("bb8: {}", kind(&error)))
                    }
                    Err(pg_entra::pool::bb8::RunError::TimedOut) => Some("bb8: timed out".into()),
                };
                record(&seen, started, failure);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // Every token the cache hands out, to look for in the logs afterwards.
    let tokens = Arc::new(Mutex::new(HashSet::new()));
    let sampler = {
        let (connector, tokens, stop) = (connector.clone(), tokens.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(token) = connector.token_cache().cached() {
                    tokens.lock().unwrap().insert(token.secret().to_owned());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let (down, up, scripted_faults) = faults(&bed, duration).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("a worker panicked");
    }
    sampler.await.unwrap();

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    // Inside: from the stop until the pools have had time to notice the server is back.
    let inside = |o: &Outcome| o.finished >= down && o.started <= up + RECOVERY_BOUND;
    let mut failures_inside = 0;
    let mut outside = Vec::new();
    for outcome in &outcomes {
        match &outcome.failure {
            Some(failure) if inside(outcome) => {
                failures_inside += 1;
                // The bed's identity endpoint sets each token as the role's password before
                // it answers, so while PostgreSQL is down it cannot issue tokens either, and
                // the cached one may expire: `TokenExpired` is one of the typed errors here.
                assert!(
                    [
                        "PostgreSQL",
                        "closed",
                        "timed out",
                        "ConnectTimeout",
                        "expired"
                    ]
                    .iter()
                    .any(|kind| failure.contains(kind)),
                    "an unexpected kind of failure in the down window: {failure}"
                );
            }
            Some(failure) => outside.push(failure.clone()),
            None => {}
        }
    }
    assert!(
        outside.is_empty(),
        "{} queries failed outside the server's down window: {:?}",
        outside.len(),
        &outside[..outside.len().min(10)]
    );
    let recovery = outcomes
        .iter()
        .filter(|o| o.failure.is_none() && o.started >= up)
        .map(|o| o.finished.saturating_duration_since(up))
        .min()
        .expect("queries succeeded after the restart");
    assert!(
        recovery <= RECOVERY_BOUND,
        "the pools took {recovery:?} to recover"
    );

    // Rotations at half the lifetime, each a few requests at most under the scripted faults,
    // plus the forced refresh after the revocation and the refreshes the outage made fail.
    let identity_requests = bed.identity().requests() - requests_before;
    let rotations = (duration.as_secs_f64() / (TOKEN_LIFETIME.as_secs_f64() / 2.0)).ceil();
    let request_bound = 2 * rotations as usize + scripted_faults + 30;
    assert!(
        identity_requests <= request_bound,
        "{identity_requests} identity requests: a storm (bound {request_bound})"
    );
    let tokens_issued = bed.identity().tokens_issued();
    assert!(
        tokens_issued as f64 >= duration.as_secs_f64() / TOKEN_LIFETIME.as_secs_f64(),
        "only {tokens_issued} tokens in {duration:?} of {TOKEN_LIFETIME:?} tokens"
    );
    // The revocation was seen: a login was refused once, and the retry with a new token
    // worked (no failure outside the window).
    assert!(
        bed.postgres()
            .log()
            .contains("password authentication failed"),
        "the revoked token was never refused"
    );
    let tokens = std::mem::take(&mut *tokens.lock().unwrap());
    (
        Report {
            duration,
            queries: outcomes.len(),
            failures_inside,
            failures_outside: outside.len(),
            down_for: up.saturating_duration_since(down),
            recovery,
            identity_requests,
            request_bound,
            tokens_issued,
            scripted_faults,
        },
        tokens,
    )
}

/// Drives the faults for `duration`: a cycle of identity-endpoint faults every 30 s, the
/// PostgreSQL restart once in the middle of the first cycle, the revocation once after it.
/// Returns when the server went down and came back, and how many scripted faults there were.
async fn faults(bed: &Arc<TestBed>, duration: Duration) -> (Instant, Instant, usize) {
    let start = tokio::time::Instant::now();
    let at = |offset: Duration| tokio::time::sleep_until(start + offset);
    let mut scripted = 0;
    let (mut down, mut up) = (None, None);
    let mut cycle = Duration::ZERO;
    while cycle + CYCLE <= duration {
        at(cycle + Duration::from_secs(3)).await;
        bed.identity()
            .script(std::iter::repeat_n(Reply::status(503), 3));
        at(cycle + Duration::from_secs(6)).await;
        bed.identity().script([Reply::status(429).retry_after(1)]);
        at(cycle + Duration::from_secs(9)).await;
        // "Restarting" for about 3 s.
        bed.identity().script(std::iter::repeat_n(
            Reply::status(410).delay(Duration::from_millis(400)),
            8,
        ));
        scripted += 3 + 1 + 8;
        if cycle.is_zero() {
            at(Duration::from_secs(13)).await;
            let stopping = Arc::clone(bed);
            down = Some(Instant::now());
            tokio::task::spawn_blocking(move || stopping.postgres().stop())
                .await
                .unwrap()
                .expect("PostgreSQL stops");
            tokio::time::sleep(Duration::from_secs(3)).await;
            let starting = Arc::clone(bed);
            tokio::task::spawn_blocking(move || starting.postgres().start_again())
                .await
                .unwrap()
                .expect("PostgreSQL starts again");
            up = Some(Instant::now());
        }
        at(cycle + Duration::from_secs(21)).await;
        bed.identity()
            .script([Reply::token().delay(Duration::from_millis(2500))]);
        if cycle.is_zero() {
            at(Duration::from_secs(25)).await;
            // An admin changes the role's password: the cached token is refused at the next
            // login, which forces one refresh.
            let until = OffsetDateTime::now_utc() + time::Duration::hours(1);
            bed.postgres()
                .password_setter()
                .set_password(bed.principal().name(), "rotated-by-an-admin", until)
                .await
                .expect("the password changes");
        }
        cycle += CYCLE;
    }
    at(duration).await;
    (
        down.expect("the server was stopped"),
        up.expect("the server was started again"),
        scripted,
    )
}

/// One query on a checked-out connection; `Some` names the failure.
async fn query(client: &tokio_postgres::Client) -> Option<String> {
    match client.query_one("select 1", &[]).await {
        Ok(_) => None,
        Err(error) => Some(format!(
            "query: {}",
            match error.code() {
                Some(code) => format!("PostgreSQL {}", code.code()),
                None if error.is_closed() => "connection closed".to_owned(),
                None => format!("PostgreSQL: {error}"),
            }
        )),
    }
}

/// The variant of a connector error, for the report.
fn kind(error: &Error) -> String {
    match error {
        Error::Postgres { source } => match source.code() {
            Some(code) => format!("PostgreSQL {}", code.code()),
            None if source.is_closed() => "PostgreSQL: connection closed".into(),
            None => format!("PostgreSQL: {source}"),
        },
        Error::ConnectTimeout { .. } => "ConnectTimeout".into(),
        other => format!("{other}"),
    }
}

fn record(outcomes: &Mutex<Vec<Outcome>>, started: Instant, failure: Option<String>) {
    outcomes.lock().unwrap().push(Outcome {
        started,
        finished: Instant::now(),
        failure,
    });
}
