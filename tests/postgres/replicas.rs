//! Read replicas, failover and one token for all: a primary, its streaming standby and a
//! PgBouncer, all real, and libpq's multi-host settings choosing between them.

use std::sync::Arc;
use std::time::Duration;

use pg_entra::testing::{LocalPgBouncer, LocalPostgres, PoolMode, TestBed};
use pg_entra::{Connector, Environment};

use super::bed;
use super::pgbouncer::pgbouncer_available;

/// A connector built as a service builds it (the default chain from the environment), aimed
/// at `hosts` (`(port, …)` on `localhost`) with `target_session_attrs`.
fn service_connector(bed: &TestBed, ports: &[u16], attrs: &str) -> Connector {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let hosts = vec!["localhost"; ports.split(',').count()].join(",");
    let mut vars = bed.vars();
    vars.retain(|(name, _)| name != "PGHOST" && name != "PGPORT");
    vars.extend([
        ("PGHOST".to_owned(), hosts),
        ("PGPORT".to_owned(), ports),
        ("PGTARGETSESSIONATTRS".to_owned(), attrs.to_owned()),
    ]);
    Connector::builder()
        .environment(Environment::from_vars(vars))
        .build()
        .unwrap()
}

/// Which server a session is on, and whether it is a standby.
async fn server_of(client: &tokio_postgres::Client) -> (i32, bool) {
    let row = client
        .query_one(
            "select inet_server_port(), pg_catalog.pg_is_in_recovery()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn with_standby() -> (TestBed, LocalPostgres) {
    let bed = bed().await;
    let standby = bed.postgres().start_standby().await.unwrap();
    (bed, standby)
}

/// Every `target_session_attrs` over `primary,standby` and `standby,primary`: `read-write`
/// and `primary` find the primary, `read-only` and `standby` the standby, `prefer-standby`
/// the standby whichever comes first, `any` the first host. With the standby stopped,
/// `prefer-standby` falls back on the primary and `standby` fails saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_session_attrs_choose_between_primary_and_standby() {
    let (bed, standby) = with_standby().await;
    assert!(standby.is_in_recovery().await.unwrap());
    let (primary_port, standby_port) = (bed.postgres().port(), standby.port());
    let primary = (primary_port, false);
    let replica = (standby_port, true);
    for order in [[primary_port, standby_port], [standby_port, primary_port]] {
        let first = if order[0] == primary_port {
            primary
        } else {
            replica
        };
        for (attrs, expected) in [
            ("read-write", primary),
            ("primary", primary),
            ("read-only", replica),
            ("standby", replica),
            ("prefer-standby", replica),
            ("any", first),
        ] {
            let connector = service_connector(&bed, &order, attrs);
            assert_eq!(connector.target_session_attrs().as_str(), attrs);
            let client = connector.connect().await.unwrap();
            let (port, in_recovery) = server_of(&client).await;
            assert_eq!(
                (port as u16, in_recovery),
                expected,
                "{attrs} over {order:?}"
            );
        }
    }
    // Every connector above shared one token: the standby replays the primary's roles and
    // their passwords.
    assert_eq!(bed.identity().tokens_issued(), 1);

    let standby = Arc::new(standby);
    let stopping = Arc::clone(&standby);
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap()
        .unwrap();
    let order = [standby_port, primary_port];
    let client = service_connector(&bed, &order, "prefer-standby")
        .connect()
        .await
        .unwrap();
    assert_eq!(server_of(&client).await, (primary_port as i32, false));
    let error = service_connector(&bed, &[primary_port], "standby")
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            pg_entra::Error::SessionAttrsNotMet { standby: false, .. }
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("target_session_attrs=standby"),
        "{error}"
    );
    assert!(error.hint().unwrap().contains("reader endpoint"));
    assert_eq!(bed.identity().tokens_issued(), 1);
}

