//! Steps 1 to 5: configuration, credential, token, user name, the role's SQL. Network and login
//! have files of their own.

use std::sync::Arc;
use std::time::Duration;

use pg_entra::{Connector, Environment, Token, TokenCache, TokenCredential};
use time::OffsetDateTime;

use super::{Report, Step, login, network, role_sql};
use crate::claims::{Claims, PrincipalKind};
use crate::exit::Failure;
use crate::server::{IssuedToken, ServerArgs, causes};

/// Warn when a token has less than this left: a login a little later may see it expired.
const SHORT_LIFE: Duration = Duration::from_secs(5 * 60);

/// Every step in order; the success line, or the failure that stopped the check.
pub(super) async fn examine(
    server: &ServerArgs,
    timeout: Duration,
    report: &mut Report,
) -> Result<String, Failure> {
    let (chain, connector) = configuration(server, timeout, report)?;
    // The connector has checked it (a scope it cannot read stops step 1).
    let scope = connector.token_cache().scope().to_owned();
    let access = credential(&chain, &scope, report).await?;
    let token = Token::from(access.clone());
    let claims = Claims::of(token.secret());
    // The connector's own rule for a token too close to its expiry to be used.
    let usable = match TokenCache::builder(Arc::new(IssuedToken(access.clone())))
        .scope(&scope)
        .build()
    {
        Ok(cache) => cache
            .token()
            .await
            .map(drop)
            .map_err(|error| causes(&error).join(": ")),
        Err(error) => Err(error.to_string()),
    };
    token_step(&token, &claims, &scope, usable, server, report)?;
    let user = user_name(&connector, &token, &claims, server, report)?;
    report.record(role_sql::step(&user, &claims, server), Failure::Internal)?;
    network::check(&connector, timeout, report).await?;
    // The login uses the token inspected above, not a new one.
    let login_connector = match server.connector(Arc::new(IssuedToken(access)), Some(timeout)) {
        Ok(connector) => connector,
        Err(error) => {
            let step = Step::failed_with("login", &error);
            return Err(report.fail(step, Failure::Configuration));
        }
    };
    login::check(
        &login_connector,
        timeout,
        &user,
        &token,
        &claims,
        server,
        report,
    )
    .await
}

/// Step 1: the settings and where each came from; the chain and connector they make.
fn configuration(
    server: &ServerArgs,
    timeout: Duration,
    report: &mut Report,
) -> Result<(Arc<pg_entra::DefaultAzureCredential>, Connector), Failure> {
    let built = server.chain().map(Arc::new).and_then(|chain| {
        let credential: Arc<dyn TokenCredential> = chain.clone();
        server
            .connector(credential, Some(timeout))
            .map(|connector| (chain, connector))
    });
    let (chain, connector) = match built {
        Ok(built) => built,
        Err(error) => {
            let step = Step::failed_with("configuration", &error);
            return Err(report.fail(step, Failure::Configuration));
        }
    };
    let config = connector.base_config();
    let hosts = server.hosts().join(",");
    let summary = format!(
        "{hosts}, database {}, TLS {}",
        config.get_dbname().unwrap_or("postgres"),
        connector.ssl_mode().as_str()
    );
    let mut step = Step::passed("configuration", summary);
    for setting in server.settings() {
        let value = setting.value.as_deref().unwrap_or("(derived)");
        step = step.setting(setting.name, value, setting.source);
    }
    let scope_source = match (
        &server.scope,
        server
            .hosts()
            .iter()
            .any(|h| pg_entra::Cloud::server_scope(h).is_some()),
    ) {
        (Some(_), _) => "--scope",
        (None, true) => "the server's host name",
        (None, false) => "the default cloud",
    };
    step = step.setting("scope", connector.token_cache().scope(), scope_source);
    report.record(step, Failure::Configuration)?;
    Ok((chain, connector))
}

