//! What a refused login means.
//!
//! Azure's authentication layer refuses a token with distinct messages, and only one of them
//! is cured by a new token for the same scope. The SQLSTATE it attaches is not documented
//! (`28P01` and `28000` are both seen), so the class (`28`) and the message decide. Public
//! reports behind each text: an expired token (pools holding one token), a wrong audience
//! (Cosmos DB for PostgreSQL, MicrosoftDocs/azure-docs#123030; a trailing `/`,
//! azure-sdk-for-java#42632), a token PostgreSQL could not validate (another tenant, or a
//! plain password for an Entra role), a role made for another principal type, and PgBouncer
//! refusing a password as long as a token (`08P01`).
//!
//! PgBouncer answers a client with SQLSTATE `08P01` whatever happened: its own refusals, and
//! the server's refusal of the login it made with the client's password, whose text it
//! relays (1.25 relays the server's own code, without the source location PostgreSQL sends).
//! So under `08P01` the text decides too, and a `password authentication failed` through a
//! pooler for a token longer than PgBouncer keeps is its cut, not the server's verdict
//! (measured against PgBouncer 1.18 and 1.25 in `tests/postgres/pgbouncer.rs`).

/// The longest password PgBouncer 1.17 to 1.25 keeps, in bytes (`MAX_PASSWORD` is 2,048
/// with the terminating zero). A longer one reaches the server cut short (PAM, as Azure's
/// pooler passes tokens on) or is refused (`password too long`); from 4,091 bytes the
/// password message no longer fits PgBouncer's 4 KiB packet buffer (`client sent partial
/// pkt in startup phase`). Upstream raised the limit in July 2026 (pgbouncer#1310).
pub(crate) const PGBOUNCER_LONGEST_PASSWORD: usize = 2047;

/// Why the server refused a login, read from its SQLSTATE and message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoginRefusal {
    /// `The access token has expired`: one forced refresh and one retry.
    TokenExpired,
    /// `… does not have a valid audience claim. Please acquire a new token for the resource
    /// "X"`: the token is for another resource. When `resource` is an Azure Database for
    /// PostgreSQL audience, one token for it and one retry; never for any other resource.
    WrongAudience {
        /// The resource the server names, if it names one.
        resource: Option<String>,
    },
    /// `An error occurred while validating the access token. Please acquire a new token and
    /// retry`: the password is not an Entra token for this server's tenant and resource. At
    /// most one retry.
    TokenInvalid,
    /// `Service Principals cannot generate AAD_AUTH_TOKENTYPE_APP_USER tokens for role[…]`
    /// (and the same for other principal types): the role was created for another kind of
    /// principal. No refresh helps.
    PrincipalTypeMismatch {
        /// The role named between the brackets.
        role: Option<String>,
    },
    /// `password authentication failed for user "…"` with no Entra text: the role is missing
    /// or named otherwise; or, on a plain PostgreSQL such as the test bed, the token was
    /// revoked or its password expired. One forced refresh and one retry.
    PasswordFailed,
    /// Any other refusal of class `28` (`no pg_hba.conf entry`, a role without `LOGIN`, …).
    /// No refresh helps.
    OtherAuthorization,
    /// SQLSTATE `08P01` from a connection pooler (`client sent partial pkt in startup
    /// phase`, `password too long`, or the server's `password authentication failed` for a
    /// token longer than the 2,047 bytes PgBouncer 1.17–1.25 keep): not a token refusal.
    /// Azure's built-in PgBouncer listens on port 6432.
    PoolerRefusedLongPassword,
    /// `server login has been failing, try again later (server_login_retry)`: PgBouncer's
    /// last login to the server for this database and user failed (an expired or revoked
    /// token, say), and it turns new server logins away for `server_login_retry` seconds
    /// (15 by default). Connections it already pools keep working. No refresh helps now.
    PoolerLoginRetryWait,
}

/// What the connector does about a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Force one refresh of the cached token and try once more.
    WithRefreshedToken,
    /// Get one token for this PostgreSQL resource and try once more.
    WithTokenFor(String),
    /// Nothing a new token would change.
    No,
}

impl LoginRefusal {
    /// Reads a refusal from its SQLSTATE and message; `None` for what is not a refused login
    /// (any other SQLSTATE class: a new token never helps those).
    pub fn classify(code: &str, message: &str) -> Option<Self> {
        let lower = message.to_ascii_lowercase();
        if code == "08P01" {
            if lower.contains("partial pkt") || lower.contains("password too long") {
                return Some(LoginRefusal::PoolerRefusedLongPassword);
            }
            if lower.contains("server_login_retry") {
                return Some(LoginRefusal::PoolerLoginRetryWait);
            }
            // PgBouncer relaying the server's refusal: the server's text, PgBouncer's code.
            return Some(Self::from_text(message, &lower))
                .filter(|refusal| *refusal != LoginRefusal::OtherAuthorization);
        }
        if !code.starts_with("28") {
            return None;
        }
        Some(Self::from_text(message, &lower))
    }

