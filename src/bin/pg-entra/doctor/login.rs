//! Step 7: the login with the token inspected earlier, and what a refusal most likely means
//! for this kind of principal.

use std::time::Duration;

use pg_entra::Connector;

use super::{Report, Step};
use crate::claims::{Claims, PrincipalKind};
use crate::exit::Failure;
use crate::server::{ServerArgs, causes};

/// Logs in and reads who, what and how; or explains the refusal.
pub(super) async fn check(
    connector: &Connector,
    timeout: Duration,
    user: &str,
    token_name: Option<&str>,
    claims: &Claims,
    server: &ServerArgs,
    report: &mut Report,
) -> Result<String, Failure> {
    let title = "login";
    let client = match connector.connect().await {
        Ok(client) => client,
        Err(error) => {
            let (step, failure) = diagnose(&error, user, token_name, claims, server);
            return Err(report.fail(step, failure));
        }
    };
    let query = client.query_one(
        "select current_user::text, current_setting('server_version'), \
         (select cipher from pg_stat_ssl where pid = pg_backend_pid())",
        &[],
    );
    let row = match tokio::time::timeout(timeout, query).await {
        Ok(Ok(row)) => row,
        Ok(Err(error)) => {
            let step = Step::failed(
                title,
                format!("logged in, but the first query failed: {error}"),
            );
            return Err(report.fail(step, Failure::Internal));
        }
        Err(_) => {
            let step = Step::failed(
                title,
                format!("logged in, but the first query got no answer within {timeout:?}"),
            );
            return Err(report.fail(step, Failure::Timeout));
        }
    };
    let current_user: String = row.get(0);
    let version: String = row.get(1);
    let cipher: Option<String> = row.get(2);
    let database = connector.base_config().get_dbname().unwrap_or("postgres");
    let step = Step::passed(title, format!("logged in as {current_user}"))
        .detail("current_user", current_user.clone())
        .detail("server_version", version)
        .detail("database", database)
        .detail(
            "TLS cipher",
            cipher.unwrap_or_else(|| "(none reported)".into()),
        );
    report.record(step, Failure::Internal)?;
    Ok(format!(
        "{current_user} can log in to {database} with an Entra token"
    ))
}

/// The failure class and the likely causes of a refused or failed login.
fn diagnose(
    error: &pg_entra::Error,
    user: &str,
    token_name: Option<&str>,
    claims: &Claims,
    server: &ServerArgs,
) -> (Step, Failure) {
    let title = "login";
    let database = server
        .dbname
        .clone()
        .or_else(|| pg_entra::Environment::process().var("PGDATABASE"))
        .unwrap_or_else(|| "postgres".into());
    let code = match error {
        pg_entra::Error::Postgres { source } => source.code().map(|c| c.code().to_owned()),
        _ => None,
    };
    let server_message = match error {
        pg_entra::Error::Postgres { source } => source
            .as_db_error()
            .map(|db| db.message().to_owned())
            .unwrap_or_else(|| error.to_string()),
        _ => causes(error).join(": "),
    };
    match (error, code.as_deref()) {
        // The library withheld a refusal that quoted the token: nothing of it is shown.
        (pg_entra::Error::PostgresMessageWithheld { .. }, _) => (
            Step::failed(title, error.to_string())
                .cause("the server repeated the password it was sent: Azure Database for PostgreSQL never does, so this is probably not the intended server (or something in between answers for it)")
                .next(error.hint().unwrap_or("check the host")),
            Failure::LoginRefused,
        ),
        (_, Some("28P01")) => (
            password_refused(&server_message, user, token_name, claims, server),
            Failure::LoginRefused,
        ),
        (_, Some("28000")) => {
            let mut step = Step::failed(title, format!("{server_message} (28000)"));
            if server_message.contains("pg_hba.conf") {
                step = step
                    .cause("Single Server: no firewall rule admits this machine's address (the message names it); add one under Connection security")
                    .cause("Microsoft Entra authentication is not enabled on the server (Flexible Server: Security → Authentication)")
                    .cause("this is a different server than intended (check the host)");
            } else {
                step = step
                    .cause(format!("the role {user} exists but is not a Microsoft Entra principal, or is not allowed to log in"))
                    .next("an Entra administrator can recreate it with the SQL of step 5");
            }
            (step, Failure::AccessRule)
        }
        (_, Some("3D000")) => (
            Step::failed(title, format!("{server_message} (3D000)"))
                .next("--dbname or PGDATABASE must name an existing database; `postgres` always exists")
                .next(format!("or an administrator runs: CREATE DATABASE \"{}\"; GRANT CONNECT ON DATABASE \"{}\" TO \"{}\";", database.replace('"', "\"\""), database.replace('"', "\"\""), user.replace('"', "\"\""))),
            Failure::DatabaseMissing,
        ),
        (pg_entra::Error::ConnectTimeout { .. }, _) => (
            Step::failed(title, error.to_string())
                .cause("the server accepted the connection but did not finish the login in time (overloaded, or a proxy in the way)")
                .next("try again with a longer --timeout"),
            Failure::Timeout,
        ),
        (pg_entra::Error::Tls { .. }, _) => (
            Step::failed(title, causes(error).join(": ")).next(
                error
                    .hint()
                    .unwrap_or("check the server's certificate and PGSSLROOTCERT"),
            ),
            Failure::Tls,
        ),
        _ => {
            let mut step = Step::failed(title, causes(error).join(": "));
            if let Some(hint) = error.hint() {
                step = step.next(hint);
            }
            (step, Failure::Internal)
        }
    }
}

/// 28P01: the server did not accept the token for `user`. The causes in the order they are
/// met in practice for this kind of principal.
fn password_refused(
    message: &str,
    user: &str,
    token_name: Option<&str>,
    claims: &Claims,
    server: &ServerArgs,
) -> Step {
    let mut step = Step::failed("login", format!("{message} (28P01)"));
    let kind = claims.kind();
    match (server.given_user(), token_name) {
        (Some((given, source)), Some(name)) if given != name => {
            step = step.cause(format!(
                "{source}={given} is not this principal's name, {name}: unset {source}, or use the name of a role created for this principal's object id"
            ));
        }
        (Some((given, source)), None) if kind != PrincipalKind::ServicePrincipal => {
            step = step.cause(format!(
                "{source}={given} is not a role created for this {}",
                kind.describe()
            ));
        }
        _ => {}
    }
    step = step.cause(format!(
        "no role {user} exists for this principal on this server: an Entra administrator runs the SQL of step 5"
    ));
    if kind.is_managed_identity() {
        step = step.cause(
            "the role was created for another identity of the same name (a deleted and recreated identity has a new object id): drop it and create it again with pgaadauth_create_principal_with_oid",
        );
    }
    if kind == PrincipalKind::User {
        step = step.cause(
            "the role's name differs in case from the UPN (role names are case-sensitive), or the user is a guest whose UPN differs from the sign-in name",
        );
    }
    if kind == PrincipalKind::ServicePrincipal {
        step = step.cause(
            "the role was created with pgaadauth_create_principal under a name shared by another application: create it with pgaadauth_create_principal_with_oid and this object id",
        );
    }
    step = step
        .cause("Microsoft Entra authentication is not enabled on the server (Security → Authentication)")
        .cause("the server belongs to another Entra tenant than the token (see tid in step 3)");
    step
}