/// Step 2: which member of the chain produced a token, and why the earlier ones did not.
async fn credential(
    chain: &pg_entra::DefaultAzureCredential,
    scope: &str,
    report: &mut Report,
) -> Result<pg_entra::credential::AccessToken, Failure> {
    let answer = chain.get_token(&[scope], None).await;
    let skipped = chain.skipped_credentials();
    let (mut step, access) = match answer {
        Ok(access) => {
            let selected = chain.selected_credential().unwrap_or("the credential");
            (
                Step::passed("credential", selected.to_owned()),
                Some(access),
            )
        }
        Err(error) => {
            let lines = causes(&error);
            let identity_unknown = lines
                .iter()
                .any(|line| line.contains("does not know this identity"));
            let summary = if identity_unknown {
                "no token: the managed identity endpoint answered 400 (no such identity on this resource)".to_owned()
            } else if skipped.len() == chain.credential_names().len() {
                "no credential in the chain could be used here".to_owned()
            } else {
                lines.first().cloned().unwrap_or_default()
            };
            let mut step = Step::failed("credential", summary);
            // The chain's own message lists the members already shown below; keep the rest.
            if skipped.len() != chain.credential_names().len() {
                for line in lines.iter().skip(1) {
                    step = step.cause(line.clone());
                }
            }
            step = step
                .next("on an Azure VM, App Service, Container Apps or Functions: turn on the resource's managed identity, or assign a user-assigned one and set AZURE_CLIENT_ID to its client id")
                .next("on AKS: workload identity needs the pod's service account federated with the identity (the webhook sets AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE)")
                .next("on a developer machine: `az login` or `azd auth login`; for a service principal set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET");
            (step, None)
        }
    };
    let passed_over = if access.is_some() {
        "skipped"
    } else {
        "unavailable"
    };
    for (name, reason) in &skipped {
        step = step.detail(*name, format!("{passed_over}: {reason}"));
    }
    if let Some(client_id) = Environment::process().var("AZURE_CLIENT_ID") {
        step = step.detail("AZURE_CLIENT_ID", client_id);
    }
    if let Some(only) = Environment::process().var("AZURE_TOKEN_CREDENTIALS") {
        step = step.detail("AZURE_TOKEN_CREDENTIALS", only);
    }
    report.record(step, Failure::Credential)?;
    access.ok_or(Failure::Credential)
}

