//! Errors: [`Error`] (also at the crate root), and [`ConfigError`] for the settings it refuses.
//!
//! Every variant is something a caller can act on. No variant carries a token: errors from
//! credentials are kept as their source, and credential errors written by this crate never
//! echo a response body that could hold one.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use azure_core::time::OffsetDateTime;

/// SQLSTATE `28P01` (invalid password) and `28000` (invalid authorization specification):
/// what PostgreSQL answers when it does not accept the token.
pub(crate) const AUTH_FAILURE_SQLSTATES: [&str; 2] = ["28P01", "28000"];

/// A convenient alias for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between an Azure identity and a PostgreSQL session.
///
/// Branch on the variant; print it with its [`source`](std::error::Error::source) chain and
/// [`hint`](Error::hint) to tell a person what to do next. No variant, `Display` or `Debug`
/// output contains an access token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing, invalid, unsupported or contradicts another; the
    /// [`ConfigError`] names it and says how to fix it.
    #[error("invalid configuration: {0}")]
    Config(ConfigError),

    /// A TLS mode that would let the token travel unverified (`disable`, `allow`, `prefer`).
    #[error(
        "sslmode={mode} is refused: the password is a bearer access token and may only travel \
         inside verified TLS; use sslmode=verify-full (the default), verify-ca or require"
    )]
    TlsRequired {
        /// The refused mode, as given.
        mode: String,
    },

    /// TLS could not be set up on this side (an unreadable root certificate, say), or the
    /// server could not be verified during the handshake. Nothing was sent to the server.
    #[error("TLS failed: {message}")]
    Tls {
        /// What failed.
        message: String,
        /// The underlying TLS or PostgreSQL error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The credential could not get a token here: no identity endpoint answered, it kept
    /// failing, or it is not configured in this environment. (Not to be confused with
    /// [`CredentialUnavailable`](crate::credential::CredentialUnavailable), one credential's
    /// "not here, try the next", which may be among this error's causes.)
    #[error("the credential could not get an access token")]
    TokenUnavailable {
        /// The credential's error (shared: the token cache hands it to every waiting caller).
        #[source]
        source: Arc<azure_core::Error>,
    },

    /// The identity endpoint answered and refused: the identity is not assigned to this
    /// resource, or the caller is not authorized.
    #[error("the identity endpoint refused to issue an access token")]
    TokenRefused {
        /// The credential's error.
        #[source]
        source: Arc<azure_core::Error>,
    },

    /// The cached token has expired and refreshing it keeps failing. Returned at once while
    /// the cache backs off, so that callers do not storm the identity endpoint.
    #[error("the access token expired at {expired_at} and could not be refreshed")]
    TokenExpired {
        /// When the last good token expired.
        expired_at: OffsetDateTime,
        /// Why the last refresh failed, when one was attempted.
        #[source]
        last_cause: Option<Arc<azure_core::Error>>,
    },

    /// No user name was given and the token carries no claim to derive one from.
    #[error(
        "no PostgreSQL user name: none was configured and the token has none of the claims \
         xms_mirid, upn, preferred_username, unique_name (claims present: {})",
        if claims_present.is_empty() { "none".to_owned() } else { claims_present.join(", ") }
    )]
    UnknownUser {
        /// Names (never values) of the claims the token did carry.
        claims_present: Vec<String>,
    },

    /// The token belongs to a guest (B2B) or Microsoft account, and no user name was given:
    /// its role is named after its guest user name in the server's tenant, which the token
    /// does not carry, and never after its home address.
    #[error(
        "no PostgreSQL user name: the token belongs to a guest account ({home}), whose role is \
         named after its user name in the server's tenant, such as {suggestion}; set PGUSER \
         (or the connector's user) to it"
    )]
    GuestUser {
        /// The guest's home address, from the token.
        home: String,
        /// The form of its user name in the server's tenant (`alice_contoso.com#EXT#@…`).
        suggestion: String,
    },

    /// A connection attempt to one host took longer than the connect timeout as a whole (DNS,
    /// TCP, TLS, startup and login): the server accepted and went silent, or the network is
    /// dropping packets.
    #[error(
        "connecting to {host}:{port} did not complete within {timeout:?} (DNS, TCP, TLS and login \
         together)"
    )]
    ConnectTimeout {
        /// The host that did not answer in time.
        host: String,
        /// Its port.
        port: u16,
        /// The limit that ran out.
        timeout: std::time::Duration,
    },

    /// The server at `host:port` was reached and accepted the login, but is not the kind
    /// `target_session_attrs` asks for (a standby where a primary is wanted, or the other way
    /// round); with several hosts, the last one's.
    #[error(
        "{host}:{port} is {} (target_session_attrs={wanted})",
        if *standby { "a standby (in recovery)" } else { "not a standby" }
    )]
    SessionAttrsNotMet {
        /// The host name.
        host: String,
        /// Its port.
        port: u16,
        /// What was asked for.
        wanted: crate::TargetSessionAttrs,
        /// Whether the server is in recovery.
        standby: bool,
    },

    /// [`Connector::warm_up`](crate::Connector::warm_up) ran out of time.
    #[error(
        "not ready within {within:?}: still waiting for {waiting_for}{}",
        last_error.as_deref().map(|e| format!(" (the last token refresh failed: {e})")).unwrap_or_default()
    )]
    NotReady {
        /// The bound given.
        within: std::time::Duration,
        /// `a token` or `the login`.
        waiting_for: &'static str,
        /// The token cache's last refresh error, if one failed.
        last_error: Option<String>,
    },

    /// libpq (Diesel's `PgConnection`) could not connect; its message, which names the host and
    /// what the server said. [`Error::login_refusal`] reads a refused login from it.
    #[error("libpq: {message}")]
    Libpq {
        /// libpq's message (`connection to server at … failed: FATAL: …`).
        message: String,
    },

    /// PostgreSQL refused the connection or the session failed.
    #[error("PostgreSQL error")]
    Postgres {
        /// The tokio-postgres error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A connection pooler (PgBouncer: Azure's built-in one listens on port 6432) refused the
    /// login, or relayed the server's refusal. Told apart from PostgreSQL's own refusals by
    /// SQLSTATE `08P01` (what PgBouncer 1.18 gives every refusal) or by an error without the
    /// source location PostgreSQL always sends (PgBouncer relays only the code and the text).
    /// [`Error::login_refusal`] reads which refusal, knowing the token's length.
    #[error("a connection pooler refused the login, or relayed the server's refusal")]
    PoolerRefused {
        /// The length of the refused token, in bytes: PgBouncer up to 1.25 keeps 2,047.
        token_bytes: usize,
        /// The tokio-postgres error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The server refused the token's audience and named a resource that is not an Azure
    /// Database for PostgreSQL audience: no token is requested for it (a server must not be
    /// able to have a token minted for Microsoft Graph or Azure Resource Manager and sent to
    /// it).
    #[error(
        "the server asks for a token for {resource:?}, which is not an Azure Database for \
         PostgreSQL resource; none is requested for it"
    )]
    UnexpectedResource {
        /// The resource the server named.
        resource: String,
        /// The server's refusal.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The server refused the login with a message that quoted the password, that is the
    /// access token: the message is withheld, only its SQLSTATE is kept. Azure never answers
    /// so; the server is probably not the one intended.
    #[error(
        "PostgreSQL refused the login (SQLSTATE {}) with a message that quoted the access \
         token; the message is withheld",
        code.as_deref().unwrap_or("none")
    )]
    PostgresMessageWithheld {
        /// The SQLSTATE of the refusal, when the server sent one.
        code: Option<String>,
    },
}

