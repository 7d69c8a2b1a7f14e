//! A PostgreSQL-protocol server that follows a script instead of running a database: it
//! answers the TLS request (with a certificate of the test CA, or not at all), asks for a
//! cleartext password as Azure does, counts the passwords it receives, and then accepts the
//! login or refuses it with the SQLSTATE and message it was given. What a real server cannot
//! be made to do on purpose (refuse with Azure's Entra texts, offer no TLS, present a
//! certificate for another name, repeat the password) is tested against it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::TestBedError;
use super::certs::ServerCertificate;

/// `SSLRequest` and `GSSENCRequest` codes (in place of a protocol version).
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// The largest startup packet read (libpq's own limit is 10 000 bytes).
const MAX_STARTUP_BYTES: u32 = 10_000;
/// The largest password message read (tokens are a few KiB).
const MAX_PASSWORD_BYTES: u32 = 64 * 1024;
/// The CA certificate's file name in a trusted server's directory.
const CA_FILE: &str = "ca.crt";
/// How long one client may take over its whole exchange.
const CLIENT_DEADLINE: Duration = Duration::from_secs(10);

/// Whether and how the server answers the TLS request.
#[derive(Clone)]
pub enum TlsOffer {
    /// `N`: the server has no TLS, as a misconfigured or hostile server might answer.
    None,
    /// `S`, then a handshake with this certificate (issue one with [`TestCa`]).
    ///
    /// [`TestCa`]: super::TestCa
    Certificate(ServerCertificate),
}

impl fmt::Debug for TlsOffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsOffer::None => f.write_str("None"),
            TlsOffer::Certificate(_) => f.write_str("Certificate(..)"),
        }
    }
}

/// What the server answers the password with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginAnswer {
    /// `AuthenticationOk`, then `ReadyForQuery`; any query afterwards gets an error.
    Accept,
    /// An `ErrorResponse` with severity `FATAL`, this SQLSTATE and this message.
    Refuse {
        /// The SQLSTATE, e.g. `28P01`.
        code: String,
        /// The message, e.g. Azure's `The access token has expired`.
        message: String,
    },
    /// A `28P01` refusal whose message repeats the password it was sent, as no honest server
    /// does: the client must not show it.
    RefuseRepeatingPassword,
    /// As [`Accept`](Self::Accept), with a `NOTICE` after the login that repeats the
    /// password: the client must not log it.
    AcceptNoticingPassword,
    /// As Azure checks a token's audience: accepts a JWT whose `aud` is exactly this
    /// resource, and refuses any other with Azure's text naming it (`28000`, `The access
    /// token does not have a valid audience claim. Please acquire a new token for the
    /// resource "…"`).
    RequireAudience(String),
    /// Takes the password and then says nothing until the client leaves, as a server stuck
    /// in its login: the client's connect timeout must end the wait.
    Silent,
}

