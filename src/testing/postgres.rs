//! A real PostgreSQL server configured like Azure Database for PostgreSQL Flexible Server:
//! TLS only, cleartext password authentication inside TLS, roles whose passwords are tokens
//! `VALID UNTIL` their expiry. Members of the group role [`SCRAM_GROUP`] (which the bed does
//! not create: a test that wants it does) are asked for SCRAM-SHA-256 instead, for clients
//! that answer either, as `pg-entra proxy` does.
//!
//! The bed runs on developers' machines, so it hands out no more than Azure does: its
//! directory is `0700` and owned by the account that runs the server, the superuser logs in
//! over the Unix socket only and with a random password that lives in this process's memory,
//! and no line of `pg_hba.conf` says `trust`. (Like IMDS on a VM, the identity endpoint mints
//! tokens for any local process: those log in as the identity's role, which has no
//! privileges.) When the bed runs as root the server runs as `postgres`, and
//! every file written after the directory is handed over is written as `postgres`: a symlink
//! planted there can only lead to what `postgres` could write anyway.

use std::fmt;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_postgres::{Client, NoTls};

use super::TestBedError;
use super::certs::{ServerCertificate, TestCa};
use crate::connector::{Connector, ConnectorBuilder};
use crate::environment::Environment;

/// The group role whose members the bed asks for SCRAM-SHA-256 rather than a cleartext
/// password (`pg_hba.conf` names it as `+scram_login`; no such role exists until a test makes
/// it).
pub const SCRAM_GROUP: &str = "scram_login";

/// Overrides where the PostgreSQL server binaries are looked for.
pub(crate) const BINDIR_VAR: &str = "PG_ENTRA_PG_BINDIR";
/// The host name the test server's certificate is for and clients connect to.
pub(crate) const TEST_HOST: &str = "localhost";
const SUPERUSER: &str = "postgres";
/// The OS account that runs the server when the tests run as root (initdb refuses root).
const SERVER_ACCOUNT: &str = "postgres";
const START_ATTEMPTS: usize = 3;

/// The superuser's password: random, in memory only, never shown.
const SUPERUSER_PASSWORD_BYTES: usize = 24;

/// A running PostgreSQL in a temporary directory. Stopped and deleted when dropped.
pub struct LocalPostgres {
    dir: TempDir,
    bindir: PathBuf,
    port: u16,
    as_server_account: bool,
    superuser_password: Arc<str>,
    /// The CA and the server certificate, kept in memory so that a standby or a PgBouncer
    /// gets its own copies without reading files the server's account could have replaced.
    tls: Arc<TlsMaterial>,
    /// This server and its standbys: where the identity endpoint sets role passwords.
    cluster: Cluster,
}

/// The CA certificate and the server's certificate and key, PEM.
pub(crate) struct TlsMaterial {
    pub(crate) ca_pem: Vec<u8>,
    pub(crate) server: ServerCertificate,
}

/// Where a server of the bed listens: its Unix socket directory and port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerAddress {
    socket_dir: PathBuf,
    port: u16,
}

/// A primary and its standbys, shared by each of them and by their [`PasswordSetter`]s.
type Cluster = Arc<Mutex<Vec<ServerAddress>>>;

impl fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl LocalPostgres {
    /// Creates a cluster, a test CA and a server certificate, and starts the server, with an
    /// emulation of Azure's Entra role functions in its `postgres` database
    /// (`pgaadauth_create_principal`, `pgaadauth_create_principal_with_oid`,
    /// `pgaadauth_list_principals`: their shapes only; nothing is looked up in Entra). Takes
    /// a second or two; the blocking work runs on Tokio's blocking pool.
    pub async fn start() -> Result<Self, TestBedError> {
        let postgres = tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .map_err(|e| TestBedError::new("the PostgreSQL start-up task failed", e))??;
        postgres
            .admin()
            .await?
            .batch_execute(&super::pgaadauth::install_sql(super::jwt::TEST_TENANT_ID))
            .await?;
        Ok(postgres)
    }

