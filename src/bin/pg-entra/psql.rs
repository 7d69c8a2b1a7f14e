//! `pg-entra psql`: psql with a fresh token as its password, in its environment only.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use pg_entra::Environment;

use crate::exit::Failure;
use crate::server::{ServerArgs, causes};

/// Where distributions keep the system's CA bundle, for libpq versions without
/// `sslrootcert=system` (before 16).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Arguments of `pg-entra psql`.
#[derive(Debug, clap::Args)]
pub(crate) struct PsqlArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Arguments for psql, after `--` (`pg-entra psql -- -c 'select 1'`).
    #[arg(last = true, value_name = "PSQL ARGS")]
    psql_args: Vec<OsString>,
}

/// Runs psql (`PG_ENTRA_PSQL`, else `psql` on the `PATH`) in place of this process.
pub(crate) async fn run(args: PsqlArgs) -> Result<(), Failure> {
    if let Some(plain) = args.psql_args.iter().find_map(|arg| plaintext_mode(arg)) {
        eprintln!(
            "pg-entra: sslmode={plain} in psql's arguments is refused: the password is a bearer token and travels only inside verified TLS"
        );
        return Err(Failure::Configuration);
    }
    let server = args.server;
    // The settings are checked before a token is asked for (plaintext modes, no host).
    let connector = server
        .chain()
        .and_then(|chain| server.connector(Arc::new(chain), None))
        .map_err(|error| {
            eprintln!("pg-entra: {error}");
            Failure::Configuration
        })?;
    let token = connector.token_cache().token().await.map_err(|error| {
        eprintln!("pg-entra: no access token for {}:", server.scope());
        for line in causes(&error) {
            eprintln!("  {line}");
        }
        Failure::Credential
    })?;
    let user = connector.user_for(&token).map_err(|error| {
        eprintln!("pg-entra: {error}");
        if let Some(hint) = error.hint() {
            eprintln!("  {hint}");
        }
        Failure::Token
    })?;

    let env = Environment::process();
    let program = env.var("PG_ENTRA_PSQL").unwrap_or_else(|| "psql".into());
    let mut command = Command::new(&program);
    command.args(&args.psql_args);
    command
        .env("PGPASSWORD", token.secret())
        .env("PGUSER", &user);
    if let Some(host) = &server.host {
        command.env("PGHOST", host);
    }
    if let Some(port) = server.port {
        command.env("PGPORT", port.to_string());
    }
    match (&server.dbname, env.var("PGDATABASE")) {
        (Some(dbname), _) => {
            command.env("PGDATABASE", dbname);
        }
        // libpq's default is the user's name; Entra roles live in `postgres`.
        (None, None) => {
            command.env("PGDATABASE", "postgres");
        }
        (None, Some(_)) => {}
    }
    let mode = env.var("PGSSLMODE");
    if !matches!(mode.as_deref(), Some("verify-ca" | "verify-full")) {
        command.env("PGSSLMODE", "verify-full");
    }
    match env.var("PGSSLROOTCERT").as_deref() {
        None | Some("system") => {
            if let Some(bundle) = system_bundle(&env) {
                command.env("PGSSLROOTCERT", bundle);
            }
        }
        Some(_) => {}
    }
    let error = exec(command);
    if error.kind() == std::io::ErrorKind::NotFound {
        eprintln!(
            "pg-entra: {program} not found: install the PostgreSQL client (Debian/Ubuntu: postgresql-client), or set PG_ENTRA_PSQL to psql's path"
        );
        Err(Failure::PsqlMissing)
    } else {
        eprintln!("pg-entra: cannot run {program}: {error}");
        Err(Failure::PsqlMissing)
    }
}

/// `sslmode=disable|allow|prefer` in a psql argument (a connection string or URL).
fn plaintext_mode(arg: &OsString) -> Option<&'static str> {
    // libpq allows spaces around `=` and quotes around values.
    let text = arg.to_string_lossy().to_ascii_lowercase().replace('\'', "");
    let compact = text.split('=').map(str::trim).collect::<Vec<_>>().join("=");
    ["disable", "allow", "prefer"].into_iter().find(|mode| {
        compact
            .split(|c: char| c.is_whitespace() || c == '&' || c == '?')
            .any(|part| part == format!("sslmode={mode}"))
    })
}

/// The system CA bundle for libpq: `SSL_CERT_FILE`, else the first that exists.
fn system_bundle(env: &Environment) -> Option<String> {
    env.var("SSL_CERT_FILE")
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(|path| (*path).to_owned()))
        .find(|path| Path::new(path).is_file())
}

/// Replaces this process with `command`; returns only if it could not.
#[cfg(unix)]
fn exec(mut command: Command) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    command.exec()
}

/// Runs `command` and exits with its status.
#[cfg(not(unix))]
fn exec(mut command: Command) -> std::io::Error {
    match command.status() {
        Ok(status) => std::process::exit(status.code().unwrap_or(1)),
        Err(error) => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_modes_in_arguments() {
        let mode = |arg: &str| plaintext_mode(&OsString::from(arg));
        assert_eq!(mode("host=h sslmode=disable"), Some("disable"));
        assert_eq!(mode("postgresql://h/db?sslmode=prefer"), Some("prefer"));
        assert_eq!(mode("postgresql://h/db?a=b&sslmode=allow"), Some("allow"));
        assert_eq!(mode("sslmode=verify-full"), None);
        assert_eq!(mode("-c"), None);
        assert_eq!(mode("host=h sslmode = 'disable'"), Some("disable"));
        assert_eq!(mode("select 'sslmode=disabled'"), None);
    }
}
