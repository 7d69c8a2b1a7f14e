//! Getting ready before serving: a token in the cache (and, if asked, one login) within a
//! bound, for a service's start-up or readiness step.

use std::time::Duration;

use crate::connector::Connector;
use crate::error::Error;

/// What [`Connector::warm_up`] makes ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WarmUp {
    /// A token in the cache: the first connect then asks no identity endpoint.
    Token,
    /// A token and one login with it, closed at once: the role, the network and TLS work too.
    Login,
}

impl Connector {
    /// Makes the connector ready before a service serves (what Google's connectors call
    /// warm-up): gets a token into the cache and, for [`WarmUp::Login`], opens and closes one
    /// connection, all within `within`.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), pg_entra::Error> {
    /// use std::time::Duration;
    /// use pg_entra::{Connector, WarmUp};
    ///
    /// let connector = Connector::from_env()?;
    /// // Fail the start-up, with the cause, rather than serve without a database.
    /// connector.warm_up(WarmUp::Login, Duration::from_secs(20)).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// What [`token`](crate::TokenCache::token) or [`connect`](Self::connect) return (the
    /// same typed errors, with their hints); [`Error::NotReady`] when `within` runs out first,
    /// naming the cache's last failure if there was one.
    pub async fn warm_up(&self, what: WarmUp, within: Duration) -> Result<(), Error> {
        let ready = async {
            match what {
                WarmUp::Token => self.token_cache().token().await.map(drop),
                WarmUp::Login => {
                    let client = self.connect().await?;
                    client.simple_query("").await.map_err(Error::from)?;
                    Ok(())
                }
            }
        };
        match tokio::time::timeout(within, ready).await {
            Ok(result) => result,
            Err(_) => {
                let health = self.token_cache().health();
                Err(Error::NotReady {
                    within,
                    waiting_for: if health.ready { "the login" } else { "a token" },
                    last_error: health.last_error,
                })
            }
        }
    }
}