impl Error {
    fn config(
        setting: impl Into<Cow<'static, str>>,
        kind: ConfigErrorKind,
        message: String,
    ) -> Self {
        Error::Config(ConfigError {
            setting: setting.into(),
            kind,
            message,
        })
    }

    /// `setting` is required and was not given.
    pub(crate) fn missing(
        setting: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self::config(setting, ConfigErrorKind::Missing, message.into())
    }

    /// `setting` has a value it cannot take.
    pub(crate) fn invalid(
        setting: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self::config(setting, ConfigErrorKind::Invalid, message.into())
    }

    /// `setting` is valid elsewhere but deliberately not supported here.
    pub(crate) fn unsupported(
        setting: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self::config(setting, ConfigErrorKind::Unsupported, message.into())
    }

    /// `setting` contradicts another setting.
    pub(crate) fn conflict(
        setting: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self::config(setting, ConfigErrorKind::Conflict, message.into())
    }

    /// Sorts a credential's error into unavailable or refused.
    pub(crate) fn from_credential(error: Arc<azure_core::Error>) -> Self {
        if credential_error_is_refusal(&error) {
            Error::TokenRefused { source: error }
        } else {
            Error::TokenUnavailable { source: error }
        }
    }

    /// Wraps a tokio-postgres error, lifting TLS failures into [`Error::Tls`].
    pub(crate) fn from_postgres(error: tokio_postgres::Error) -> Self {
        // tokio-postgres has no public accessor for its error kind; every TLS failure (including
        // "server does not support TLS") displays with this prefix.
        if error
            .to_string()
            .starts_with("error performing TLS handshake")
        {
            let detail = std::error::Error::source(&error)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "the server did not complete a verified TLS handshake".into());
            // A connection that broke in the handshake (a reset, an early close) says nothing
            // about the certificate: said so, with a hint about the network instead.
            if broke_in_handshake(&error, &detail) {
                return Error::Tls {
                    message: format!("the connection broke during the TLS handshake: {detail}"),
                    source: Some(Box::new(
                        Hinted::new(
                            detail,
                            "the network or something on it (a firewall, a proxy, a load \
                             balancer) ended the connection before TLS was set up; nothing was \
                             sent to the server. It is usually brief: retry, and check the path \
                             if it persists",
                        )
                        .caused_by(error),
                    )),
                };
            }
            return Error::Tls {
                message: format!("could not verify the server: {detail}"),
                source: Some(Box::new(error)),
            };
        }
        Error::Postgres { source: error }
    }

    /// Wraps the error of a login made with `password`: when anything the server said
    /// quotes the password (any piece of it, in any encoding; see `redact`), only its
    /// SQLSTATE is kept ([`Error::PostgresMessageWithheld`]).
    pub(crate) fn from_login(error: tokio_postgres::Error, password: &str) -> Self {
        // `Debug` shows every field of the server's error (routine, schema, position, …);
        // whatever shows it must not show the token.
        let said = format!("{error}\n{error:?}");
        if crate::redact::echoes(&said, password) {
            return Error::PostgresMessageWithheld {
                code: error.code().map(|code| code.code().to_owned()),
            };
        }
        if said_by_a_pooler(&error) {
            return Error::PoolerRefused {
                token_bytes: password.len(),
                source: error,
            };
        }
        Error::from_postgres(error)
    }

    /// Why the server refused the login, read from its SQLSTATE and message (see
    /// [`LoginRefusal`](crate::LoginRefusal)); `None` for errors that are not a refused login.
    pub fn login_refusal(&self) -> Option<crate::LoginRefusal> {
        match self {
            Error::Postgres { source } => {
                let db = source.as_db_error()?;
                crate::LoginRefusal::classify(db.code().code(), db.message())
            }
            Error::Libpq { message } => crate::LoginRefusal::from_libpq(message),
            Error::PoolerRefused {
                token_bytes,
                source,
            } => {
                let db = source.as_db_error()?;
                crate::LoginRefusal::classify_pooled(db.code().code(), db.message(), *token_bytes)
            }
            Error::UnexpectedResource { resource, .. } => {
                Some(crate::LoginRefusal::WrongAudience {
                    resource: Some(resource.clone()),
                })
            }
            // The text is withheld: the SQLSTATE alone says little.
            Error::PostgresMessageWithheld { code } => code
                .as_deref()
                .and_then(|code| crate::LoginRefusal::classify(code, "")),
            _ => None,
        }
    }

    /// True when PostgreSQL refused the login (SQLSTATE `28P01` or `28000`): the token was not
    /// accepted, or the role does not exist or is not an Entra principal.
    pub fn is_auth_failure(&self) -> bool {
        match self {
            Error::Postgres { source } => source
                .code()
                .is_some_and(|code| AUTH_FAILURE_SQLSTATES.contains(&code.code())),
            Error::PostgresMessageWithheld { code } => code
                .as_deref()
                .is_some_and(|code| AUTH_FAILURE_SQLSTATES.contains(&code)),
            Error::UnexpectedResource { .. } => true,
            Error::Libpq { .. } => self.login_refusal().is_some(),
            // PgBouncer's code: the server's refusal it relays counts, its own does not.
            Error::PoolerRefused { .. } => self.login_refusal().is_some_and(|refusal| {
                !matches!(
                    refusal,
                    crate::LoginRefusal::PoolerRefusedLongPassword
                        | crate::LoginRefusal::PoolerLoginRetryWait
                )
            }),
            _ => false,
        }
    }

    /// What to try next: the failing credential's own advice when it gave one, else a general
    /// answer when there is one.
    pub fn hint(&self) -> Option<&'static str> {
        let specific = match self {
            Error::TokenUnavailable { source } | Error::TokenRefused { source } => {
                Hinted::find(source.as_ref())
            }
            Error::TokenExpired {
                last_cause: Some(cause),
                ..
            } => Hinted::find(cause.as_ref()),
            Error::Tls {
                source: Some(source),
                ..
            } => Hinted::find(source.as_ref()),
            _ => None,
        };
        if specific.is_some() {
            return specific;
        }
        match self {
            Error::TokenUnavailable { .. } => Some(
                "on Azure, enable a managed identity on this resource (and set AZURE_CLIENT_ID for a \
                 user-assigned one); on a developer machine run `az login` or `azd auth login`; \
                 or set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET for a service \
                 principal",
            ),
            Error::TokenRefused { .. } => Some(
                "check that the managed identity is assigned to this resource and that \
                 AZURE_CLIENT_ID (or the identity chosen in code) names it",
            ),
            Error::TokenExpired { .. } => Some(
                "the identity endpoint has been failing since before the token expired; the cause \
                 says why; the cache keeps retrying with backoff",
            ),
            Error::GuestUser { .. } => Some(
                "set PGUSER to the guest's user principal name in the server's tenant (Entra \
                 admin center → Users → the guest → User principal name), and get the token from \
                 that tenant (AZURE_TENANT_ID, or `az login --tenant`)",
            ),
            Error::UnknownUser { .. } => Some(
                "set PGUSER (or the connector's user) to the Entra principal's name; a service \
                 principal's token never carries it",
            ),
            Error::Postgres { .. }
            | Error::Libpq { .. }
            | Error::PoolerRefused { .. }
            | Error::UnexpectedResource { .. } => {
                self.login_refusal().map(|refusal| refusal.hint())
            }
            Error::PostgresMessageWithheld { .. } => Some(
                "a server that repeats the password it was sent is not Azure Database for \
                 PostgreSQL: check that the host (and hostaddr) name the intended server",
            ),
            Error::SessionAttrsNotMet { standby: true, .. } => Some(
                "no host was a primary: list the primary too (on Azure the server's own name or \
                 the writer endpoint), or ask for `prefer-standby` or `any`",
            ),
            Error::SessionAttrsNotMet { standby: false, .. } => Some(
                "no host was a standby: list a read replica (on Azure its own name or the reader \
                 endpoint), or ask for `prefer-standby` to fall back on the primary",
            ),
            Error::NotReady { .. } => Some(
                "the identity endpoint or the server is slow or unreachable: the error names \
                 which; a later warm-up or connect tries again \
                 (`TokenCache::health` shows the token cache's state)",
            ),
            Error::ConnectTimeout { .. } => Some(
                "check the host name and port, that the server is running, and that a firewall \
                 rule lets this machine in (silence, not a refusal, usually means a firewall); \
                 raise PGCONNECT_TIMEOUT (or the connector's connect_timeout) if it is only slow",
            ),
            Error::Tls { .. } => Some(
                "the server's certificate must chain to a trusted root; set PGSSLROOTCERT to an \
                 extra root certificate file if the system roots lack it",
            ),
            _ => None,
        }
    }
}

