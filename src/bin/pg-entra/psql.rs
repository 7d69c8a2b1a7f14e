//! `pg-entra psql`: psql with a fresh token as its password, in its environment only.

use std::ffi::OsString;
use std::process::Command;

use pg_entra::{Connector, Environment, SslMode};

use crate::exit::Failure;
use crate::psql_args::{self, Unreadable};
use crate::server::{ServerArgs, causes};

/// Arguments of `pg-entra psql`.
#[derive(Debug, clap::Args)]
pub(crate) struct PsqlArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Arguments for psql, after `--` (`pg-entra psql -- -c 'select 1'`).
    #[arg(last = true, value_name = "PSQL ARGS")]
    psql_args: Vec<OsString>,
}

/// libpq's variables that choose where and how to connect. psql gets none of them: the
/// connection string it is given says all of that (values there beat variables, but a
/// variable for a keyword left out, `PGSERVICE` or `PGHOSTADDR` say, would still count).
const LIBPQ_CONNECTION_VARS: [&str; 32] = [
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGAPPNAME",
    "PGSSLMODE",
    "PGREQUIRESSL",
    "PGSSLCOMPRESSION",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGSSLROOTCERT",
    "PGSSLCRL",
    "PGSSLCRLDIR",
    "PGSSLSNI",
    "PGREQUIREPEER",
    "PGSSLMINPROTOCOLVERSION",
    "PGSSLMAXPROTOCOLVERSION",
    "PGGSSENCMODE",
    "PGKRBSRVNAME",
    "PGGSSLIB",
    "PGCONNECT_TIMEOUT",
    "PGTARGETSESSIONATTRS",
    "PGLOADBALANCEHOSTS",
    "PGCHANNELBINDING",
    "PGSSLNEGOTIATION",
    "PGSSLCERTMODE",
];

