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

use pg_entra::Connector;
use pg_entra::testing::TestBed;

/// `select current_user` through a fresh connection.
async fn current_user(connector: &Connector) -> Result<String, pg_entra::Error> {
    let client = connector.connect().await?;
    let row = client
        .query_one("select current_user", &[])
        .await
        .map_err(|source| pg_entra::Error::Postgres { source })?;
    Ok(row.get(0))
}

async fn bed() -> TestBed {
    TestBed::start().await.expect("test bed starts")
}