/// `?` on a tokio-postgres result gives this crate's error, with TLS failures lifted into
/// [`Error::Tls`] as the connector lifts them.
impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        Error::from_postgres(error)
    }
}

/// Whether a credential's error means "the endpoint answered and said no" rather than
/// "could not get an answer": the first HTTP status found, looking through wrapping (the
/// credential chain wraps its members' errors), decides. Every credential of this crate, like
/// those of the Azure SDK, reports an endpoint's answer as an `HttpResponse` error with its
/// status, so no credential's own error type is needed here.
fn credential_error_is_refusal(error: &azure_core::Error) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(level) = current {
        if let Some(status) = level
            .downcast_ref::<azure_core::Error>()
            .and_then(azure_core::Error::http_status)
        {
            return crate::status::is_refusal(u16::from(status));
        }
        current = level.source();
    }
    false
}

/// A cause that knows what to do next, better than [`Error::hint`]'s general advice: a
/// credential puts one in its error's chain (an Arc key this account may not read, a client
/// secret Entra refused, a chain with no credential to use), and `hint` returns it, so that
/// every hint is about the credential that failed. Its text is the message; the hint is not
/// repeated in it.
#[derive(Debug)]
pub(crate) struct Hinted {
    message: String,
    hint: &'static str,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Hinted {
    pub(crate) fn new(message: impl Into<String>, hint: &'static str) -> Self {
        Self {
            message: message.into(),
            hint,
            source: None,
        }
    }

