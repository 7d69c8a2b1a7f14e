//! Everything that needs the real PostgreSQL of the test bed, in one binary.

mod end_to_end;
mod expiry;
mod no_secrets;
#[cfg(all(feature = "deadpool", feature = "bb8"))]
mod pool;
#[cfg(all(feature = "deadpool", feature = "bb8"))]
mod soak;
mod timeouts;
mod tls;

/// Says, in every test run, that the pool and soak tests were not built, rather than skipping
/// them silently.
#[cfg(not(all(feature = "deadpool", feature = "bb8")))]
#[test]
#[ignore = "the pool and soak tests need --features deadpool,bb8 (or --all-features)"]
fn pool_and_soak_tests_need_the_deadpool_and_bb8_features() {}

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

/// Log lines, kept to look for tokens in.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

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
