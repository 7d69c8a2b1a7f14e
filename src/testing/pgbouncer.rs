//! A real PgBouncer in front of the bed's PostgreSQL, as Azure runs its built-in pooler:
//! TLS towards clients with the bed's certificate, verified TLS towards the server, and the
//! client's password (the token) handed on to PostgreSQL, which checks it.
//!
//! # How the token gets through
//!
//! PgBouncer 1.18 (Debian 12) checks a client's password itself against `auth_file` or an
//! `auth_query`, and logs in to the server with what it stored there: a token that changes
//! every hour cannot be in either. Its `auth_type = pam` is the exception: after PAM accepts
//! a client, PgBouncer keeps the cleartext password the client sent and logs in to the server
//! with it (`pam.c`, `pam_auth_finish`). So the bed runs PgBouncer with `auth_type = pam` and
//! a PAM service that accepts only PgBouncers the bed started and leaves the check to
//! PostgreSQL:
//!
//! - `/etc/pam.d/pgbouncer` (PgBouncer's fixed PAM service name) runs
//!   `/usr/local/libexec/pg-entra-bed-pgbouncer-pam` through `pam_exec`;
//! - that script succeeds only when the PgBouncer asking (its parent process) works in a
//!   directory holding the bed's marker file, so any other PgBouncer on the machine that uses
//!   PAM is refused, not let through.
//!
//! Both files are written once, as root, when missing (`.ci/run` runs as root), and left in
//! place for later runs; the bed never changes either file when it finds something else there
//! (other contents, a link, an unreadable file). A PgBouncer of the system's own that uses
//! `auth_type = pam` without a service file of its own is refused by them.
//!
//! What this PgBouncer checks, and what it does not: PostgreSQL checks a password when a
//! server connection opens. PgBouncer hands a pooled server connection to any client that
//! names its role, whatever password that client sent, and logs in with the last client's
//! password when it opens the next one. So any local account can use the bed's pooled
//! sessions of a role, and disturb its next server logins with a wrong password. The bed's
//! identity endpoint already mints the identity's tokens for any local process (as IMDS does
//! on a VM), so this grants no role more than the bed already does; do not run the bed where
//! other local accounts must not reach its roles.
//!
//! PgBouncer 1.18 keeps at most 2,047 bytes of a password (`MAX_PASSWORD`, 2,048 with its
//! terminating zero); the bed's tests measure what that does to longer tokens.

use std::fmt;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::TestBedError;
use super::postgres::{LocalPostgres, TEST_HOST, new_bed_dir, read_as_owner, run_with_input};
use crate::connector::{Connector, ConnectorBuilder};
use crate::environment::Environment;

/// Overrides which `pgbouncer` program the bed runs (a newer build, say).
pub const PGBOUNCER_VAR: &str = "PG_ENTRA_PGBOUNCER";
const DEFAULT_PROGRAM: &str = "/usr/sbin/pgbouncer";
const PAM_SERVICE_FILE: &str = "/etc/pam.d/pgbouncer";
const PAM_CHECK_PROGRAM: &str = "/usr/local/libexec/pg-entra-bed-pgbouncer-pam";
/// The file whose presence in a PgBouncer's working directory tells the PAM check that the
/// bed started it.
const MARKER: &str = "pg-entra-bed-pgbouncer";
const SERVER_ACCOUNT: &str = "postgres";
const START_ATTEMPTS: usize = 3;
const READY_WITHIN: Duration = Duration::from_secs(15);

const PAM_SERVICE: &str = "\
# Written by pg-entra's test bed (src/testing/pgbouncer.rs). PgBouncer with auth_type = pam
# logs in to PostgreSQL with the password its client sent; the check below lets through only
# PgBouncers the bed started, whose server (PostgreSQL) checks that password.
auth     required  pam_exec.so quiet /usr/local/libexec/pg-entra-bed-pgbouncer-pam
account  required  pam_exec.so quiet /usr/local/libexec/pg-entra-bed-pgbouncer-pam
";

