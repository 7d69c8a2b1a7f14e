//! What the crate tells operators about itself: metrics through the [`metrics`] facade
//! (feature `metrics`; any exporter), and `tracing` spans whose fields carry OpenTelemetry's
//! attribute names, so that `tracing-opentelemetry` users get database-client traces.
//!
//! The cache and the connector call the functions here at a handful of points; without the
//! `metrics` feature the metric calls compile to nothing. No field or label ever holds a
//! token, a secret or a password.
//!
//! # Metrics
//!
//! Names and units follow OpenTelemetry's conventions where one exists
//! (`db.client.connection.create_time`); the others are the crate's own, under `pg_entra.`.
//! Prometheus exporters write the dots as underscores and append the unit.
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `pg_entra.token.refreshes` | counter | {refresh} | `outcome` (`success`, `no_progress`, `failure`), `trigger` (`background`, `on_demand`, `forced`), `credential` |
//! | `pg_entra.token.refresh.duration` | histogram | s | `outcome`, `credential` |
//! | `pg_entra.token.time_to_expiry` | gauge | s | — (set at each refresh, connect and health read) |
//! | `pg_entra.token.forced_refreshes` | counter | {request} | `outcome` (`started`, `joined`, `rate_limited`) |
//! | `pg_entra.identity.requests` | counter | {request} | `source` (`imds`, `app_service`, `azure_arc`, `cloud_shell`, `app_service_2017`, `entra`, `azure_cli`, `azure_developer_cli`), `status` (the HTTP status, the CLI's exit code, or `error`) |
//! | `pg_entra.connects` | counter | {connect} | `outcome` (`success`, `refused`, `timeout`, `tls`, `error`) |
//! | `db.client.connection.create_time` | histogram | s | `db.system.name` (`postgresql`), `outcome` |
//! | `pg_entra.login.refusals` | counter | {refusal} | `kind` (`token_expired`, `wrong_audience`, `token_invalid`, `principal_type_mismatch`, `password_failed`, `other_authorization`, `pooler_refused_long_password`, `pooler_login_retry_wait`) |
//! | `pg_entra.pool.connections.created` | counter | {connection} | `pool` (`deadpool`, `bb8`, `diesel` for diesel-async's pools, `r2d2_postgres`, `r2d2_diesel`) |
//!
//! sqlx pools log in through sqlx itself with options the cache keeps current: their
//! connects appear in sqlx's own instrumentation, not in `pg_entra.connects` and
//! `pg_entra.pool.connections.created` (counting them would take the pool's `after_connect`
//! hook from the application).
//!
//! # Spans
//!
//! | span | fields |
//! |---|---|
//! | `pg_entra.connect` (one connect, with its retry) | `db.system.name`, `db.namespace`, `server.address` and `server.port` (the first host) |
//! | `pg_entra.connect.attempt` (one host) | `server.address`, `server.port` |
//! | `pg_entra.token.refresh` (one credential call) | `trigger`, `scope`, `credential` |
//! | `pg_entra.token.acquire` (one member of `DefaultAzureCredential`) | `credential` |

use std::time::Duration;

use tracing::Span;

use crate::LoginRefusal;

/// Why a token refresh runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// Ahead of expiry: the cache's own task, or a read that found the token stale.
    Background,
    /// A caller needed a token and there was none usable.
    OnDemand,
    /// The server refused the cached token.
    Forced,
}

impl Trigger {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Background => "background",
            Self::OnDemand => "on_demand",
            Self::Forced => "forced",
        }
    }
}

/// How a refresh ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefreshOutcome {
    Success,
    /// The credential answered with no newer token.
    NoProgress,
    Failure,
}

impl RefreshOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::NoProgress => "no_progress",
            Self::Failure => "failure",
        }
    }
}

/// How a connect ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectOutcome {
    Success,
    Refused,
    Timeout,
    Tls,
    Error,
}