/// Two standbys, the primary gone, the second promoted: a new token is written on the new
/// primary only, and the remaining standby (which refuses writes) never logs the statement
/// that carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_never_logs_a_token() {
    let (bed, first) = with_standby().await;
    let second = Arc::new(bed.postgres().start_standby().await.unwrap());
    let bed = Arc::new(bed);
    let stopping = Arc::clone(&bed);
    tokio::task::spawn_blocking(move || stopping.postgres().stop())
        .await
        .unwrap()
        .unwrap();
    let promoting = Arc::clone(&second);
    tokio::task::spawn_blocking(move || promoting.promote())
        .await
        .unwrap()
        .unwrap();
    let connector = service_connector(&bed, &[second.port()], "primary");
    let client = connector.connect().await.unwrap();
    assert_eq!(server_of(&client).await, (second.port() as i32, false));
    let token = connector.token_cache().cached().unwrap();
    for log in [first.log(), second.log(), bed.postgres().log()] {
        assert!(!log.contains(&token.secret()[..40]));
    }
}

/// A primary, its read replica and a PgBouncer in front of the primary, used from one
/// process through connectors built apart: one token request serves all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_serves_the_primary_its_replica_and_pgbouncer() {
    if !pgbouncer_available() {
        return;
    }
    let (bed, standby) = with_standby().await;
    let bouncer = LocalPgBouncer::start(bed.postgres(), PoolMode::Transaction)
        .await
        .unwrap();
    let targets = [
        (bed.postgres().port(), false),
        (standby.port(), true),
        (bouncer.port(), false),
    ];
    let mut tasks = Vec::new();
    for (port, standby) in targets {
        for _ in 0..4 {
            let connector = service_connector(&bed, &[port], "any");
            tasks.push(tokio::spawn(async move {
                let client = connector.connect().await.unwrap();
                let row = client
                    .query_typed_one("select pg_catalog.pg_is_in_recovery()", &[])
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, bool>(0), standby, "port {port}");
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    // (The chain's first request to IMDS is its probe; one token was minted.)
    assert_eq!(bed.identity().tokens_issued(), 1, "one token for all");
}

#[cfg(feature = "deadpool")]
mod failover {
    use std::time::Instant;

    use pg_entra::pool::deadpool::Runtime;
    use pg_entra::pool::deadpool::managed::Pool;
    use pg_entra::pool::{DeadpoolManager, DeadpoolPool};

    use super::super::Captured;
    use super::*;

    /// The promoted standby must be serving the pool's writes within this long.
    const BACK_WITHIN: Duration = Duration::from_secs(3);
    const WORKERS: usize = 8;

    /// What each write saw: when it started and finished, relative to the run's start, and
    /// the server that took it (or the error).
    struct Write {
        started: Duration,
        finished: Duration,
        outcome: Result<u16, String>,
    }

    /// The figures of one failover.
    struct Failover {
        /// From the stop of the primary to the promotion's end.
        switch: Duration,
        /// From the promotion's end to the first write the new primary took (zero when
        /// writes reached it before `pg_ctl promote` returned).
        back_after: Duration,
        /// From the stop of the primary to the first write the new primary took.
        outage: Duration,
        failed_writes: usize,
        writes: usize,
    }

    async fn write(pool: &DeadpoolPool) -> Result<u16, String> {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let row = client
            .query_one(
                "insert into failover_probe values (default) returning inet_server_port()",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, i32>(0) as u16)
    }

    /// A pool writing through `host=primary,standby target_session_attrs=read-write` while
    /// the primary stops and the standby is promoted, as a high-availability failover does.
    async fn fail_over_once(logs: &Captured) -> Failover {
        let (bed, standby) = with_standby().await;
        let role = bed.principal().name().replace('"', "\"\"");
        bed.postgres()
            .admin()
            .await
            .unwrap()
            .batch_execute(&format!(
                "create table public.failover_probe (n bigserial primary key);
                 grant insert, select on public.failover_probe to \"{role}\";
                 grant usage on sequence public.failover_probe_n_seq to \"{role}\";"
            ))
            .await
            .unwrap();
        let (primary_port, standby_port) = (bed.postgres().port(), standby.port());
        let connector = service_connector(&bed, &[primary_port, standby_port], "read-write");
        let manager = DeadpoolManager::new(connector.clone());
        let pool: DeadpoolPool = Pool::builder(manager)
            .max_size(WORKERS)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .unwrap();
        let start = Instant::now();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (pool, stop) = (pool.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = start.elapsed();
                        let outcome = write(&pool).await;
                        seen.push(Write {
                            started,
                            finished: start.elapsed(),
                            outcome,
                        });
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    seen
                })
            })
            .collect();

        tokio::time::sleep(Duration::from_secs(1)).await;
        let stopping = start.elapsed();
        let bed = Arc::new(bed);
        let standby = Arc::new(standby);
        {
            let bed = Arc::clone(&bed);
            tokio::task::spawn_blocking(move || bed.postgres().stop())
                .await
                .unwrap()
                .unwrap();
        }
        {
            let standby = Arc::clone(&standby);
            tokio::task::spawn_blocking(move || standby.promote())
                .await
                .unwrap()
                .unwrap();
        }
        let promoted = start.elapsed();
        tokio::time::sleep(BACK_WITHIN + Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut writes = Vec::new();
        for worker in workers {
            writes.extend(worker.await.unwrap());
        }

        // The switch window runs from the primary's stop to the first write the promoted
        // standby took, which must come within the stated grace of the promotion. Every write
        // that ended before it went to the primary; every one that started after it, to the
        // new primary: none outside the window fails.
        let first_on_new = writes
            .iter()
            .filter(|w| w.outcome == Ok(standby_port))
            .map(|w| w.finished)
            .min()
            .expect("the new primary took writes");
        let back_after = first_on_new.saturating_sub(promoted);
        assert!(back_after < BACK_WITHIN, "back after {back_after:?}");
        for write in writes.iter().filter(|w| w.finished < stopping) {
            assert_eq!(write.outcome, Ok(primary_port), "before the failover");
        }
        for write in writes.iter().filter(|w| w.started > first_on_new) {
            assert_eq!(
                write.outcome,
                Ok(standby_port),
                "after the failover (started {:?} after the first write on the new primary)",
                write.started - first_on_new
            );
        }
        // One token served both servers: no request storm when every connection is remade.
        assert_eq!(bed.identity().tokens_issued(), 1);
        let token = connector.token_cache().cached().unwrap();
        super::super::assert_no_piece_of(token.secret(), &logs.text());
        super::super::assert_no_piece_of(token.secret(), &bed.postgres().log());
        super::super::assert_no_piece_of(token.secret(), &standby.log());
        Failover {
            switch: promoted - stopping,
            back_after,
            outage: first_on_new.saturating_sub(stopping),
            failed_writes: writes.iter().filter(|w| w.outcome.is_err()).count(),
            writes: writes.len(),
        }
    }

    /// One failover in every test run; `PG_ENTRA_FAILOVER_ROUNDS=N` repeats it for the
    /// README's figures.
    #[tokio::test]
    async fn a_pool_follows_a_failover_to_the_promoted_standby() {
        let logs = Captured::default();
        let subscriber = logs.subscriber();
        // This runtime is this thread: the pool's tasks log through this subscriber.
        let _guard = crate::log_to(&tracing::Dispatch::new(subscriber));
        let rounds: usize = std::env::var("PG_ENTRA_FAILOVER_ROUNDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let mut figures = Vec::new();
        for _ in 0..rounds {
            figures.push(fail_over_once(&logs).await);
        }
        for (round, f) in figures.iter().enumerate() {
            eprintln!(
                "failover {round}: stop and promotion took {:?}; the first write on the new primary came {:?} after the stop, {:?} after the promotion; {} of {} writes failed",
                f.switch, f.outage, f.back_after, f.failed_writes, f.writes
            );
        }
    }
}
