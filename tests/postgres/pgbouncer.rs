//! Through a real PgBouncer, as through Azure's built-in pooler on port 6432: the token passed
//! on to PostgreSQL, every pool stack in session and transaction pooling across token
//! rotations, what transaction pooling does to prepared statements, and tokens longer than
//! PgBouncer keeps.

use std::sync::Arc;
use std::time::Duration;

use pg_entra::testing::{LocalPgBouncer, PoolMode, TestBed};
use pg_entra::{Connector, Error, LoginRefusal};
use tokio_postgres::types::Type;

use super::bed;

/// Set by `.ci/run`: a missing PgBouncer fails the run instead of skipping these tests.
const REQUIRE_VAR: &str = "PG_ENTRA_REQUIRE_PGBOUNCER";

/// Whether PgBouncer can run here; without it the tests say so and pass, unless CI asks.
pub(crate) fn pgbouncer_available() -> bool {
    match LocalPgBouncer::available() {
        Ok(()) => true,
        Err(why) if std::env::var_os(REQUIRE_VAR).is_some() => {
            panic!("{REQUIRE_VAR} is set and PgBouncer cannot run: {why}")
        }
        Err(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// A connector to `bouncer` with the bed's identity.
pub(crate) fn through(bouncer: &LocalPgBouncer, bed: &TestBed) -> Connector {
    bouncer
        .connector_builder()
        .credential(Arc::new(bed.credential()))
        .build()
        .unwrap()
}

/// The PAM check the bed installs lets through only a PgBouncer working in a directory the
/// bed marked: any other PgBouncer on the machine that uses PAM is refused.
#[test]
fn the_pam_check_accepts_only_the_beds_pgbouncers() {
    if !pgbouncer_available() {
        return;
    }
    let check = "/usr/local/libexec/pg-entra-bed-pgbouncer-pam";
    if !std::path::Path::new(check).exists() {
        eprintln!("skipped: {check} is written when the first bed PgBouncer starts");
        return;
    }
    let marked = tempfile::tempdir().unwrap();
    std::fs::write(marked.path().join("pg-entra-bed-pgbouncer"), "").unwrap();
    let unmarked = tempfile::tempdir().unwrap();
    // The check's parent process stands in for PgBouncer: a shell in the directory.
    let run_in = |dir: &std::path::Path| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{check}; echo $?"))
            .current_dir(dir)
            .output()
            .unwrap()
    };
    let status = |dir: &std::path::Path| {
        String::from_utf8_lossy(&run_in(dir).stdout)
            .trim()
            .to_owned()
    };
    assert_eq!(status(marked.path()), "0");
    assert_eq!(status(unmarked.path()), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_passed_through_to_postgresql_in_both_pool_modes() {
    if !pgbouncer_available() {
        return;
    }
    let bed = bed().await;
    let cache = bed
        .connector_builder()
        .build()
        .unwrap()
        .token_cache()
        .clone();
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let bouncer = LocalPgBouncer::start(bed.postgres(), mode).await.unwrap();
        let connector = bouncer
            .connector_builder()
            .token_cache(cache.clone())
            .build();
        let client = connector.unwrap().connect().await.unwrap();
        let row = client
            .query_typed_one("select current_user", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), bed.principal().name(), "{mode:?}");
        // PgBouncer logged in to PostgreSQL as the identity, over TLS, with the token.
        let log = bouncer.log();
        assert!(log.contains("new connection to server"), "{log}");
        assert!(log.contains("SSL established"), "{log}");
    }
    assert_eq!(bed.identity().tokens_issued(), 1, "one token for both");
}

/// Bisects the password length PgBouncer passes on intact, with a new role for each probe
/// (a pooled server connection would hide the server's check): the limit is measured, not
/// assumed, and the refusals on either side of it are the ones the library reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_password_pgbouncer_passes_on_is_measured() {
    if !pgbouncer_available() {
        return;
    }
    let bed = bed().await;
    let bouncer = LocalPgBouncer::start(bed.postgres(), PoolMode::Session)
        .await
        .unwrap();
    let tls = through(&bouncer, &bed).tls_connector().unwrap();
    let probes = std::sync::atomic::AtomicUsize::new(0);
    let probe = |length: usize| {
        let (bed, tls, port) = (&bed, tls.clone(), bouncer.port());
        let serial = probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            let role = format!("probe-{serial}-{length}");
            bed.postgres().create_role(&role).await.unwrap();
            let password = "t".repeat(length);
            let until = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
            bed.postgres()
                .password_setter()
                .set_password(&role, &password, until)
                .await
                .unwrap();
            let mut config = tokio_postgres::Config::new();
            config
                .host("localhost")
                .port(port)
                .dbname("postgres")
                .user(&role)
                .password(password.as_bytes())
                .ssl_mode(tokio_postgres::config::SslMode::Require);
            config.connect(tls).await.map(|_| ())
        }
    };
    // Accepted at 1 KiB, refused at 64 KiB: bisect between.
    assert!(probe(1024).await.is_ok());
    let (mut accepted, mut refused) = (1024, 65_536);
    while refused - accepted > 1 {
        let middle = (accepted + refused) / 2;
        match probe(middle).await {
            Ok(()) => accepted = middle,
            Err(_) => refused = middle,
        }
    }
    eprintln!(
        "{}: the longest password passed on intact is {accepted} bytes",
        bouncer.version()
    );
    let just_over = probe(accepted + 1).await.unwrap_err();
    let code = |e: &tokio_postgres::Error| e.code().map(|c| c.code().to_owned());
    let message = |e: &tokio_postgres::Error| e.as_db_error().map(|d| d.message().to_owned());
    if bouncer.version().starts_with("PgBouncer 1.18") {
        assert_eq!(accepted, 2047, "PgBouncer 1.18's MAX_PASSWORD is 2,048");
        // One byte more: PgBouncer cuts it, PostgreSQL refuses the stub, PgBouncer relays
        // that refusal under its own SQLSTATE.
        assert_eq!(code(&just_over).as_deref(), Some("08P01"));
        assert!(
            message(&just_over)
                .unwrap()
                .starts_with("password authentication failed"),
            "{just_over:?}"
        );
        // A password message past PgBouncer's 4 KiB packet buffer is its own refusal.
        let too_big = probe(4091).await.unwrap_err();
        assert_eq!(
            message(&too_big).as_deref(),
            Some("client sent partial pkt in startup phase")
        );
        assert!(probe(4090).await.unwrap_err().as_db_error().is_some());
    }
}

