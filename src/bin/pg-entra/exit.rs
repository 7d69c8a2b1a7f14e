//! The exit codes: one per class of failure, so that scripts can branch without parsing text.

use std::process::ExitCode;

/// Why a command failed. The numbers are part of the command's interface (README, "Exit
/// codes"); `0` is success and `2` is a usage error (clap's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Something this tool did not expect (a query after a successful login failed, the test
    /// bed could not start).
    Internal,
    /// The settings are missing or refused (no host, a plaintext `sslmode`, a bad port).
    Configuration,
    /// No credential produced a token (no managed identity, nothing logged in), or the
    /// identity endpoint refused.
    Credential,
    /// A token arrived but cannot work: expired, for another audience, or naming no user.
    Token,
    /// The server's name does not resolve, or nothing accepts the TCP connection.
    Network,
    /// TLS failed: the server does not offer it, or its certificate is not trusted.
    Tls,
    /// The server refused the password (SQLSTATE 28P01).
    LoginRefused,
    /// The server refused the connection before the password (SQLSTATE 28000: no `pg_hba.conf`
    /// entry, a firewall on Single Server, Entra authentication not enabled).
    AccessRule,
    /// The database does not exist (SQLSTATE 3D000).
    DatabaseMissing,
    /// The server or the network went silent (connect, TLS or login took too long).
    Timeout,
    /// `psql` could not be found or started.
    PsqlMissing,
}

impl Failure {
    /// The process exit status.
    pub(crate) fn code(self) -> u8 {
        match self {
            Failure::Internal => 1,
            Failure::Configuration => 3,
            Failure::Credential => 4,
            Failure::Token => 5,
            Failure::Network => 6,
            Failure::Tls => 7,
            Failure::LoginRefused => 8,
            Failure::AccessRule => 9,
            Failure::DatabaseMissing => 10,
            Failure::Timeout => 11,
            // What shells use for "command not found".
            Failure::PsqlMissing => 127,
        }
    }

    /// A short name for JSON output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Failure::Internal => "internal",
            Failure::Configuration => "configuration",
            Failure::Credential => "credential",
            Failure::Token => "token",
            Failure::Network => "network",
            Failure::Tls => "tls",
            Failure::LoginRefused => "login_refused",
            Failure::AccessRule => "access_rule",
            Failure::DatabaseMissing => "database_missing",
            Failure::Timeout => "timeout",
            Failure::PsqlMissing => "psql_missing",
        }
    }
}

impl From<Failure> for ExitCode {
    fn from(failure: Failure) -> Self {
        ExitCode::from(failure.code())
    }
}
