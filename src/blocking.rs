//! The synchronous stacks: the `postgres` crate (feature `postgres-sync`) and Diesel's
//! `PgConnection` over libpq (feature `diesel-sync`), each with an r2d2 manager, with the
//! guarantees of the async connector: a current token for every new connection, verified TLS,
//! one retry with a forced refresh after a refused login, the token in no log. One thing the
//! async connector does they do not: follow a server that names another PostgreSQL audience
//! (Cosmos DB for PostgreSQL's); give the connector that scope instead.
//!
//! The token cache is async. [`BlockingConnector`] runs it on a runtime it owns (one worker
//! thread, started when it is built) or on one the caller hands over, so it works from a plain
//! `fn main()` with no runtime and from a Tokio runtime's blocking threads
//! (`spawn_blocking`); the calls block, so do not make them on a runtime's worker threads.
//!
//! ```no_run
//! # #[cfg(feature = "postgres-sync")]
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use pg_entra::blocking::{BlockingConnector, PostgresManager};
//!
//! // PGHOST, PGUSER, ... and the identity from the environment, as `Connector::from_env`.
//! let connector = BlockingConnector::from_env()?;
//! let mut client = connector.postgres_client()?;
//! client.simple_query("select 1")?;
//!
//! let pool = r2d2::Pool::builder()
//!     .max_size(8)
//!     .build(PostgresManager::new(connector))?;
//! let mut pooled = pool.get()?;
//! let row = pooled.query_one("select current_user", &[])?;
//! # let _: String = row.get(0);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::connector::{Connector, ConnectorBuilder};
use crate::error::Error;
use crate::refusal::Retry;
use crate::token::Token;

#[cfg(feature = "postgres-sync")]
mod deadline;
#[cfg(feature = "diesel-sync")]
mod diesel;
#[cfg(feature = "postgres-sync")]
mod postgres;

#[cfg(feature = "diesel-sync")]
pub use diesel::DieselManager;
#[cfg(feature = "postgres-sync")]
pub use postgres::PostgresManager;

/// The `postgres` crate this module is built on, so that its version need not be pinned.
#[cfg(feature = "postgres-sync")]
pub use ::postgres as postgres_crate;
/// The r2d2 these managers implement `ManageConnection` for.
pub use ::r2d2;

/// A [`Connector`] for blocking code: every call blocks the calling thread until done. Cheap
/// to clone; clones share the connector, its token cache and the runtime.
#[derive(Clone)]
pub struct BlockingConnector {
    connector: Connector,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for BlockingConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingConnector")
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

/// Where the async half runs.
enum Runtime {
    /// Built here; shut down without waiting when the last clone goes, so that dropping the
    /// connector inside async code cannot panic.
    Owned(Option<tokio::runtime::Runtime>),
    /// Handed over by the caller.
    Handle(tokio::runtime::Handle),
}

impl Runtime {
    fn handle(&self) -> &tokio::runtime::Handle {
        match self {
            Runtime::Owned(Some(runtime)) => runtime.handle(),
            Runtime::Handle(handle) => handle,
            Runtime::Owned(None) => unreachable!("the runtime is taken only when dropped"),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Runtime::Owned(runtime) = self
            && let Some(runtime) = runtime.take()
        {
            runtime.shutdown_background();
        }
    }
}

impl BlockingConnector {
    /// A connector from the environment (as [`Connector::from_env`]) on a runtime of its own.
    ///
    /// # Errors
    /// As [`Connector::from_env`]; [`Error::Config`] when the runtime cannot start.
    pub fn from_env() -> Result<Self, Error> {
        Self::new(Connector::builder())
    }

