//! Step 7: the login with the token inspected earlier, and what a refusal most likely means
//! for this kind of principal.

use std::time::Duration;

use pg_entra::{Connector, LoginRefusal, Token};

use super::{Report, Step};
use crate::claims::{Claims, PrincipalKind};
use crate::exit::Failure;
use crate::server::{ServerArgs, causes};

/// Logs in and reads who, what and how; or explains the refusal.
pub(super) async fn check(
    connector: &Connector,
    timeout: Duration,
    user: &str,
    token: &Token,
    claims: &Claims,
    server: &ServerArgs,
    report: &mut Report,
) -> Result<String, Failure> {
    let title = "login";
    let client = match connector.connect().await {
        Ok(client) => client,
        Err(error) => {
            let (step, failure) = diagnose(&error, user, token, claims, server);
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
    token: &Token,
    claims: &Claims,
    server: &ServerArgs,
) -> (Step, Failure) {
    let title = "login";
    let token_name = token.username();
    let database = server
        .dbname
        .clone()
        .or_else(|| pg_entra::Environment::process().var("PGDATABASE"))
        .unwrap_or_else(|| "postgres".into());
    let code = match error {
        pg_entra::Error::Postgres { source }
        | pg_entra::Error::PoolerRefused { source, .. }
        | pg_entra::Error::UnexpectedResource { source, .. } => {
            source.code().map(|c| c.code().to_owned())
        }
        _ => None,
    };
    let server_message = match error {
        pg_entra::Error::Postgres { source }
        | pg_entra::Error::PoolerRefused { source, .. }
        | pg_entra::Error::UnexpectedResource { source, .. } => source
            .as_db_error()
            .map(|db| db.message().to_owned())
            .unwrap_or_else(|| error.to_string()),
        _ => causes(error).join(": "),
    };
    if let Some(step) = entra_refusal(error, &server_message, code.as_deref(), user, token, claims)
    {
        return (step, Failure::LoginRefused);
    }
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

/// The refusals Azure's authentication layer words itself, each with its own cause; `None`
/// for the others (a missing role, an access rule), which the SQLSTATE sorts.
fn entra_refusal(
    error: &pg_entra::Error,
    message: &str,
    code: Option<&str>,
    user: &str,
    token: &Token,
    claims: &Claims,
) -> Option<Step> {
    let refusal = error.login_refusal()?;
    let failed = || Step::failed("login", format!("{message} ({})", code.unwrap_or("-")));
    let step = match &refusal {
        LoginRefusal::TokenExpired => failed()
            .cause("the token expired between step 3 and the login, or this machine's clock is ahead of Entra's (compare `date -u` with the expiry in step 3)")
            .cause("something in front of the identity endpoint hands out old tokens"),
        LoginRefusal::WrongAudience { resource } => {
            let step = failed().cause(format!(
                "the token's audience ({}) is not the resource the server takes{}",
                claims.text("aud").unwrap_or_else(|| "none".into()),
                resource
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
            match resource {
                Some(resource) if pg_entra::Cloud::is_postgres_resource(resource) => {
                    step.next(format!("request the scope {resource}/.default (--scope, or the connector's scope)"))
                }
                Some(resource) => step.cause(format!(
                    "{resource} is not an Azure Database for PostgreSQL resource: this is probably not the intended server, and no token is requested for it"
                )),
                None => step.next(refusal.hint()),
            }
        }
        LoginRefusal::TokenInvalid => failed()
            .cause(format!(
                "the token is from tenant {}, and the server belongs to another (a guest signs in to the server's tenant: set AZURE_TENANT_ID or --tenant, or `az login --tenant <server's tenant>`)",
                claims.text("tid").unwrap_or_else(|| "?".into())
            ))
            .cause("a plain password was sent to an Entra role (this command always sends a token)"),
        LoginRefusal::PrincipalTypeMismatch { role } => {
            // The SQL names the role this login used, never one the server merely mentions.
            if role.as_deref().is_some_and(|named| named != user) {
                return Some(failed().cause(format!(
                    "the server names the role {:?}, not the login's {user:?}: check the host",
                    role.as_deref().unwrap_or_default()
                )));
            }
            let role = user;
            let kind = claims.kind();
            let object_type = if kind == PrincipalKind::User { "user" } else { "service" };
            let mut step = failed().cause(format!(
                "the role {role} was created for another kind of principal than this {}",
                kind.describe()
            ));
            if let Some(oid) = claims.object_id() {
                step = step.sql(format!(
                    "-- as an Entra administrator, in the postgres database:\nDROP ROLE \"{}\";\nselect * from pgaadauth_create_principal_with_oid('{}', '{}', '{object_type}', false, false);",
                    role.replace('"', "\"\""),
                    role.replace('\'', "''"),
                    oid.replace('\'', "''"),
                ));
            }
            step
        }
        LoginRefusal::PoolerRefusedLongPassword => failed()
            .cause(format!(
                "a connection pooler (PgBouncer: Azure's built-in one listens on 6432) refused or cut the password for its length: the token is {} bytes, and PgBouncer up to 1.25 keeps at most 2,047",
                token.secret().len()
            ))
            .cause("the token is long because it lists the identity's groups (see the claims of step 3): each adds about 50 bytes")
            .cause("this is not a token refusal: a new token would be refused the same way")
            .next("connect to port 5432 (PostgreSQL itself), or put a PgBouncer in front that takes long passwords"),
        LoginRefusal::PoolerLoginRetryWait => failed()
            .cause("PgBouncer's last login to the server for this user failed (an expired or revoked token, or a password that is not a token), and it turns new logins away for server_login_retry seconds (15 by default)")
            .next("run the doctor against port 5432 to see the server's own refusal, or wait and try again"),
        _ => return None,
    };
    Some(step)
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
    // Single Server's roles are made with CREATE ROLE (step 5), not pgaadauth.
    if server.single_server {
        return step
            .cause("the role was created with another application id as its password (Single Server binds a role to an application id, not an object id)")
            .cause("no Active Directory admin is set on the server (Single Server: Active Directory admin)")
            .cause("the server belongs to another Entra tenant than the token (see tid in step 3)");
    }
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
