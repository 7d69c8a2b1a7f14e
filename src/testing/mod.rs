//! A test kit: fakes for unit tests (feature `test-util`) and a bed that runs the whole flow
//! without Azure (feature `testing`).
//!
//! With `test-util` alone: [`ManualClock`], [`Principal`] (test identities) and
//! [`FakeCredential`] (tokens for a principal without an endpoint), adding no dependency. With
//! `testing`:
//!
//! - `LocalPostgres`: a real PostgreSQL started from the system's server binaries,
//!   configured like Flexible Server: TLS only (a throwaway CA, a certificate for
//!   `localhost`/`127.0.0.1`), cleartext password authentication inside TLS, no plaintext
//!   host line. Run as root, it runs the server as the `postgres` account. Its directory is
//!   `0700` and no `pg_hba.conf` line trusts: only the bed itself logs in as superuser.
//! - `IdentityEndpoint`: a real HTTP server on 127.0.0.1 speaking the IMDS token protocol.
//!   It mints JWT-shaped tokens and, before returning each, sets it as the password of the
//!   principal's role `VALID UNTIL` its expiry, so PostgreSQL refuses expired tokens as
//!   Azure does. Faults are scripted (`Reply`), requests counted and recorded.
//! - `TestBed`: both, wired together, with one system-assigned identity.
//! - `ScriptedPostgres`: a PostgreSQL-protocol server that follows a script (`TlsOffer`,
//!   `LoginAnswer`) for what a real server cannot be made to do on purpose: offer no TLS,
//!   present a certificate for another name (`TestCa::issue_certificate_for`), refuse with a
//!   chosen SQLSTATE and message. It counts the passwords it receives.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use pg_entra::testing::TestBed;
//!
//! let bed = TestBed::start().await?;
//! let connector = bed.connector_builder().build()?;
//! let client = connector.connect().await?;
//! let row = client.query_one("select current_user", &[]).await?;
//! assert_eq!(row.get::<_, String>(0), bed.principal().name());
//! # Ok(()) }
//! ```

mod fake_credential;
mod identity;
mod jwt;

#[cfg(feature = "testing")]
mod bed;
#[cfg(feature = "testing")]
mod certs;
#[cfg(feature = "testing")]
mod endpoint;
#[cfg(feature = "testing")]
mod pgaadauth;
#[cfg(feature = "testing")]
mod pgbouncer;
#[cfg(feature = "testing")]
mod postgres;
#[cfg(feature = "testing")]
mod scripted_postgres;

#[cfg(feature = "testing")]
use std::fmt;

pub use crate::clock::ManualClock;
pub use fake_credential::FakeCredential;
pub use identity::Principal;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub use bed::TestBed;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub use certs::{ServerCertificate, TestCa};
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub use endpoint::{
    ExpiresOnFormat, HoldGuard, IdentityEndpoint, IdentityEndpointBuilder, RecordedRequest, Reply,
};
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub use pgbouncer::{LocalPgBouncer, PGBOUNCER_VAR, PoolMode};
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub use postgres::{LocalPostgres, PasswordSetter, SCRAM_GROUP};
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub use scripted_postgres::{LoginAnswer, ScriptedPostgres, TlsOffer};

/// Why the test bed could not do what was asked.
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
#[derive(Debug)]
pub struct TestBedError {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

#[cfg(feature = "testing")]
impl TestBedError {
    pub(crate) fn new(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    pub(crate) fn message(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }
}

#[cfg(feature = "testing")]
impl fmt::Display for TestBedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

#[cfg(feature = "testing")]
impl std::error::Error for TestBedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as _)
    }
}

#[cfg(feature = "testing")]
impl From<std::io::Error> for TestBedError {
    fn from(error: std::io::Error) -> Self {
        Self::new("I/O error", error)
    }
}

#[cfg(feature = "testing")]
impl From<openssl::error::ErrorStack> for TestBedError {
    fn from(error: openssl::error::ErrorStack) -> Self {
        Self::new("certificate generation failed", error)
    }
}

#[cfg(feature = "testing")]
impl From<tokio_postgres::Error> for TestBedError {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::new("test PostgreSQL error", error)
    }
}

#[cfg(feature = "testing")]
impl From<crate::Error> for TestBedError {
    fn from(error: crate::Error) -> Self {
        Self::new("pg-entra error", error)
    }
}
