//! A real PostgreSQL server configured like Azure Database for PostgreSQL Flexible Server:
//! TLS only, cleartext password authentication inside TLS, roles whose passwords are tokens
//! `VALID UNTIL` their expiry.

use std::fmt;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_postgres::{Client, NoTls};

use super::TestBedError;
use super::certs::TestCa;
use crate::connector::{Connector, ConnectorBuilder};
use crate::environment::Environment;

/// Overrides where the PostgreSQL server binaries are looked for.
pub(crate) const BINDIR_VAR: &str = "PG_ENTRA_PG_BINDIR";
/// The host name the test server's certificate is for and clients connect to.
pub(crate) const TEST_HOST: &str = "localhost";
const SUPERUSER: &str = "postgres";
/// The OS account that runs the server when the tests run as root (initdb refuses root).
const SERVER_ACCOUNT: &str = "postgres";
const START_ATTEMPTS: usize = 3;

/// A running PostgreSQL in a temporary directory. Stopped and deleted when dropped.
pub struct LocalPostgres {
    dir: TempDir,
    bindir: PathBuf,
    port: u16,
    as_server_account: bool,
}

impl fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl LocalPostgres {
    /// Creates a cluster, a test CA and a server certificate, and starts the server. Takes a
    /// second or two; the blocking work runs on Tokio's blocking pool.
    pub async fn start() -> Result<Self, TestBedError> {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .map_err(|e| TestBedError::new("the PostgreSQL start-up task failed", e))?
    }

    fn start_blocking() -> Result<Self, TestBedError> {
        let bindir = find_bindir()?;
        let as_server_account = running_as_root();
        let dir = tempfile::Builder::new().prefix("pg-entra-").tempdir()?;
        let data = dir.path().join("data");
        let tls = dir.path().join("tls");
        std::fs::create_dir(&tls)?;

        let ca = TestCa::generate("pg-entra test CA")?;
        let server = ca.issue_server_certificate()?;
        std::fs::write(tls.join("ca.crt"), ca.certificate_pem()?)?;
        std::fs::write(tls.join("server.crt"), &server.certificate_pem)?;
        write_private(&tls.join("server.key"), &server.key_pem)?;
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
        };
        postgres.run_tool(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        // Flexible Server: TLS only, cleartext password inside it. The superuser reaches the
        // server over the Unix socket only.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local   all  all                trust\n\
             hostssl all  all  127.0.0.1/32  password\n\
             hostssl all  all  ::1/128       password\n",
        )?;
        let socket_dir = postgres.dir.path().display().to_string();
        let tls_dir = tls.display().to_string();
        let settings = format!(
            "\n# pg-entra test bed\n\
             listen_addresses = 'localhost'\n\
             unix_socket_directories = '{socket_dir}'\n\
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
        let conf = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf)?;
        existing.push_str(&settings);
        std::fs::write(&conf, existing)?;

        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            postgres.port = free_port()?;
            match postgres.pg_ctl_start() {
                Ok(()) => {
                    tracing::debug!(port = postgres.port, dir = %postgres.dir.path().display(), "test PostgreSQL started");
                    return Ok(postgres);
                }
                // Another process may have taken the port between probe and bind.
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| TestBedError::message("PostgreSQL did not start")))
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

    /// The server log (connection attempts and authentication failures are logged).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
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
        self.password_setter().admin().await
    }

    /// Creates a login role with no password yet (an Entra principal's role).
    pub async fn create_role(&self, name: &str) -> Result<(), TestBedError> {
        let admin = self.admin().await?;
        admin
            .batch_execute(&format!("CREATE ROLE {} LOGIN", quote_identifier(name)))
            .await?;
        Ok(())
    }

    /// What the identity endpoint uses to set role passwords.
    pub fn password_setter(&self) -> PasswordSetter {
        PasswordSetter {
            socket_dir: self.dir.path().to_owned(),
            port: self.port,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn run_tool(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<(), TestBedError> {
        let program = self.bindir.join(tool);
        let mut command = if self.as_server_account {
            let mut command = Command::new("runuser");
            command.args(["-u", SERVER_ACCOUNT, "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        command.args(args);
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
        if self.port == 0 {
            return;
        }
        let data = self.dir.path().join("data");
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

/// Sets role passwords over a superuser session.
#[derive(Debug, Clone)]
pub struct PasswordSetter {
    socket_dir: PathBuf,
    port: u16,
}

impl PasswordSetter {
    async fn admin(&self) -> Result<Client, TestBedError> {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname("postgres")
            .connect(NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

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
        self.admin().await?.batch_execute(&statement).await?;
        Ok(())
    }
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

fn running_as_root() -> bool {
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

fn write_private(path: &Path, contents: &[u8]) -> Result<(), TestBedError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, contents)?;
    // PostgreSQL refuses a key readable by others.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn run(command: &mut Command) -> Result<(), TestBedError> {
    let shown = format!("{command:?}");
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .map_err(|e| TestBedError::new(format!("cannot run {shown}"), e))?;
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
