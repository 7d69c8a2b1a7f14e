//! Diesel (diesel-async) against the real bed: a Diesel query through diesel-async's own
//! deadpool and bb8 pools across token rotations, a refused token, and errors people can read.

use std::time::Duration;

use diesel::ConnectionError;
use diesel::sql_types::Text;
use diesel_async::pooled_connection::{ManagerConfig, RecyclingMethod, bb8, deadpool};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::bed;
use super::rotation::{change_password_behind_the_cache, rotating_bed, workload};

/// `select current_user`, written with Diesel's query builder.
async fn current_user(connection: &mut AsyncPgConnection) -> Result<String, String> {
    diesel::select(diesel::dsl::sql::<Text>("current_user"))
        .get_result(connection)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diesel_deadpool_runs_queries_across_two_token_rotations() {
    let bed = rotating_bed().await;
    let connector = bed.connector_builder().build().unwrap();
    let pool = deadpool::Pool::builder(connector.diesel_manager(ManagerConfig::default()))
        .max_size(8)
        .wait_timeout(Some(Duration::from_secs(10)))
        .runtime(pg_entra::pool::deadpool::Runtime::Tokio1)
        .build()
        .unwrap();
    let mut veteran = deadpool::Object::take(pool.get().await.unwrap());
    // deadpool has no connection lifetime of its own: retire connections older than 300 ms,
    // so that new physical connections keep being made.
    let retire = tokio::spawn({
        let pool = pool.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                pool.retain(|_, metrics| metrics.age() < Duration::from_millis(300));
            }
        }
    });
    let name = bed.principal().name().to_owned();

    let seen = workload({
        let (pool, name) = (pool.clone(), name.clone());
        move || {
            let (pool, name) = (pool.clone(), name.clone());
            async move {
                let mut connection = pool.get().await.map_err(|e| e.to_string())?;
                assert_eq!(current_user(&mut connection).await?, name);
                Ok(())
            }
        }
    })
    .await;
    retire.abort();

    assert!(!seen.is_empty());
    assert!(bed.identity().tokens_issued() >= 3);
    // Twice the pool's size at least: connections were renewed across the rotations.
    let created = bed
        .postgres()
        .log()
        .matches("connection authorized")
        .count();
    assert!(created > 16, "{created} logins");
    assert_eq!(current_user(&mut veteran).await.unwrap(), name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diesel_bb8_runs_queries_across_two_token_rotations() {
    let bed = rotating_bed().await;
    let connector = bed.connector_builder().build().unwrap();
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    let pool = bb8::Pool::builder()
        .max_size(8)
        .max_lifetime(Some(Duration::from_millis(300)))
        .reaper_rate(Duration::from_millis(100))
        .connection_timeout(Duration::from_secs(10))
        .retry_connection(false)
        .build(connector.diesel_manager(config))
        .await
        .unwrap();
    let mut veteran = pool.dedicated_connection().await.unwrap();
    let name = bed.principal().name().to_owned();

    let seen = workload({
        let (pool, name) = (pool.clone(), name.clone());
        move || {
            let (pool, name) = (pool.clone(), name.clone());
            async move {
                let mut connection = pool.get_owned().await.map_err(|e| e.to_string())?;
                assert_eq!(current_user(&mut connection).await?, name);
                Ok(())
            }
        }
    })
    .await;

    assert!(!seen.is_empty());
    assert!(bed.identity().tokens_issued() >= 3);
    assert!(pool.state().statistics.connections_created > 8);
    assert_eq!(current_user(&mut veteran).await.unwrap(), name);
}

#[tokio::test]
async fn a_refused_token_is_refreshed_once_and_errors_read_like_ours() {
    let bed = bed().await;
    let connector = bed.connector_builder().build().unwrap();
    let mut first = connector.diesel_connection().await.unwrap();
    assert_eq!(bed.identity().requests(), 1);

    change_password_behind_the_cache(&bed).await;
    let pool = deadpool::Pool::builder(connector.diesel_manager(ManagerConfig::default()))
        .max_size(2)
        .build()
        .unwrap();
    let mut pooled = pool.get().await.unwrap();
    assert_eq!(
        current_user(&mut pooled).await.unwrap(),
        bed.principal().name()
    );
    assert_eq!(bed.identity().requests(), 2, "exactly one forced refresh");
    assert_eq!(
        current_user(&mut first).await.unwrap(),
        bed.principal().name()
    );

    // A role that does not exist: the server's words and the crate's hint, and no token.
    let nobody = bed.connector_builder().user("nobody").build().unwrap();
    let Err(ConnectionError::BadConnection(message)) = nobody.diesel_connection().await else {
        panic!("a login as a missing role succeeded");
    };
    assert!(message.contains("nobody"), "{message}");
    assert!(message.contains("hint:"), "{message}");
    let token = nobody.token_cache().cached().unwrap();
    for part in token.secret().split('.') {
        assert!(!message.contains(part), "part of the token in: {message}");
    }
}