/// A token past PgBouncer's limit, because the identity is in many groups: the library and
/// its error say it is the token's length, not a token refusal, and no new token is asked
/// for. The same token gets in when it goes to PostgreSQL directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_longer_than_pgbouncer_keeps_is_diagnosed_as_its_length() {
    if !pgbouncer_available() {
        return;
    }
    let bed = bed().await;
    let bouncer = LocalPgBouncer::start(bed.postgres(), PoolMode::Session)
        .await
        .unwrap();
    // 40 groups: about 3 KiB, cut by PgBouncer. 80: about 5 KiB, past 1.18's packet buffer.
    for (groups, said) in [
        (40, "password authentication failed"),
        (80, "client sent partial pkt"),
    ] {
        bed.identity().set_group_claims(groups);
        let connector = through(&bouncer, &bed);
        let token = connector.token_cache().token().await.unwrap();
        assert!(
            token.secret().len() > 2047,
            "{} bytes",
            token.secret().len()
        );
        let issued = bed.identity().tokens_issued();

        let error = connector.connect().await.unwrap_err();
        assert!(
            matches!(error, Error::PoolerRefused { token_bytes, .. } if token_bytes == token.secret().len()),
            "{error:?}"
        );
        assert_eq!(
            error.login_refusal(),
            Some(LoginRefusal::PoolerRefusedLongPassword)
        );
        assert!(!error.is_auth_failure());
        assert!(error.hint().unwrap().contains("2,047 bytes"));
        let shown = format!("{error} {error:?}");
        // What PgBouncer says differs by version (1.25 cuts both and relays the server's
        // 28P01); the diagnosis above does not.
        if bouncer.version().starts_with("PgBouncer 1.18") {
            assert!(shown.contains(said), "{shown}");
        }
        assert!(!shown.contains(token.secret()));
        assert_eq!(bed.identity().tokens_issued(), issued, "no refresh for it");

        let direct = bed.connector_builder().build().unwrap();
        let client = direct.connect().await.unwrap();
        client.simple_query("select 1").await.unwrap();
    }
}

