//! Connect to Azure Database for PostgreSQL with an Entra token, configured by the
//! environment, as Microsoft's C# sample does with `DefaultAzureCredential`:
//!
//! ```sh
//! export PGHOST=myserver.postgres.database.azure.com PGUSER=my-vm-name
//! # on a VM with a user-assigned identity: export AZURE_CLIENT_ID=<its client id>
//! # on a laptop: az login (PGUSER is then your UPN, taken from the token if unset)
//! cargo run --example connect
//! ```
//!
//! The token comes from the first credential that applies: a service principal in the
//! environment, AKS workload identity, the managed identity, the Azure CLI or the Azure
//! Developer CLI (`AZURE_TOKEN_CREDENTIALS=prod|dev|<name>` narrows the choice). Which one
//! produced it is printed on stderr.

#[path = "common/connect_flow.rs"]
mod connect_flow;

use std::process::ExitCode;
use std::sync::Arc;

use pg_entra::credential::CredentialOptions;
use pg_entra::{Cloud, Connector, DefaultAzureCredential};

#[tokio::main]
async fn main() -> ExitCode {
    connect_flow::init_tracing();
    // The chain's Entra authority follows the server's cloud, as the connector's own would.
    let cloud = std::env::var("PGHOST")
        .ok()
        .and_then(|host| Cloud::from_host(&host))
        .unwrap_or_default();
    let chain = match DefaultAzureCredential::builder()
        .options(CredentialOptions::default().cloud(cloud))
        .build()
    {
        Ok(chain) => Arc::new(chain),
        Err(error) => {
            connect_flow::report(&error);
            return ExitCode::FAILURE;
        }
    };
    connect_flow::run_and_report(
        || Connector::builder().credential(chain.clone()).build(),
        Some(&chain),
    )
    .await
}