/// Runs psql (`PG_ENTRA_PSQL`, else `psql` on the `PATH`) in place of this process.
///
/// Where psql connects is decided here, not by psql: its connection arguments (`-d`, `-h`,
/// `-p`, `-U`, the positional database and user, a connection string or URL among them) are
/// read as psql reads them and checked by the crate's connector with libpq's own rules, and
/// psql is handed one connection string with `sslmode=verify-full` and the root file. A
/// token is then sent only to a server whose certificate names the host.
pub(crate) async fn run(args: PsqlArgs) -> Result<(), Failure> {
    let psql = psql_args::PsqlArgs::parse(&args.psql_args).map_err(|Unreadable(why)| {
        eprintln!(
            "pg-entra: psql's arguments cannot be read exactly ({why}); give the server with --host, --port, --dbname and --user, or as a connection string"
        );
        Failure::Configuration
    })?;
    let server = args.server;
    // The settings are checked before a token is asked for (plaintext modes, a Unix socket,
    // `service`, no host).
    let connector = connector_for(&server, &psql.connection).map_err(|error| {
        eprintln!("pg-entra: {error}");
        Failure::Configuration
    })?;
    // The root file is decided before a token is asked for: no bundle, no token.
    connector.libpq_parameters("-").map_err(|error| {
        eprintln!("pg-entra: {error}");
        Failure::Configuration
    })?;
    if connector.ssl_mode() != SslMode::VerifyFull {
        eprintln!(
            "pg-entra: sslmode={} is run as verify-full: the token goes only to a server whose certificate names the host",
            connector.ssl_mode().as_str()
        );
    }
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

    let program = Environment::process()
        .var("PG_ENTRA_PSQL")
        .unwrap_or_else(|| "psql".into());
    let mut command = Command::new(&program);
    let pairs = connector.libpq_parameters(&user).map_err(|error| {
        eprintln!("pg-entra: {error}");
        Failure::Configuration
    })?;
    let mut dbname = OsString::from("--dbname=");
    dbname.push(pg_entra::libpq::conninfo(&pairs));
    command.arg(dbname).args(&psql.own);
    for var in LIBPQ_CONNECTION_VARS {
        command.env_remove(var);
    }
    // The same settings as variables, for every later connection of the session (`\connect`,
    // in a psqlrc too): libpq's defaults would be `sslmode=prefer`, unverified.
    for (key, value) in &pairs {
        if let Some(var) = variable_for(key) {
            command.env(var, value);
        }
    }
    // Without it GNU getopt stops permuting, and psql would read its arguments otherwise.
    command.env_remove("POSIXLY_CORRECT");
    command.env("PGPASSWORD", token.secret());
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

/// The connector for what psql was asked to connect to. Layers, highest first: this
/// command's flags; a connection string or URL given as psql's database; psql's `-h`, `-p`,
/// `-U` and plain database name; libpq's variables (as in psql, where a connection string
/// given as the database beats the other options, which beat the variables).
fn connector_for(
    server: &ServerArgs,
    psql: &psql_args::ConnectionArgs,
) -> Result<Connector, pg_entra::Error> {
    let (conninfo, plain_dbname) = match psql.dbname.as_deref() {
        Some(dbname) if is_connection_string(dbname) => (Some(dbname), None),
        other => (None, other),
    };
    // As `Environment` does, a variable that is not UTF-8 counts as unset.
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect();
    for (var, value) in [
        // The connector's own chain reads the tenant from the environment.
        ("AZURE_TENANT_ID", server.tenant.as_deref()),
        ("PGHOST", psql.host.as_deref()),
        ("PGPORT", psql.port.as_deref()),
        ("PGUSER", psql.username.as_deref()),
        ("PGDATABASE", plain_dbname),
    ] {
        if let Some(value) = value {
            vars.retain(|(name, _)| name != var);
            vars.push((var.to_owned(), value.to_owned()));
        }
    }
    let mut builder = Connector::builder()
        .environment(Environment::from_vars(vars))
        .single_server(server.single_server);
    if let Some(conninfo) = conninfo {
        builder = builder.connection_string(conninfo);
    }
    // Without --scope, the connector takes the scope (and the credential chain its cloud)
    // from the host it ends up with, wherever that was given.
    if let Some(scope) = &server.scope {
        builder = builder.scope(scope);
    }
    if let Some(host) = &server.host {
        builder = builder.host(host);
    }
    if let Some(port) = server.port {
        builder = builder.port(port);
    }
    if let Some(dbname) = &server.dbname {
        builder = builder.dbname(dbname);
    }
    if let Some(user) = &server.user {
        builder = builder.user(user);
    }
    builder.build()
}

/// libpq's test for a database name that is a whole connection string (`recognized_connection_string`).
fn is_connection_string(dbname: &str) -> bool {
    dbname.starts_with("postgresql://") || dbname.starts_with("postgres://") || dbname.contains('=')
}

/// libpq's variable for a keyword of `Connector::libpq_parameters`.
fn variable_for(key: &str) -> Option<&'static str> {
    Some(match key {
        "host" => "PGHOST",
        "hostaddr" => "PGHOSTADDR",
        "port" => "PGPORT",
        "dbname" => "PGDATABASE",
        "user" => "PGUSER",
        "sslmode" => "PGSSLMODE",
        "sslrootcert" => "PGSSLROOTCERT",
        "gssencmode" => "PGGSSENCMODE",
        "application_name" => "PGAPPNAME",
        "options" => "PGOPTIONS",
        "connect_timeout" => "PGCONNECT_TIMEOUT",
        "target_session_attrs" => "PGTARGETSESSIONATTRS",
        "channel_binding" => "PGCHANNELBINDING",
        "load_balance_hosts" => "PGLOADBALANCEHOSTS",
        _ => return None,
    })
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
    fn connection_strings_as_libpq_recognizes_them() {
        assert!(is_connection_string("host=h"));
        assert!(is_connection_string("postgresql://h/db"));
        assert!(is_connection_string("postgres://h"));
        assert!(!is_connection_string("orders"));
    }
}
