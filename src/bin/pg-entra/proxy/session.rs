//! One client connection: its startup packet, the role and database it gets, the login
//! upstream, then bytes copied both ways until either side closes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::Semaphore;

use super::cancel::{CancelKeys, Route};
use super::reply;
use super::startup::{self, Packet, Startup, StartupError};
use super::upstream::{LoginError, Upstream};

/// Which role a session logs in as.
#[derive(Debug, Clone)]
pub(crate) enum UserRule {
    /// `--user` (or `PGUSER`) was given: every session logs in as that role, whatever the
    /// client names.
    Fixed,
    /// The role the client names, unless it names none or only its own login name (what
    /// libpq sends when no user is given): then the token's user name. With Single Server,
    /// a client's role gets `@server` when it lacks it.
    ClientOrToken {
        /// The Single Server's name, when its user names need the suffix.
        single_server: Option<String>,
    },
}

impl UserRule {
    /// The role (`None`: the token's, or the fixed one) and the database for a client that
    /// sent `startup` from the OS account named `account`; `dbname` when the client names no
    /// database.
    fn choose(
        &self,
        startup: &Startup,
        account: Option<&str>,
        dbname: &str,
    ) -> (Option<String>, String) {
        let named = startup
            .parameter("user")
            .filter(|user| !user.is_empty() && Some(*user) != account);
        let user = match (self, named) {
            (UserRule::Fixed, _) | (_, None) => None,
            (UserRule::ClientOrToken { single_server }, Some(name)) => Some(match single_server {
                Some(server) if !name.contains('@') => format!("{name}@{server}"),
                _ => name.to_owned(),
            }),
        };
        // libpq's default database is the user name: with the user defaulted, so is it.
        let defaulted =
            |database: &str| named.is_none() && Some(database) == startup.parameter("user");
        let database = startup
            .parameter("database")
            .filter(|database| !database.is_empty() && !defaulted(database))
            .unwrap_or(dbname);
        (user, database.to_owned())
    }
}

/// What every session shares.
pub(crate) struct Proxy {
    pub(crate) upstream: Upstream,
    pub(crate) cancels: CancelKeys,
    pub(crate) users: UserRule,
    /// The database of a client that names none.
    pub(crate) dbname: String,
    /// How long a client has to send its startup packet (encryption requests included).
    pub(crate) startup_timeout: Duration,
    /// One permit per open session.
    pub(crate) sessions: Arc<Semaphore>,
    pub(crate) max_sessions: usize,
}

/// How far a client got before its session began.
enum Opening {
    Startup(Startup),
    Cancel {
        process_id: u32,
        secret_key: Vec<u8>,
    },
}

/// Why no session began.
enum Refusal {
    /// The client went away (or its connection failed): nothing to answer.
    Gone,
    /// The packet cannot be read: answered with an error.
    Bad(StartupError),
}