/// A running scripted server on 127.0.0.1. Stops when dropped.
#[derive(Debug)]
pub struct ScriptedPostgres {
    port: u16,
    /// With [`start_trusted`](Self::start_trusted): the CA's certificate, for clients.
    ca: Option<tempfile::TempDir>,
    users: Arc<std::sync::Mutex<Vec<String>>>,
    passwords: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedPostgres {
    /// Starts a server that offers `tls` and answers every login with `answer`.
    pub async fn start(tls: TlsOffer, answer: LoginAnswer) -> Result<Self, TestBedError> {
        let acceptor = match &tls {
            TlsOffer::None => None,
            TlsOffer::Certificate(certificate) => {
                let identity = native_tls::Identity::from_pkcs8(
                    &certificate.certificate_pem,
                    &certificate.key_pem,
                )
                .map_err(|e| TestBedError::new("the scripted server's certificate", e))?;
                let acceptor = native_tls::TlsAcceptor::new(identity)
                    .map_err(|e| TestBedError::new("the scripted server's TLS", e))?;
                Some(tokio_native_tls::TlsAcceptor::from(acceptor))
            }
        };
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let passwords = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let users = Arc::new(std::sync::Mutex::new(Vec::new()));
        let ended = Arc::new(AtomicUsize::new(0));
        let counters = (
            Arc::clone(&passwords),
            Arc::clone(&connections),
            Arc::clone(&users),
            Arc::clone(&ended),
        );
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counters.1.fetch_add(1, Ordering::SeqCst);
                let session = Session {
                    acceptor: acceptor.clone(),
                    answer: answer.clone(),
                    passwords: Arc::clone(&counters.0),
                    users: Arc::clone(&counters.2),
                };
                let ended = Arc::clone(&counters.3);
                tokio::spawn(async move {
                    // A client that stalls or breaks the protocol is simply dropped.
                    let _ = tokio::time::timeout(CLIENT_DEADLINE, session.serve(stream)).await;
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self {
            port,
            ca: None,
            users,
            passwords,
            connections,
            ended,
            task,
        })
    }

    /// Starts a server with a certificate for `localhost` from a CA of its own, whose
    /// certificate is kept in a file for clients: [`libpq_vars`](Self::libpq_vars) and
    /// [`connector_builder`](Self::connector_builder) point at the server and trust it.
    pub async fn start_trusted(answer: LoginAnswer) -> Result<Self, TestBedError> {
        let ca = super::TestCa::generate("scripted PostgreSQL CA")?;
        let dir = tempfile::Builder::new()
            .prefix("pg-entra-scripted-")
            .tempdir()?;
        std::fs::write(dir.path().join(CA_FILE), ca.certificate_pem()?)?;
        let mut server = Self::start(
            TlsOffer::Certificate(ca.issue_server_certificate()?),
            answer,
        )
        .await?;
        server.ca = Some(dir);
        Ok(server)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// With [`start_trusted`](Self::start_trusted), the file holding the CA's certificate.
    pub fn ca_certificate_path(&self) -> Option<std::path::PathBuf> {
        self.ca.as_ref().map(|dir| dir.path().join(CA_FILE))
    }

    /// `PGHOST=localhost`, `PGPORT` and, with [`start_trusted`](Self::start_trusted),
    /// `PGSSLROOTCERT`: what a client needs to reach this server.
    pub fn libpq_vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            ("PGHOST".to_owned(), super::postgres::TEST_HOST.to_owned()),
            ("PGPORT".to_owned(), self.port.to_string()),
        ];
        if let Some(path) = self.ca_certificate_path() {
            vars.push(("PGSSLROOTCERT".to_owned(), path.display().to_string()));
        }
        vars
    }

    /// A connector builder aimed at this server (reading no other environment). Add a
    /// credential.
    pub fn connector_builder(&self) -> crate::ConnectorBuilder {
        crate::Connector::builder().environment(crate::Environment::from_vars(self.libpq_vars()))
    }

    /// How many password messages clients have sent so far.
    pub fn passwords_received(&self) -> usize {
        self.passwords.load(Ordering::SeqCst)
    }

    /// The `user` of every startup message received so far, in order.
    pub fn users(&self) -> Vec<String> {
        crate::lock::lock(&self.users).clone()
    }

    /// How many TCP connections clients have opened so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// How many of those have ended: the client left, broke the protocol, or held its
    /// session past the server's limit of 10 s.
    pub fn connections_ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedPostgres {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client's exchange.
struct Session {
    acceptor: Option<tokio_native_tls::TlsAcceptor>,
    answer: LoginAnswer,
    passwords: Arc<AtomicUsize>,
    users: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Session {
    async fn serve(self, mut stream: TcpStream) -> std::io::Result<()> {
        loop {
            let (code, body) = read_startup(&mut stream).await?;
            match code {
                SSL_REQUEST => match &self.acceptor {
                    Some(acceptor) => {
                        stream.write_all(b"S").await?;
                        let tls = acceptor
                            .accept(stream)
                            .await
                            .map_err(std::io::Error::other)?;
                        return self.login(tls).await;
                    }
                    None => stream.write_all(b"N").await?,
                },
                GSSENC_REQUEST => stream.write_all(b"N").await?,
                // A startup message in the clear, after `N` (or without asking).
                _ => return self.login_after_startup(stream, body).await,
            }
        }
    }

    /// Reads the startup message, then [`login_after_startup`](Self::login_after_startup).
    async fn login<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S) -> std::io::Result<()> {
        let (_, body) = read_startup(&mut stream).await?;
        self.login_after_startup(stream, body).await
    }

    async fn login_after_startup<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        startup: Vec<u8>,
    ) -> std::io::Result<()> {
        let user = startup_parameter(&startup, "user").unwrap_or_default();
        crate::lock::lock(&self.users).push(user.clone());
        // AuthenticationCleartextPassword, as Azure asks.
        stream
            .write_all(&message(b'R', &3u32.to_be_bytes()))
            .await?;
        let (kind, body) = read_message(&mut stream, MAX_PASSWORD_BYTES).await?;
        if kind != b'p' {
            return Ok(());
        }
        self.passwords.fetch_add(1, Ordering::SeqCst);
        let password = String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(&body));
        let answer = match &self.answer {
            LoginAnswer::RequireAudience(resource) => {
                if audience(&password).as_deref() == Some(resource.as_str()) {
                    LoginAnswer::Accept
                } else {
                    LoginAnswer::Refuse {
                        code: "28000".into(),
                        message: format!(
                            "The access token does not have a valid audience claim. Please acquire a new token for the resource \"{resource}\"."
                        ),
                    }
                }
            }
            other => other.clone(),
        };
        match &answer {
            LoginAnswer::Accept | LoginAnswer::AcceptNoticingPassword => {
                stream
                    .write_all(&message(b'R', &0u32.to_be_bytes()))
                    .await?;
                if answer == LoginAnswer::AcceptNoticingPassword {
                    let text = format!("welcome, your password was {password}");
                    stream.write_all(&notice_response("00000", &text)).await?;
                }
                for (name, value) in [
                    ("server_version", "15.0 (scripted)"),
                    ("client_encoding", "UTF8"),
                    ("standard_conforming_strings", "on"),
                    ("DateStyle", "ISO, MDY"),
                    ("integer_datetimes", "on"),
                ] {
                    let mut body = Vec::new();
                    put_cstr(&mut body, name);
                    put_cstr(&mut body, value);
                    stream.write_all(&message(b'S', &body)).await?;
                }
                let mut key = Vec::from(std::process::id().to_be_bytes());
                key.extend_from_slice(&0u32.to_be_bytes());
                stream.write_all(&message(b'K', &key)).await?;
                stream.write_all(&message(b'Z', b"I")).await?;
                while let Ok((kind, _)) = read_message(&mut stream, MAX_PASSWORD_BYTES).await {
                    if kind == b'X' {
                        break;
                    }
                    let refusal =
                        error_response("ERROR", "0A000", "the scripted server runs no queries");
                    stream.write_all(&refusal).await?;
                    stream.write_all(&message(b'Z', b"I")).await?;
                }
                Ok(())
            }
            LoginAnswer::Refuse { code, message } => {
                stream
                    .write_all(&error_response("FATAL", code, message))
                    .await
            }
            LoginAnswer::RequireAudience(_) => Ok(()),
            LoginAnswer::Silent => {
                let mut ignored = [0u8; 256];
                while stream.read(&mut ignored).await? > 0 {}
                Ok(())
            }
            LoginAnswer::RefuseRepeatingPassword => {
                let text =
                    format!("password authentication failed for user \"{user}\": got {password}");
                stream
                    .write_all(&error_response("FATAL", "28P01", &text))
                    .await
            }
        }
    }
}

/// A startup-phase packet: its code (protocol version or request code) and the rest.
async fn read_startup<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<(u32, Vec<u8>)> {
    let length = stream.read_u32().await?;
    if !(8..=MAX_STARTUP_BYTES).contains(&length) {
        return Err(std::io::Error::other("startup packet of a bad length"));
    }
    let code = stream.read_u32().await?;
    let mut body = vec![0; (length - 8) as usize];
    stream.read_exact(&mut body).await?;
    Ok((code, body))
}

/// A typed message: its type byte and body.
async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: u32,
) -> std::io::Result<(u8, Vec<u8>)> {
    let kind = stream.read_u8().await?;
    let length = stream.read_u32().await?;
    if !(4..=limit).contains(&length) {
        return Err(std::io::Error::other("message of a bad length"));
    }
    let mut body = vec![0; (length - 4) as usize];
    stream.read_exact(&mut body).await?;
    Ok((kind, body))
}

