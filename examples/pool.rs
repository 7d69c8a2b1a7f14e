//! A concurrent workload through a deadpool pool that keeps going across token rotations.
//!
//! ```sh
//! # locally, no Azure: a test bed whose tokens live 10 s, for 25 s (two rotations or more)
//! cargo run --example pool --features deadpool
//! # against Azure: PGHOST etc. and a managed identity, as for `examples/connect.rs`
//! PGHOST=myserver.postgres.database.azure.com cargo run --example pool --features deadpool -- 60
//! ```
//!
//! Prints queries per second, the physical connections made so far and the token in use each
//! second. The optional argument is how many seconds to run. Locally, connections are
//! replaced every 3 s so that new logins meet each new token; in production the pool's
//! 30-minute maximum lifetime applies (sessions outlive their token: no recycling is needed at
//! token expiry).

#[path = "common/connect_flow.rs"]
#[allow(dead_code)] // This example shares only the tracing set-up and error report.
mod connect_flow;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pg_entra::pool::deadpool::managed::{Object, Pool};
use pg_entra::pool::{DeadpoolManager, DeadpoolPool};
use pg_entra::testing::TestBed;
use pg_entra::{Connector, Error};

const WORKERS: usize = 32;
const POOL_SIZE: usize = 8;
/// Token lifetime on the local bed: short, so that the run sees rotations.
const LOCAL_TOKEN_LIFETIME: Duration = Duration::from_secs(10);
/// Connection lifetime on the local bed, so that new logins happen during the run.
const LOCAL_CONNECTION_LIFETIME: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> ExitCode {
    connect_flow::init_tracing();
    let local = std::env::var_os("PGHOST").is_none();
    let default_seconds = if local { 25 } else { 30 };
    let seconds = match std::env::args().nth(1).map(|s| s.parse::<u64>()) {
        None => default_seconds,
        Some(Ok(seconds)) if seconds > 0 => seconds,
        Some(_) => {
            eprintln!("usage: pool [SECONDS]");
            return ExitCode::FAILURE;
        }
    };

    // Kept alive for the whole run when local.
    let mut bed = None;
    let connector = if local {
        eprintln!(
            "PGHOST is not set: starting a local test bed with {LOCAL_TOKEN_LIFETIME:?} tokens"
        );
        match TestBed::start().await {
            Ok(started) => {
                started.identity().set_token_lifetime(LOCAL_TOKEN_LIFETIME);
                let built = Connector::builder()
                    .environment(started.environment())
                    .build();
                bed = Some(started);
                built
            }
            Err(error) => {
                eprintln!("error: could not start the local test bed: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        Connector::from_env()
    };
    let outcome = match connector {
        Ok(connector) => {
            let pool = if local {
                let manager = DeadpoolManager::new(connector.clone())
                    .max_lifetime(Some(LOCAL_CONNECTION_LIFETIME));
                Pool::builder(manager)
                    .max_size(POOL_SIZE)
                    .runtime(pg_entra::pool::deadpool::Runtime::Tokio1)
                    .wait_timeout(Some(Duration::from_secs(30)))
                    .build()
                    .expect("a pool with a runtime and a size builds")
            } else {
                match connector.deadpool_pool(POOL_SIZE) {
                    Ok(pool) => pool,
                    Err(error) => {
                        connect_flow::report(&error);
                        return ExitCode::FAILURE;
                    }
                }
            };
            run(&connector, &pool, Duration::from_secs(seconds)).await
        }
        Err(error) => Err(error),
    };
    drop(bed);
    match outcome {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("error: {failed} queries failed; see the log above");
            ExitCode::FAILURE
        }
        Err(error) => {
            connect_flow::report(&error);
            ExitCode::FAILURE
        }
    }
}

/// Runs the workload; returns how many queries failed.
async fn run(connector: &Connector, pool: &DeadpoolPool, duration: Duration) -> Result<u64, Error> {
    let queries = Arc::new(AtomicU64::new(0));
    let connections = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + duration;
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (pool, queries, failures, connections) = (
                pool.clone(),
                Arc::clone(&queries),
                Arc::clone(&failures),
                Arc::clone(&connections),
            );
            tokio::spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    let outcome = match pool.get().await {
                        Ok(client) => {
                            // A connection checked out for the first time was just made.
                            if Object::metrics(&client).recycle_count == 0 {
                                connections.fetch_add(1, Ordering::Relaxed);
                            }
                            client
                                .simple_query("select 1")
                                .await
                                .map(drop)
                                .map_err(|e| e.to_string())
                        }
                        Err(error) => Err(error.to_string()),
                    };
                    match outcome {
                        Ok(()) => queries.fetch_add(1, Ordering::Relaxed),
                        Err(error) => {
                            tracing::warn!(%error, "query failed");
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();

    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let (mut last, mut second, mut rotations, mut expiry) = (0, 0, 0, None);
    while tokio::time::Instant::now() < deadline {
        ticker.tick().await;
        second += 1;
        let total = queries.load(Ordering::Relaxed);
        let token_expiry = connector.token_cache().cached().map(|t| t.expires_on());
        if expiry.is_some() && token_expiry != expiry {
            rotations += 1;
        }
        expiry = token_expiry;
        println!(
            "{second:>4}s {:>7} queries/s  {:>4} connections made  token valid until {}",
            total - last,
            connections.load(Ordering::Relaxed),
            expiry.map_or_else(|| "-".to_owned(), |e| e.to_string())
        );
        last = total;
    }
    for worker in workers {
        let _ = worker.await;
    }
    let total = queries.load(Ordering::Relaxed);
    let failed = failures.load(Ordering::Relaxed);
    println!(
        "{total} queries in {}s ({:.0}/s), {} connections made, {failed} failed, \
         {rotations} token rotations",
        duration.as_secs(),
        total as f64 / duration.as_secs_f64(),
        connections.load(Ordering::Relaxed),
    );
    Ok(failed)
}
