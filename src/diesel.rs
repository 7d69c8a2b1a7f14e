//! Diesel through diesel-async 0.9: connections from the connector, and the manager that
//! diesel-async's own deadpool and bb8 pools take, so Diesel code keeps its pool types.
//!
//! ```no_run
//! # #[cfg(feature = "deadpool")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel_async::pooled_connection::ManagerConfig;
//! use diesel_async::pooled_connection::deadpool::Pool;
//!
//! let connector = pg_entra::Connector::from_env()?;
//! let pool = Pool::builder(connector.diesel_manager(ManagerConfig::default())).build()?;
//! let mut connection = pool.get().await?;
//! # Ok(()) }
//! ```
//!
//! With the `bb8` feature on as well, the same manager goes to
//! `diesel_async::pooled_connection::bb8::Pool::builder().build(manager)`; `deadpool` enables
//! the deadpool pool. The manager's connection URL is not used: every connection comes from
//! [`Connector::connect_with_connection`], so it has the current token, verified TLS, the
//! connect timeout and the one retry after a refused login.
//!
//! # Rotation and revocation
//! Each new physical connection logs in with the cache's current token, which the cache
//! refreshes ahead of expiry (no connect waits while it is fresh); open connections stay open.
//! A login refused with the cached token (`28P01`/`28000`) forces the cache's rate-limited
//! refresh and is retried once with the new token, inside the manager's connect.

use diesel::{ConnectionError, ConnectionResult};
use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use futures_util::FutureExt as _;

use crate::connector::Connector;
use crate::error::Error;

/// Stands in for the connection URL diesel-async's manager requires; connections come from the
/// connector, never from it.
const UNUSED_URL: &str = "postgresql://pg-entra.invalid/see-the-connector";

impl Connector {
    /// A Diesel connection (diesel-async's `AsyncPgConnection`) over a connection from
    /// [`connect_with_connection`](Self::connect_with_connection).
    ///
    /// The session set-up diesel-async runs after the login is bounded by the connect timeout
    /// too.
    ///
    /// # Errors
    /// Diesel's `ConnectionError::BadConnection` with this crate's message and hint (the
    /// message never holds the token), or `CouldntSetupConfiguration` when diesel-async's
    /// session set-up fails.
    pub async fn diesel_connection(&self) -> ConnectionResult<AsyncPgConnection> {
        let (client, connection) = self
            .connect_with_connection()
            .await
            .map_err(bad_connection)?;
        // diesel-async queries the new session to set it up; a server gone silent after the
        // login must not hold the caller (or a pool's connect) forever.
        let timeout = self.connect_timeout();
        let setup = AsyncPgConnection::try_from_client_and_connection(client, connection);
        tokio::time::timeout(timeout, setup)
            .await
            .unwrap_or_else(|_| {
                Err(ConnectionError::BadConnection(format!(
                    "the server did not finish diesel-async's session set-up within {timeout:?} \
                 (the connect timeout)"
                )))
            })
    }

    /// A diesel-async connection manager whose connections come from
    /// [`diesel_connection`](Self::diesel_connection); `config`'s recycling method is kept and
    /// its setup replaced. Hand it to diesel-async's deadpool or bb8 pool builder.
    pub fn diesel_manager(
        &self,
        mut config: ManagerConfig<AsyncPgConnection>,
    ) -> AsyncDieselConnectionManager<AsyncPgConnection> {
        let connector = self.clone();
        config.custom_setup = Box::new(move |_unused_url| {
            let connector = connector.clone();
            async move {
                let connection = connector.diesel_connection().await?;
                crate::observe::pool_connection_created("diesel");
                Ok(connection)
            }
            .boxed()
        });
        AsyncDieselConnectionManager::new_with_config(UNUSED_URL, config)
    }
}

/// Diesel's connection error for one of ours: Diesel keeps only a string, so the string has
/// the causes and the hint a person needs.
fn bad_connection(error: Error) -> ConnectionError {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        // Some errors display their source as well; say each thing once.
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    if let Some(hint) = error.hint() {
        message.push_str(" (hint: ");
        message.push_str(hint);
        message.push(')');
    }
    ConnectionError::BadConnection(message)
}