    /// As [`classify`](Self::classify), for a refusal that came through a connection pooler
    /// and a password `password_bytes` long: `password authentication failed` for a password
    /// longer than PgBouncer keeps is its cut, not the server's verdict on the token.
    pub(crate) fn classify_pooled(
        code: &str,
        message: &str,
        password_bytes: usize,
    ) -> Option<Self> {
        let refusal = Self::classify(code, message)?;
        // A cut token is refused as a wrong password (a plain PostgreSQL) or as a token that
        // does not validate (Azure's authentication reads the stub as a malformed token).
        if password_bytes > PGBOUNCER_LONGEST_PASSWORD
            && matches!(
                refusal,
                LoginRefusal::PasswordFailed | LoginRefusal::TokenInvalid
            )
        {
            return Some(LoginRefusal::PoolerRefusedLongPassword);
        }
        Some(refusal)
    }

    /// A refused login in libpq's message (`… failed: FATAL:  <server's text>`), which
    /// carries no SQLSTATE: only the texts that name a login refusal count.
    pub(crate) fn from_libpq(message: &str) -> Option<Self> {
        let (_, said) = message.split_once("FATAL:")?;
        let said = said.trim();
        let lower = said.to_ascii_lowercase();
        if lower.contains("partial pkt") || lower.contains("password too long") {
            return Some(LoginRefusal::PoolerRefusedLongPassword);
        }
        match Self::from_text(said, &lower) {
            LoginRefusal::OtherAuthorization
                if !(lower.contains("pg_hba.conf")
                    || lower.contains("not permitted to log in")) =>
            {
                None
            }
            refusal => Some(refusal),
        }
    }

    /// The refusal a server's message names; `OtherAuthorization` when it names none.
    fn from_text(message: &str, lower: &str) -> Self {
        if lower.contains("access token has expired") {
            LoginRefusal::TokenExpired
        } else if lower.contains("valid audience claim") {
            LoginRefusal::WrongAudience {
                resource: between(message, "for the resource \"", "\""),
            }
        } else if lower.contains("error occurred while validating the access token") {
            LoginRefusal::TokenInvalid
        } else if lower.contains("cannot generate aad_auth_tokentype") {
            LoginRefusal::PrincipalTypeMismatch {
                role: between(message, "role[", "]"),
            }
        } else if lower.contains("password authentication failed") {
            LoginRefusal::PasswordFailed
        } else {
            LoginRefusal::OtherAuthorization
        }
    }

    /// What the connector does about it.
    pub(crate) fn retry(&self) -> Retry {
        match self {
            LoginRefusal::TokenExpired
            | LoginRefusal::TokenInvalid
            | LoginRefusal::PasswordFailed => Retry::WithRefreshedToken,
            LoginRefusal::WrongAudience {
                resource: Some(resource),
            } => Retry::WithTokenFor(resource.clone()),
            _ => Retry::No,
        }
    }

    /// What to do next.
    pub fn hint(&self) -> &'static str {
        match self {
            LoginRefusal::TokenExpired => {
                "the token expired before the login; a refreshed one was tried once. If it \
                 persists, this machine's clock is ahead (check NTP) or something hands out old \
                 tokens"
            }
            LoginRefusal::WrongAudience { .. } => {
                "the token is for another resource than the server takes: Cosmos DB for \
                 PostgreSQL takes https://token.postgres.cosmos.azure.com/.default, Flexible and \
                 Single Server https://ossrdbms-aad.database.windows.net/.default (public cloud); \
                 set the scope to the resource the server names, with no trailing `/`"
            }
            LoginRefusal::TokenInvalid => {
                "the password is not an Entra token for this server's tenant and resource: a \
                 token from another tenant (a guest: set AZURE_TENANT_ID to the server's tenant, \
                 or `az login --tenant`), or a plain password sent to an Entra role"
            }
            LoginRefusal::PrincipalTypeMismatch { .. } => {
                "the role was created for another kind of principal (a user's role for a service \
                 principal, say): an Entra administrator drops it and creates it again for this \
                 identity with pgaadauth_create_principal_with_oid (`pg-entra doctor` prints the \
                 SQL)"
            }
            LoginRefusal::PasswordFailed => {
                "an Entra admin must create the role in the postgres database with \
                 `select * from pgaadauth_create_principal('<name>', false, false);` and the user \
                 name must be that principal's name (for a managed identity: its name in Azure)"
            }
            LoginRefusal::OtherAuthorization => {
                "the server refused the role itself, not the token: check the role's LOGIN \
                 right, that Microsoft Entra authentication is enabled, and the server's \
                 firewall rules"
            }
            LoginRefusal::PoolerRefusedLongPassword => {
                "a connection pooler refused the password for its length, not the token: \
                 PgBouncer up to 1.25 (Azure's built-in one is on port 6432) keeps at most \
                 2,047 bytes of a password, and Entra tokens grow past that with group claims; \
                 connect to port 5432, or use a PgBouncer that takes longer passwords. (A \
                 PgBouncer that keeps long passwords refuses this way only a missing role: then \
                 create it, as `pg-entra doctor` shows.)"
            }
            LoginRefusal::PoolerLoginRetryWait => {
                "PgBouncer's last login to the server for this user failed, so it turns new \
                 logins away for server_login_retry seconds (15 by default); its pooled \
                 connections keep working and a new connection after the wait gets in. If it \
                 persists, connect to port 5432 once to see the server's own refusal"
            }
        }
    }
}

