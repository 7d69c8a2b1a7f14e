//! Synchronous Diesel: `PgConnection` over libpq, and an r2d2 manager.
//!
//! Diesel's `PgConnection` is libpq (`pq-sys`), linked to the system's library (Debian's
//! `libpq-dev`): the same OpenSSL the rest of the crate uses through native-tls, security
//! updates from the distribution, and no C build of PostgreSQL's sources in every compile
//! (`pq-sys`'s `bundled` feature would build libpq and OpenSSL from source). libpq connects
//! itself, so the connection string it gets carries the token: it is built for one
//! `establish` call, never logged or shown, and dropped right after.

use std::time::Instant;

use ::diesel::{Connection as _, ConnectionError, PgConnection};

use super::BlockingConnector;
use crate::error::Error;
use crate::observe;
use crate::token::Token;

impl BlockingConnector {
    /// A Diesel `PgConnection` logged in with the current token: libpq with the connector's
    /// settings ([`Connector::libpq_parameters`]: `sslmode=verify-full`, the same root file,
    /// every host with `target_session_attrs`, the connect timeout), and one retry with a
    /// forced refresh after a refused login.
    ///
    /// [`Connector::libpq_parameters`]: crate::Connector::libpq_parameters
    ///
    /// # Errors
    /// [`Error::Libpq`] with libpq's message (withheld as [`Error::PostgresMessageWithheld`]
    /// if it quotes the token), readable with [`Error::login_refusal`]; the token errors of
    /// [`TokenCache::token`](crate::TokenCache::token).
    pub fn diesel_connection(&self) -> Result<PgConnection, Error> {
        let started = Instant::now();
        let result = self.with_retry(|token| self.diesel_connect_once(token));
        observe::connected(observe::ConnectOutcome::of(&result), started.elapsed());
        result
    }

    fn diesel_connect_once(&self, token: &Token) -> Result<PgConnection, Error> {
        let connector = self.connector();
        let user = connector.user_for(token)?;
        let mut pairs = connector.libpq_parameters(&user)?;
        // libpq's connect_timeout bounds each host's whole attempt, as the connector's does;
        // it takes whole seconds and treats less than 2 as 2.
        pairs.retain(|(key, _)| *key != "connect_timeout");
        pairs.push((
            "connect_timeout",
            self.connect_timeout().as_secs().max(2).to_string(),
        ));
        pairs.push(("password", token.secret().to_owned()));
        let conninfo = Secret(crate::libpq::conninfo(&pairs));
        drop(pairs);
        PgConnection::establish(&conninfo.0).map_err(|error| from_diesel(error, token))
    }
}

/// A string holding the token, overwritten when dropped.
struct Secret(String);

impl Drop for Secret {
    fn drop(&mut self) {
        // Zeroed before the buffer is freed (`black_box` keeps the writes from being elided).
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&bytes);
    }
}

/// Diesel's connection error as the crate's, never quoting the token.
fn from_diesel(error: ConnectionError, token: &Token) -> Error {
    let message = match error {
        ConnectionError::BadConnection(message) => message,
        other => other.to_string(),
    };
    if crate::redact::echoes(&message, token.secret()) {
        return Error::PostgresMessageWithheld { code: None };
    }
    Error::Libpq {
        message: message.trim_end().to_owned(),
    }
}

/// An r2d2 manager whose every new connection is [`BlockingConnector::diesel_connection`]. Open
/// connections outlive their token; give the pool a maximum lifetime (30–60 minutes) anyway.
#[derive(Debug, Clone)]
pub struct DieselManager {
    connector: BlockingConnector,
}

impl DieselManager {
    /// A manager connecting through `connector`.
    pub fn new(connector: BlockingConnector) -> Self {
        Self { connector }
    }
}

impl r2d2::ManageConnection for DieselManager {
    type Connection = PgConnection;
    type Error = Error;

    fn connect(&self) -> Result<PgConnection, Error> {
        let connection = self.connector.diesel_connection()?;
        observe::pool_connection_created("r2d2_diesel");
        Ok(connection)
    }

    fn is_valid(&self, connection: &mut PgConnection) -> Result<(), Error> {
        use ::diesel::connection::SimpleConnection as _;
        connection
            .batch_execute("SELECT 1")
            .map_err(|error| Error::Libpq {
                message: error.to_string(),
            })
    }

    fn has_broken(&self, _connection: &mut PgConnection) -> bool {
        // libpq reports a broken connection at the next statement; `is_valid` runs one.
        false
    }
}
