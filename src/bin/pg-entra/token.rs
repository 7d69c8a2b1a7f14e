//! `pg-entra token`: the access token on stdout and nothing else.

use std::sync::Arc;

use pg_entra::TokenCredential;
use pg_entra::credential::AccessToken;
use time::format_description::well_known::Rfc3339;

use crate::exit::Failure;
use crate::server::{IssuedToken, ServerArgs, causes};

/// Arguments of `pg-entra token`.
#[derive(Debug, clap::Args)]
pub(crate) struct TokenArgs {
    #[command(flatten)]
    server: ServerArgs,
}

/// Prints the token (or, with `--json`, the token with its expiry, credential and user name).
/// Errors go to stderr and never include the token.
pub(crate) async fn run(args: TokenArgs, json: bool) -> Result<(), Failure> {
    let server = args.server;
    let chain = server.chain().map_err(|error| {
        eprintln!("pg-entra: {error}");
        Failure::Configuration
    })?;
    let scope = server.normal_scope().map_err(|error| {
        eprintln!("pg-entra: {error}");
        Failure::Configuration
    })?;
    // Through the connector's cache, so that a token too close to its expiry to be used (an
    // Azure CLI answer whose `expires_on` has passed, say) is refused here as it would be there.
    let chain = Arc::new(chain);
    let cache = pg_entra::TokenCache::builder(Arc::clone(&chain) as Arc<dyn TokenCredential>)
        .scope(&scope)
        .build()
        .map_err(|error| {
            eprintln!("pg-entra: {error}");
            Failure::Configuration
        })?;
    let token = cache.token().await.map_err(|error| {
        eprintln!("pg-entra: no usable access token for {scope}:");
        let lines = causes(&error);
        for line in &lines {
            eprintln!("  {line}");
        }
        // The credential answered, with a token the connector would not use.
        if lines.iter().any(|line| line.contains("too soon to use")) {
            Failure::Token
        } else {
            Failure::Credential
        }
    })?;
    let access = AccessToken::new(token.secret().to_owned(), token.expires_on());
    if !json {
        println!("{}", token.secret());
        return Ok(());
    }
    // The name a login would use: given, else from the token (with Single Server's suffix
    // when the host is known).
    let user = match server.hosts().is_empty() {
        false => server
            .connector(Arc::new(IssuedToken(access)), None)
            .ok()
            .and_then(|connector| connector.user_for(&token).ok()),
        true => server
            .given_user()
            .map(|(user, _)| user)
            .or_else(|| token.username().map(str::to_owned)),
    };
    let seconds_left = (token.expires_on() - time::OffsetDateTime::now_utc()).whole_seconds();
    let document = serde_json::json!({
        "access_token": token.secret(),
        "expires_on": token.expires_on().format(&Rfc3339).unwrap_or_default(),
        "expires_in": seconds_left,
        "scope": scope,
        "credential": chain.selected_credential(),
        "user": user,
        "user_claim": if server.given_user().is_some() { None } else { token.username_claim() },
    });
    println!("{document}");
    Ok(())
}