/// The `aud` claim of a JWT, read without checking its signature.
fn audience(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("aud")?.as_str().map(str::to_owned)
}

/// A startup message's parameter (`user`, `database`, …).
fn startup_parameter(startup: &[u8], name: &str) -> Option<String> {
    let mut parts = startup.split(|b| *b == 0);
    while let (Some(key), Some(value)) = (parts.next(), parts.next()) {
        if key == name.as_bytes() {
            return Some(String::from_utf8_lossy(value).into_owned());
        }
    }
    None
}

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    // Bodies here are far below 4 GiB.
    out.extend_from_slice(
        &u32::try_from(body.len() + 4)
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(body);
    out
}

fn put_cstr(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.push(0);
}

fn error_response(severity: &str, code: &str, text: &str) -> Vec<u8> {
    message(b'E', &fields(severity, code, text))
}

fn notice_response(code: &str, text: &str) -> Vec<u8> {
    message(b'N', &fields("NOTICE", code, text))
}

/// The fields of an `ErrorResponse` or `NoticeResponse`, with the source location PostgreSQL
/// (and so Azure's server) puts in every one; a pooler's lack it.
fn fields(severity: &str, code: &str, text: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', text),
        (b'F', "auth.c"),
        (b'L', "334"),
        (b'R', "auth_failed"),
    ] {
        body.push(field);
        put_cstr(&mut body, value);
    }
    body.push(0);
    body
}