impl Proxy {
    /// Serves one client to the end. `account` is the login name of the client's account
    /// (what libpq sends as the user when none is given), `from` names it in logs.
    pub(crate) async fn serve<S>(
        self: Arc<Self>,
        mut client: S,
        account: Option<String>,
        from: String,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let opening = tokio::time::timeout(self.startup_timeout, negotiate(&mut client)).await;
        let startup = match opening {
            Err(_) => {
                tracing::info!(%from, "no startup packet in time; closing");
                let text = format!(
                    "pg-entra proxy: no startup packet within {} s",
                    self.startup_timeout.as_secs()
                );
                let _ = client.write_all(&reply::fatal("08P01", &text, None)).await;
                return;
            }
            Ok(Err(Refusal::Gone)) => return,
            Ok(Err(Refusal::Bad(error))) => {
                tracing::info!(%from, %error, "unreadable startup packet; closing");
                let text = format!("pg-entra proxy: {error}");
                let _ = client
                    .write_all(&reply::fatal(error.sqlstate(), &text, None))
                    .await;
                return;
            }
            Ok(Ok(Opening::Cancel {
                process_id,
                secret_key,
            })) => {
                // A cancel request gets no answer, whatever becomes of it (as in PostgreSQL).
                match self.cancels.route(process_id, &secret_key) {
                    Some(Route {
                        target,
                        process_id,
                        secret_key,
                    }) => self.upstream.cancel(target, process_id, secret_key).await,
                    None => tracing::info!(%from, "a cancel request for no open session"),
                }
                return;
            }
            Ok(Ok(Opening::Startup(startup))) => startup,
        };
        if startup.minor_version > 0 || !startup.protocol_options.is_empty() {
            let negotiate = reply::negotiate_protocol_version(&startup.protocol_options);
            if client.write_all(&negotiate).await.is_err() {
                return;
            }
        }
        if startup.wants_replication() {
            let refusal = reply::fatal(
                "0A000",
                "pg-entra proxy: replication connections are not proxied",
                Some(
                    "connect to the server directly for replication (pg-entra token gives the password)",
                ),
            );
            let _ = client.write_all(&refusal).await;
            return;
        }
        let Ok(_permit) = Arc::clone(&self.sessions).try_acquire_owned() else {
            tracing::warn!(%from, limit = self.max_sessions, "session limit reached; refusing");
            let text = format!(
                "pg-entra proxy: too many sessions (the limit is {}, set with --max-sessions)",
                self.max_sessions
            );
            let _ = client.write_all(&reply::fatal("53300", &text, None)).await;
            return;
        };
        let (user, parameters) = self.upstream_parameters(&startup, account.as_deref());
        let started = Instant::now();
        let session = match self.upstream.login(&parameters, user.as_deref()).await {
            Ok(session) => session,
            Err(error) => {
                let answer = self.answer(&error, &from);
                let _ = client.write_all(&answer).await;
                return;
            }
        };
        let target = &self.upstream.targets()[session.target];
        let registration = self.cancels.register(Route {
            target: session.target,
            process_id: session.process_id,
            secret_key: session.secret_key,
        });
        let (process_id, secret_key) = registration.keys();
        let mut greeting = reply::authentication_ok();
        let (ready, rest) = session
            .messages
            .split_last()
            .expect("the login ends with ReadyForQuery");
        for message in rest {
            greeting.extend_from_slice(message);
        }
        greeting.extend(reply::backend_key_data(process_id, secret_key));
        greeting.extend_from_slice(ready);
        if client.write_all(&greeting).await.is_err() {
            return;
        }
        tracing::info!(%from, user = %session.user, server = %target, "session opened");
        let mut upstream = session.stream;
        let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        let seconds = started.elapsed().as_secs_f64();
        match copied {
            Ok((sent, received)) => {
                tracing::info!(%from, sent, received, seconds, "session closed");
            }
            Err(error) => tracing::info!(%from, %error, seconds, "session ended"),
        }
        drop(registration);
    }

    /// The role (`None`: the token's) and the startup parameters to send upstream.
    fn upstream_parameters(
        &self,
        startup: &Startup,
        account: Option<&str>,
    ) -> (Option<String>, Vec<(String, String)>) {
        let (user, database) = self.users.choose(startup, account, &self.dbname);
        let mut parameters = vec![("database".to_owned(), database)];
        parameters.extend(
            startup
                .parameters
                .iter()
                .filter(|(name, _)| !matches!(name.as_str(), "user" | "database" | "replication"))
                .cloned(),
        );
        let base = self.upstream.connector().base_config();
        for (name, value) in [
            ("application_name", base.get_application_name()),
            ("options", base.get_options()),
        ] {
            if let Some(value) = value
                && startup.parameter(name).is_none()
            {
                parameters.push((name.to_owned(), value.to_owned()));
            }
        }
        (user, parameters)
    }

    /// What the client is told when its login failed upstream, logged too.
    fn answer(&self, error: &LoginError, from: &str) -> Vec<u8> {
        match error {
            LoginError::Token(error) => {
                tracing::warn!(%from, %error, "no token for the session");
                reply::fatal(
                    "08004",
                    &format!("pg-entra proxy: no access token: {error}"),
                    error.hint(),
                )
            }
            LoginError::Refused {
                code,
                message,
                refusal,
                target,
            } => {
                tracing::warn!(%from, %code, %message, server = %target, "the server refused the login");
                reply::fatal(
                    code,
                    &format!("{message} (server {target}, through pg-entra proxy)"),
                    refusal.as_ref().map(pg_entra::LoginRefusal::hint),
                )
            }
            LoginError::Server(frame) => {
                tracing::warn!(%from, "the server ended the session at its start");
                frame.to_vec()
            }
            LoginError::Connect { message, hint } => {
                tracing::warn!(%from, %message, "cannot reach the server");
                reply::fatal("08006", &format!("pg-entra proxy: {message}"), Some(hint))
            }
        }
    }
}