    fn start_blocking() -> Result<Self, TestBedError> {
        let bindir = find_bindir()?;
        let as_server_account = running_as_root();
        // Only the account that runs the server (and root) may enter: the socket, the keys
        // and the data are inside.
        let dir = new_bed_dir()?;
        let data = dir.path().join("data");
        let tls = dir.path().join("tls");
        std::fs::create_dir(&tls)?;
        std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o700))?;

        // Everything root writes, it writes before the directory changes hands.
        let ca = TestCa::generate("pg-entra test CA")?;
        let material = Arc::new(TlsMaterial {
            ca_pem: ca.certificate_pem()?,
            server: ca.issue_server_certificate()?,
        });
        material.write_to(&tls)?;
        let superuser_password = random_password()?;
        let password_file = dir.path().join("superuser.password");
        write_private(&password_file, superuser_password.as_bytes())?;
        if as_server_account {
            run(Command::new("chown")
                .args(["-R", &format!("{SERVER_ACCOUNT}:")])
                .arg(dir.path()))?;
        }

        let mut postgres = Self {
            dir,
            bindir,
            port: 0,
            as_server_account,
            superuser_password: superuser_password.into(),
            tls: material,
            cluster: Cluster::default(),
        };
        let password_file_option = {
            let mut option = std::ffi::OsString::from("--pwfile=");
            option.push(&password_file);
            option
        };
        let initdb = postgres.run_tool(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "-A".as_ref(),
                "scram-sha-256".as_ref(),
                password_file_option.as_os_str(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        postgres.remove_file(&password_file)?;
        initdb?;
        // Flexible Server: TLS only, cleartext password inside it, no `trust` anywhere. The
        // superuser: over the Unix socket only (in the 0700 directory), with its password.
        postgres.write_file(
            &data.join("pg_hba.conf"),
            &format!(
                "local   all  postgres                 scram-sha-256\n\
                 local   replication  postgres         scram-sha-256\n\
                 local   all  all                      reject\n\
                 hostssl all  postgres  127.0.0.1/32   reject\n\
                 hostssl all  postgres  ::1/128        reject\n\
                 hostssl all  +{SCRAM_GROUP}  127.0.0.1/32  scram-sha-256\n\
                 hostssl all  +{SCRAM_GROUP}  ::1/128       scram-sha-256\n\
                 hostssl all  all       127.0.0.1/32   password\n\
                 hostssl all  all       ::1/128        password\n"
            ),
            WriteMode::Replace,
        )?;
        let socket_dir = postgres.dir.path().display().to_string();
        let tls_dir = tls.display().to_string();
        let settings = format!(
            "\n# pg-entra test bed\n\
             listen_addresses = 'localhost'\n\
             unix_socket_directories = '{socket_dir}'\n\
             unix_socket_permissions = 0700\n\
             ssl = on\n\
             ssl_cert_file = '{tls_dir}/server.crt'\n\
             ssl_key_file = '{tls_dir}/server.key'\n\
             ssl_min_protocol_version = 'TLSv1.2'\n\
             password_encryption = 'scram-sha-256'\n\
             log_connections = on\n\
             max_connections = 200\n\
             shared_buffers = '32MB'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n"
        );
        postgres.write_file(&data.join("postgresql.conf"), &settings, WriteMode::Append)?;
        postgres.start_on_a_free_port()?;
        Ok(postgres)
    }

    /// Starts the server on a free port and records it in the cluster.
    fn start_on_a_free_port(&mut self) -> Result<(), TestBedError> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            self.port = free_port()?;
            match self.pg_ctl_start() {
                Ok(()) => {
                    tracing::debug!(port = self.port, dir = %self.dir.path().display(), "test PostgreSQL started");
                    lock(&self.cluster).push(self.address());
                    return Ok(());
                }
                // Another process may have taken the port between probe and bind.
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| TestBedError::message("PostgreSQL did not start")))
    }

    /// Starts a streaming standby of this server (`pg_basebackup -R`), as a read replica or
    /// the high-availability standby: a server of its own, on its own port and in its own
    /// directory, with the same certificate (for `localhost`) and roles, replaying what this
    /// server writes. Role passwords set later reach it by replication; after
    /// [`promote`](Self::promote) the identity endpoint sets them on it. Blocks for a second
    /// or two on Tokio's blocking pool.
    pub async fn start_standby(&self) -> Result<LocalPostgres, TestBedError> {
        let seed = Self {
            dir: new_bed_dir()?,
            bindir: self.bindir.clone(),
            port: 0,
            as_server_account: self.as_server_account,
            superuser_password: Arc::clone(&self.superuser_password),
            tls: Arc::clone(&self.tls),
            cluster: Arc::clone(&self.cluster),
        };
        let primary = self.address();
        tokio::task::spawn_blocking(move || seed.start_standby_blocking(primary))
            .await
            .map_err(|e| TestBedError::new("the standby's start-up task failed", e))?
    }

    fn start_standby_blocking(
        mut self,
        primary: ServerAddress,
    ) -> Result<LocalPostgres, TestBedError> {
        let tls = self.dir.path().join("tls");
        std::fs::create_dir(&tls)?;
        std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o700))?;
        self.tls.write_to(&tls)?;
        // libpq's password file: the superuser password reaches pg_basebackup, and then the
        // standby's replication connection (`-R` names the file in `primary_conninfo`),
        // without a command line or an environment value another process could read. It
        // stays, `0600` in the `0700` directory, for as long as the standby runs.
        let passfile = self.dir.path().join("superuser.pgpass");
        write_private(
            &passfile,
            format!("*:*:*:*:{}\n", self.superuser_password).as_bytes(),
        )?;
        if self.as_server_account {
            run(Command::new("chown")
                .args(["-R", &format!("{SERVER_ACCOUNT}:")])
                .arg(self.dir.path()))?;
        }
        let data = self.dir.path().join("data");
        let port = primary.port.to_string();
        let backup = self.run_tool_with_env(
            "pg_basebackup",
            &[("PGPASSFILE", passfile.as_os_str())],
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-h".as_ref(),
                primary.socket_dir.as_os_str(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "-R".as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "-c".as_ref(),
                "fast".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        backup?;
        // The copied settings name the primary's socket directory and certificate: later
        // lines win.
        let settings = format!(
            "\n# pg-entra test bed: standby\n\
             unix_socket_directories = '{}'\n\
             ssl_cert_file = '{}/server.crt'\n\
             ssl_key_file = '{}/server.key'\n",
            self.dir.path().display(),
            tls.display(),
            tls.display()
        );
        self.write_file(&data.join("postgresql.conf"), &settings, WriteMode::Append)?;
        self.start_on_a_free_port()?;
        Ok(self)
    }

    /// Promotes this standby to a primary (`pg_ctl promote`), as a failover does; blocks
    /// until it accepts writes. Stop the old primary first: the bed does not fence it.
    pub fn promote(&self) -> Result<(), TestBedError> {
        let data = self.dir.path().join("data");
        self.run_tool(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "promote".as_ref(),
            ],
        )
    }

    /// Whether this server is a standby (`pg_is_in_recovery()`).
    pub async fn is_in_recovery(&self) -> Result<bool, TestBedError> {
        let row = self
            .admin()
            .await?
            .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
            .await?;
        Ok(row.get(0))
    }

    fn address(&self) -> ServerAddress {
        ServerAddress {
            socket_dir: self.dir.path().to_owned(),
            port: self.port,
        }
    }

    /// Stops the server with a fast shutdown, as a restart or a failover does: open sessions
    /// are cut and new connections refused until [`start_again`](Self::start_again). Blocks
    /// while `pg_ctl` runs (about a second): call it from `spawn_blocking`.
    pub fn stop(&self) -> Result<(), TestBedError> {
        let data = self.dir.path().join("data");
        self.run_tool(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        )
    }

    /// Starts the server stopped by [`stop`](Self::stop) again, on the same port; blocks until
    /// it accepts connections.
    pub fn start_again(&self) -> Result<(), TestBedError> {
        self.pg_ctl_start()
    }

    /// `pg_ctl start` on this server's port; waits until it accepts connections.
    fn pg_ctl_start(&self) -> Result<(), TestBedError> {
        let data = self.dir.path().join("data");
        let log = self.log_path();
        let port_option = format!("-p {}", self.port);
        self.run_tool(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                port_option.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )
    }

    /// The host name to connect to (the certificate is for it).
    pub fn host(&self) -> &'static str {
        TEST_HOST
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The test CA's certificate file: the extra trusted root (`PGSSLROOTCERT`).
    pub fn ca_certificate_path(&self) -> PathBuf {
        self.dir.path().join("tls").join("ca.crt")
    }

    /// The server log (connection attempts and authentication failures are logged). Read as
    /// the account that runs the server, so that a link planted in its directory discloses
    /// nothing else.
    pub fn log(&self) -> String {
        read_as_owner(&self.log_path(), self.as_server_account)
    }

    /// libpq variables that point at this server (host, port, database, root certificate).
    pub fn libpq_vars(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), TEST_HOST.into()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGDATABASE".into(), "postgres".into()),
            ("PGSSLMODE".into(), "verify-full".into()),
            (
                "PGSSLROOTCERT".into(),
                self.ca_certificate_path().display().to_string(),
            ),
        ]
    }

    /// A connector builder aimed at this server, reading no environment. Add a credential.
    pub fn connector_builder(&self) -> ConnectorBuilder {
        Connector::builder().environment(Environment::from_vars(self.libpq_vars()))
    }

    /// A superuser session over the Unix socket (spawned on the current runtime).
    pub async fn admin(&self) -> Result<Client, TestBedError> {
        admin_at(&self.address(), &self.superuser_password).await
    }

    /// Creates a login role with no password yet (an Entra principal's role).
    pub async fn create_role(&self, name: &str) -> Result<(), TestBedError> {
        let admin = self.admin().await?;
        admin
            .batch_execute(&format!("CREATE ROLE {} LOGIN", quote_identifier(name)))
            .await?;
        Ok(())
    }

    /// What the identity endpoint uses to set role passwords: on whichever server of this
    /// one's cluster (itself, its standbys) accepts writes.
    pub fn password_setter(&self) -> PasswordSetter {
        PasswordSetter {
            cluster: Arc::clone(&self.cluster),
            superuser_password: Arc::clone(&self.superuser_password),
        }
    }

    /// The bed's certificates, for a PgBouncer in front of this server.
    pub(crate) fn tls_material(&self) -> &Arc<TlsMaterial> {
        &self.tls
    }

    /// Whether the bed runs its servers as the `postgres` account (it runs as root).
    pub(crate) fn as_server_account(&self) -> bool {
        self.as_server_account
    }

    /// The bed's directory (the server's Unix socket is in it): `0700`, owned by the account
    /// that runs the server.
    pub fn directory(&self) -> &Path {
        self.dir.path()
    }

    /// `program` run as the server's account (`runuser -u postgres --`).
    fn as_server_account_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("runuser");
        command.args(["-u", SERVER_ACCOUNT, "--"]).arg(program);
        command
    }

    /// Writes `contents` to `path` inside the bed's directory. As root, the write runs as the
    /// server's account, which owns the directory: whatever that account planted at `path`
    /// (a symlink to a root-owned file, say), the write can reach nothing it could not.
    fn write_file(&self, path: &Path, contents: &str, mode: WriteMode) -> Result<(), TestBedError> {
        if !self.as_server_account {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(mode == WriteMode::Append)
                .truncate(mode == WriteMode::Replace)
                .open(path)?;
            file.write_all(contents.as_bytes())?;
            return Ok(());
        }
        let mut command = self.as_server_account_command("tee");
        if mode == WriteMode::Append {
            command.arg("-a");
        }
        command.arg("--").arg(path);
        run_with_input(command, contents)
    }

    /// Removes `path` inside the bed's directory, as the account that owns it.
    fn remove_file(&self, path: &Path) -> Result<(), TestBedError> {
        if self.as_server_account {
            run(self
                .as_server_account_command("rm")
                .arg("-f")
                .arg("--")
                .arg(path))
        } else {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn run_tool(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<(), TestBedError> {
        self.run_tool_with_env(tool, &[], args)
    }

    fn run_tool_with_env(
        &self,
        tool: &str,
        env: &[(&str, &std::ffi::OsStr)],
        args: &[&std::ffi::OsStr],
    ) -> Result<(), TestBedError> {
        let program = self.bindir.join(tool);
        let mut command = if self.as_server_account {
            self.as_server_account_command(&program)
        } else {
            Command::new(&program)
        };
        command.args(args);
        // A process group of their own: Ctrl-C in a terminal reaches the program using the
        // bed, which then stops the server in order, and not initdb or the server half-way.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        // The tools must not pick up the caller's libpq settings.
        for var in [
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGDATA",
            "PGSSLMODE",
        ] {
            command.env_remove(var);
        }
        command.envs(env.iter().copied());
        run(&mut command).map_err(|e| {
            let log = self.log();
            if log.is_empty() {
                e
            } else {
                TestBedError::message(format!("{e}\nserver log:\n{log}"))
            }
        })
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let address = self.address();
        lock(&self.cluster).retain(|server| *server != address);
        let data = self.dir.path().join("data");
        // A start-up cut short may have left a server running before its port was recorded.
        if self.port == 0 && !data.join("postmaster.pid").exists() {
            return;
        }
        let stopped = self.run_tool(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
        if let Err(error) = stopped {
            tracing::warn!(%error, "could not stop the test PostgreSQL");
        }
    }
}

/// How a file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteMode {
    Replace,
    Append,
}

/// Sets role passwords over a superuser session.
#[derive(Clone)]
pub struct PasswordSetter {
    cluster: Cluster,
    superuser_password: Arc<str>,
}

impl fmt::Debug for PasswordSetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordSetter")
            .field("servers", &*lock(&self.cluster))
            .finish_non_exhaustive()
    }
}