/// A token revoked behind the cache's back, with no server connection pooled: PgBouncer
/// relays the server's refusal under its own SQLSTATE (08P01); the library still reads it as
/// a refusal of the token, forces one refresh, and the retry gets in. The same in both pool
/// modes, as the README's table says.
async fn a_revoked_token_is_recovered_by_one_forced_refresh(mode: PoolMode) {
    if !pgbouncer_available() {
        return;
    }
    let bed = bed().await;
    let bouncer = LocalPgBouncer::start(bed.postgres(), mode).await.unwrap();
    let connector = through(&bouncer, &bed);
    connector.token_cache().token().await.unwrap();
    let until = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    bed.postgres()
        .password_setter()
        .set_password(bed.principal().name(), "revoked-by-an-admin", until)
        .await
        .unwrap();

    let client = connector.connect().await.unwrap();
    client.simple_query("select 1").await.unwrap();
    assert_eq!(
        bed.identity().tokens_issued(),
        2,
        "exactly one forced refresh"
    );
    let log = bouncer.log();
    assert!(
        log.contains("server login failed: FATAL password authentication failed"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_recovered_in_session_pooling() {
    a_revoked_token_is_recovered_by_one_forced_refresh(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_recovered_in_transaction_pooling() {
    a_revoked_token_is_recovered_by_one_forced_refresh(PoolMode::Transaction).await;
}

/// Named (protocol-level) prepared statements, which tokio-postgres's `query` and `prepare`
/// use, in transaction pooling: PgBouncer 1.21 and later (with `max_prepared_statements`, as
/// Azure runs it) carry them to whichever server connection runs the next transaction;
/// earlier versions do not, and the statement is missing there. Set `PG_ENTRA_PGBOUNCER` to a
/// newer build to check the other side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_in_transaction_pooling_follow_the_pgbouncer_version() {
    if !pgbouncer_available() {
        return;
    }
    let bed = bed().await;
    let bouncer = LocalPgBouncer::start(bed.postgres(), PoolMode::Transaction)
        .await
        .unwrap();
    let connector = through(&bouncer, &bed);
    let a = connector.connect().await.unwrap();
    let b = connector.connect().await.unwrap();
    // A prepares on the one server connection, which goes back to the pool at once.
    let statement = a.prepare("select current_user").await.unwrap();
    // B holds that server connection in a transaction; A's next one gets a new server.
    b.batch_execute("begin").await.unwrap();
    let used = a.query_one(&statement, &[]).await;
    b.batch_execute("commit").await.unwrap();
    if bouncer.tracks_prepared_statements() {
        assert_eq!(
            used.unwrap().get::<_, String>(0),
            bed.principal().name(),
            "{}",
            bouncer.version()
        );
    } else {
        let error = used.unwrap_err();
        assert_eq!(
            error.code().map(|c| c.code()),
            Some("26000"),
            "{}: {error:?}",
            bouncer.version()
        );
    }
    // Unnamed statements (`query_typed`: parse, bind and execute in one message train) work
    // on every version.
    b.batch_execute("begin").await.unwrap();
    let row = a
        .query_typed_one("select $1::text", &[(&"typed", Type::TEXT)])
        .await
        .unwrap();
    b.batch_execute("commit").await.unwrap();
    assert_eq!(row.get::<_, String>(0), "typed");

    // sqlx names and caches the statements it runs: its second run of the same query uses
    // the name on whichever server connection it gets.
    #[cfg(feature = "sqlx")]
    {
        let pool = connector
            .sqlx_pool(sqlx::postgres::PgPoolOptions::new().max_connections(1))
            .await
            .unwrap();
        let mut connection = pool.acquire().await.unwrap();
        let query = || sqlx::query_scalar::<_, String>("select current_user");
        query().fetch_one(&mut *connection).await.unwrap();
        b.batch_execute("begin").await.unwrap();
        let again = query().fetch_one(&mut *connection).await;
        b.batch_execute("commit").await.unwrap();
        if bouncer.tracks_prepared_statements() {
            assert_eq!(
                again.unwrap(),
                bed.principal().name(),
                "{}",
                bouncer.version()
            );
        } else {
            let error = again.unwrap_err();
            let code = error
                .as_database_error()
                .and_then(|e| e.code().map(|c| c.into_owned()));
            assert_eq!(
                code.as_deref(),
                Some("26000"),
                "{}: {error:?}",
                bouncer.version()
            );
        }
    }
}

/// Every stack in both pool modes across two token rotations, with the calls that work in
/// each: session pooling takes anything; transaction pooling on PgBouncer before 1.21 takes
/// unnamed statements (`query_typed`, `simple_query`; sqlx's `persistent(false)`).
#[cfg(all(feature = "deadpool", feature = "bb8", feature = "sqlx"))]
mod rotations {
    use std::collections::HashSet;

    use pg_entra::pool::deadpool::Runtime;
    use pg_entra::pool::deadpool::managed::Pool;
    use pg_entra::pool::{Bb8Manager, DeadpoolManager, DeadpoolPool};
    use sqlx::postgres::PgPoolOptions;

    use super::super::rotation::{rotating_bed, workload};
    use super::*;

    async fn user(client: &tokio_postgres::Client, mode: PoolMode) -> Result<String, String> {
        let row = match mode {
            PoolMode::Session => client.query_one("select current_user", &[]).await,
            PoolMode::Transaction => client.query_typed_one("select current_user", &[]).await,
        };
        row.map(|row| row.get(0)).map_err(|e| e.to_string())
    }

    async fn started(mode: PoolMode) -> Option<(Arc<TestBed>, Arc<LocalPgBouncer>)> {
        if !pgbouncer_available() {
            return None;
        }
        let bed = rotating_bed().await;
        let bouncer = LocalPgBouncer::start(bed.postgres(), mode).await.unwrap();
        Some((bed, Arc::new(bouncer)))
    }

    fn rotated(bed: &TestBed) {
        let issued = bed.identity().tokens_issued();
        assert!(issued >= 3, "two rotations need three tokens, got {issued}");
    }

    async fn connector_across_rotations(mode: PoolMode) {
        let Some((bed, bouncer)) = started(mode).await else {
            return;
        };
        let connector = through(&bouncer, &bed);
        let veteran = connector.connect().await.unwrap();
        let name = bed.principal().name().to_owned();
        workload({
            let (connector, name) = (connector.clone(), name.clone());
            move || {
                let (connector, name) = (connector.clone(), name.clone());
                async move {
                    let client = connector.connect().await.map_err(|e| e.to_string())?;
                    assert_eq!(user(&client, mode).await?, name);
                    Ok(())
                }
            }
        })
        .await;
        rotated(&bed);
        assert_eq!(user(&veteran, mode).await.unwrap(), name);
    }

    async fn deadpool_across_rotations(mode: PoolMode) {
        let Some((bed, bouncer)) = started(mode).await else {
            return;
        };
        let manager = DeadpoolManager::new(through(&bouncer, &bed))
            .max_lifetime(Some(Duration::from_millis(300)));
        let pool: DeadpoolPool = Pool::builder(manager)
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .build()
            .unwrap();
        let name = bed.principal().name().to_owned();
        workload({
            let (pool, name) = (pool.clone(), name.clone());
            move || {
                let (pool, name) = (pool.clone(), name.clone());
                async move {
                    let client = pool.get().await.map_err(|e| e.to_string())?;
                    assert_eq!(user(&client, mode).await?, name);
                    Ok(())
                }
            }
        })
        .await;
        rotated(&bed);
        assert!(pool.status().size > 0);
    }

    async fn bb8_across_rotations(mode: PoolMode) {
        let Some((bed, bouncer)) = started(mode).await else {
            return;
        };
        let pool = pg_entra::pool::bb8::Pool::builder()
            .max_size(8)
            .max_lifetime(Some(Duration::from_millis(300)))
            .reaper_rate(Duration::from_millis(100))
            .connection_timeout(Duration::from_secs(10))
            .retry_connection(false)
            .build(Bb8Manager::new(through(&bouncer, &bed)))
            .await
            .unwrap();
        let name = bed.principal().name().to_owned();
        workload({
            let (pool, name) = (pool.clone(), name.clone());
            move || {
                let (pool, name) = (pool.clone(), name.clone());
                async move {
                    let client = pool.get_owned().await.map_err(|e| e.to_string())?;
                    assert_eq!(user(&client, mode).await?, name);
                    Ok(())
                }
            }
        })
        .await;
        rotated(&bed);
        assert!(pool.state().statistics.connections_created > 8);
    }

    async fn sqlx_across_rotations(mode: PoolMode) {
        let Some((bed, bouncer)) = started(mode).await else {
            return;
        };
        let pool = through(&bouncer, &bed)
            .sqlx_pool(
                PgPoolOptions::new()
                    .max_connections(super::super::rotation::WORKERS as u32)
                    .max_lifetime(Duration::from_millis(300))
                    .acquire_timeout(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        let name = bed.principal().name().to_owned();
        let tracks = bouncer.tracks_prepared_statements();
        let seen = workload({
            let (pool, name) = (pool.clone(), name.clone());
            move || {
                let (pool, name) = (pool.clone(), name.clone());
                async move {
                    let mut connection = pool.acquire().await.map_err(|e| e.to_string())?;
                    let query = sqlx::query_scalar::<_, String>("select current_user");
                    let user = match mode {
                        PoolMode::Session => query.fetch_one(&mut *connection).await,
                        // 1.21 and later carry sqlx's named statements across server
                        // connections, as the README says.
                        PoolMode::Transaction if tracks => query.fetch_one(&mut *connection).await,
                        // sqlx describes a statement in one round trip and runs it in the
                        // next, and names it by default: in transaction pooling before
                        // PgBouncer 1.21 both must happen in one transaction, unnamed.
                        PoolMode::Transaction => {
                            let mut transaction = sqlx::Connection::begin(&mut *connection)
                                .await
                                .map_err(|e| e.to_string())?;
                            let user = query.persistent(false).fetch_one(&mut *transaction).await;
                            transaction.commit().await.map_err(|e| e.to_string())?;
                            user
                        }
                    };
                    assert_eq!(user.map_err(|e| e.to_string())?, name);
                    Ok(pool.token())
                }
            }
        })
        .await;
        rotated(&bed);
        let distinct: HashSet<&str> = seen.iter().map(pg_entra::Token::secret).collect();
        assert!(distinct.len() >= 3, "{} tokens seen", distinct.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connector_in_session_pooling() {
        connector_across_rotations(PoolMode::Session).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connector_in_transaction_pooling() {
        connector_across_rotations(PoolMode::Transaction).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deadpool_in_session_pooling() {
        deadpool_across_rotations(PoolMode::Session).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deadpool_in_transaction_pooling() {
        deadpool_across_rotations(PoolMode::Transaction).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bb8_in_session_pooling() {
        bb8_across_rotations(PoolMode::Session).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bb8_in_transaction_pooling() {
        bb8_across_rotations(PoolMode::Transaction).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlx_in_session_pooling() {
        sqlx_across_rotations(PoolMode::Session).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlx_in_transaction_pooling() {
        sqlx_across_rotations(PoolMode::Transaction).await;
    }
}