/// Step 3: who the token is for, for what, until when. Never the token or its signature.
fn token_step(
    token: &Token,
    claims: &Claims,
    scope: &str,
    usable: Result<(), String>,
    server: &ServerArgs,
    report: &mut Report,
) -> Result<(), Failure> {
    let now = OffsetDateTime::now_utc();
    let left = token.expires_on() - now;
    let expires = format!(
        "{} ({})",
        token
            .expires_on()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        if left.is_positive() {
            format!("in {}", human_duration(left.unsigned_abs()))
        } else {
            format!("{} ago", human_duration(left.unsigned_abs()))
        }
    );
    let kind = claims.kind();
    // The resource the token was asked for: its audience must be exactly this.
    let expected_audience = scope.strip_suffix("/.default").unwrap_or(scope).to_owned();
    let audience = claims.text("aud");
    // The resource the server's kind takes, when its host name tells.
    let server_resource = server.hosts().iter().find_map(|host| {
        pg_entra::Cloud::server_scope(host)
            .map(|scope| (host.clone(), scope.trim_end_matches("/.default").to_owned()))
    });
    let mut step = if !left.is_positive() {
        Step::failed("token", "the token has already expired")
            .cause("this machine's clock is ahead of the identity endpoint's (check NTP)")
            .cause("the identity endpoint or a cache in front of it handed out an old token")
            .next("compare `date -u` with the expiry above, then ask for a new token (with the Azure CLI: `az account get-access-token`)")
    } else if let Err(why) = usable {
        Step::failed("token", format!("the connector would not use this token: {why}"))
            .cause("it expires within the connector's expiry margin (30 s by default), so a login could outlive it")
            .cause("this machine's clock is ahead, or the identity endpoint or a cache in front of it handed out an old token")
            .next("ask for a new token; with the Azure CLI, `az account get-access-token` refreshes it")
    } else if let Some(audience) = audience.as_deref().filter(|aud| *aud != expected_audience) {
        Step::failed(
            "token",
            format!(
                "the token's audience is {audience:?}, not the resource it was asked for, {expected_audience:?}: the server refuses it"
            ),
        )
        .cause("the identity endpoint minted the audience from a differently written resource (a trailing `/`, say)")
        .cause("--scope names another resource than this server's (Cosmos DB for PostgreSQL takes https://token.postgres.cosmos.azure.com, Flexible and Single Server https://ossrdbms-aad.database.windows.net in the public cloud)")
        .next(format!(
            "request the scope {expected_audience}/.default (drop --scope to take the server's own)"
        ))
    } else if let Some(audience) = audience
        .as_deref()
        .filter(|aud| !pg_entra::Cloud::is_postgres_resource(aud))
    {
        Step::failed(
            "token",
            format!("the token is for {audience}, not for Azure Database for PostgreSQL"),
        )
        .next("drop --scope: the server's own scope is taken from its host name")
    } else if let Some((host, wanted)) =
        server_resource.filter(|(_, wanted)| audience.as_deref().is_some_and(|aud| aud != wanted))
    {
        Step::failed(
            "token",
            format!(
                "the token is for {:?}, but {host} takes tokens for {wanted:?}",
                audience.as_deref().unwrap_or_default()
            ),
        )
        .next(format!(
            "request the scope {wanted}/.default (drop --scope)"
        ))
    } else {
        Step::passed("token", format!("for a {}", kind.describe()))
    };
    if claims.is_empty() {
        step = step.warning("the token is not a JWT: its claims cannot be shown");
    }
    for (name, value) in claims.shown() {
        step = step.detail(name, value);
    }
    step = step.detail("expires", expires);
    if left.is_positive() && left.unsigned_abs() < SHORT_LIFE {
        step = step.warning("the token expires within 5 minutes");
    }
    report.record(step, Failure::Token)
}

/// Step 4: the role name the login will use, and the rule that produced it.
fn user_name(
    connector: &Connector,
    token: &Token,
    claims: &Claims,
    server: &ServerArgs,
    report: &mut Report,
) -> Result<String, Failure> {
    let user = match connector.user_for(token) {
        Ok(user) => user,
        Err(error) => {
            let step = Step::failed_with("user name", &error);
            return Err(report.fail(step, Failure::Token));
        }
    };
    let rule = match (server.given_user(), token.username_claim()) {
        (Some((_, source)), _) => format!("given by {source}"),
        (None, Some("xms_mirid")) => format!(
            "from the token's xms_mirid claim: the {}'s name, the last segment of its resource id",
            claims.kind().describe()
        ),
        (None, Some(claim)) => {
            format!("from the token's {claim} claim (role names are case-sensitive)")
        }
        (None, None) => "from the token".to_owned(),
    };
    let mut step = Step::passed("user name", user.clone()).detail("rule", rule);
    if server.single_server {
        step = step.detail("Single Server", "`@<server>` appended to the name");
    }
    if let (Some((given, source)), Some(derived)) = (server.given_user(), token.username())
        && !given.eq(derived)
        && !given.starts_with(&format!("{derived}@"))
    {
        step = step.warning(format!(
            "{source}={given} differs from the name in the token ({derived}): the role must have been created for this principal's object id"
        ));
    }
    if claims.kind() == PrincipalKind::ServicePrincipal && server.given_user().is_some() {
        step = step.detail(
            "note",
            "a service principal's token carries no name: the role name is whatever the administrator created for its object id",
        );
    }
    report.record(step, Failure::Token)?;
    Ok(user)
}

/// "59 min", "2 h 5 min", "42 s".
fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min", seconds / 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}
