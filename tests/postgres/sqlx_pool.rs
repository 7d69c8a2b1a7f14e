//! sqlx pools against the real bed: rotation under load, revocation behind the cache,
//! secrets out of `Debug`, TLS before login, settings sqlx cannot honour, and the task's end.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::FutureExt as _;

use pg_entra::cache::TokenUpdates;
use pg_entra::sqlx::SqlxPool;
use pg_entra::{Connector, Error, Token};
use sqlx::postgres::PgPoolOptions;

use super::rotation::{change_password_behind_the_cache, rotating_bed, workload};
use super::tls::{assert_no_login_reached, recording_server};
use super::{Captured, bed};

async fn current_user_via_acquire(pool: &SqlxPool) -> Result<String, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    sqlx::query_scalar("select current_user")
        .fetch_one(&mut *connection)
        .await
}

async fn current_user_via_pool(pool: &SqlxPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("select current_user")
        .fetch_one(pool.pool())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_runs_across_two_token_rotations_without_one_failure() {
    let bed = rotating_bed().await;
    let connector = bed.connector_builder().build().unwrap();
    let pool = connector
        .sqlx_pool(
            PgPoolOptions::new()
                // Fewer connections than workers: more would make more connects race each
                // rotation, and the bed (unlike Entra) accepts only the newest token.
                .max_connections(8)
                // Short-lived connections, so that new physical connections keep being made.
                .max_lifetime(Duration::from_millis(300))
                .acquire_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let first_token = pool.token();
    // A session opened with the first token and kept for the whole run.
    let mut veteran = pool.acquire().await.unwrap().detach();
    let name = bed.principal().name().to_owned();

    let seen = workload({
        let (pool, name) = (pool.clone(), name.clone());
        move || {
            let (pool, name) = (pool.clone(), name.clone());
            async move {
                let user = current_user_via_acquire(&pool).await;
                assert_eq!(user.map_err(|e| e.to_string())?, name);
                Ok(pool.token())
            }
        }
    })
    .await;

    let issued = bed.identity().tokens_issued();
    assert!(issued >= 3, "two rotations need three tokens, got {issued}");
    // The pool's options followed the cache: the token in them changed, and queries ran
    // with at least three different ones.
    let distinct: HashSet<&str> = seen.iter().map(Token::secret).collect();
    assert!(distinct.len() >= 3, "{} tokens seen", distinct.len());
    assert_ne!(pool.token().secret(), first_token.secret());
    // The bed accepts only its newest token at login; the last connections used it.
    let newest = current_user_via_acquire(&pool).await.unwrap();
    assert_eq!(newest, name);
    let user: String = sqlx::query_scalar("select current_user")
        .fetch_one(&mut veteran)
        .await
        .unwrap();
    assert_eq!(user, name);
}

#[tokio::test]
async fn the_pools_options_follow_each_new_token_with_no_connect_asking() {
    let bed = rotating_bed().await;
    // The connector's cache has no background refresh of its own; the pool keeps it fresh.
    let connector = bed.connector_builder().build().unwrap();
    let pool = connector.sqlx_pool(PgPoolOptions::new()).await.unwrap();
    let mut seen = vec![pool.token()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} tokens",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let token = pool.token();
        if token.secret() != seen.last().unwrap().secret() {
            seen.push(token);
        }
    }
    assert_eq!(pool.size(), 0, "no connection was opened");
    // A newer token each time.
    assert!(
        seen.windows(2)
            .all(|w| w[0].expires_on() < w[1].expires_on())
    );
}

#[tokio::test]
async fn a_token_refused_behind_the_caches_back_recovers_with_one_identity_request() {
    let bed = bed().await;
    let connector = bed.connector_builder().build().unwrap();
    let pool = connector
        .sqlx_pool(PgPoolOptions::new().max_connections(4))
        .await
        .unwrap();
    assert_eq!(bed.identity().requests(), 1);
    let refused = pool.token();

    change_password_behind_the_cache(&bed).await;
    let mut first = pool.acquire().await.unwrap();
    assert_eq!(bed.identity().requests(), 2, "exactly one forced refresh");
    assert!(!pool.token().secret().eq(refused.secret()));
    let user: String = sqlx::query_scalar("select current_user")
        .fetch_one(&mut *first)
        .await
        .unwrap();
    assert_eq!(user, bed.principal().name());
    // Later connections (here through `&PgPool`) use the new token without asking again.
    let second = pool.acquire().await.unwrap();
    assert_eq!(
        current_user_via_pool(&pool).await.unwrap(),
        bed.principal().name()
    );
    assert_eq!(bed.identity().requests(), 2);

    // Refused again at once: the forced refresh is rate-limited, so the login error surfaces
    // without another identity request. Open sessions are unaffected: the idle one left by
    // the query above is handed out without a login; the next connection needs one.
    change_password_behind_the_cache(&bed).await;
    let mut idle = pool.acquire().await.unwrap();
    let user: String = sqlx::query_scalar("select current_user")
        .fetch_one(&mut *idle)
        .await
        .unwrap();
    assert_eq!(user, bed.principal().name());
    let _held = (first, second, idle);
    let error = pool.acquire().await.unwrap_err();
    let sqlx::Error::Database(database) = &error else {
        panic!("expected the server's refusal, got {error:?}");
    };
    assert_eq!(database.code().as_deref(), Some("28P01"), "{error}");
    assert_eq!(bed.identity().requests(), 2);
}

#[tokio::test]
async fn options_and_pool_debug_never_show_the_token() {
    let bed = bed().await;
    let connector = bed.connector_builder().build().unwrap();
    let options = connector.sqlx_options().await.unwrap();
    let pool = connector.sqlx_pool(PgPoolOptions::new()).await.unwrap();
    current_user_via_acquire(&pool).await.unwrap();
    let secret = options.token().secret().to_owned();
    assert!(secret.len() > 40);

    let shown = format!("{options:?} {pool:?} {:?}", pool.pool());
    assert!(shown.contains("not shown"), "{shown}");
    for part in secret.split('.') {
        assert!(!shown.contains(part), "part of the token in: {shown}");
    }
    // What the wrapper exists for: sqlx's own options print the password.
    let raw = format!("{:?}", options.into_inner());
    assert!(raw.contains(&secret));

    // A refused login's error, as sqlx reports it.
    let wrong_user = bed.connector_builder().user("nobody").build().unwrap();
    let wrong_pool = wrong_user.sqlx_pool(PgPoolOptions::new()).await.unwrap();
    let error = wrong_pool.acquire().await.unwrap_err();
    let wrong_secret = wrong_pool.token().secret().to_owned();
    let described = format!("{error} {error:?}");
    assert!(described.contains("28"), "{described}");
    for part in wrong_secret.split('.') {
        assert!(
            !described.contains(part),
            "part of the token in: {described}"
        );
    }
}

#[tokio::test]
async fn an_untrusted_server_fails_tls_before_login() {
    let bed = bed().await;
    // System roots only: the bed's CA is not among them.
    let connector = bed
        .connector_builder()
        .ssl_root_cert("system")
        .build()
        .unwrap();
    let pool = connector.sqlx_pool(PgPoolOptions::new()).await.unwrap();
    let error = pool.acquire().await.unwrap_err();
    assert!(matches!(error, sqlx::Error::Tls(_)), "{error:?}");
    assert_no_login_reached(&bed);

    // And a server whose certificate no trusted root signed sees the SSLRequest and no byte
    // more: no startup message, no password.
    let (port, server) = recording_server(b'S').await;
    let connector = bed.connector_builder().port(port).build().unwrap();
    let pool = connector
        .sqlx_pool(PgPoolOptions::new().acquire_timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    let error = pool.acquire().await.unwrap_err();
    assert!(matches!(error, sqlx::Error::Tls(_)), "{error:?}");
    let (bytes, handshake_ok) = server.await.unwrap();
    assert_eq!(bytes, [0, 0, 0, 8, 4, 210, 22, 47]);
    assert_eq!(handshake_ok, Some(false));
}

#[tokio::test]
async fn settings_sqlx_cannot_honour_are_refused_by_name() {
    let bed = bed().await;
    let cases = [
        ("host", "host=localhost,127.0.0.1"),
        ("keepalives_idle", "keepalives_idle=30"),
        ("target_session_attrs", "target_session_attrs=read-write"),
        ("options", "options='-d 5'"),
    ];
    for (setting, conninfo) in cases {
        let connector = bed
            .connector_builder()
            .connection_string(conninfo)
            .build()
            .unwrap();
        let Err(Error::Config(error)) = connector.sqlx_options().await else {
            panic!("{conninfo} was not refused");
        };
        assert_eq!(error.setting(), setting, "{conninfo}: {error}");
    }
    assert_eq!(bed.identity().requests(), 0, "refused before any token");

    // `-c` settings do reach the server.
    let connector = bed
        .connector_builder()
        .connection_string(r"options='-c search_path=pg_catalog,\\ public -cwork_mem=8MB'")
        .application_name("sqlx-test")
        .build()
        .unwrap();
    let pool = connector.sqlx_pool(PgPoolOptions::new()).await.unwrap();
    let mut connection = pool.acquire().await.unwrap();
    let path: String = sqlx::query_scalar("show search_path")
        .fetch_one(&mut *connection)
        .await
        .unwrap();
    assert_eq!(path, "pg_catalog, public");
}

/// A pool, and a listener on its connector's cache (the connector itself is dropped): the
/// listener hears `None` once nothing holds the cache, so once the pool's task let go of it.
async fn pool_and_listener(bed: &pg_entra::testing::TestBed) -> (SqlxPool, TokenUpdates) {
    let connector: Connector = bed.connector_builder().build().unwrap();
    let pool = connector.sqlx_pool(PgPoolOptions::new()).await.unwrap();
    current_user_via_acquire(&pool).await.unwrap();
    (pool, connector.token_cache().updates())
}

/// Waits (10 s at most) for the cache behind `updates` to be dropped.
async fn cache_dropped(updates: &mut TokenUpdates) {
    let dropped = async { while updates.next().await.is_some() {} };
    tokio::time::timeout(Duration::from_secs(10), dropped)
        .await
        .expect("the cache was dropped within 10 s");
}

#[tokio::test]
async fn the_task_ends_when_the_last_pool_is_dropped_or_the_pool_is_closed() {
    let bed = bed().await;

    let (pool, mut updates) = pool_and_listener(&bed).await;
    let clone = pool.clone();
    drop(pool);
    tokio::task::yield_now().await;
    assert!(
        updates.next().now_or_never().is_none(),
        "a clone still holds the pool, and with it the cache"
    );
    drop(clone);
    cache_dropped(&mut updates).await;

    // Closed while a handle is kept: the task ends (it logs so; nothing else shows it while
    // the handle holds the cache) and the pool refuses work.
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(captured.clone())
        .with_ansi(false)
        .finish();
    let _guard = crate::log_to(&tracing::Dispatch::new(subscriber));
    let (pool, _) = pool_and_listener(&bed).await;
    pool.close().await;
    wait_for(|| captured.text().contains("no longer follows the token")).await;
    assert!(matches!(
        pool.acquire().await.unwrap_err(),
        sqlx::Error::PoolClosed
    ));
}

async fn wait_for(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "not within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server that repeats the password in its refusal: `acquire` returns an error with the
/// SQLSTATE and nothing of the token, and sends no second token.
#[tokio::test]
async fn a_refusal_repeating_the_token_is_withheld() {
    use pg_entra::testing::{FakeCredential, LoginAnswer, Principal, ScriptedPostgres};
    let server = ScriptedPostgres::start_trusted(LoginAnswer::RefuseRepeatingPassword)
        .await
        .unwrap();
    let connector = server
        .connector_builder()
        .credential(std::sync::Arc::new(FakeCredential::new(
            Principal::user_assigned("orders-api"),
        )))
        .build()
        .unwrap();
    let pool = connector
        .sqlx_pool(
            PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(std::time::Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let error = pool.acquire().await.unwrap_err();
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("SQLSTATE 28P01"), "{shown}");
    assert!(shown.contains("withheld"), "{shown}");
    let secret = connector
        .token_cache()
        .cached()
        .unwrap()
        .secret()
        .to_owned();
    super::assert_no_piece_of(&secret, &shown);
    assert_eq!(server.passwords_received(), 1, "no second token was sent");
}
