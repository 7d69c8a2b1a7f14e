//! The whole flow on a machine with no Azure: a local PostgreSQL configured like Flexible
//! Server (TLS only, token passwords that expire) and a mock managed identity endpoint, then
//! exactly what `examples/connect.rs` does on an Azure VM.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! Needs the PostgreSQL server binaries (`apt-get install -y postgresql`); as root, the server
//! runs as the `postgres` account.

#[path = "common/connect_flow.rs"]
mod connect_flow;

use std::process::ExitCode;

use std::sync::Arc;

use pg_entra::DefaultAzureCredential;
use pg_entra::testing::TestBed;

#[tokio::main]
async fn main() -> ExitCode {
    connect_flow::init_tracing();
    eprintln!("Starting a local PostgreSQL with TLS and a mock managed identity endpoint...");
    let bed = match TestBed::start().await {
        Ok(bed) => bed,
        Err(error) => {
            eprintln!("error: could not start the local test bed: {error}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "PostgreSQL on {}:{}, identity endpoint at {}, VM identity {:?} with its role",
        bed.postgres().host(),
        bed.postgres().port(),
        bed.identity().authority_host(),
        bed.principal().name()
    );
    // The environment a service on an Azure VM would have, pointed at the local bed, and the
    // same DefaultAzureCredential chain the connector would make from it.
    let chain = match DefaultAzureCredential::builder()
        .options(bed.environment())
        .build()
    {
        Ok(chain) => Arc::new(chain),
        Err(error) => {
            connect_flow::report(&error);
            return ExitCode::FAILURE;
        }
    };
    connect_flow::run_and_report(
        || {
            pg_entra::Connector::builder()
                .environment(bed.environment())
                .credential(chain.clone())
                .build()
        },
        Some(&chain),
    )
    .await
}
