//! The flow of Microsoft's C# sample, shared by `connect` and `quickstart`: get a token,
//! connect with it, print the server version.

use std::process::ExitCode;

use pg_entra::{Connector, DefaultAzureCredential, Error};

/// Diagnostics on stderr (`RUST_LOG=pg_entra=debug` for more); stdout stays the sample's.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
}

/// Builds the connector with `build`, runs the flow, and reports a failure. With `chain`,
/// also reports which of its credentials produced the token.
pub async fn run_and_report(
    build: impl FnOnce() -> Result<Connector, Error>,
    chain: Option<&DefaultAzureCredential>,
) -> ExitCode {
    let outcome = match build() {
        Ok(connector) => run(&connector, chain).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report(&error);
            ExitCode::FAILURE
        }
    }
}

/// Runs the flow and prints what the C# sample prints.
async fn run(connector: &Connector, chain: Option<&DefaultAzureCredential>) -> Result<(), Error> {
    println!("Getting access token...");
    let token = connector.token_cache().token().await?;
    if let Some(chain) = chain {
        eprintln!(
            "token from {} (DefaultAzureCredential tried: {})",
            chain
                .selected_credential()
                .unwrap_or("an unknown credential"),
            chain.credential_names().join(" → ")
        );
    }
    eprintln!(
        "token for user {:?}, valid until {}",
        token.username().unwrap_or("(not in the token)"),
        token.expires_on()
    );
    println!("Opening connection using access token...");
    let client = connector.connect().await?;
    println!("Connected!");
    let version: String = client.query_one("select version()", &[]).await?.get(0);
    println!("Postgres version: {version}");
    Ok(())
}

/// Prints an error with its causes and a hint, for a person to act on.
pub fn report(error: &Error) {
    eprintln!("error: {error}");
    let mut last = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        // azure_core's errors display their inner error, which is also their source.
        let text = cause.to_string();
        if text != last {
            eprintln!("  caused by: {text}");
        }
        last = text;
        source = cause.source();
    }
    if let Some(hint) = error.hint() {
        eprintln!("  hint: {hint}");
    }
}
