//! Connect to **Azure Database for PostgreSQL** with a **Microsoft Entra ID access token** as
//! the password, from a managed identity, a service principal, a workload identity, the Azure
//! CLIs, or any `azure_core` credential.
//!
//! The token is cached and refreshed ahead of expiry, so a connect almost never waits on the
//! identity endpoint; TLS is always on and always verified, because the password is a bearer
//! token.
//!
//! ```no_run
//! # async fn run() -> Result<(), pg_entra::Error> {
//! // PGHOST=myserver.postgres.database.azure.com PGUSER=my-identity-name
//! let connector = pg_entra::Connector::from_env()?;
//! let client = connector.connect().await?;
//! let row = client.query_one("select version()", &[]).await?;
//! let version: String = row.get(0);
//! # Ok(()) }
//! ```
//!
//! # Pieces
//! - [`DefaultAzureCredential`]: Environment → WorkloadIdentity → ManagedIdentity → AzureCli →
//!   AzureDeveloperCli, with `AZURE_TOKEN_CREDENTIALS`, a fast IMDS probe off Azure and one
//!   error listing every credential. Each member is public on its own
//!   ([`ManagedIdentityCredential`] for every Azure host, [`ImdsCredential`] for IMDS alone,
//!   [`EnvironmentCredential`], [`WorkloadIdentityCredential`], [`AzureCliCredential`],
//!   [`AzureDeveloperCliCredential`]). Any [`TokenCredential`] (for example from
//!   `azure_identity`) works too.
//! - [`TokenCache`]: fresh tokens without I/O (in about 8 ns through
//!   [`TokenCache::with_token`]), one refresh in flight at most, callers served during
//!   refresh, typed errors and backoff when the identity endpoint fails.
//! - [`Connector`]: libpq-style configuration (`PG*` variables, URLs, `key=value`), verified
//!   TLS, the user name from the token when none is given.
//!
//! # Features
//! | feature   | adds |
//! |-----------|------|
//! | `deadpool` | `pool::DeadpoolManager` and `Connector::deadpool_pool` |
//! | `bb8` | `pool::Bb8Manager` and `Connector::bb8_pool` |
//! | `client-certificate` | service principals with a certificate (OpenSSL) |
//! | `testing` | `testing`: a local TLS PostgreSQL configured like Flexible Server and a mock identity endpoint (IMDS, App Service, Arc, Cloud Shell, Entra) that mints tokens and sets them as role passwords, for tests without Azure |
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod clock;
mod cloud;
mod connector;
mod conninfo;
mod credential;
mod environment;
mod error;
mod jitter;
mod lock;
#[cfg(any(feature = "deadpool", feature = "bb8"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "deadpool", feature = "bb8"))))]
pub mod pool;
mod status;
mod tls;
mod token;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
pub use cache::{
    DEFAULT_EXPIRY_MARGIN, DEFAULT_FORCED_REFRESH_INTERVAL, DEFAULT_MAX_BACKOFF,
    DEFAULT_MIN_BACKOFF, DEFAULT_REFRESH_JITTER, DEFAULT_REFRESH_MARGIN, DEFAULT_REFRESH_TIMEOUT,
    TokenCache, TokenCacheBuilder,
};
pub use clock::{Clock, SystemClock};
pub use cloud::{CHINA_SCOPE, Cloud, PUBLIC_SCOPE, US_GOVERNMENT_SCOPE};
pub use connector::{Connection, Connector, ConnectorBuilder, DEFAULT_DBNAME, DEFAULT_PORT};
pub use credential::{
    AUTHORITY_HOST_VAR, AzureCliCredential, AzureCliCredentialBuilder, AzureDeveloperCliCredential,
    AzureDeveloperCliCredentialBuilder, CLIENT_ID_VAR, CredentialUnavailable, DEFAULT_CLI_TIMEOUT,
    DEFAULT_IMDS_PROBE_TIMEOUT, DefaultAzureCredential, DefaultAzureCredentialBuilder,
    EnvironmentCredential, IDENTITY_ENDPOINT_VAR, IDENTITY_HEADER_VAR, IMDS_AUTHORITY_HOST,
    IMDS_ENDPOINT_VAR, ImdsCredential, ImdsCredentialBuilder, MSI_ENDPOINT_VAR, MSI_SECRET_VAR,
    ManagedIdentityCredential, ManagedIdentityCredentialBuilder, ManagedIdentityError,
    ManagedIdentityId, POD_IDENTITY_AUTHORITY_HOST_VAR, RetryOptions, TOKEN_CREDENTIALS_VAR,
    WorkloadIdentityCredential,
};
pub use environment::Environment;
pub use error::{Error, Result};
pub use tls::SslMode;

/// The TLS connector type [`Connector::tls_connector`] returns comes from here.
pub use postgres_native_tls;
/// The tokio-postgres the connector builds on: [`Connector::connect`] returns its `Client`,
/// [`Connector::config`] its `Config`. Use it rather than pinning your own version.
pub use tokio_postgres;

/// The bb8 version the `bb8` feature builds on, so that callers need not pin it themselves.
#[cfg(feature = "bb8")]
#[cfg_attr(docsrs, doc(cfg(feature = "bb8")))]
pub use bb8;
/// The deadpool version the `deadpool` feature builds on, so that callers need not pin it
/// themselves.
#[cfg(feature = "deadpool")]
#[cfg_attr(docsrs, doc(cfg(feature = "deadpool")))]
pub use deadpool;
pub use token::Token;
