//! Connection pools whose new physical connections always log in with a current token.
//!
//! PostgreSQL checks the token only at login: an open session outlives its token, so a pooled
//! connection never has to be closed because its token expired. What a pool needs is a fresh
//! token for each *new* connection, which these managers take from the [`Connector`]'s cache
//! (no identity-endpoint call while the cached token is fresh). A login refused with the
//! cached token (SQLSTATE `28P01` / `28000`) forces one rate-limited refresh and one retry,
//! as [`Connector::connect`] does.
//!
//! Still set a maximum connection lifetime (30 to 60 minutes): it bounds how long a session
//! keeps working after its identity lost access in Entra, and spreads connections over
//! server restarts and failovers.
//!
//! - feature `deadpool`: [`DeadpoolManager`] and [`Connector::deadpool_pool`];
//! - feature `bb8`: [`Bb8Manager`] and [`Connector::bb8_pool`].
//!
//! [`Connector`]: crate::Connector
//! [`Connector::connect`]: crate::Connector::connect
//! [`Connector::deadpool_pool`]: crate::Connector::deadpool_pool
//! [`Connector::bb8_pool`]: crate::Connector::bb8_pool

#[cfg(feature = "bb8")]
mod bb8_manager;
#[cfg(feature = "deadpool")]
mod deadpool_manager;

use std::time::Duration;

/// The bb8 this crate's `bb8` feature builds on, so that callers need not pin it themselves.
#[cfg(feature = "bb8")]
#[cfg_attr(docsrs, doc(cfg(feature = "bb8")))]
pub use ::bb8;
/// The deadpool this crate's `deadpool` feature builds on, so that callers need not pin it
/// themselves.
#[cfg(feature = "deadpool")]
#[cfg_attr(docsrs, doc(cfg(feature = "deadpool")))]
pub use ::deadpool;

#[cfg(feature = "bb8")]
#[cfg_attr(docsrs, doc(cfg(feature = "bb8")))]
pub use self::bb8_manager::{Bb8Manager, Bb8Pool, Bb8PooledConnection};
#[cfg(feature = "deadpool")]
#[cfg_attr(docsrs, doc(cfg(feature = "deadpool")))]
pub use self::deadpool_manager::{DeadpoolError, DeadpoolManager, DeadpoolObject, DeadpoolPool};

/// How long a convenience pool waits for a free connection, and for a new one to be made,
/// before giving up with a typed timeout error (bb8's own default).
pub(crate) const DEFAULT_POOL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a convenience pool keeps a physical connection (bb8's own default); see the
/// module documentation for why a limit is wise although tokens do not need it.
pub(crate) const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// How a pooled connection is checked before it is handed out again (as in deadpool-postgres).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RecyclingMethod {
    /// Only check that the connection has not closed: no round trip. A connection the server
    /// dropped a moment ago may still be handed out once.
    #[default]
    Fast,
    /// Also run `SELECT 1`: one round trip per checkout, no dead connection handed out.
    Verified,
}
