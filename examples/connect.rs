//! Connect to Azure Database for PostgreSQL with the managed identity's token, configured by
//! the environment as on an Azure VM:
//!
//! ```sh
//! export PGHOST=myserver.postgres.database.azure.com PGUSER=my-vm-name
//! # for a user-assigned identity: export AZURE_CLIENT_ID=<its client id>
//! cargo run --example connect
//! ```

#[path = "common/connect_flow.rs"]
mod connect_flow;

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    connect_flow::init_tracing();
    connect_flow::run_and_report(pg_entra::Connector::from_env).await
}