/// The text between `start` and the next `end` after it.
fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(text[from..from + len].to_owned()).filter(|inner| !inner.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_text_and_sqlstate() {
        let cases: [(&str, &str, Option<LoginRefusal>); 16] = [
            (
                "28P01",
                "The access token has expired",
                Some(LoginRefusal::TokenExpired),
            ),
            (
                "28000",
                "The access token has expired",
                Some(LoginRefusal::TokenExpired),
            ),
            (
                "28000",
                "The access token does not have a valid audience claim. Please acquire a new token for the resource \"https://token.postgres.cosmos.azure.com\".",
                Some(LoginRefusal::WrongAudience {
                    resource: Some("https://token.postgres.cosmos.azure.com".into()),
                }),
            ),
            (
                "28P01",
                "The access token does not have a valid audience claim.",
                Some(LoginRefusal::WrongAudience { resource: None }),
            ),
            (
                "28P01",
                "An error occurred while validating the access token. Please acquire a new token and retry.",
                Some(LoginRefusal::TokenInvalid),
            ),
            (
                "28000",
                "Service Principals cannot generate AAD_AUTH_TOKENTYPE_APP_USER tokens for role[orders-api]",
                Some(LoginRefusal::PrincipalTypeMismatch {
                    role: Some("orders-api".into()),
                }),
            ),
            (
                "28P01",
                "password authentication failed for user \"orders-api\"",
                Some(LoginRefusal::PasswordFailed),
            ),
            (
                "28000",
                "no pg_hba.conf entry for host \"10.0.0.4\", user \"x\", database \"postgres\", SSL encryption",
                Some(LoginRefusal::OtherAuthorization),
            ),
            (
                "08P01",
                "client sent partial pkt in startup phase",
                Some(LoginRefusal::PoolerRefusedLongPassword),
            ),
            (
                "08P01",
                "password too long",
                Some(LoginRefusal::PoolerRefusedLongPassword),
            ),
            ("08P01", "invalid startup packet layout", None),
            (
                "08P01",
                "server login has been failing, try again later (server_login_retry)",
                Some(LoginRefusal::PoolerLoginRetryWait),
            ),
            // PgBouncer relays the server's refusal under its own code.
            (
                "08P01",
                "The access token has expired",
                Some(LoginRefusal::TokenExpired),
            ),
            (
                "08P01",
                "password authentication failed for user \"orders-api\"",
                Some(LoginRefusal::PasswordFailed),
            ),
            ("08P01", "no such database: orders", None),
            ("XX000", "The access token has expired", None),
        ];
        for (code, message, expected) in cases {
            assert_eq!(
                LoginRefusal::classify(code, message),
                expected,
                "{code} {message}"
            );
        }
    }

    /// Past 2,047 bytes, a `password authentication failed` through a pooler is its cut.
    #[test]
    fn a_long_token_refused_through_a_pooler_is_its_length() {
        let failed = "password authentication failed for user \"orders-api\"";
        assert_eq!(
            LoginRefusal::classify_pooled("08P01", failed, PGBOUNCER_LONGEST_PASSWORD),
            Some(LoginRefusal::PasswordFailed)
        );
        assert_eq!(
            LoginRefusal::classify_pooled("08P01", failed, PGBOUNCER_LONGEST_PASSWORD + 1),
            Some(LoginRefusal::PoolerRefusedLongPassword)
        );
        // Azure reads the stub as a token that does not validate.
        assert_eq!(
            LoginRefusal::classify_pooled(
                "28000",
                "An error occurred while validating the access token. Please acquire a new token and retry.",
                3000
            ),
            Some(LoginRefusal::PoolerRefusedLongPassword)
        );
        // PgBouncer 1.25 relays the server's own code.
        assert_eq!(
            LoginRefusal::classify_pooled("28P01", failed, 5000),
            Some(LoginRefusal::PoolerRefusedLongPassword)
        );
    }

    #[test]
    fn only_some_refusals_are_retried() {
        assert_eq!(
            LoginRefusal::TokenExpired.retry(),
            Retry::WithRefreshedToken
        );
        assert_eq!(
            LoginRefusal::WrongAudience {
                resource: Some("https://x".into())
            }
            .retry(),
            Retry::WithTokenFor("https://x".into())
        );
        for no in [
            LoginRefusal::WrongAudience { resource: None },
            LoginRefusal::PrincipalTypeMismatch { role: None },
            LoginRefusal::OtherAuthorization,
            LoginRefusal::PoolerRefusedLongPassword,
            LoginRefusal::PoolerLoginRetryWait,
        ] {
            assert_eq!(no.retry(), Retry::No, "{no:?}");
        }
    }
}