    /// Builds `builder` on a runtime of its own: one worker thread named `pg-entra`, which
    /// also runs the token cache's refreshes.
    ///
    /// # Errors
    /// What [`ConnectorBuilder::build`] returns; [`Error::Config`] when the runtime cannot
    /// start.
    pub fn new(builder: ConnectorBuilder) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pg-entra")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::invalid(
                    "runtime",
                    format!("cannot start the blocking connector's Tokio runtime: {e}"),
                )
            })?;
        Self::build_on(builder, Runtime::Owned(Some(runtime)))
    }

    /// Builds `builder` on the caller's runtime, which must keep running while this is used.
    ///
    /// # Errors
    /// What [`ConnectorBuilder::build`] returns.
    pub fn with_runtime(
        builder: ConnectorBuilder,
        handle: tokio::runtime::Handle,
    ) -> Result<Self, Error> {
        Self::build_on(builder, Runtime::Handle(handle))
    }

    fn build_on(builder: ConnectorBuilder, runtime: Runtime) -> Result<Self, Error> {
        // The cache's background refresh needs the runtime when it is built.
        let connector = {
            let _entered = runtime.handle().enter();
            builder.build()?
        };
        Ok(Self {
            connector,
            runtime: Arc::new(runtime),
        })
    }

    /// The async connector underneath (for its configuration, token cache and health).
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The current token (a fresh one costs no I/O).
    ///
    /// # Errors
    /// As [`TokenCache::token`](crate::TokenCache::token).
    pub fn token(&self) -> Result<Token, Error> {
        let cache = self.connector.token_cache().clone();
        self.run(async move { cache.token().await })?
    }

    /// Runs `future` on the connector's runtime and waits for it on this thread. A std
    /// channel, not a Tokio one: waiting on it does not panic on any thread.
    pub(crate) fn run<F>(&self, future: F) -> Result<F::Output, Error>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = self.runtime.handle();
        let inside = tokio::runtime::Handle::try_current().is_ok();
        let handed_over = matches!(*self.runtime, Runtime::Handle(_));
        if handed_over
            && inside
            && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
        {
            // Waiting here could be waiting for this very thread.
            return Err(Error::invalid(
                "runtime",
                "a blocking connector on a current-thread runtime cannot be called from inside \
                 a runtime: call it from a thread of your own, or build it with \
                 `BlockingConnector::new` (its own runtime)",
            ));
        }
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        handle.spawn(async move {
            let _ = sender.send(future.await);
        });
        let stopped = |_| {
            Error::invalid(
                "runtime",
                "the blocking connector's runtime stopped before answering",
            )
        };
        if handed_over && inside {
            // On one of the caller's worker threads, let the others run while this one
            // waits (on a blocking-pool thread it simply waits).
            tokio::task::block_in_place(|| receiver.recv()).map_err(stopped)
        } else {
            receiver.recv().map_err(stopped)
        }
    }

    /// The one retry every blocking connect makes: `attempt` with the current token; after
    /// a refusal a new token can cure, once more with a forced refresh's token.
    pub(crate) fn with_retry<C>(
        &self,
        attempt: impl Fn(&Token) -> Result<C, Error>,
    ) -> Result<C, Error> {
        let token = self.token()?;
        let error = match attempt(&token) {
            Ok(connection) => return Ok(connection),
            Err(error) => error,
        };
        let refusal = error.login_refusal();
        if let Some(refusal) = &refusal {
            crate::observe::login_refused(refusal);
        }
        let retry = match &error {
            Error::PostgresMessageWithheld { .. } => Retry::No,
            _ => refusal.map_or(Retry::No, |refusal| refusal.retry()),
        };
        if retry != Retry::WithRefreshedToken {
            return Err(error);
        }
        let cache = self.connector.token_cache().clone();
        let refused = token.clone();
        match self.run(async move { cache.refresh_rejected(&refused).await })? {
            Ok(Some(next)) => {
                tracing::info!(%error, "the server refused the token; retrying once with a new token");
                attempt(&next).inspect_err(|error| {
                    if let Some(refusal) = error.login_refusal() {
                        crate::observe::login_refused(&refusal);
                    }
                })
            }
            Ok(None) => Err(error),
            Err(refresh_error) => {
                tracing::warn!(%refresh_error, "cannot refresh the token the server refused");
                Err(error)
            }
        }
    }

    /// The limit on one attempt at one host.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connector.connect_timeout()
    }
}