    /// The same, with the error it explains as its source.
    pub(crate) fn caused_by(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The hint of the first `Hinted` in `error`'s chain (itself included).
    fn find(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
        let mut current = Some(error);
        while let Some(level) = current {
            if let Some(hinted) = level.downcast_ref::<Hinted>() {
                return Some(hinted.hint);
            }
            // azure_core's error hides what it wraps from `source`; ask it directly.
            if let Some(inner) = level
                .downcast_ref::<azure_core::Error>()
                .and_then(|e| e.get_ref())
                .and_then(|inner| Hinted::find(inner))
            {
                return Some(inner);
            }
            current = level.source();
        }
        None
    }
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Hinted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as _)
    }
}

/// A setting this crate refuses: which one, what sort of problem, and what to do.
///
/// `Display` gives the whole explanation ("connection URL: a port is not a number …");
/// [`setting`](Self::setting) and [`kind`](Self::kind) are for code that reacts to it. The
/// value of a password-like setting is never part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    setting: Cow<'static, str>,
    kind: ConfigErrorKind,
    message: String,
}

impl ConfigError {
    /// The setting at fault, as its user knows it: a libpq keyword (`host`, `sslmode`), an
    /// environment variable (`AZURE_TOKEN_CREDENTIALS`), a builder setting
    /// (`refresh_margin`, `max_size`), or `connection string` / `connection URL` for syntax.
    pub fn setting(&self) -> &str {
        &self.setting
    }