const PAM_CHECK: &str = "\
#!/bin/sh
# Written by pg-entra's test bed (src/testing/pgbouncer.rs): succeeds only for a PgBouncer
# (this program's parent) working in a directory the bed marked as its own.
test -f \"/proc/$PPID/cwd/pg-entra-bed-pgbouncer\"
";

/// How PgBouncer hands server connections to clients (`pool_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection for the whole client session.
    Session,
    /// A server connection for one transaction; between transactions the client has none.
    Transaction,
}

impl PoolMode {
    fn keyword(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// A running PgBouncer in front of a [`LocalPostgres`]. Stopped and deleted when dropped.
pub struct LocalPgBouncer {
    dir: TempDir,
    port: u16,
    child: Child,
    as_server_account: bool,
    ca_certificate: PathBuf,
    version: String,
}

impl fmt::Debug for LocalPgBouncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPgBouncer")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl LocalPgBouncer {
    /// Whether a PgBouncer can be started here: the program exists, and the PAM service is in
    /// place or can be written (running as root). `Err` says what is missing.
    pub fn available() -> Result<(), TestBedError> {
        let program = program();
        if !program.is_file() {
            return Err(TestBedError::message(format!(
                "PgBouncer not found at {}: install it (`apt-get install -y pgbouncer`) or set \
                 {PGBOUNCER_VAR}",
                program.display()
            )));
        }
        match ours(PAM_SERVICE_FILE, PAM_SERVICE) {
            Presence::Ours => Ok(()),
            Presence::Other => Err(TestBedError::message(format!(
                "{PAM_SERVICE_FILE} exists and was not written by pg-entra's test bed; the bed \
                 leaves it alone and cannot pass tokens through PgBouncer"
            ))),
            Presence::Missing if running_as_root() => Ok(()),
            Presence::Missing => Err(TestBedError::message(format!(
                "{PAM_SERVICE_FILE} is missing: run the tests once as root (as .ci/run does) \
                 so that the bed can write it"
            ))),
        }
    }

    /// Starts PgBouncer in `mode` in front of `postgres`, listening on 127.0.0.1 with TLS.
    /// Blocks for up to a few seconds on Tokio's blocking pool.
    pub async fn start(postgres: &LocalPostgres, mode: PoolMode) -> Result<Self, TestBedError> {
        Self::available()?;
        let server_port = postgres.port();
        let tls = std::sync::Arc::clone(postgres.tls_material());
        let as_server_account = postgres.as_server_account();
        tokio::task::spawn_blocking(move || {
            Self::start_blocking(server_port, &tls, as_server_account, mode)
        })
        .await
        .map_err(|e| TestBedError::new("the PgBouncer start-up task failed", e))?
    }

    fn start_blocking(
        server_port: u16,
        tls: &super::postgres::TlsMaterial,
        as_server_account: bool,
        mode: PoolMode,
    ) -> Result<Self, TestBedError> {
        install_pam_service()?;
        let version = version()?;
        let dir = new_bed_dir()?;
        tls.write_to(dir.path())?;
        std::fs::write(dir.path().join(MARKER), "")?;
        if as_server_account {
            let status = Command::new("chown")
                .args(["-R", &format!("{SERVER_ACCOUNT}:")])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                return Err(TestBedError::message(
                    "chown of the PgBouncer directory failed",
                ));
            }
        }
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
                .local_addr()?
                .port();
            let config = dir.path().join(format!("pgbouncer-{port}.ini"));
            // Written before the hand-over is not possible for a port chosen now; the
            // directory's owner writes it (a new name each time, so nothing is followed).
            let text = configuration(dir.path(), port, server_port, mode, &version);
            write_new(&config, &text, as_server_account)?;
            match spawn(dir.path(), &config, as_server_account)
                .and_then(|child| wait_until_ready(child, port))
            {
                Ok(child) => {
                    tracing::debug!(port, %version, "test PgBouncer started");
                    let ca_certificate = dir.path().join("ca.crt");
                    return Ok(Self {
                        dir,
                        port,
                        child,
                        as_server_account,
                        ca_certificate,
                        version,
                    });
                }
                Err(error) => last_error = Some(error),
            }
        }
        let log = read_log(dir.path(), as_server_account);
        Err(last_error
            .map(|e| TestBedError::message(format!("{e}\nPgBouncer log:\n{log}")))
            .unwrap_or_else(|| TestBedError::message("PgBouncer did not start")))
    }

    /// The host name to connect to (the certificate is for it).
    pub fn host(&self) -> &'static str {
        TEST_HOST
    }

    /// The TCP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What `pgbouncer --version` says first (`PgBouncer 1.18.0`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether this PgBouncer keeps protocol-level prepared statements apart per client in
    /// transaction pooling (`max_prepared_statements`, PgBouncer 1.21 and later).
    pub fn tracks_prepared_statements(&self) -> bool {
        parse_version(&self.version).is_some_and(|v| v >= (1, 21))
    }

    /// PgBouncer's log (connections, logins, server login failures).
    pub fn log(&self) -> String {
        read_log(self.dir.path(), self.as_server_account)
    }

    /// libpq variables that point at this PgBouncer (host, port, database, root certificate).
    pub fn libpq_vars(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), TEST_HOST.into()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGDATABASE".into(), "postgres".into()),
            ("PGSSLMODE".into(), "verify-full".into()),
            (
                "PGSSLROOTCERT".into(),
                self.ca_certificate.display().to_string(),
            ),
        ]
    }

    /// A connector builder aimed at this PgBouncer, reading no environment. Add a credential.
    pub fn connector_builder(&self) -> ConnectorBuilder {
        Connector::builder().environment(Environment::from_vars(self.libpq_vars()))
    }
}

