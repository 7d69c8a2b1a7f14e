//! The synchronous stacks against the real bed: the `postgres` crate and Diesel's
//! `PgConnection` (libpq), each alone and in an r2d2 pool, from threads with no runtime and
//! from a Tokio runtime's blocking threads: rotations, a revoked token, servers whose TLS cannot
//! be verified.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_entra::blocking::BlockingConnector;
use pg_entra::testing::{LoginAnswer, ScriptedPostgres, TestBed, TestCa, TlsOffer};
use pg_entra::{ConnectorBuilder, Environment};

/// How long the rotation runs' tokens live: the cache refreshes them half-way.
const SHORT_LIFETIME: Duration = Duration::from_secs(2);

/// The bed on a runtime of its own: the code under test runs on plain threads.
struct Bed {
    bed: Arc<TestBed>,
    runtime: tokio::runtime::Runtime,
    /// For files a test writes.
    directory: tempfile::TempDir,
}

impl Bed {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let bed = Arc::new(runtime.block_on(TestBed::start()).unwrap());
        let directory = tempfile::tempdir().unwrap();
        Self {
            bed,
            runtime,
            directory,
        }
    }

    fn connector(&self) -> BlockingConnector {
        let builder = self.bed.connector_builder();
        BlockingConnector::new(builder).unwrap()
    }

    fn revoke(&self) {
        let until = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        self.runtime
            .block_on(self.bed.postgres().password_setter().set_password(
                self.bed.principal().name(),
                "revoked-by-an-admin",
                until,
            ))
            .unwrap();
    }
}

