//! The synchronous `postgres` crate: blocking connects and an r2d2 manager.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::SimpleQueryMessage;

use super::BlockingConnector;
use super::deadline::DeadlineTls;
use crate::error::Error;
use crate::observe;
use crate::token::Token;

impl BlockingConnector {
    /// A `postgres::Client` logged in with the current token over verified TLS: each host in
    /// turn (and `target_session_attrs`, every libpq value) as [`Connector::connect`] does,
    /// each attempt bounded as a whole by the connect timeout, and one retry with a forced
    /// refresh after a refused login. Server notices are logged through `tracing`, withheld
    /// when they quote the token.
    ///
    /// [`Connector::connect`]: crate::Connector::connect
    ///
    /// # Errors
    /// The same typed errors as [`Connector::connect`].
    pub fn postgres_client(&self) -> Result<postgres::Client, Error> {
        let started = Instant::now();
        let result = self.with_retry(|token| self.postgres_connect_once(token));
        observe::connected(observe::ConnectOutcome::of(&result), started.elapsed());
        result
    }

    fn postgres_connect_once(&self, token: &Token) -> Result<postgres::Client, Error> {
        let connector = self.connector();
        let hosts = connector.hosts_with(token)?;
        let tls = connector.tls_connector()?;
        let timeout = self.connect_timeout();
        let mut failed = crate::connector::FailedAttempts::default();
        for &standby in connector.target_session_attrs().passes() {
            for (host, port, config) in &hosts {
                let attempt = Attempt {
                    host,
                    port: *port,
                    config: config.clone(),
                    tls: tls.clone(),
                    token: token.clone(),
                    standby,
                    wanted: connector.target_session_attrs(),
                };
                let error = match attempt.run(timeout) {
                    Ok(client) => return Ok(client),
                    Err(error) => error,
                };
                tracing::debug!(%host, port, %error, "connection attempt failed");
                failed.record(error);
            }
        }
        Err(failed.into_error())
    }
}

/// One attempt at one host.
struct Attempt<'a> {
    host: &'a str,
    port: u16,
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
    token: Token,
    standby: Option<bool>,
    wanted: crate::TargetSessionAttrs,
}

impl Attempt<'_> {
    /// Runs on a thread of its own (the `postgres` crate runs a runtime of its own, which a
    /// runtime's thread may not), and the caller waits no longer than the connect timeout.
    /// The thread itself is bounded by the `postgres` crate's TCP connect timeout and, from
    /// the TLS handshake to the end of the login, by a deadline in the TLS stream
    /// ([`DeadlineTls`]); only a server that accepts TCP and never answers the `SSLRequest`
    /// (which tokio-postgres reads with no limit) keeps it until the server or the network
    /// gives up.
    fn run(self, timeout: Duration) -> Result<postgres::Client, Error> {
        let (sender, receiver) = mpsc::sync_channel(1);
        let (host, port) = (self.host.to_owned(), self.port);
        let (config, tls, token, standby) = (self.config, self.tls, self.token, self.standby);
        let wanted = self.wanted;
        let attempt_host = host.clone();
        let spawned = std::thread::Builder::new()
            .name("pg-entra-connect".into())
            .spawn(move || {
                let _ = sender.send(connect(
                    config,
                    tls,
                    &token,
                    &attempt_host,
                    port,
                    standby,
                    wanted,
                    timeout,
                ));
            });
        if let Err(error) = spawned {
            return Err(Error::invalid(
                "thread",
                format!("cannot start a connect thread: {error}"),
            ));
        }
        // A little past the thread's own deadline: its error (which says what ran out) wins.
        match receiver.recv_timeout(timeout + Duration::from_millis(500)) {
            Ok(result) => result,
            Err(_) => Err(Error::ConnectTimeout {
                host,
                port,
                timeout,
            }),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn connect(
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
    token: &Token,
    host: &str,
    port: u16,
    standby: Option<bool>,
    wanted: crate::TargetSessionAttrs,
    timeout: Duration,
) -> Result<postgres::Client, Error> {
    let (tls, login) = DeadlineTls::new(tls, Instant::now() + timeout);
    let mut config = postgres::Config::from(config);
    config.connect_timeout(timeout);
    let notices = token.clone();
    config.notice_callback(move |notice| crate::connector::log_notice(&notice, &notices));
    let connected = config.connect(tls).map_err(|error| {
        if crate::connector::socket_timed_out(&error) {
            return Error::ConnectTimeout {
                host: host.to_owned(),
                port,
                timeout,
            };
        }
        crate::connector::name_mismatch_advice(Error::from_login(error, token.secret()), host)
    });
    let mut client = connected?;
    // The session check below is part of the attempt; the limit comes off after it.
    let checked = check_session(&mut client, token, host, port, standby, wanted);
    login.done();
    checked.map(|()| client)
}

/// With `standby` set, the server must (`true`) or must not (`false`) be in recovery.
fn check_session(
    client: &mut postgres::Client,
    token: &Token,
    host: &str,
    port: u16,
    standby: Option<bool>,
    wanted: crate::TargetSessionAttrs,
) -> Result<(), Error> {
    if let Some(wanted_standby) = standby {
        let in_recovery = client
            .simple_query("SELECT pg_catalog.pg_is_in_recovery()")
            .map_err(|error| Error::from_login(error, token.secret()))?
            .iter()
            .any(|message| matches!(message, SimpleQueryMessage::Row(row) if row.get(0) == Some("t")));
        if in_recovery != wanted_standby {
            return Err(Error::SessionAttrsNotMet {
                host: host.to_owned(),
                port,
                wanted,
                standby: in_recovery,
            });
        }
    }
    Ok(())
}

/// An r2d2 manager whose every new connection is [`BlockingConnector::postgres_client`]: a
/// current token, verified TLS, one retry after a refused login. Open connections outlive
/// their token (PostgreSQL checks it only at login); give the pool a maximum lifetime (30–60
/// minutes) anyway, to bound how long a revoked identity keeps its sessions.
#[derive(Debug, Clone)]
pub struct PostgresManager {
    connector: BlockingConnector,
}

impl PostgresManager {
    /// A manager connecting through `connector`.
    pub fn new(connector: BlockingConnector) -> Self {
        Self { connector }
    }
}

impl r2d2::ManageConnection for PostgresManager {
    type Connection = postgres::Client;
    type Error = Error;

    fn connect(&self) -> Result<postgres::Client, Error> {
        let client = self.connector.postgres_client()?;
        observe::pool_connection_created("r2d2_postgres");
        Ok(client)
    }

    fn is_valid(&self, client: &mut postgres::Client) -> Result<(), Error> {
        client.simple_query("").map(drop).map_err(Error::from)
    }

    fn has_broken(&self, client: &mut postgres::Client) -> bool {
        client.is_closed()
    }
}