impl Drop for LocalPgBouncer {
    fn drop(&mut self) {
        // SIGINT: PgBouncer's "safe shutdown" would wait for clients; SIGKILL of `runuser`
        // would leave PgBouncer running. SIGTERM stops it at once.
        let pid = self.child.id().to_string();
        let _ = Command::new("pkill").args(["-TERM", "-P", &pid]).status();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn program() -> PathBuf {
    std::env::var_os(PGBOUNCER_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PROGRAM))
}

fn version() -> Result<String, TestBedError> {
    // A program named by a variable, run as root: bounded, as every wait of the bed.
    let mut child = Command::new(program())
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + READY_WITHIN;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TestBedError::message(format!(
                "`{} --version` did not answer within {READY_WITHIN:?}",
                program().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .next()
        .filter(|line| line.starts_with("PgBouncer "))
        .map(str::to_owned)
        .ok_or_else(|| {
            TestBedError::message(format!("`{} --version` said {text:?}", program().display()))
        })
}

/// `PgBouncer 1.18.0` → `(1, 18)`.
fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.strip_prefix("PgBouncer ")?.split(['.', ' ']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn configuration(dir: &Path, port: u16, server_port: u16, mode: PoolMode, version: &str) -> String {
    let dir = dir.display();
    let mode = mode.keyword();
    // 1.21 and later keep clients' protocol-level prepared statements apart; 1.18 refuses
    // the setting as unknown.
    let prepared = if parse_version(version).is_some_and(|v| v >= (1, 21)) {
        "max_prepared_statements = 100\n"
    } else {
        ""
    };
    // `ignore_startup_parameters`: what clients send that PgBouncer would otherwise refuse
    // (sqlx sends `extra_float_digits`). `server_login_retry` short, so that a test that
    // makes a server login fail on purpose does not block the next one for 15 s.
    format!(
        "[databases]\n\
         * = host={TEST_HOST} port={server_port}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = pam\n\
         pool_mode = {mode}\n\
         max_client_conn = 200\n\
         default_pool_size = 20\n\
         {prepared}\
         ignore_startup_parameters = extra_float_digits\n\
         server_login_retry = 1\n\
         logfile = {dir}/pgbouncer.log\n\
         client_tls_sslmode = require\n\
         client_tls_cert_file = {dir}/server.crt\n\
         client_tls_key_file = {dir}/server.key\n\
         server_tls_sslmode = verify-full\n\
         server_tls_ca_file = {dir}/ca.crt\n"
    )
}

fn spawn(dir: &Path, config: &Path, as_server_account: bool) -> Result<Child, TestBedError> {
    let mut command = if as_server_account {
        let mut command = Command::new("runuser");
        command.args(["-u", SERVER_ACCOUNT, "--"]).arg(program());
        command
    } else {
        Command::new(program())
    };
    command
        .arg(config)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    Ok(command.spawn()?)
}

/// Waits until PgBouncer accepts TCP connections on `port`; an exit first is an error.
fn wait_until_ready(mut child: Child, port: u16) -> Result<Child, TestBedError> {
    let deadline = Instant::now() + READY_WITHIN;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Err(TestBedError::message(format!(
                "PgBouncer exited ({status})"
            )));
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(TestBedError::message(format!(
        "PgBouncer did not listen on port {port} within {READY_WITHIN:?}"
    )))
}

/// PAM's service file and the check it runs, written when missing (root only).
fn install_pam_service() -> Result<(), TestBedError> {
    for (path, contents, mode) in [
        (PAM_SERVICE_FILE, PAM_SERVICE, 0o644),
        (PAM_CHECK_PROGRAM, PAM_CHECK, 0o755),
    ] {
        match ours(path, contents) {
            Presence::Ours => {}
            Presence::Missing => write_root_file(Path::new(path), contents, mode)?,
            Presence::Other => {
                return Err(TestBedError::message(format!(
                    "{path} was not written by pg-entra's test bed (or cannot be read); it is \
                     left alone, and the bed's PgBouncer cannot run"
                )));
            }
        }
    }
    Ok(())
}

/// Whether one of the bed's system files is there as the bed writes it.
enum Presence {
    Ours,
    Missing,
    /// Anything else: other contents, a link, unreadable. Never overwritten.
    Other,
}

fn ours(path: &str, contents: &str) -> Presence {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Presence::Missing,
        Ok(meta) if meta.file_type().is_file() => match std::fs::read_to_string(path) {
            Ok(text) if text == contents => Presence::Ours,
            _ => Presence::Other,
        },
        _ => Presence::Other,
    }
}

/// Writes a root-owned file through a new temporary file in the same directory, renamed into
/// place, so that no half-written service file is ever read and no existing link is followed.
fn write_root_file(path: &Path, contents: &str, mode: u32) -> Result<(), TestBedError> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let parent = path
        .parent()
        .ok_or_else(|| TestBedError::message(format!("{} has no directory", path.display())))?;
    std::fs::create_dir_all(parent)?;
    let mut file = tempfile::NamedTempFile::new_in(parent)?;
    file.write_all(contents.as_bytes())?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.persist(path)
        .map_err(|e| TestBedError::new(format!("cannot write {}", path.display()), e.error))?;
    Ok(())
}

/// Creates `path` (which must not exist) with `contents`, as the directory's owner.
fn write_new(path: &Path, contents: &str, as_server_account: bool) -> Result<(), TestBedError> {
    use std::io::Write as _;
    if !as_server_account {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?
            .write_all(contents.as_bytes())?;
        return Ok(());
    }
    // `set -C`: the shell's `>` refuses an existing file (or a link planted in its place).
    let mut command = Command::new("runuser");
    command
        .args([
            "-u",
            SERVER_ACCOUNT,
            "--",
            "sh",
            "-c",
            "set -C; cat > \"$1\"",
            "sh",
        ])
        .arg(path);
    run_with_input(command, contents)
}

fn read_log(dir: &Path, as_server_account: bool) -> String {
    read_as_owner(&dir.join("pgbouncer.log"), as_server_account)
}

fn running_as_root() -> bool {
    super::postgres::running_as_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read() {
        assert_eq!(parse_version("PgBouncer 1.18.0"), Some((1, 18)));
        assert_eq!(parse_version("PgBouncer 1.25.1"), Some((1, 25)));
        assert_eq!(parse_version("pgbouncer"), None);
    }
}
