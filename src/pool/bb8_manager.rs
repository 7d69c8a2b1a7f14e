//! A bb8 [`ManageConnection`] over a [`Connector`].
//!
//! bb8 retries a failed connect on its own (`retry_connection`, on by default) until its
//! `connection_timeout`, and a failed connect never reaches [`Pool::get`]: the caller sees
//! [`RunError::TimedOut`] and the error goes to the pool's error sink. Each of those attempts
//! goes through [`Connector::connect`], whose refused-login retry forces at most one token
//! refresh per rate-limit interval, so bb8's retries cannot hammer the identity endpoint. The
//! sink installed by [`Connector::bb8_pool`] logs each error with `tracing`; call
//! [`Pool::dedicated_connection`] to get the typed [`Error`] itself.

use bb8::{ErrorSink, ManageConnection, Pool, PooledConnection};
use tokio_postgres::Client;

use super::{DEFAULT_MAX_LIFETIME, DEFAULT_POOL_TIMEOUT};
use crate::connector::Connector;
use crate::error::Error;

#[cfg(doc)]
use bb8::RunError;

/// A bb8 pool of tokio-postgres clients that log in with the connector's current token.
pub type Bb8Pool = Pool<Bb8Manager>;
/// A client checked out of a [`Bb8Pool`]; it dereferences to [`tokio_postgres::Client`].
pub type Bb8PooledConnection<'a> = PooledConnection<'a, Bb8Manager>;

/// Makes and checks pooled connections for bb8.
///
/// bb8 checks a connection on checkout with `SELECT 1` while its `test_on_check_out` is on
/// (the default; deadpool-postgres calls this "verified" recycling). Turn it off for "fast"
/// recycling, which only skips connections that have closed.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use pg_entra::pool::Bb8Manager;
///
/// let manager = Bb8Manager::new(pg_entra::Connector::from_env()?);
/// let pool = pg_entra::pool::bb8::Pool::builder()
///     .max_size(16)
///     .max_lifetime(Some(std::time::Duration::from_secs(1800)))
///     .build(manager)
///     .await?;
/// let client = pool.get().await?;
/// client.simple_query("select 1").await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Bb8Manager {
    connector: Connector,
}

impl Bb8Manager {
    /// A manager that connects through `connector`.
    pub fn new(connector: Connector) -> Self {
        Self { connector }
    }

    /// The connector new connections go through.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }
}

impl ManageConnection for Bb8Manager {
    type Connection = Client;
    type Error = Error;

    async fn connect(&self) -> Result<Client, Error> {
        let client = self.connector.connect().await?;
        crate::observe::pool_connection_created("bb8");
        Ok(client)
    }

    async fn is_valid(&self, client: &mut Client) -> Result<(), Error> {
        client
            .simple_query("SELECT 1")
            .await
            .map(drop)
            .map_err(Error::from)
    }

    fn has_broken(&self, client: &mut Client) -> bool {
        client.is_closed()
    }
}

/// Logs the errors bb8 does not hand to a caller (failed background connects).
#[derive(Debug, Clone, Copy)]
struct TracingErrorSink;

impl ErrorSink<Error> for TracingErrorSink {
    fn sink(&self, error: Error) {
        tracing::warn!(%error, hint = error.hint().unwrap_or("-"), "bb8 could not open a connection");
    }

    fn boxed_clone(&self) -> Box<dyn ErrorSink<Error>> {
        Box::new(*self)
    }
}

impl Connector {
    /// A bb8 pool of up to `max_size` connections through this connector: checked with
    /// `SELECT 1` on checkout, a 30-minute maximum lifetime, a 30-second connection timeout,
    /// and connect errors logged with `tracing`. No connection is opened until the first
    /// [`Pool::get`]. For other settings, build a [`Bb8Pool`] from a [`Bb8Manager`] yourself.
    ///
    /// # Errors
    /// [`Error::Config`] when `max_size` is zero.
    #[cfg_attr(docsrs, doc(cfg(feature = "bb8")))]
    pub fn bb8_pool(&self, max_size: u32) -> Result<Bb8Pool, Error> {
        if max_size == 0 {
            return Err(Error::invalid(
                "max_size",
                "a pool needs room for at least one connection",
            ));
        }
        Ok(Pool::builder()
            .max_size(max_size)
            .max_lifetime(Some(DEFAULT_MAX_LIFETIME))
            .connection_timeout(DEFAULT_POOL_TIMEOUT)
            .error_sink(Box::new(TracingErrorSink))
            .build_unchecked(Bb8Manager::new(self.clone())))
    }
}
