//! Synchronous Diesel: `PgConnection` over libpq, and an r2d2 manager.
//!
//! Diesel's `PgConnection` is libpq (`pq-sys`), linked to the system's library (Debian's
//! `libpq-dev`): the same OpenSSL the rest of the crate uses through native-tls, security
//! updates from the distribution, and no C build of PostgreSQL's sources in every compile
//! (`pq-sys`'s `bundled` feature would build libpq and OpenSSL from source).
//!
//! libpq connects by itself, and Diesel hands the connection string to its instrumentation
//! (an application's logger sees it whole). So the string carries no password: the token goes
//! to libpq through a password file (`passfile`) that exists only in memory: on Linux a memfd
//! readable by its owner only (`0600`), named to libpq as `/proc/self/fd/N` and closed when the
//! connect returns; elsewhere a `0600` file in the temporary directory, removed at once.

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
        let password = PasswordFile::holding(token)?;
        pairs.push(("passfile", password.path.clone()));
        let conninfo = crate::libpq::conninfo(&pairs);
        let connected = PgConnection::establish(&conninfo);
        drop(password);
        connected.map_err(|error| from_diesel(error, token))
    }
}

/// A libpq password file holding the token for any host, port, database and user, for one
/// connect.
struct PasswordFile {
    path: String,
    #[cfg(target_os = "linux")]
    _memfd: std::fs::File,
    #[cfg(not(target_os = "linux"))]
    _file: TemporaryFile,
}

impl PasswordFile {
    fn holding(token: &Token) -> Result<Self, Error> {
        // libpq's format: `host:port:database:user:password`, `\` and `:` escaped.
        let line = format!(
            "*:*:*:*:{}\n",
            token.secret().replace('\\', "\\\\").replace(':', "\\:")
        );
        let failed = |e: std::io::Error| {
            Error::invalid(
                "passfile",
                format!("cannot make the in-memory password file for libpq: {e}"),
            )
        };
        Self::create(line.as_bytes()).map_err(failed)
    }

    #[cfg(target_os = "linux")]
    fn create(contents: &[u8]) -> std::io::Result<Self> {
        use rustix::fs::{MemfdFlags, Mode, fchmod, memfd_create};
        use std::io::Write as _;
        use std::os::fd::AsRawFd as _;

        let fd = memfd_create("pg-entra-passfile", MemfdFlags::CLOEXEC)?;
        // libpq ignores a password file others may read.
        fchmod(&fd, Mode::from_raw_mode(0o600))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(contents)?;
        Ok(Self {
            path: format!("/proc/self/fd/{}", file.as_raw_fd()),
            _memfd: file,
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn create(contents: &[u8]) -> std::io::Result<Self> {
        let file = TemporaryFile::create(contents)?;
        Ok(Self {
            path: file.path.display().to_string(),
            _file: file,
        })
    }
}

/// A `0600` file in the temporary directory, removed when dropped.
#[cfg(not(target_os = "linux"))]
struct TemporaryFile {
    path: std::path::PathBuf,
}

#[cfg(not(target_os = "linux"))]
impl TemporaryFile {
    fn create(contents: &[u8]) -> std::io::Result<Self> {
        use std::io::Write as _;
        let name = format!(
            "pg-entra-passfile-{}-{:016x}",
            std::process::id(),
            (crate::jitter::unit_random() * u64::MAX as f64) as u64
        );
        let path = std::env::temp_dir().join(name);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&path)?.write_all(contents)?;
        Ok(Self { path })
    }
}

#[cfg(not(target_os = "linux"))]
impl Drop for TemporaryFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
