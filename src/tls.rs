//! TLS policy: always on, always verified.
//!
//! The password is a bearer token, so a connection that is not verified TLS would hand it to
//! whoever answers. tokio-postgres' default (`prefer`) silently falls back to plaintext; this
//! crate only ever asks tokio-postgres for `require` and gives it a connector that verifies the
//! chain and the host name.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

use native_tls::{Certificate, Protocol, TlsConnector};
use postgres_native_tls::MakeTlsConnector;

use crate::credential::read_capped_blocking;
use crate::error::Error;

/// `PGSSLROOTCERT=system` means "the system roots only", as in libpq 16.
const SYSTEM_ROOTS: &str = "system";
const PEM_BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const PEM_END: &str = "-----END CERTIFICATE-----";

/// The TLS modes this crate accepts: every one verifies the server.
///
/// All three verify the certificate chain against the
/// system roots (plus `PGSSLROOTCERT`) **and** the host name: unlike libpq, `require` and
/// `verify-ca` are not weaker, because the password is a bearer token. `disable`, `allow` and
/// `prefer` are refused with [`Error::TlsRequired`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// libpq's `require`; verified here all the same.
    Require,
    /// libpq's `verify-ca`; the host name is verified here all the same.
    VerifyCa,
    /// libpq's `verify-full` (the default).
    #[default]
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = Error;

    /// Parses a libpq `sslmode`; the modes that allow plaintext are refused.
    fn from_str(mode: &str) -> Result<Self, Error> {
        match mode.trim().to_ascii_lowercase().as_str() {
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            refused @ ("disable" | "allow" | "prefer") => Err(Error::TlsRequired {
                mode: refused.to_owned(),
            }),
            _ => Err(Error::invalid(
                "sslmode",
                format!("unknown sslmode {mode:?}; use verify-full, verify-ca or require"),
            )),
        }
    }
}

/// A verifying TLS connector for tokio-postgres: system roots, plus the certificates in
/// `root_cert` (a PEM bundle or one DER certificate) unless it is `system`.
#[cfg(test)]
pub(crate) fn make_tls_connector(root_cert: Option<&str>) -> Result<MakeTlsConnector, Error> {
    LazyTls::new(root_cert)?.get()
}

/// The process's one TLS connector for the system roots alone (TLS 1.2 or later), built at
/// the first call: building one parses the system's root bundle, tens of milliseconds, so a
/// process pays that once, and only when it opens its first TLS connection. Shared by the
/// identity endpoints' HTTP client and every PostgreSQL connector without `sslrootcert`. A
/// build that fails (rare: OpenSSL set up wrongly, out of memory) is not kept, so the next
/// call tries again instead of repeating the first failure for the life of the process.
pub(crate) fn system_connector() -> Result<TlsConnector, Error> {
    static SYSTEM: OnceLock<TlsConnector> = OnceLock::new();
    // Serialises first builds, so that concurrent first callers parse the bundle once.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(connector) = SYSTEM.get() {
        return Ok(connector.clone());
    }
    let _building = crate::lock::lock(&BUILDING);
    if let Some(connector) = SYSTEM.get() {
        return Ok(connector.clone());
    }
    SYSTEM_BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let connector = build_connector(&[]).map_err(|e| Error::Tls {
        message: format!("cannot create a TLS connector: {e}"),
        source: None,
    })?;
    Ok(SYSTEM.get_or_init(|| connector).clone())
}

/// How often the process built its system-roots connector: at most once (tested).
static SYSTEM_BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn build_connector(extra_roots: &[Certificate]) -> Result<TlsConnector, native_tls::Error> {
    let mut builder = TlsConnector::builder();
    builder.min_protocol_version(Some(Protocol::Tlsv12));
    for certificate in extra_roots {
        builder.add_root_certificate(certificate.clone());
    }
    builder.build()
}

/// A PostgreSQL connector's TLS: the `sslrootcert` file is read when the connector is built
/// (so that a missing or malformed file is an error at once), the TLS connector made at the
/// first connect.
pub(crate) struct LazyTls {
    root_file: Option<RootFile>,
    built: OnceLock<MakeTlsConnector>,
}

