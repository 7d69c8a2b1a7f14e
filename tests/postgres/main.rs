//! Everything that needs the real PostgreSQL of the test bed, in one binary.

mod bed_security;
#[path = "../common/log_to.rs"]
mod log_to;
use log_to::log_to;
#[cfg(all(feature = "diesel-async", feature = "deadpool", feature = "bb8"))]
mod diesel_pools;
mod end_to_end;
mod expiry;
#[cfg(feature = "deadpool")]
mod network_faults;
mod no_secrets;
mod operating;
mod pgbouncer;
#[cfg(all(feature = "deadpool", feature = "bb8"))]
mod pool;
mod refusals;
mod replicas;
mod root_bundle;
#[cfg(any(
    all(feature = "deadpool", feature = "bb8"),
    feature = "sqlx",
    feature = "diesel-async"
))]
mod rotation;
#[cfg(all(feature = "sqlx", feature = "metrics"))]
mod service;
mod shared_token;
#[cfg(all(feature = "deadpool", feature = "bb8"))]
mod soak;
#[cfg(feature = "sqlx")]
mod sqlx_pool;
#[cfg(any(feature = "postgres-sync", feature = "diesel-sync"))]
mod sync_stacks;
mod timeouts;
mod tls;
mod user_names;

// Say, in every test run, which tests were not built, rather than skipping them silently.
#[cfg(not(all(feature = "deadpool", feature = "bb8")))]
#[test]
#[ignore = "the pool and soak tests need --features deadpool,bb8 (or --all-features)"]
fn pool_and_soak_tests_need_the_deadpool_and_bb8_features() {}

#[cfg(not(feature = "sqlx"))]
#[test]
#[ignore = "the sqlx tests need --features sqlx (or --all-features)"]
fn sqlx_tests_need_the_sqlx_feature() {}

#[cfg(not(all(feature = "sqlx", feature = "metrics")))]
#[test]
#[ignore = "the service-example tests need --features sqlx,metrics (or --all-features)"]
fn service_tests_need_the_sqlx_and_metrics_features() {}

#[cfg(not(all(feature = "postgres-sync", feature = "diesel-sync")))]
#[test]
#[ignore = "the synchronous stacks' tests need --features postgres-sync,diesel-sync (or --all-features)"]
fn sync_stack_tests_need_their_features() {}

#[cfg(not(all(feature = "diesel-async", feature = "deadpool", feature = "bb8")))]
#[test]
#[ignore = "the Diesel tests need --features diesel-async,deadpool,bb8 (or --all-features)"]
fn diesel_tests_need_the_diesel_async_deadpool_and_bb8_features() {}

use std::io::Write;
use std::sync::{Arc, Mutex};

use pg_entra::Connector;
use pg_entra::testing::TestBed;
use tracing_subscriber::fmt::MakeWriter;

/// `select current_user` through a fresh connection.
async fn current_user(connector: &Connector) -> Result<String, pg_entra::Error> {
    let client = connector.connect().await?;
    let row = client.query_one("select current_user", &[]).await?;
    Ok(row.get(0))
}

async fn bed() -> TestBed {
    TestBed::start().await.expect("test bed starts")
}

/// A runtime whose every thread logs to `dispatch`, whatever the other tests of this binary
/// set as the global subscriber.
#[cfg(feature = "deadpool")]
fn logging_runtime(dispatch: &tracing::Dispatch) -> tokio::runtime::Runtime {
    let on_start = dispatch.clone();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // Kept for the thread's life.
            std::mem::forget(log_to(&on_start));
        })
        .build()
        .expect("a runtime")
}

/// Log lines, kept to look for tokens in.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// What was logged so far.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// A subscriber that writes every event, at every level, here.
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(self.clone())
            .with_ansi(false)
            .finish()
    }
}

/// No 8-character piece of `secret` is in `shown` (the pieces the crate's redaction withholds):
/// every window, the last one included.
fn assert_no_piece_of(secret: &str, shown: &str) {
    for start in 0..=secret.len().saturating_sub(8) {
        let piece = secret.get(start..start + 8).unwrap_or(secret);
        assert!(!shown.contains(piece), "{piece:?} is in:\n{shown}");
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
