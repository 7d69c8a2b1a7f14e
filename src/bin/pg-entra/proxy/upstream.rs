//! The server side of a proxied session: verified TLS to the server, the login with the
//! cached token, and the server's messages up to its first `ReadyForQuery`.
//!
//! TLS comes from the library's connector (its roots, its `sslmode`, `verify-full` unless set
//! otherwise), the token from its cache, and the messages are encoded and parsed with
//! postgres-protocol.

use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator as _;
use pg_entra::{Connector, LoginRefusal, Token};
use postgres_native_tls::{MakeTlsConnector, TlsStream};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{self, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;
use tokio_postgres::tls::TlsConnect as _;

/// The limit on one connection attempt to one host when none is configured: the library's.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest message accepted before the session is handed over: login messages and
/// parameter statuses are small; a bigger one is not a PostgreSQL server speaking.
const LONGEST_LOGIN_MESSAGE: usize = 1 << 20;
/// How long a cancel request may take (connect, TLS, send).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// A server the proxy logs in to: the name TLS checks, where to connect, the port.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The host name the certificate must name.
    pub(crate) host: String,
    /// `hostaddr` when given, else the host name.
    address: String,
    pub(crate) port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A session logged in upstream, at its first `ReadyForQuery`.
pub(crate) struct LoggedIn {
    pub(crate) stream: TlsStream<TcpStream>,
    /// Which of [`Upstream::targets`] it is on.
    pub(crate) target: usize,
    /// The server's keys for cancelling its queries.
    pub(crate) process_id: u32,
    pub(crate) secret_key: u32,
    /// The server's messages after `AuthenticationOk` up to `ReadyForQuery`, in order, as
    /// sent, with `BackendKeyData` left out (the client gets the proxy's keys in its place,
    /// before the last message).
    pub(crate) messages: Vec<Bytes>,
    /// The role it logged in as.
    pub(crate) user: String,
}

/// Why a session could not be logged in upstream.
#[derive(Debug)]
pub(crate) enum LoginError {
    /// No token (the credential failed), or none that names a user.
    Token(pg_entra::Error),
    /// The server refused the login: its SQLSTATE, its message (withheld if it quoted the
    /// token) and the library's reading of it.
    Refused {
        code: String,
        message: String,
        refusal: Option<LoginRefusal>,
        target: String,
    },
    /// The server's error after the login (no such database, too many connections, starting
    /// up): its message bytes, relayed as they are.
    Server(Bytes),
    /// No server could be reached, TLS failed, or a server broke the protocol.
    Connect { message: String, hint: &'static str },
}

/// The servers and what logging in to them takes.
#[derive(Clone)]
pub(crate) struct Upstream {
    connector: Connector,
    tls: MakeTlsConnector,
    targets: Vec<Target>,
    connect_timeout: Duration,
}

impl Upstream {
    /// The connector's hosts in libpq's order, with its TLS.
    pub(crate) fn new(connector: Connector) -> Result<Self, pg_entra::Error> {
        let config = connector.base_config();
        let ports = config.get_ports();
        let addresses = config.get_hostaddrs();
        let targets = config
            .get_hosts()
            .iter()
            .enumerate()
            .filter_map(|(i, host)| match host {
                Host::Tcp(name) => Some(Target {
                    host: name.clone(),
                    address: addresses
                        .get(i)
                        .map_or_else(|| name.clone(), ToString::to_string),
                    port: *ports.get(i).or(ports.first()).unwrap_or(&5432),
                }),
                // The connector refuses Unix sockets: no TLS there.
                #[cfg(unix)]
                Host::Unix(_) => None,
            })
            .collect();
        Ok(Self {
            tls: connector.tls_connector()?,
            connect_timeout: config
                .get_connect_timeout()
                .copied()
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            connector,
            targets,
        })
    }

    /// The servers, in the order they are tried.
    pub(crate) fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The connector (settings, token cache).
    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Logs a session in with `parameters` (the startup message's, `user` and `database`
    /// among them; `user` is filled in from the token when `user` is `None`). A refusal a
    /// new token can cure is retried once with a forced refresh, as the library's connector
    /// does.
    pub(crate) async fn login(
        &self,
        parameters: &[(String, String)],
        user: Option<&str>,
    ) -> Result<LoggedIn, LoginError> {
        let cache = self.connector.token_cache();
        let token = cache.token().await.map_err(LoginError::Token)?;
        let error = match self.login_with(&token, parameters, user).await {
            Ok(session) => return Ok(session),
            Err(error) => error,
        };
        let LoginError::Refused {
            refusal: Some(refusal),
            ..
        } = &error
        else {
            return Err(error);
        };
        // The same refusals the library's connector retries with a forced refresh. A server
        // naming another resource gets no token for it here: the hint says which scope to set.
        if !matches!(
            refusal,
            LoginRefusal::TokenExpired | LoginRefusal::TokenInvalid | LoginRefusal::PasswordFailed
        ) {
            return Err(error);
        }
        match cache.refresh_rejected(&token).await {
            Ok(Some(next)) => {
                tracing::info!("the server refused the token; retrying once with a new token");
                self.login_with(&next, parameters, user).await
            }
            Ok(None) => Err(error),
            Err(refresh_error) => {
                tracing::warn!(%refresh_error, "cannot refresh the token the server refused");
                Err(error)
            }
        }
    }

    /// One login with `token`, host after host until one answers; a refusal is final.
    async fn login_with(
        &self,
        token: &Token,
        parameters: &[(String, String)],
        user: Option<&str>,
    ) -> Result<LoggedIn, LoginError> {
        let user = match user {
            Some(user) => user.to_owned(),
            None => self.connector.user_for(token).map_err(LoginError::Token)?,
        };
        let mut last = None;
        for (index, target) in self.targets.iter().enumerate() {
            let attempt = tokio::time::timeout(
                self.connect_timeout,
                self.login_at(target, token, parameters, &user),
            )
            .await
            .unwrap_or_else(|_| {
                Err(LoginError::Connect {
                    message: format!(
                        "{target} did not finish the login within {} s",
                        self.connect_timeout.as_secs()
                    ),
                    hint: "the server or the network is silent; check the server's state and \
                           the network path, or raise the connect timeout (PGCONNECT_TIMEOUT)",
                })
            });
            match attempt {
                Ok((stream, process_id, secret_key, messages)) => {
                    return Ok(LoggedIn {
                        stream,
                        target: index,
                        process_id,
                        secret_key,
                        messages,
                        user,
                    });
                }
                Err(error @ LoginError::Connect { .. }) => {
                    tracing::debug!(%target, ?error, "cannot log in there; trying the next host");
                    last = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last.unwrap_or(LoginError::Connect {
            message: "no TCP host to connect to".to_owned(),
            hint: "set --host (or PGHOST) to the server's name",
        }))
    }

    async fn login_at(
        &self,
        target: &Target,
        token: &Token,
        parameters: &[(String, String)],
        user: &str,
    ) -> Result<(TlsStream<TcpStream>, u32, u32, Vec<Bytes>), LoginError> {
        let mut stream = self.open(target).await?;
        let mut out = BytesMut::new();
        let startup: Vec<(&str, &str)> = std::iter::once(("user", user))
            .chain(
                parameters
                    .iter()
                    .filter(|(name, _)| name != "user")
                    .map(|(name, value)| (name.as_str(), value.as_str())),
            )
            .collect();
        frontend::startup_message(startup, &mut out).map_err(protocol(target))?;
        send(&mut stream, &mut out, target).await?;
        let mut input = BytesMut::new();
        authenticate(&mut stream, &mut input, token, user, target).await?;
        let mut messages = Vec::new();
        let mut keys = None;
        loop {
            let (tag, frame) = read_message(&mut stream, &mut input, target).await?;
            match tag {
                b'K' => {
                    let mut parse = BytesMut::from(&frame[..]);
                    if let Ok(Some(Message::BackendKeyData(body))) = Message::parse(&mut parse) {
                        keys = Some((body.process_id() as u32, body.secret_key() as u32));
                    }
                }
                b'S' | b'N' => messages.push(frame),
                b'Z' => {
                    messages.push(frame);
                    break;
                }
                b'E' => return Err(LoginError::Server(withhold(frame, token))),
                _ => return Err(unexpected(tag, target)),
            }
        }
        if !input.is_empty() {
            return Err(unexpected(input[0], target));
        }
        // Relayed only if no field quotes the token (a server or extension that echoes the
        // password into a notice or a setting). One check over all of them; one per message
        // only when that finds something.
        let all: Vec<u8> = messages.iter().flat_map(|m| m.iter().copied()).collect();
        if quotes_token(&Bytes::from(all), token) {
            tracing::warn!(%target, "a server message quoted the token; not relayed");
            messages
                .retain(|message| message.first() == Some(&b'Z') || !quotes_token(message, token));
        }
        let (process_id, secret_key) = keys.unwrap_or((0, 0));
        Ok((stream, process_id, secret_key, messages))
    }

    /// TCP, `SSLRequest` and the TLS handshake with `target`'s name verified.
    async fn open(&self, target: &Target) -> Result<TlsStream<TcpStream>, LoginError> {
        let tcp = TcpStream::connect((target.address.as_str(), target.port))
            .await
            .map_err(|error| LoginError::Connect {
                message: format!("cannot connect to {target}: {error}"),
                hint: "check the host name and port, the server's firewall rules and that the \
                       server is running",
            })?;
        // Small messages both ways: a query waits for no coalescing.
        tcp.set_nodelay(true).ok();
        let mut tcp = tcp;
        let mut out = BytesMut::new();
        frontend::ssl_request(&mut out);
        tcp.write_all(&out).await.map_err(io(target))?;
        let answer = tcp.read_u8().await.map_err(io(target))?;
        if answer != b'S' {
            return Err(LoginError::Connect {
                message: format!("{target} does not offer TLS"),
                hint: "the token is sent only inside verified TLS; Azure Database for \
                       PostgreSQL always offers it, so this is not the server meant",
            });
        }
        let mut make = self.tls.clone();
        let connect = tokio_postgres::tls::MakeTlsConnect::<TcpStream>::make_tls_connect(
            &mut make,
            &target.host,
        )
        .map_err(|error| LoginError::Connect {
            message: format!("TLS with {target}: {error}"),
            hint: "the host name is not one TLS can check",
        })?;
        connect
            .connect(tcp)
            .await
            .map_err(|error| LoginError::Connect {
                message: format!("TLS with {target} failed: {error}"),
                hint: "the server's certificate must chain to a trusted root (the system's, or the \
                   file in PGSSLROOTCERT) and name the host you connect to",
            })
    }

    /// Sends a client's cancel request for the session with the server's keys on `target`,
    /// inside TLS as libpq does.
    pub(crate) async fn cancel(&self, target: usize, process_id: u32, secret_key: u32) {
        let Some(target) = self.targets.get(target) else {
            return;
        };
        let sent = tokio::time::timeout(CANCEL_TIMEOUT, async {
            let mut stream = self.open(target).await?;
            let mut out = BytesMut::new();
            frontend::cancel_request(process_id as i32, secret_key as i32, &mut out);
            send(&mut stream, &mut out, target).await?;
            // The server closes the connection when it has read the request.
            let mut rest = [0u8; 1];
            let _ = stream.read(&mut rest).await;
            Ok::<_, LoginError>(())
        })
        .await;
        match sent {
            Ok(Ok(())) => tracing::debug!(%target, "cancel request sent"),
            Ok(Err(error)) => tracing::warn!(%target, ?error, "cannot send a cancel request"),
            Err(_) => tracing::warn!(%target, "the cancel request timed out"),
        }
    }
}

/// Answers the server's authentication requests with the token until `AuthenticationOk`.
async fn authenticate(
    stream: &mut TlsStream<TcpStream>,
    input: &mut BytesMut,
    token: &Token,
    user: &str,
    target: &Target,
) -> Result<(), LoginError> {
    let password = token.secret().as_bytes();
    let mut scram: Option<ScramSha256> = None;
    let mut out = BytesMut::new();
    loop {
        let (tag, frame) = read_message(stream, input, target).await?;
        match tag {
            b'R' => {}
            b'E' => return Err(refused(&frame, token, target)),
            // A server answering a 3.0 startup with no options has nothing to negotiate.
            b'v' | b'N' => continue,
            _ => return Err(unexpected(tag, target)),
        }
        let mut parse = BytesMut::from(&frame[..]);
        let message = Message::parse(&mut parse).map_err(protocol(target))?;
        match message {
            Some(Message::AuthenticationOk) => return Ok(()),
            Some(Message::AuthenticationCleartextPassword) => {
                frontend::password_message(password, &mut out).map_err(protocol(target))?;
            }
            Some(Message::AuthenticationMd5Password(body)) => {
                let hash = md5_hash(user.as_bytes(), password, body.salt());
                frontend::password_message(hash.as_bytes(), &mut out).map_err(protocol(target))?;
            }
            Some(Message::AuthenticationSasl(body)) => {
                let mut mechanisms = body.mechanisms();
                let mut offered = false;
                while let Some(mechanism) = mechanisms.next().map_err(protocol(target))? {
                    offered |= mechanism == sasl::SCRAM_SHA_256;
                }
                if !offered {
                    return Err(LoginError::Connect {
                        message: format!(
                            "{target} asks for a SASL mechanism other than SCRAM-SHA-256"
                        ),
                        hint: "the proxy answers cleartext, MD5 and SCRAM-SHA-256 with the token",
                    });
                }
                // The TLS stream does not show its certificate hash, so no channel binding
                // (the server is verified by TLS itself).
                let exchange = ScramSha256::new(password, ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, exchange.message(), &mut out)
                    .map_err(protocol(target))?;
                scram = Some(exchange);
            }
            Some(Message::AuthenticationSaslContinue(body)) => {
                let exchange = scram.as_mut().ok_or_else(|| unexpected(tag, target))?;
                exchange.update(body.data()).map_err(protocol(target))?;
                frontend::sasl_response(exchange.message(), &mut out).map_err(protocol(target))?;
            }
            Some(Message::AuthenticationSaslFinal(body)) => {
                let exchange = scram.as_mut().ok_or_else(|| unexpected(tag, target))?;
                exchange.finish(body.data()).map_err(protocol(target))?;
                continue;
            }
            _ => {
                return Err(LoginError::Connect {
                    message: format!(
                        "{target} asks for an authentication the proxy does not answer (GSSAPI, SSPI or Kerberos)"
                    ),
                    hint: "Entra logins use a password; check that the role is an Entra role",
                });
            }
        }
        send(stream, &mut out, target).await?;
    }
}

/// The next whole message: its tag and all its bytes.
async fn read_message(
    stream: &mut TlsStream<TcpStream>,
    input: &mut BytesMut,
    target: &Target,
) -> Result<(u8, Bytes), LoginError> {
    loop {
        if let Some(header) = backend::Header::parse(input).map_err(protocol(target))? {
            let length = header.len() as usize + 1;
            if length > LONGEST_LOGIN_MESSAGE {
                return Err(unexpected(header.tag(), target));
            }
            if input.len() >= length {
                return Ok((header.tag(), input.split_to(length).freeze()));
            }
        }
        input.reserve(8192);
        if stream.read_buf(input).await.map_err(io(target))? == 0 {
            return Err(LoginError::Connect {
                message: format!("{target} closed the connection during the login"),
                hint: "see the server's log; a server that is starting or shutting down does this",
            });
        }
    }
}

async fn send(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    out: &mut BytesMut,
    target: &Target,
) -> Result<(), LoginError> {
    stream.write_all(out).await.map_err(io(target))?;
    stream.flush().await.map_err(io(target))?;
    out.clear();
    Ok(())
}

/// Whether any field of a server message quotes the token (or an 8-character piece of it).
fn quotes_token(frame: &Bytes, token: &Token) -> bool {
    pg_entra::redact::echoes(&String::from_utf8_lossy(frame), token.secret())
}

/// A refusal of the login, read as the library reads one, its text checked for the token.
/// Only the SQLSTATE and the message reach the client, in a message the proxy builds.
fn refused(frame: &Bytes, token: &Token, target: &Target) -> LoginError {
    let (code, message) = code_and_message(frame);
    let message = if quotes_token(frame, token) {
        pg_entra::redact::WITHHELD.to_owned()
    } else {
        message
    };
    LoginError::Refused {
        refusal: LoginRefusal::classify(&code, &message),
        code,
        message,
        target: target.to_string(),
    }
}

/// An error after the login as the server sent it, or a new one if any of its fields (message,
/// detail, hint, context) quotes the token.
fn withhold(frame: Bytes, token: &Token) -> Bytes {
    if quotes_token(&frame, token) {
        let (code, _) = code_and_message(&frame);
        Bytes::from(super::reply::fatal(&code, pg_entra::redact::WITHHELD, None))
    } else {
        frame
    }
}

/// An `ErrorResponse`'s SQLSTATE and message.
fn code_and_message(frame: &Bytes) -> (String, String) {
    let mut parse = BytesMut::from(&frame[..]);
    let (mut code, mut message) = (String::from("XX000"), String::new());
    if let Ok(Some(Message::ErrorResponse(body))) = Message::parse(&mut parse) {
        let mut fields = body.fields();
        while let Ok(Some(field)) = fields.next() {
            match field.type_() {
                b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
                b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
                _ => {}
            }
        }
    }
    (code, message)
}

fn unexpected(tag: u8, target: &Target) -> LoginError {
    LoginError::Connect {
        message: format!(
            "{target} sent an unexpected message ({:?}) during the login",
            char::from(tag)
        ),
        hint: "the address is not a PostgreSQL server, or something between rewrites the traffic",
    }
}

fn protocol(target: &Target) -> impl Fn(std::io::Error) -> LoginError + '_ {
    move |error| LoginError::Connect {
        message: format!("{target} broke the protocol during the login: {error}"),
        hint: "the address is not a PostgreSQL server, or something between rewrites the traffic",
    }
}

fn io(target: &Target) -> impl Fn(std::io::Error) -> LoginError + '_ {
    move |error| LoginError::Connect {
        message: format!("the connection to {target} failed during the login: {error}"),
        hint: "check the network path to the server",
    }
}
