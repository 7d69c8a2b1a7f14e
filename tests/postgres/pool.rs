//! deadpool and bb8 pools against the real bed: token rotation under load, a token refused
//! behind the cache's back, an identity-endpoint outage, and typed pool errors.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pg_entra::pool::bb8::RunError;
use pg_entra::pool::deadpool::Runtime;
use pg_entra::pool::deadpool::managed::{Object, Pool, PoolError, TimeoutType};
use pg_entra::pool::{Bb8Manager, DeadpoolManager, DeadpoolPool, RecyclingMethod};
use pg_entra::testing::{ManualClock, Reply, TestBed};
use pg_entra::{Connector, Error, TokenCache};

use super::bed;
use super::rotation::{change_password_behind_the_cache, rotating_bed, workload};

async fn current_user_on(client: &tokio_postgres::Client) -> Result<String, String> {
    let row = client
        .query_one("select current_user", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadpool_serves_a_workload_across_two_token_rotations() {
    let bed = rotating_bed().await;
    let connector = bed.connector_builder().build().unwrap();
    // Short-lived connections, so that new physical connections keep being made.
    let manager = DeadpoolManager::new(connector).max_lifetime(Some(Duration::from_millis(300)));
    let pool: DeadpoolPool = Pool::builder(manager)
        .max_size(8)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .build()
        .unwrap();
    // A session opened with the first token and kept for the whole run.
    let veteran = Object::take(pool.get().await.unwrap());
    let name = bed.principal().name().to_owned();

    let seen = workload({
        let (pool, bed, name) = (pool.clone(), Arc::clone(&bed), name.clone());
        move || {
            let (pool, bed, name) = (pool.clone(), Arc::clone(&bed), name.clone());
            async move {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                assert_eq!(current_user_on(&client).await?, name);
                Ok((Object::id(&client), bed.identity().tokens_issued()))
            }
        }
    })
    .await;

    let issued = bed.identity().tokens_issued();
    assert!(issued >= 3, "two rotations need three tokens, got {issued}");
    // The bed accepts only the newest token, so a connection first seen after a rotation
    // logged in with a token at least that new. The second-to-last rotation is the one
    // asked about: the last may come too close to the workload's end (on a loaded machine)
    // for a connection to be renewed after it.
    let mut first_seen = HashMap::new();
    for (id, tokens) in &seen {
        first_seen.entry(*id).or_insert(*tokens);
    }
    let after_a_late_rotation = first_seen.values().filter(|t| **t + 1 >= issued).count();
    assert!(
        after_a_late_rotation > 0,
        "no connection was made with either of the last two tokens ({} connections)",
        first_seen.len()
    );
    assert!(first_seen.len() > 8, "connections were not renewed");
    // The first session outlived its token, which PostgreSQL no longer accepts at login.
    assert_eq!(current_user_on(&veteran).await.unwrap(), name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bb8_serves_a_workload_across_two_token_rotations() {
    let bed = rotating_bed().await;
    let connector = bed.connector_builder().build().unwrap();
    let pool = pg_entra::pool::bb8::Pool::builder()
        .max_size(8)
        .max_lifetime(Some(Duration::from_millis(300)))
        .reaper_rate(Duration::from_millis(100))
        .connection_timeout(Duration::from_secs(10))
        .retry_connection(false)
        .build(Bb8Manager::new(connector))
        .await
        .unwrap();
    let veteran = pool.dedicated_connection().await.unwrap();
    let name = bed.principal().name().to_owned();

    let seen = workload({
        let (pool, name) = (pool.clone(), name.clone());
        move || {
            let (pool, name) = (pool.clone(), name.clone());
            async move {
                let client = pool.get_owned().await.map_err(|e| e.to_string())?;
                assert_eq!(current_user_on(&client).await?, name);
                Ok(())
            }
        }
    })
    .await;

    assert!(!seen.is_empty());
    assert!(bed.identity().tokens_issued() >= 3);
    assert!(pool.state().statistics.connections_created > 8);
    assert_eq!(current_user_on(&veteran).await.unwrap(), name);
}

#[tokio::test]
async fn a_token_refused_behind_the_caches_back_forces_exactly_one_refresh() {
    let bed = bed().await;
    let connector = bed.connector_builder().build().unwrap();
    connector.config().await.unwrap();
    assert_eq!(bed.identity().requests(), 1);

    change_password_behind_the_cache(&bed).await;
    let pool = connector.deadpool_pool(4).unwrap();
    let first = pool.get().await.unwrap();
    assert_eq!(
        current_user_on(&first).await.unwrap(),
        bed.principal().name()
    );
    assert_eq!(bed.identity().requests(), 2, "exactly one forced refresh");

    // Refused again at once: the forced refresh is rate-limited, so the login error surfaces
    // without another identity-endpoint call.
    change_password_behind_the_cache(&bed).await;
    let error = pool.get().await.unwrap_err();
    let PoolError::Backend(error) = error else {
        panic!("expected the connector's error, got {error:?}");
    };
    assert!(error.is_auth_failure(), "{error:?}");
    assert_eq!(bed.identity().requests(), 2);
    // The connection already made is unaffected.
    assert_eq!(
        current_user_on(&first).await.unwrap(),
        bed.principal().name()
    );
}

#[tokio::test]
async fn an_identity_outage_leaves_a_warm_pool_working_while_the_token_is_valid() {
    let bed = bed().await;
    let clock = ManualClock::starting_now();
    let cache = TokenCache::builder(Arc::new(bed.credential()))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let connector = bed
        .postgres()
        .connector_builder()
        .token_cache(cache)
        .build()
        .unwrap();
    let pool = connector.bb8_pool(4).unwrap();
    let checked_out = pool.get().await.unwrap();
    let requests_before = bed.identity().requests();

    // The endpoint fails every request, and the token turns stale (not yet expired).
    bed.identity()
        .script(std::iter::repeat_n(Reply::status(503), 1000));
    clock.advance(Duration::from_secs(3600 - 4 * 60));

    let mut fresh = Vec::new();
    for _ in 0..3 {
        let client = pool.dedicated_connection().await.unwrap();
        assert_eq!(
            current_user_on(&client).await.unwrap(),
            bed.principal().name()
        );
        fresh.push(client);
    }
    assert_eq!(
        current_user_on(&checked_out).await.unwrap(),
        bed.principal().name()
    );
    // The stale token did trigger refreshes, which failed without disturbing anyone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bed.identity().requests() == requests_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh was tried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(connector.token_cache().cached().is_some());
}

/// A connector aimed at a port where nothing listens.
fn unreachable_connector(bed: &TestBed) -> Connector {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    bed.connector_builder()
        .port(port)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

#[tokio::test]
async fn deadpool_exhaustion_and_failed_connects_are_typed_errors() {
    let bed = bed().await;
    let connector = bed.connector_builder().build().unwrap();
    let manager = DeadpoolManager::new(connector).recycling_method(RecyclingMethod::Verified);
    let pool: DeadpoolPool = Pool::builder(manager)
        .max_size(1)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_millis(100)))
        .build()
        .unwrap();
    let held = pool.get().await.unwrap();
    let error = pool.get().await.unwrap_err();
    assert!(
        matches!(error, PoolError::Timeout(TimeoutType::Wait)),
        "{error:?}"
    );
    drop(held);
    // Recycled with `SELECT 1` and handed out again.
    drop(pool.get().await.unwrap());

    let pool = unreachable_connector(&bed).deadpool_pool(2).unwrap();
    let error = pool.get().await.unwrap_err();
    assert!(
        matches!(error, PoolError::Backend(Error::Postgres { .. })),
        "{error:?}"
    );
    assert!(matches!(
        bed.postgres()
            .connector_builder()
            .build()
            .unwrap()
            .deadpool_pool(0),
        Err(Error::Config(_))
    ));
}

#[tokio::test]
async fn bb8_exhaustion_and_failed_connects_are_typed_errors() {
    let bed = bed().await;
    let connector = bed.connector_builder().build().unwrap();
    // bb8's connection timeout bounds the first checkout's connect too (token, TLS, login):
    // 200 ms was too short for it on a loaded CI machine (a run failed so).
    let pool = pg_entra::pool::bb8::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(2))
        .build(Bb8Manager::new(connector.clone()))
        .await
        .unwrap();
    let held = pool.get().await.unwrap();
    assert!(matches!(pool.get().await, Err(RunError::TimedOut)));
    drop(held);
    pool.get().await.unwrap();

    // bb8 hands connect errors to its error sink, not to `get`; `dedicated_connection`
    // returns the typed error itself.
    let unreachable = unreachable_connector(&bed);
    let pool = unreachable.bb8_pool(2).unwrap();
    let error = pool.dedicated_connection().await.unwrap_err();
    assert!(matches!(error, Error::Postgres { .. }), "{error:?}");
    assert!(matches!(connector.bb8_pool(0), Err(Error::Config(_))));
}