/// Four threads that each check a connection out and query, over two token lifetimes.
fn across_rotations(run: impl Fn() -> Result<String, String> + Send + Sync + 'static) -> usize {
    let run = Arc::new(run);
    let until = Instant::now() + 2 * SHORT_LIFETIME + Duration::from_millis(500);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let run = Arc::clone(&run);
            std::thread::spawn(move || {
                let mut done = 0;
                while Instant::now() < until {
                    run().expect("every checkout and query succeeds");
                    done += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                done
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

/// Servers whose TLS the connector cannot verify, each with a builder pointed at it: one that
/// offers no TLS, one whose certificate comes from a CA nobody trusts (the system's roots are
/// used), and one with a trusted CA's certificate for another host name. A connect to any of
/// them must fail before a password is sent.
fn unverifiable_servers(bed: &Bed) -> Vec<(&'static str, ScriptedPostgres, ConnectorBuilder)> {
    let trusted = TestCa::generate("sync stacks' trusted CA").unwrap();
    let ca_file = bed.directory.path().join("trusted-ca.crt");
    std::fs::write(&ca_file, trusted.certificate_pem().unwrap()).unwrap();
    let untrusted = TestCa::generate("nobody's CA").unwrap();
    let servers = [
        ("no TLS", TlsOffer::None, None),
        (
            "an untrusted CA",
            TlsOffer::Certificate(untrusted.issue_server_certificate().unwrap()),
            None,
        ),
        (
            "another host name",
            TlsOffer::Certificate(trusted.issue_certificate_for("elsewhere.example").unwrap()),
            Some(&ca_file),
        ),
    ];
    servers
        .into_iter()
        .map(|(what, offer, root)| {
            let server = bed
                .runtime
                .block_on(ScriptedPostgres::start(offer, LoginAnswer::Accept))
                .unwrap();
            let mut vars = server.libpq_vars();
            if let Some(root) = root {
                vars.push(("PGSSLROOTCERT".into(), root.display().to_string()));
            }
            let builder = pg_entra::Connector::builder()
                .environment(Environment::from_vars(vars))
                .credential(Arc::new(bed.bed.credential()));
            (what, server, builder)
        })
        .collect()
}

#[cfg(feature = "postgres-sync")]
mod postgres_crate {
    use pg_entra::blocking::PostgresManager;

    use super::*;

    fn current_user(client: &mut postgres::Client) -> Result<String, String> {
        let row = client
            .query_one("select current_user", &[])
            .map_err(|e| e.to_string())?;
        Ok(row.get(0))
    }

    /// From a plain thread with no runtime: connects, and an r2d2 pool across two token
    /// rotations with new connections all the time.
    #[test]
    fn a_pool_runs_across_token_rotations_without_a_runtime() {
        let bed = Bed::start();
        bed.bed.identity().set_token_lifetime(SHORT_LIFETIME);
        let connector = bed.connector();
        let name = bed.bed.principal().name().to_owned();
        let mut client = connector.postgres_client().unwrap();
        assert_eq!(current_user(&mut client).unwrap(), name);

        let pool = r2d2::Pool::builder()
            .max_size(4)
            .build(PostgresManager::new(connector.clone()))
            .unwrap();
        let queries = across_rotations({
            let (pool, connector, name) = (pool.clone(), connector.clone(), name.clone());
            move || {
                // A new physical connection each time (r2d2 retires connections only every
                // 30 s), and a pooled one.
                let mut fresh = connector.postgres_client().map_err(|e| e.to_string())?;
                assert_eq!(current_user(&mut fresh)?, name);
                let mut pooled = pool.get().map_err(|e| e.to_string())?;
                assert_eq!(current_user(&mut pooled)?, name);
                Ok(name.clone())
            }
        });
        assert!(queries > 20, "{queries}");
        assert!(bed.bed.identity().tokens_issued() >= 3);
        // The first session outlived its token; a new pool logs in with the newest one.
        assert_eq!(current_user(&mut client).unwrap(), name);
        let pool = r2d2::Pool::builder()
            .max_size(2)
            .build(PostgresManager::new(connector))
            .unwrap();
        assert_eq!(current_user(&mut pool.get().unwrap()).unwrap(), name);
    }

    /// A token revoked behind the cache's back: one forced refresh, and the connect gets in.
    #[test]
    fn a_revoked_token_is_recovered_by_one_forced_refresh() {
        let bed = Bed::start();
        let connector = bed.connector();
        connector.postgres_client().unwrap();
        bed.revoke();
        let mut client = connector.postgres_client().unwrap();
        current_user(&mut client).unwrap();
        assert_eq!(bed.bed.identity().tokens_issued(), 2);
    }

    #[test]
    fn a_server_it_cannot_verify_gets_no_password() {
        let bed = Bed::start();
        for (what, server, builder) in unverifiable_servers(&bed) {
            let connector = BlockingConnector::new(builder).unwrap();
            let error = connector.postgres_client().err().expect(what);
            assert!(
                matches!(error, pg_entra::Error::Tls { .. }),
                "{what}: {error:?}"
            );
            assert_eq!(server.connections(), 1, "{what}");
            assert_eq!(server.passwords_received(), 0, "{what}");
        }
    }

    /// A server that completes TLS and takes the password, then says nothing: the deadline
    /// the TLS stream carries through the login ends the connect, and its thread, at the
    /// connect timeout, with `ConnectTimeout` (the `postgres` crate bounds only the TCP
    /// connect itself).
    #[test]
    fn a_server_silent_after_the_handshake_is_a_timeout() {
        let bed = Bed::start();
        let server = bed
            .runtime
            .block_on(ScriptedPostgres::start_trusted(LoginAnswer::Silent))
            .unwrap();
        let mut vars = server.libpq_vars();
        vars.push(("PGCONNECT_TIMEOUT".into(), "2".into()));
        let builder = pg_entra::Connector::builder()
            .environment(Environment::from_vars(vars))
            .credential(Arc::new(bed.bed.credential()));
        let connector = BlockingConnector::new(builder).unwrap();
        let error = connector.postgres_client().err().expect("timed out");
        assert!(
            matches!(error, pg_entra::Error::ConnectTimeout { .. }),
            "{error:?}"
        );
        // The handshake was over and the password sent: the stall was in the login.
        assert_eq!(server.passwords_received(), 1);
        // And the connect's own thread gave up and closed its socket, rather than holding it
        // until the server's 10 s limit: it is not left behind.
        let left = (0..100).any(|_| {
            server.connections_ended() == 1 || {
                std::thread::sleep(Duration::from_millis(50));
                false
            }
        });
        assert!(left, "the connect thread still holds its connection");
    }

    /// A server that accepts and then says nothing: the connect ends at the connect timeout
    /// with `ConnectTimeout`.
    #[test]
    fn a_silent_server_is_a_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _held = std::thread::spawn(move || {
            let accepted: Vec<_> = listener.incoming().take(2).collect();
            std::thread::sleep(Duration::from_secs(30));
            drop(accepted);
        });
        let bed = Bed::start();
        let builder = pg_entra::Connector::builder()
            .environment(pg_entra::Environment::from_vars([
                ("PGHOST", "localhost"),
                ("PGHOSTADDR", "127.0.0.1"),
                ("PGPORT", &port.to_string()),
                ("PGUSER", "orders-api"),
            ]))
            .connect_timeout(Duration::from_secs(1))
            .credential(Arc::new(bed.bed.credential()));
        let connector = BlockingConnector::new(builder).unwrap();
        let error = connector.postgres_client().err().expect("a timeout");
        assert!(
            matches!(error, pg_entra::Error::ConnectTimeout { .. }),
            "{error:?}"
        );
    }

    /// Inside a Tokio runtime, on its blocking threads: no "cannot start a runtime from
    /// within a runtime" panic, with the connector's own runtime or the caller's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn it_works_from_a_tokio_runtimes_blocking_threads() {
        let bed = Arc::new(TestBed::start().await.unwrap());
        let name = bed.principal().name().to_owned();
        for handed_over in [false, true] {
            let handle = tokio::runtime::Handle::current();
            let bed = Arc::clone(&bed);
            let user = tokio::task::spawn_blocking(move || {
                let builder = bed.connector_builder();
                let connector = if handed_over {
                    BlockingConnector::with_runtime(builder, handle).unwrap()
                } else {
                    BlockingConnector::new(builder).unwrap()
                };
                let pool = r2d2::Pool::builder()
                    .max_size(2)
                    .build(PostgresManager::new(connector))
                    .unwrap();
                let mut client = pool.get().unwrap();
                current_user(&mut client).unwrap()
            })
            .await
            .unwrap();
            assert_eq!(user, name);
        }
    }
}

#[cfg(feature = "diesel-sync")]
mod diesel_libpq {
    use diesel::{PgConnection, RunQueryDsl as _, sql_query, sql_types::Text};
    use pg_entra::blocking::DieselManager;

    use super::*;

    #[derive(diesel::QueryableByName)]
    struct User {
        #[diesel(sql_type = Text)]
        user: String,
    }

    fn current_user(connection: &mut PgConnection) -> Result<String, String> {
        let rows: Vec<User> = sql_query("select current_user::text as user")
            .load(connection)
            .map_err(|e| e.to_string())?;
        rows.into_iter()
            .next()
            .map(|row| row.user)
            .ok_or_else(|| "no row".to_owned())
    }

    #[test]
    fn a_pool_runs_across_token_rotations_without_a_runtime() {
        let bed = Bed::start();
        bed.bed.identity().set_token_lifetime(SHORT_LIFETIME);
        let connector = bed.connector();
        let name = bed.bed.principal().name().to_owned();
        let mut first = connector.diesel_connection().unwrap();
        assert_eq!(current_user(&mut first).unwrap(), name);
        let pool = r2d2::Pool::builder()
            .max_size(4)
            .build(DieselManager::new(connector.clone()))
            .unwrap();
        let queries = across_rotations({
            let (pool, connector, name) = (pool.clone(), connector.clone(), name.clone());
            move || {
                let mut fresh = connector.diesel_connection().map_err(|e| e.to_string())?;
                assert_eq!(current_user(&mut fresh)?, name);
                let mut pooled = pool.get().map_err(|e| e.to_string())?;
                assert_eq!(current_user(&mut pooled)?, name);
                Ok(name.clone())
            }
        });
        assert!(queries > 20, "{queries}");
        assert!(bed.bed.identity().tokens_issued() >= 3);
        assert_eq!(current_user(&mut first).unwrap(), name);
        let pool = r2d2::Pool::builder()
            .max_size(2)
            .build(DieselManager::new(connector))
            .unwrap();
        assert_eq!(current_user(&mut pool.get().unwrap()).unwrap(), name);
    }

    #[test]
    fn a_revoked_token_is_recovered_by_one_forced_refresh() {
        let bed = Bed::start();
        let connector = bed.connector();
        connector.diesel_connection().unwrap();
        bed.revoke();
        let mut connection = connector.diesel_connection().unwrap();
        current_user(&mut connection).unwrap();
        assert_eq!(bed.bed.identity().tokens_issued(), 2);
        // Revoked again inside the forced-refresh interval: libpq's refusal, read as one.
        bed.revoke();
        let error = connector.diesel_connection().err().expect("refused");
        assert_eq!(
            error.login_refusal(),
            Some(pg_entra::LoginRefusal::PasswordFailed),
            "{error:?}"
        );
        let token = connector.token().unwrap();
        assert!(!format!("{error} {error:?}").contains(&token.secret()[..40]));
    }

    /// Every event Diesel's instrumentation saw, as an application's logger would print it.
    static EVENTS: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

    /// Diesel hands the connection string to its instrumentation (an application's logger):
    /// the string carries no token, which reaches libpq through an in-memory password file.
    #[test]
    fn diesels_instrumentation_never_sees_the_token() {
        fn logger() -> Option<Box<dyn diesel::connection::Instrumentation>> {
            Some(Box::new(
                |event: diesel::connection::InstrumentationEvent<'_>| {
                    EVENTS.lock().unwrap().push_str(&format!("{event:?}\n"));
                },
            ))
        }
        diesel::connection::set_default_instrumentation(logger).unwrap();
        let bed = Bed::start();
        let connector = bed.connector();
        let mut connection = connector.diesel_connection().unwrap();
        current_user(&mut connection).unwrap();
        let token = connector.token().unwrap();
        let events = EVENTS.lock().unwrap().clone();
        assert!(events.contains("StartEstablishConnection"), "{events}");
        assert!(events.contains("passfile='/proc/self/fd/"), "{events}");
        super::super::assert_no_piece_of(token.secret(), &events);
    }

    /// libpq does its own TLS: `sslmode=verify-full` and the connector's root file are what
    /// keep the token from these servers.
    #[test]
    fn a_server_it_cannot_verify_gets_no_password() {
        let bed = Bed::start();
        for (what, server, builder) in unverifiable_servers(&bed) {
            let connector = BlockingConnector::new(builder).unwrap();
            let error = connector.diesel_connection().err().expect(what);
            let said = error.to_string();
            let expected = match what {
                "no TLS" => "SSL",
                "an untrusted CA" => "certificate verify failed",
                _ => "does not match host name",
            };
            assert!(said.contains(expected), "{what}: {said}");
            assert!(server.connections() >= 1, "{what}");
            assert_eq!(server.passwords_received(), 0, "{what}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn it_works_from_a_tokio_runtimes_blocking_threads() {
        let bed = Arc::new(TestBed::start().await.unwrap());
        let name = bed.principal().name().to_owned();
        let user = tokio::task::spawn_blocking({
            let bed = Arc::clone(&bed);
            move || {
                let connector = BlockingConnector::new(bed.connector_builder()).unwrap();
                let mut connection = connector.diesel_connection().unwrap();
                current_user(&mut connection).unwrap()
            }
        })
        .await
        .unwrap();
        assert_eq!(user, name);
    }
}