/// A superuser session over the Unix socket of the server at `address`.
async fn admin_at(address: &ServerAddress, password: &str) -> Result<Client, TestBedError> {
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(&address.socket_dir)
        .port(address.port)
        .user(SUPERUSER)
        .password(password.as_bytes())
        .dbname("postgres")
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl PasswordSetter {
    /// `ALTER ROLE <role> PASSWORD <password> VALID UNTIL <valid_until>`: PostgreSQL then
    /// refuses the password once `valid_until` has passed, as Azure refuses an expired token.
    pub async fn set_password(
        &self,
        role: &str,
        password: &str,
        valid_until: OffsetDateTime,
    ) -> Result<(), TestBedError> {
        let until = valid_until
            .format(&Rfc3339)
            .map_err(|e| TestBedError::new("cannot format the expiry", e))?;
        let statement = format!(
            "ALTER ROLE {} PASSWORD {} VALID UNTIL {}",
            quote_identifier(role),
            quote_literal(password),
            quote_literal(&until)
        );
        // The server that accepts the write is the primary: a standby refuses it (read-only
        // transaction), a stopped server refuses the connection. Standbys replay it.
        let servers = lock(&self.cluster).clone();
        let mut last_error = TestBedError::message("the bed has no running server");
        for address in &servers {
            let written = async {
                let admin = admin_at(address, &self.superuser_password).await?;
                // A standby refuses the write and, by default, logs the refused statement,
                // token and all: ask first, and never log a failing statement here.
                let standby: bool = admin
                    .query_one("SELECT pg_catalog.pg_is_in_recovery()", &[])
                    .await?
                    .get(0);
                if standby {
                    return Err(TestBedError::message("a standby"));
                }
                admin
                    .batch_execute("SET log_min_error_statement = panic")
                    .await?;
                admin.batch_execute(&statement).await?;
                let row = admin
                    .query_one("SELECT pg_catalog.pg_current_wal_insert_lsn()::text", &[])
                    .await?;
                Ok::<_, TestBedError>(row.get::<_, String>(0))
            };
            match written.await {
                Ok(lsn) => {
                    // Entra's tokens are valid on every server at once; the bed's are once
                    // each standby has replayed the new password.
                    for standby in servers.iter().filter(|s| *s != address) {
                        self.wait_for_replay(standby, &lsn).await;
                    }
                    return Ok(());
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// Waits (up to 5 s) until `standby` has replayed the primary's WAL up to `lsn`. A
    /// standby that is stopped or not replaying is not waited for.
    async fn wait_for_replay(&self, standby: &ServerAddress, lsn: &str) {
        let Ok(admin) = admin_at(standby, &self.superuser_password).await else {
            return;
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            let replayed = admin
                .query_one(
                    "SELECT coalesce(pg_catalog.pg_last_wal_replay_lsn() >= $1::text::pg_lsn, true)",
                    &[&lsn],
                )
                .await;
            match replayed {
                Ok(row) if !row.get::<_, bool>(0) => {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                _ => return,
            }
        }
        tracing::warn!(
            port = standby.port,
            "a standby did not replay a new role password within 5 s"
        );
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TlsMaterial {
    /// Writes `ca.crt`, `server.crt` and `server.key` (`0600`) into `dir`.
    pub(crate) fn write_to(&self, dir: &Path) -> Result<(), TestBedError> {
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        std::fs::write(dir.join("server.crt"), &self.server.certificate_pem)?;
        write_private(&dir.join("server.key"), &self.server.key_pem)
    }
}

/// A new bed directory: `0700`, so that only its owner (and root) may enter.
pub(crate) fn new_bed_dir() -> Result<TempDir, TestBedError> {
    Ok(tempfile::Builder::new()
        .prefix("pg-entra-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()?)
}

/// Runs `command` with `contents` on its standard input; its standard error in the error.
pub(crate) fn run_with_input(mut command: Command, contents: &str) -> Result<(), TestBedError> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let shown = format!("{command:?}");
    let mut child = command
        .spawn()
        .map_err(|e| TestBedError::new(format!("cannot run {shown}"), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(contents.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(TestBedError::message(format!(
            "{shown} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

/// A file in a bed directory, read as the account that owns the directory when the bed runs
/// as root (a link planted there then discloses nothing else); empty when unreadable.
pub(crate) fn read_as_owner(path: &Path, as_server_account: bool) -> String {
    if !as_server_account {
        return std::fs::read_to_string(path).unwrap_or_default();
    }
    Command::new("runuser")
        .args(["-u", SERVER_ACCOUNT, "--", "cat", "--"])
        .arg(path)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Where initdb and pg_ctl are: `PG_ENTRA_PG_BINDIR`, `pg_config --bindir`, `PATH`, then the
/// newest `/usr/lib/postgresql/*/bin`.
fn find_bindir() -> Result<PathBuf, TestBedError> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os(BINDIR_VAR).map(PathBuf::from) {
        return if has_initdb(&dir) {
            Ok(dir)
        } else {
            Err(TestBedError::message(format!(
                "{BINDIR_VAR}={} has no initdb",
                dir.display()
            )))
        };
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_initdb(&dir) {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|d| has_initdb(d))
    {
        return Ok(dir);
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_initdb(&bin).then_some((version, bin))
        })
        .collect();
    versioned.sort();
    versioned.pop().map(|(_, dir)| dir).ok_or_else(|| {
        TestBedError::message(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install them \
             (`apt-get install -y postgresql`) or set PG_ENTRA_PG_BINDIR",
        )
    })
}

pub(crate) fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> Result<u16, TestBedError> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Creates `path` readable by its owner only (PostgreSQL refuses a key readable by others),
/// before anything is written to it.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), TestBedError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    Ok(())
}

/// A password from the system's cryptographic random source, hex-encoded.
fn random_password() -> Result<String, TestBedError> {
    let mut bytes = [0u8; SUPERUSER_PASSWORD_BYTES];
    openssl::rand::rand_bytes(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// How long one of the server's tools (initdb, pg_basebackup, pg_ctl, …) may run: past it,
/// its process group is killed and the bed fails instead of hanging the test run.
const TOOL_BOUND: Duration = Duration::from_secs(120);

/// Runs `command` to its end, within [`TOOL_BOUND`] (past it, the command is killed, with
/// its process group when it leads one); its output in the error.
fn run(command: &mut Command) -> Result<(), TestBedError> {
    run_within(command, TOOL_BOUND)
}

fn run_within(command: &mut Command, bound: Duration) -> Result<(), TestBedError> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| TestBedError::new(format!("cannot run {shown}"), e))?;
    // Drained as it runs, so that a tool writing much cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            let _ = sender.send(bytes);
        });
        receiver
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            // The whole group: as root the child is runuser, and the tool its child.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            let said = |receiver: std::sync::mpsc::Receiver<Vec<u8>>| {
                let bytes = receiver
                    .recv_timeout(Duration::from_millis(500))
                    .unwrap_or_default();
                String::from_utf8_lossy(&bytes).into_owned()
            };
            return Err(TestBedError::message(format!(
                "{shown} did not finish within {bound:?}:\n{}{}",
                said(stdout),
                said(stderr)
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A process the tool left running may hold its pipes open: what came within a moment.
    let collected = |receiver: std::sync::mpsc::Receiver<Vec<u8>>| {
        receiver
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default()
    };
    let (stdout, stderr) = (collected(stdout), collected(stderr));
    if status.success() {
        Ok(())
    } else {
        Err(TestBedError::message(format!(
            "{shown} failed ({status}):\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tool that does not end is killed at the bound, with what it started in its process
    /// group, and the bed fails instead of waiting.
    #[test]
    fn a_tool_that_hangs_is_killed_at_the_bound() {
        // A duration no other process here sleeps, to find them by.
        let marker = format!("sleep 290.{}", std::process::id());
        let mut command = Command::new("sh");
        // A child of the tool that would outlive it if only the tool were killed.
        command.args(["-c", &format!("{marker} & {marker}")]);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let error = run_within(&mut command, Duration::from_millis(300)).unwrap_err();
        assert!(
            error.to_string().contains("did not finish within"),
            "{error}"
        );
        // The killed background child is not ours to reap: give it a moment to leave.
        let gone = (0..200).any(|_| {
            let left = Command::new("pgrep")
                .args(["-f", &marker])
                .output()
                .unwrap();
            left.stdout.is_empty() || {
                std::thread::sleep(Duration::from_millis(10));
                false
            }
        });
        assert!(gone, "{marker} still runs");
    }

    #[test]
    fn a_tool_that_fails_shows_its_output() {
        let error = run(Command::new("sh").args(["-c", "echo said-on-stderr >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("said-on-stderr"), "{error}");
    }

    /// A bed directory handed to the server's account, as `start` leaves it, with no server.
    fn handed_over() -> LocalPostgres {
        let dir = tempfile::Builder::new()
            .prefix("pg-entra-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .unwrap();
        run(Command::new("chown")
            .args(["-R", &format!("{SERVER_ACCOUNT}:")])
            .arg(dir.path()))
        .unwrap();
        LocalPostgres {
            dir,
            bindir: PathBuf::new(),
            port: 0,
            as_server_account: true,
            superuser_password: "unused".into(),
            tls: Arc::new(TlsMaterial {
                ca_pem: Vec::new(),
                server: TestCa::generate("unused")
                    .and_then(|ca| ca.issue_server_certificate())
                    .unwrap(),
            }),
            cluster: Cluster::default(),
        }
    }

    /// As root, a file the server's account links into its directory is never written
    /// through: root's own file stays as it was, whether the bed replaces or appends.
    #[test]
    fn a_planted_symlink_is_not_followed_by_root() {
        if !running_as_root() {
            eprintln!("skipped: only a bed run as root hands its directory to another account");
            return;
        }
        let bed = handed_over();
        let root_owned = tempfile::tempdir().unwrap();
        let target = root_owned.path().join("root-only.conf");
        std::fs::write(&target, "root's own\n").unwrap();
        std::fs::set_permissions(root_owned.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        for (name, mode) in [
            ("pg_hba.conf", WriteMode::Replace),
            ("postgresql.conf", WriteMode::Append),
        ] {
            let planted = bed.dir.path().join(name);
            run(bed
                .as_server_account_command("ln")
                .arg("-s")
                .arg(&target)
                .arg(&planted))
            .unwrap();
            assert!(
                std::fs::symlink_metadata(&planted)
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );
            let written = bed.write_file(&planted, "local all all trust\n", mode);
            assert!(written.is_err(), "{name}: the write went through the link");
            assert_eq!(std::fs::read_to_string(&target).unwrap(), "root's own\n");
        }
        // The log is read as the server's account too: a link to a root-only file shows nothing.
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        run(bed
            .as_server_account_command("ln")
            .arg("-s")
            .arg(&target)
            .arg(bed.log_path()))
        .unwrap();
        assert_eq!(bed.log(), "");
    }

    #[test]
    fn the_superuser_password_is_random_and_hidden() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 2 * SUPERUSER_PASSWORD_BYTES);
        let setter = PasswordSetter {
            cluster: Cluster::default(),
            superuser_password: a.clone().into(),
        };
        assert!(!format!("{setter:?}").contains(&a));
    }
}
