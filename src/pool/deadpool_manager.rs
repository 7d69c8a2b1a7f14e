//! A deadpool [`Manager`] over a [`Connector`].
//!
//! deadpool-postgres' own `Connect` hook must return a `tokio_postgres::Error`, which cannot
//! carry a token error; implementing [`Manager`] directly keeps [`Error`] typed.

use std::time::Duration;

use ::deadpool::Runtime;
use ::deadpool::managed::{Manager, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use tokio_postgres::Client;

use super::{DEFAULT_MAX_LIFETIME, DEFAULT_POOL_TIMEOUT, RecyclingMethod};
use crate::connector::Connector;
use crate::error::Error;

/// A deadpool pool of tokio-postgres clients that log in with the connector's current token.
pub type DeadpoolPool = Pool<DeadpoolManager>;
/// A client checked out of a [`DeadpoolPool`]; it dereferences to [`tokio_postgres::Client`].
pub type DeadpoolObject = Object<DeadpoolManager>;
/// What [`DeadpoolPool::get`] fails with: a timeout, the pool closed, or a connect error
/// ([`PoolError::Backend`] carrying this crate's [`Error`]).
pub type DeadpoolError = PoolError<Error>;

/// Makes and recycles pooled connections for deadpool.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use pg_entra::pool::{DeadpoolManager, DeadpoolPool, RecyclingMethod};
///
/// let manager = DeadpoolManager::new(pg_entra::Connector::from_env()?)
///     .recycling_method(RecyclingMethod::Verified);
/// let pool = DeadpoolPool::builder(manager)
///     .max_size(16)
///     .runtime(pg_entra::pool::deadpool::Runtime::Tokio1)
///     .wait_timeout(Some(std::time::Duration::from_secs(5)))
///     .build()?;
/// let client = pool.get().await?;
/// client.simple_query("select 1").await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeadpoolManager {
    connector: Connector,
    recycling: RecyclingMethod,
    max_lifetime: Option<Duration>,
}

impl DeadpoolManager {
    /// A manager that connects through `connector`, recycles with
    /// [`RecyclingMethod::Fast`] and keeps connections for any length of time.
    pub fn new(connector: Connector) -> Self {
        Self {
            connector,
            recycling: RecyclingMethod::Fast,
            max_lifetime: None,
        }
    }

    /// How a connection is checked before it is handed out again.
    pub fn recycling_method(mut self, method: RecyclingMethod) -> Self {
        self.recycling = method;
        self
    }

    /// Close connections older than this when they come up for reuse (deadpool has no such
    /// setting of its own). `None` keeps them indefinitely.
    pub fn max_lifetime(mut self, max_lifetime: Option<Duration>) -> Self {
        self.max_lifetime = max_lifetime;
        self
    }

    /// The connector new connections go through.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }
}

impl Manager for DeadpoolManager {
    type Type = Client;
    type Error = Error;

    async fn create(&self) -> Result<Client, Error> {
        let client = self.connector.connect().await?;
        crate::observe::pool_connection_created("deadpool");
        Ok(client)
    }

    async fn recycle(&self, client: &mut Client, metrics: &Metrics) -> RecycleResult<Error> {
        if client.is_closed() {
            return Err(RecycleError::message("the connection has closed"));
        }
        if self.max_lifetime.is_some_and(|max| metrics.age() >= max) {
            return Err(RecycleError::message(
                "the connection reached its maximum lifetime",
            ));
        }
        if self.recycling == RecyclingMethod::Verified {
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|source| RecycleError::Backend(Error::from(source)))?;
        }
        Ok(())
    }
}

impl Connector {
    /// A deadpool pool of up to `max_size` connections through this connector: fast
    /// recycling, a 30-minute maximum lifetime, and 30-second limits on waiting for a free
    /// connection and on making a new one (reported as [`PoolError::Timeout`]). For other
    /// settings, build a [`DeadpoolPool`] from a [`DeadpoolManager`] yourself.
    ///
    /// # Errors
    /// [`Error::Config`] when `max_size` is zero.
    #[cfg_attr(docsrs, doc(cfg(feature = "deadpool")))]
    pub fn deadpool_pool(&self, max_size: usize) -> Result<DeadpoolPool, Error> {
        if max_size == 0 {
            return Err(Error::invalid(
                "max_size",
                "a pool needs room for at least one connection",
            ));
        }
        let manager = DeadpoolManager::new(self.clone()).max_lifetime(Some(DEFAULT_MAX_LIFETIME));
        Pool::builder(manager)
            .max_size(max_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(DEFAULT_POOL_TIMEOUT))
            .create_timeout(Some(DEFAULT_POOL_TIMEOUT))
            .build()
            .map_err(|error| {
                Error::invalid("pool", format!("cannot build the deadpool pool: {error}"))
            })
    }
}
