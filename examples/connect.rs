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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let outcome = match pg_entra::Connector::from_env() {
        Ok(connector) => connect_flow::run(&connector).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            connect_flow::report(&error);
            ExitCode::FAILURE
        }
    }
}