    /// What sort of problem it is.
    pub fn kind(&self) -> ConfigErrorKind {
        self.kind
    }

    /// The same error, its explanation prefixed with where the setting came from.
    pub(crate) fn with_origin(mut self, origin: &str) -> Self {
        self.message = format!("{origin}: {}", self.message);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// What sort of problem a [`ConfigError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// Required and not given (no host), or something the setting needs is absent (a Tokio
    /// runtime).
    Missing,
    /// Given, but not a value this setting takes.
    Invalid,
    /// Valid for libpq or another Azure SDK, but refused here on purpose (a password, a Unix
    /// socket, `service`, Service Fabric).
    Unsupported,
    /// Contradicts another setting (three ports for two hosts).
    Conflict,
}

/// Whether a login error came from a connection pooler rather than PostgreSQL: PgBouncer's
/// own code (`08P01`), or an error response without the source routine that PostgreSQL puts
/// in every error it sends (PgBouncer relays the server's code and text alone).
fn said_by_a_pooler(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::PROTOCOL_VIOLATION || db.routine().is_none()
    })
}

/// Whether a failed TLS handshake failed because the connection broke, not because of what
/// the server sent: an I/O error of a broken connection anywhere in the chain (a reset, a
/// broken pipe), or OpenSSL's own report of an early close, which carries no I/O error
/// (`unexpected EOF`; native-tls does not expose OpenSSL's error type to match instead).
fn broke_in_handshake(error: &tokio_postgres::Error, detail: &str) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = next {
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            )
        {
            return true;
        }
        next = cause.source();
    }
    detail.to_ascii_lowercase().contains("unexpected eof")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::ManagedIdentityError;

    /// A credential's own advice wins over the general hint, wherever in the chain it is.
    #[test]
    fn the_failing_credentials_hint_wins() {
        let arc = ManagedIdentityError::ArcKeyUnreadable {
            key_file: "/var/opt/azcmagent/tokens/x.key".into(),
            advice: Box::new(Hinted::new("folder for privileged users", "join himds")),
        };
        let error = Error::from_credential(Arc::new(arc.into_azure()));
        assert_eq!(error.hint(), Some("join himds"));
        assert!(!error.to_string().contains("join himds"));
        // Wrapped once more, as the chain wraps its members' errors.
        let inner = azure_core::Error::new(
            azure_core::error::ErrorKind::Credential,
            Hinted::new("no member applies", "run az login"),
        );
        let wrapped = azure_core::Error::with_error(
            azure_core::error::ErrorKind::Credential,
            inner,
            "DefaultAzureCredential",
        );
        assert_eq!(
            Error::from_credential(Arc::new(wrapped)).hint(),
            Some("run az login")
        );
        // Without one, the general hint.
        let plain = azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, "x");
        assert!(
            Error::from_credential(Arc::new(plain))
                .hint()
                .unwrap()
                .contains("managed identity")
        );
    }
}
