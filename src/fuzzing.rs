//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not part of the API):
//! each parser of outside input, fed whatever libFuzzer makes, with the invariants a run must
//! keep asserted. A panic here is a bug; each crash's input becomes a unit test next to the
//! parser it broke.

use std::sync::Arc;

use time::OffsetDateTime;

use crate::testing::{FakeCredential, Principal};

/// A secret the fuzzed answers may echo: no 8-byte piece of it may be shown.
const SECRET: &str = "fuzz-secret-5e7b1c9a0d2f4e68";

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_764_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A connection string (libpq keywords or a URL) on the first line, `VAR=value` environment
/// lines after it: the connector's reading of both.
pub fn conninfo(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let (conninfo, rest) = text.split_once('\n').unwrap_or((text, ""));
    let vars: Vec<(String, String)> = rest
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let Ok(cache) = crate::TokenCache::builder(Arc::new(FakeCredential::new(
        Principal::user_assigned("fuzz"),
    )))
    .build() else {
        return;
    };
    let built = crate::Connector::builder()
        .environment(crate::Environment::from_vars(vars))
        .connection_string(conninfo)
        .token_cache(cache)
        .build();
    if let Ok(connector) = built {
        let _ = connector.libpq_parameters("fuzz");
        let _ = format!("{connector:?}");
    }
}

/// A token endpoint's answer, as a success and as an error: the error's shown parts never
/// hold a piece of a secret the request carried.
pub fn token_response(data: &[u8]) {
    let _ = crate::credential::token_response::parse_token_response(data, now());
    let body = crate::credential::token_response::ErrorBody::parse(data, &[SECRET]);
    let shown = format!("{:?} {:?} {:?}", body.code, body.description, body.excerpt);
    for start in 0..SECRET.len() - 8 {
        assert!(
            !shown.contains(&SECRET[start..start + 8]),
            "a piece of the secret is shown: {shown}"
        );
    }
}

/// A `Retry-After` header value (seconds or an HTTP date).
pub fn retry_after(data: &[u8]) {
    if let Some(value) = text(data) {
        let _ = crate::credential::managed_identity::parse_retry_after(value, now());
    }
}

/// An access token's claims (the user name, audience, guest marks).
pub fn jwt_claims(data: &[u8]) {
    let Some(secret) = text(data) else { return };
    let token = crate::Token::from(azure_core::credentials::AccessToken::new(
        secret.to_owned(),
        now(),
    ));
    let _ = token.username();
    let _ = token.username_claim();
    let _ = token.audience();
    let _ = token.is_guest();
    let _ = format!("{token:?}");
}

/// The Azure CLI's (first byte even) or the Azure Developer CLI's (odd) JSON output.
pub fn cli_output(data: &[u8]) {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let _ = crate::credential::cli::parse_output(first % 2 == 0, rest);
}

/// The Arc agent's `WWW-Authenticate` challenge: a path it names is accepted only as a
/// `.key` file directly in the agent's key folder (here one that does not exist, so never).
pub fn arc_challenge(data: &[u8]) {
    let Some(challenge) = text(data) else { return };
    let folder = std::path::Path::new("/nonexistent-pg-entra-fuzz/tokens");
    let accepted = crate::credential::managed_identity::arc_challenge_path(Some(challenge), folder);
    assert!(
        accepted.is_err(),
        "{challenge:?} was accepted outside the key folder"
    );
}

/// A refused login: a SQLSTATE on the first line and the server's text after it, read as
/// PostgreSQL, a pooler and libpq give it.
pub fn login_refusal(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let (code, message) = text.split_once('\n').unwrap_or(("28P01", text));
    let _ = crate::LoginRefusal::classify(code, message);
    let _ = crate::LoginRefusal::classify_pooled(code, message, message.len());
    let _ = crate::LoginRefusal::from_libpq(message);
}