impl ConnectOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Tls => "tls",
            Self::Error => "error",
        }
    }

    pub(crate) fn of(result: &Result<impl Sized, crate::Error>) -> Self {
        match result {
            Ok(_) => Self::Success,
            Err(crate::Error::ConnectTimeout { .. }) => Self::Timeout,
            Err(crate::Error::Tls { .. } | crate::Error::TlsRequired { .. }) => Self::Tls,
            Err(error) if error.login_refusal().is_some() || error.is_auth_failure() => {
                Self::Refused
            }
            Err(crate::Error::PostgresMessageWithheld { .. }) => Self::Refused,
            Err(_) => Self::Error,
        }
    }
}

/// What a forced refresh request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forced {
    Started,
    /// Another refresh was in flight; the request waits for it.
    Joined,
    RateLimited,
}

impl Forced {
    fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Joined => "joined",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// The metrics' names, in one place.
#[cfg(feature = "metrics")]
pub(crate) mod names {
    pub(crate) const TOKEN_REFRESHES: &str = "pg_entra.token.refreshes";
    pub(crate) const TOKEN_REFRESH_DURATION: &str = "pg_entra.token.refresh.duration";
    pub(crate) const TOKEN_TIME_TO_EXPIRY: &str = "pg_entra.token.time_to_expiry";
    pub(crate) const FORCED_REFRESHES: &str = "pg_entra.token.forced_refreshes";
    pub(crate) const IDENTITY_REQUESTS: &str = "pg_entra.identity.requests";
    pub(crate) const CONNECTS: &str = "pg_entra.connects";
    pub(crate) const CONNECTION_CREATE_TIME: &str = "db.client.connection.create_time";
    pub(crate) const LOGIN_REFUSALS: &str = "pg_entra.login.refusals";
    pub(crate) const POOL_CONNECTIONS_CREATED: &str = "pg_entra.pool.connections.created";
}

/// Describes each metric to the installed recorder once (units and help texts for
/// exporters). Called before each emission; costs one atomic load after the first.
#[cfg(feature = "metrics")]
fn describe() {
    use metrics::Unit;
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(|| {
        metrics::describe_counter!(
            names::TOKEN_REFRESHES,
            "Token refreshes by outcome, trigger and credential"
        );
        metrics::describe_histogram!(
            names::TOKEN_REFRESH_DURATION,
            Unit::Seconds,
            "How long one credential call took"
        );
        metrics::describe_gauge!(
            names::TOKEN_TIME_TO_EXPIRY,
            Unit::Seconds,
            "Time left before the cached token expires, when last looked at"
        );
        metrics::describe_counter!(
            names::FORCED_REFRESHES,
            "Refreshes asked for because the server refused the cached token"
        );
        metrics::describe_counter!(
            names::IDENTITY_REQUESTS,
            "HTTP requests to identity endpoints, by source and status"
        );
        metrics::describe_counter!(names::CONNECTS, "PostgreSQL connects, by outcome");
        metrics::describe_histogram!(
            names::CONNECTION_CREATE_TIME,
            Unit::Seconds,
            "How long a connect took, token wait, TLS and login included"
        );
        metrics::describe_counter!(names::LOGIN_REFUSALS, "Refused logins, by refusal kind");
        metrics::describe_counter!(
            names::POOL_CONNECTIONS_CREATED,
            "Physical connections pools made through the connector"
        );
    });
}

/// One refresh ended.
pub(crate) fn token_refreshed(
    trigger: Trigger,
    outcome: RefreshOutcome,
    credential: &'static str,
    took: Duration,
) {
    #[cfg(feature = "metrics")]
    {
        describe();
        metrics::counter!(
            names::TOKEN_REFRESHES,
            "outcome" => outcome.as_str(),
            "trigger" => trigger.as_str(),
            "credential" => credential,
        )
        .increment(1);
        metrics::histogram!(
            names::TOKEN_REFRESH_DURATION,
            "outcome" => outcome.as_str(),
            "credential" => credential,
        )
        .record(took.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (trigger, outcome.as_str(), credential, took);
}

/// The cached token expires `left` from now.
pub(crate) fn time_to_expiry(left: Duration) {
    #[cfg(feature = "metrics")]
    {
        describe();
        metrics::gauge!(names::TOKEN_TIME_TO_EXPIRY).set(left.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = left;
}

/// The server refused the cached token and a refresh was asked for.
pub(crate) fn forced_refresh(outcome: Forced) {
    #[cfg(feature = "metrics")]
    {
        describe();
        metrics::counter!(names::FORCED_REFRESHES, "outcome" => outcome.as_str()).increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = outcome.as_str();
}

/// One HTTP request to an identity endpoint; `status` is `None` when no answer came.
pub(crate) fn identity_request(source: &'static str, status: Option<u16>) {
    #[cfg(feature = "metrics")]
    {
        describe();
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        metrics::counter!(names::IDENTITY_REQUESTS, "source" => source, "status" => status)
            .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (source, status);
}

/// One connect ended (its refused-login retry included).
pub(crate) fn connected(outcome: ConnectOutcome, took: Duration) {
    #[cfg(feature = "metrics")]
    {
        describe();
        metrics::counter!(names::CONNECTS, "outcome" => outcome.as_str()).increment(1);
        metrics::histogram!(
            names::CONNECTION_CREATE_TIME,
            "db.system.name" => "postgresql",
            "outcome" => outcome.as_str(),
        )
        .record(took.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (outcome.as_str(), took);
}

/// The server refused a login.
pub(crate) fn login_refused(refusal: &LoginRefusal) {
    let kind = match refusal {
        LoginRefusal::TokenExpired => "token_expired",
        LoginRefusal::WrongAudience { .. } => "wrong_audience",
        LoginRefusal::TokenInvalid => "token_invalid",
        LoginRefusal::PrincipalTypeMismatch { .. } => "principal_type_mismatch",
        LoginRefusal::PasswordFailed => "password_failed",
        LoginRefusal::OtherAuthorization => "other_authorization",
        LoginRefusal::PoolerRefusedLongPassword => "pooler_refused_long_password",
        LoginRefusal::PoolerLoginRetryWait => "pooler_login_retry_wait",
    };
    tracing::debug!(kind, "login refused");
    #[cfg(feature = "metrics")]
    {
        describe();
        metrics::counter!(names::LOGIN_REFUSALS, "kind" => kind).increment(1);
    }
}

/// A pool made a physical connection through the connector.
#[cfg(any(
    feature = "deadpool",
    feature = "bb8",
    feature = "diesel-async",
    feature = "postgres-sync",
    feature = "diesel-sync"
))]
pub(crate) fn pool_connection_created(pool: &'static str) {
    #[cfg(feature = "metrics")]
    {
        describe();
        metrics::counter!(names::POOL_CONNECTIONS_CREATED, "pool" => pool).increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = pool;
}

/// The span of one connect.
pub(crate) fn connect_span(dbname: Option<&str>, host: &str, port: u16) -> Span {
    tracing::info_span!(
        "pg_entra.connect",
        "db.system.name" = "postgresql",
        "db.namespace" = dbname.unwrap_or_default(),
        "server.address" = host,
        "server.port" = port,
    )
}

/// The span of one attempt at one host.
pub(crate) fn attempt_span(host: &str, port: u16) -> Span {
    tracing::info_span!(
        "pg_entra.connect.attempt",
        "server.address" = host,
        "server.port" = port,
    )
}

/// The span of one credential call by the cache.
pub(crate) fn refresh_span(trigger: Trigger, scope: &str, credential: &'static str) -> Span {
    tracing::info_span!(
        "pg_entra.token.refresh",
        trigger = trigger.as_str(),
        scope,
        credential,
    )
}

/// The span of one member of `DefaultAzureCredential` asked for a token.
pub(crate) fn acquire_span(credential: &'static str) -> Span {
    tracing::info_span!("pg_entra.token.acquire", credential)
}