impl LazyTls {
    /// Reads the file `root_cert` names (a PEM bundle or one DER certificate) unless it is
    /// `system` or absent: an unreadable file, or text with no PEM certificate, is an error
    /// now; certificates OpenSSL cannot parse are an error at the first connect.
    pub(crate) fn new(root_cert: Option<&str>) -> Result<Self, Error> {
        let root_file = root_certificate_file(root_cert)
            .map(|path| RootFile::read(Path::new(path)))
            .transpose()?;
        Ok(Self {
            root_file,
            built: OnceLock::new(),
        })
    }

    /// The connector: the process's shared one when there are no extra roots, else one of
    /// this connector's own, built once.
    pub(crate) fn get(&self) -> Result<MakeTlsConnector, Error> {
        if let Some(built) = self.built.get() {
            return Ok(built.clone());
        }
        let connector = match &self.root_file {
            None => system_connector()?,
            Some(file) => build_connector(&file.parse()?).map_err(|e| Error::Tls {
                message: "cannot create a TLS connector".into(),
                source: Some(Box::new(e)),
            })?,
        };
        Ok(self
            .built
            .get_or_init(|| MakeTlsConnector::new(connector))
            .clone())
    }

    /// Whether the connector is built (the first connect builds it).
    pub(crate) fn is_built(&self) -> bool {
        self.built.get().is_some()
    }
}

/// The file an `sslrootcert` setting names, unless it is `system` (the system roots only).
pub(crate) fn root_certificate_file(root_cert: Option<&str>) -> Option<&str> {
    root_cert.filter(|path| *path != SYSTEM_ROOTS)
}

/// The one certificate of a root-certificate file (PEM or DER), as PEM: sqlx's native-tls
/// backend reads one certificate from the bytes it is given, so a file with several distinct
/// ones is refused (repeated copies of one certificate count once).
#[cfg(feature = "sqlx")]
pub(crate) fn only_root_certificate_pem(path: &str) -> Result<Vec<u8>, Error> {
    let mut certificates = read_certificates(Path::new(path))?;
    let mut seen = Vec::new();
    certificates.retain(|certificate| {
        let der = certificate.to_der().unwrap_or_default();
        let new = !seen.contains(&der);
        seen.push(der);
        new
    });
    if certificates.len() > 1 {
        // sqlx's native-tls backend reads one certificate from the file: with a bundle it
        // would trust the first and refuse servers chained to the others, at every acquire.
        return Err(Error::unsupported(
            "sslrootcert",
            format!(
                "{path} holds {} certificates, and sqlx trusts only the first certificate of a \
                 root file: put the one root the server chains to alone in the file, or install \
                 the roots in the system's trust store (sqlx trusts those too) and leave \
                 sslrootcert unset; the tokio-postgres, deadpool, bb8 and diesel-async \
                 integrations take the whole bundle",
                certificates.len()
            ),
        ));
    }
    let first = certificates
        .first()
        .ok_or_else(|| Error::invalid("sslrootcert", format!("{path} holds no certificate")))?;
    let der = first.to_der().map_err(|e| Error::Tls {
        message: format!("cannot re-encode the root certificate from {path}"),
        source: Some(Box::new(e)),
    })?;
    Ok(der_to_pem(&der).into_bytes())
}

/// One certificate as PEM, base64 in 64-column lines (RFC 7468).
#[cfg(feature = "sqlx")]
fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = String::with_capacity(body.len() + body.len() / 64 + 64);
    text.push_str(PEM_BEGIN);
    text.push('\n');
    // Base64 is ASCII, so 64-byte chunks are whole characters.
    for line in body.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).unwrap_or_default());
        text.push('\n');
    }
    text.push_str(PEM_END);
    text.push('\n');
    text
}

/// The most a root certificate file may hold: a system's whole CA bundle is about 200 KiB.
const MAX_ROOT_FILE_BYTES: u64 = 4 * 1024 * 1024;

#[cfg(feature = "sqlx")]
fn read_certificates(path: &Path) -> Result<Vec<Certificate>, Error> {
    RootFile::read(path)?.parse()
}

/// A root certificate file read and split, not yet parsed: parsing needs OpenSSL, whose
/// set-up a cold-started process should not pay before its first token request.
struct RootFile {
    shown: String,
    certificates: Vec<RootBytes>,
}

enum RootBytes {
    Pem(String),
    Der(Vec<u8>),
}

