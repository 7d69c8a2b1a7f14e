//! Print an access token for PostgreSQL from `DefaultAzureCredential` (managed identity on
//! Azure, `az login` on a laptop, ...), and nothing else, on stdout:
//!
//! ```sh
//! export PGPASSWORD=$(cargo run -q --example token)
//! psql "host=myserver.postgres.database.azure.com user=my-vm-name dbname=postgres sslmode=verify-full"
//! ```
//!
//! Diagnostics, including which credential produced the token, go to stderr. The scope follows
//! the cloud of `PGHOST`, if set.

use std::process::ExitCode;

use pg_entra::credential::CredentialOptions;
use pg_entra::{Cloud, DefaultAzureCredential, Environment, TokenCredential};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cloud = Environment::process()
        .var("PGHOST")
        .and_then(|host| Cloud::from_host(&host))
        .unwrap_or_default();
    let scope = cloud.scope();
    let credential = match DefaultAzureCredential::builder()
        .options(CredentialOptions::default().cloud(cloud))
        .build()
    {
        Ok(credential) => credential,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match credential.get_token(&[scope], None).await {
        Ok(token) => {
            println!("{}", token.token.secret());
            eprintln!(
                "token for {scope} from {}, valid until {}",
                credential.selected_credential().unwrap_or("?"),
                token.expires_on
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