/// Reads packets until the startup message or a cancel request; encryption requests are
/// answered "no" (the hop is local; the proxy's own TLS is upstream). At most two are
/// answered, as a client asks for each kind once.
async fn negotiate<S>(client: &mut S) -> Result<Opening, Refusal>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for _ in 0..3 {
        match startup::parse(&read_packet(client).await?).map_err(Refusal::Bad)? {
            Packet::SslRequest | Packet::GssEncRequest => {
                client
                    .write_all(&[reply::ENCRYPTION_REFUSED])
                    .await
                    .map_err(|_| Refusal::Gone)?;
            }
            Packet::Cancel {
                process_id,
                secret_key,
            } => {
                return Ok(Opening::Cancel {
                    process_id,
                    secret_key,
                });
            }
            Packet::Startup(startup) => return Ok(Opening::Startup(startup)),
        }
    }
    Err(Refusal::Bad(StartupError::Malformed(
        "more than two encryption requests",
    )))
}

/// One packet: its length word, checked before anything more is read, then the rest.
async fn read_packet<S: AsyncRead + Unpin>(client: &mut S) -> Result<Vec<u8>, Refusal> {
    let mut length_word = [0u8; 4];
    client
        .read_exact(&mut length_word)
        .await
        .map_err(|_| Refusal::Gone)?;
    let length = startup::packet_length(length_word).map_err(Refusal::Bad)?;
    let mut packet = vec![0u8; length];
    packet[..4].copy_from_slice(&length_word);
    client
        .read_exact(&mut packet[4..])
        .await
        .map_err(|_| Refusal::Gone)?;
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(parameters: &[(&str, &str)]) -> Startup {
        Startup {
            minor_version: 0,
            parameters: parameters
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            protocol_options: Vec::new(),
        }
    }

    #[test]
    fn psqls_defaults_give_the_tokens_role_and_the_proxys_database() {
        let rule = UserRule::ClientOrToken {
            single_server: None,
        };
        // `psql` with nothing given: libpq sends the OS login name as user and database.
        let defaults = startup(&[("user", "alice"), ("database", "alice")]);
        assert_eq!(
            rule.choose(&defaults, Some("alice"), "postgres"),
            (None, "postgres".to_owned())
        );
        // A role and a database the client names are used.
        let named = startup(&[("user", "readers"), ("database", "sales")]);
        assert_eq!(
            rule.choose(&named, Some("alice"), "postgres"),
            (Some("readers".to_owned()), "sales".to_owned())
        );
        // A database named like the OS account, with the user given explicitly, is kept.
        let explicit = startup(&[("user", "readers"), ("database", "alice")]);
        assert_eq!(rule.choose(&explicit, Some("alice"), "postgres").1, "alice");
        // No user at all (allowed by the protocol, not by PostgreSQL): the token's.
        assert_eq!(
            rule.choose(&startup(&[]), None, "db"),
            (None, "db".to_owned())
        );
    }

    #[test]
    fn a_fixed_user_wins_and_single_server_names_get_the_server() {
        let named = startup(&[("user", "readers"), ("database", "sales")]);
        assert_eq!(
            UserRule::Fixed.choose(&named, Some("alice"), "postgres"),
            (None, "sales".to_owned())
        );
        let single = UserRule::ClientOrToken {
            single_server: Some("mysrv".to_owned()),
        };
        assert_eq!(
            single
                .choose(&named, Some("alice"), "postgres")
                .0
                .as_deref(),
            Some("readers@mysrv")
        );
        let suffixed = startup(&[("user", "readers@mysrv")]);
        assert_eq!(
            single.choose(&suffixed, None, "postgres").0.as_deref(),
            Some("readers@mysrv")
        );
    }
}