impl RootFile {
    /// Reads `path`; a file that cannot be read, or that is text with no PEM certificate, is an
    /// error here.
    fn read(path: &Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let bytes = read_capped_blocking(path, MAX_ROOT_FILE_BYTES).map_err(|e| {
            Error::invalid(
                "sslrootcert",
                format!(
                    "cannot read the root certificate file {shown} (PGSSLROOTCERT / sslrootcert): {e}"
                ),
            )
        })?;
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(binary) => {
                return Ok(Self {
                    shown,
                    certificates: vec![RootBytes::Der(binary.into_bytes())],
                });
            }
        };
        let mut certificates = Vec::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find(PEM_BEGIN) {
            let Some(len) = rest[start..].find(PEM_END) else {
                break;
            };
            let block = &rest[start..start + len + PEM_END.len()];
            certificates.push(RootBytes::Pem(block.to_owned()));
            rest = &rest[start + len + PEM_END.len()..];
        }
        if certificates.is_empty() {
            return Err(Error::invalid(
                "sslrootcert",
                format!(
                    "the root certificate file {shown} has no PEM certificate (-----BEGIN CERTIFICATE-----)"
                ),
            ));
        }
        Ok(Self {
            shown,
            certificates,
        })
    }

    fn parse(&self) -> Result<Vec<Certificate>, Error> {
        let unreadable = |e: native_tls::Error| Error::Tls {
            message: format!(
                "the root certificate file {} holds no usable certificate",
                self.shown
            ),
            source: Some(Box::new(e)),
        };
        self.certificates
            .iter()
            .map(|certificate| match certificate {
                RootBytes::Pem(block) => Certificate::from_pem(block.as_bytes()),
                RootBytes::Der(der) => Certificate::from_der(der),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable)
    }
}

#[cfg(test)]
mod tests {
    /// Any number of connectors without extra roots share the one system connector, built at
    /// the first use, not when a connector is made.
    #[test]
    fn the_system_roots_are_loaded_at_most_once_and_only_when_used() {
        let lazy: Vec<LazyTls> = (0..3).map(|_| LazyTls::new(None).unwrap()).collect();
        assert!(lazy.iter().all(|tls| !tls.is_built()));
        for tls in &lazy {
            tls.get().unwrap();
            tls.get().unwrap();
        }
        system_connector().unwrap();
        assert_eq!(SYSTEM_BUILDS.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    use super::*;

    #[test]
    fn plaintext_modes_are_refused_with_the_reason() {
        for mode in ["disable", "allow", "prefer", "PREFER"] {
            let error = mode.parse::<SslMode>().unwrap_err();
            assert!(matches!(error, Error::TlsRequired { .. }), "{mode}");
            assert!(error.to_string().contains("bearer access token"), "{error}");
        }
    }

    #[test]
    fn verifying_modes_parse() {
        assert_eq!("require".parse::<SslMode>().unwrap(), SslMode::Require);
        assert_eq!("verify-ca".parse::<SslMode>().unwrap(), SslMode::VerifyCa);
        assert_eq!(
            " verify-full ".parse::<SslMode>().unwrap(),
            SslMode::VerifyFull
        );
        assert!(matches!(
            "sometimes".parse::<SslMode>().unwrap_err(),
            Error::Config(_)
        ));
    }

    #[test]
    fn missing_root_file_names_the_file() {
        let Err(error) = make_tls_connector(Some("/nonexistent/root.crt")) else {
            panic!("a missing file must fail");
        };
        assert!(
            error.to_string().contains("/nonexistent/root.crt"),
            "{error}"
        );
    }

    #[cfg(feature = "sqlx")]
    #[test]
    fn pem_wraps_at_64_columns_and_reads_back() {
        use base64::Engine as _;
        let text = der_to_pem(&[7u8; 100]);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], PEM_BEGIN);
        assert_eq!(lines.last(), Some(&PEM_END));
        assert_eq!(lines[1].len(), 64);
        assert!(lines[1..lines.len() - 1].iter().all(|l| l.len() <= 64));
        let body: String = lines[1..lines.len() - 1].concat();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        assert_eq!(decoded, [7u8; 100]);
    }

    #[test]
    fn system_keyword_needs_no_file() {
        assert!(make_tls_connector(Some("system")).is_ok());
        assert!(make_tls_connector(None).is_ok());
    }
}
