//! Connect to **Azure Database for PostgreSQL** with a **Microsoft Entra ID access token** as
//! the password: from a managed identity, a service principal, a workload identity, the Azure
//! CLIs, or any `azure_core` credential. The token is cached and refreshed ahead of expiry, so
//! a connect almost never waits on the identity endpoint; TLS is always on and always
//! verified, because the password is a bearer token.
//!
//! ```no_run
//! # async fn run() -> Result<(), pg_entra::Error> {
//! // PGHOST=myserver.postgres.database.azure.com PGUSER=my-identity-name
//! let connector = pg_entra::Connector::from_env()?;
//! let client = connector.connect().await?;
//! let row = client.query_one("select current_user", &[]).await?;
//! # Ok(()) }
//! ```
//!
//! [`Connector`] is the entry point: libpq-style settings, a [`TokenCache`] over a
//! [`DefaultAzureCredential`] (or any [`TokenCredential`]), the user name from the token. The
//! modules below hold the rest; the README has the Azure set-up and the measurements.
//!
//! # Features
#![doc = document_features::document_features!()]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![deny(rustdoc::broken_intra_doc_links)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
#[cfg(any(feature = "postgres-sync", feature = "diesel-sync"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres-sync", feature = "diesel-sync")))
)]
pub mod blocking;
pub mod cache;
mod clock;
mod cloud;
mod connector;
mod conninfo;
pub mod credential;
#[cfg(feature = "diesel-async")]
#[cfg_attr(docsrs, doc(cfg(feature = "diesel-async")))]
pub mod diesel;
mod environment;
pub mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod jitter;
pub mod libpq;
mod lock;
mod observe;
#[cfg(any(feature = "deadpool", feature = "bb8"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "deadpool", feature = "bb8"))))]
pub mod pool;
pub mod redact;
mod refusal;
mod session_attrs;
#[cfg(feature = "sqlx")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx")))]
pub mod sqlx;
mod status;
mod tls;
mod token;
mod warm_up;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;

pub use cache::TokenCache;
pub use cloud::Cloud;
pub use connector::{Connection, Connector, ConnectorBuilder};
pub use credential::{DefaultAzureCredential, TokenCredential};
pub use environment::Environment;
pub use error::{Error, Result};
pub use refusal::LoginRefusal;
pub use session_attrs::TargetSessionAttrs;
pub use tls::SslMode;
pub use token::Token;
pub use warm_up::WarmUp;

/// The TLS connector type [`Connector::tls_connector`] returns comes from here.
pub use postgres_native_tls;
/// The tokio-postgres the connector builds on: [`Connector::connect`] returns its `Client`,
/// [`Connector::config`] its `Config`. Use it rather than pinning your own version.
pub use tokio_postgres;

/// The README's code, compiled and run as doc tests so that it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
