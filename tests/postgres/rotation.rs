//! What the pool tests share: a bed whose tokens rotate every two seconds, a concurrent
//! workload across two rotations, and a password changed behind the cache's back.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pg_entra::testing::TestBed;
use time::OffsetDateTime;

use super::bed;

/// Concurrent workers. The PgBouncer sqlx test gives its pool as many connections, so that no
/// task waits for a permit: sqlx 0.9's `acquire` can spin at 100% CPU, its timeout never
/// firing, on a permit whose connection expired while checked out (transact-rs/sqlx#4185),
/// which short `max_lifetime`s on a saturated pool make likely.
pub(crate) const WORKERS: usize = 16;

/// How long the rotation tests' tokens live: the cache refreshes them half-way.
pub(crate) const SHORT_LIFETIME: Duration = Duration::from_secs(2);

/// The bed with short-lived tokens, so that a few seconds cover two rotations.
pub(crate) async fn rotating_bed() -> Arc<TestBed> {
    let bed = bed().await;
    bed.identity().set_token_lifetime(SHORT_LIFETIME);
    Arc::new(bed)
}

/// `WORKERS` tasks that each check a connection out, query and return it, over two token
/// lifetimes and a bit. Returns what each checkout reported.
pub(crate) async fn workload<F, Fut, T>(checkout_and_query: F) -> Vec<T>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<T, String>> + Send,
    T: Send + 'static,
{
    let until = tokio::time::Instant::now() + 2 * SHORT_LIFETIME + Duration::from_millis(500);
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let run = checkout_and_query.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while tokio::time::Instant::now() < until {
                    seen.push(run().await.expect("every checkout and query succeeds"));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            })
        })
        .collect();
    let mut seen = Vec::new();
    for worker in workers {
        seen.extend(worker.await.expect("a worker panicked"));
    }
    seen
}

/// Sets the role's password to something the cache has never seen.
pub(crate) async fn change_password_behind_the_cache(bed: &TestBed) {
    let valid_until = OffsetDateTime::now_utc() + time::Duration::hours(1);
    bed.postgres()
        .password_setter()
        .set_password(bed.principal().name(), "rotated-by-an-admin", valid_until)
        .await
        .unwrap();
}
