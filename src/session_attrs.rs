//! libpq's `target_session_attrs`: which kind of server a connection must reach among
//! several hosts, and the check after login that tokio-postgres does not make itself.

use std::fmt;

use std::task::Poll;

use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

use crate::connector::Connection;
use crate::error::Error;
use crate::token::Token;

/// The kind of session a connection must have, as libpq 15's `target_session_attrs` names it
/// (`PGTARGETSESSIONATTRS`). With several hosts, each is tried in turn until one offers it.
///
/// `read-write` and `read-only` ask whether the session accepts writes
/// (`transaction_read_only`); `primary` and `standby` ask whether the server is in recovery
/// (`pg_is_in_recovery()`), so a primary with `default_transaction_read_only` on counts as
/// `primary` but not as `read-write`. `prefer-standby` tries every host for a standby first,
/// then every host again for any server. On Azure, a read replica or the reader virtual
/// endpoint is a standby; the writer endpoint and a high-availability server's name are the
/// primary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TargetSessionAttrs {
    /// Any server (the default).
    #[default]
    Any,
    /// A session that accepts writes.
    ReadWrite,
    /// A session that does not accept writes.
    ReadOnly,
    /// A server not in recovery.
    Primary,
    /// A server in recovery (a standby, a read replica).
    Standby,
    /// A standby if any host is one, else any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    /// Reads libpq's spelling (case-sensitive, as libpq); `None` for anything else.
    pub(crate) fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "any" => Self::Any,
            "read-write" => Self::ReadWrite,
            "read-only" => Self::ReadOnly,
            "primary" => Self::Primary,
            "standby" => Self::Standby,
            "prefer-standby" => Self::PreferStandby,
            _ => return None,
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::ReadWrite => "read-write",
            Self::ReadOnly => "read-only",
            Self::Primary => "primary",
            Self::Standby => "standby",
            Self::PreferStandby => "prefer-standby",
        }
    }

    /// What tokio-postgres checks itself (`SHOW transaction_read_only`); the recovery-based
    /// kinds are checked by the connector.
    pub(crate) fn for_tokio_postgres(self) -> tokio_postgres::config::TargetSessionAttrs {
        use tokio_postgres::config::TargetSessionAttrs as Tp;
        match self {
            Self::ReadWrite => Tp::ReadWrite,
            Self::ReadOnly => Tp::ReadOnly,
            Self::Any | Self::Primary | Self::Standby | Self::PreferStandby => Tp::Any,
        }
    }

    /// The passes over the hosts: in each, whether the server must be a standby (`Some`) or
    /// may be anything (`None`).
    pub(crate) fn passes(self) -> &'static [Option<bool>] {
        match self {
            Self::Primary => &[Some(false)],
            Self::Standby => &[Some(true)],
            Self::PreferStandby => &[Some(true), None],
            Self::Any | Self::ReadWrite | Self::ReadOnly => &[None],
        }
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the server behind a new session is in recovery. Drives `connection` while it
/// asks, as the session is not spawned yet: notices that arrive are logged as the spawned
/// session logs them (withheld when they quote the token), and errors are read as a login's.
pub(crate) async fn in_recovery(
    client: &Client,
    connection: &mut Connection,
    token: &Token,
) -> Result<bool, Error> {
    let query = client.simple_query("SELECT pg_catalog.pg_is_in_recovery()");
    futures_util::pin_mut!(query);
    let messages = futures_util::future::poll_fn(|cx| {
        loop {
            match connection.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => {
                    crate::connector::log_notice(&notice, token);
                }
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(error))) => {
                    return Poll::Ready(Err(Error::from_login(error, token.secret())));
                }
                // Closed: the query's answer fails with it.
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        query
            .as_mut()
            .poll(cx)
            .map_err(|error| Error::from_login(error, token.secret()))
    })
    .await?;
    Ok(messages
        .iter()
        .any(|message| matches!(message, SimpleQueryMessage::Row(row) if row.get(0) == Some("t"))))
}
