//! `pg-entra`: an Entra access token for Azure Database for PostgreSQL on the command line, `psql`
//! logged in with one, a step-by-step diagnosis of a failing login, a local proxy that logs
//! any PostgreSQL client in, and a local test bed.
//!
//! Built with the `cli` feature (`cargo install pg-entra --features cli`); `testbed` also needs
//! `testing`. Exit codes are listed in [`exit::Failure`] and the README.

#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, unreachable_pub)]

mod claims;
mod doctor;
mod exit;
mod output;
mod proxy;
mod psql;
mod psql_args;
mod server;
mod testbed;
mod token;

use clap::{Parser, Subcommand};

use exit::Failure;

/// Entra ID tokens for Azure Database for PostgreSQL: print one, run psql with one, or find
/// out why a login fails.
#[derive(Debug, Parser)]
#[command(name = "pg-entra", version, max_term_width = 100)]
struct Cli {
    /// Print JSON for scripts instead of text for people (`token`, `doctor`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print an access token for the server, and nothing else: `export PGPASSWORD=$(pg-entra token)`.
    Token(token::TokenArgs),
    /// Run psql logged in with a fresh token (passed in psql's environment, never its arguments).
    Psql(psql::PsqlArgs),
    /// Check configuration, credential, token, user name, network, TLS and login, step by step.
    Doctor(doctor::DoctorArgs),
    /// Listen locally for any PostgreSQL client (psql, pgAdmin, DBeaver, …) and log each
    /// session in to the server with verified TLS and a fresh token, until Ctrl-C.
    Proxy(proxy::ProxyArgs),
    /// Start a local PostgreSQL and identity endpoint and print `export` lines that point at
    /// them, until Ctrl-C (needs the `testing` feature).
    Testbed,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The proxy copies many sessions' bytes at once: every core. The other commands do one
    // thing at a time.
    let mut builder = match cli.command {
        Command::Proxy(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pg-entra: cannot start the async runtime: {error}");
            return Failure::Internal.into();
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Token(args) => token::run(args, cli.json).await,
            Command::Psql(args) => psql::run(args).await,
            Command::Doctor(args) => doctor::run(args, cli.json).await,
            Command::Proxy(args) => proxy::run(args).await,
            Command::Testbed => testbed::run().await,
        }
    });
    // Whatever a blocking task still waits on, the process ends now: every command has
    // already bounded its own waits and given its verdict.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(failure) => failure.into(),
    }
}
