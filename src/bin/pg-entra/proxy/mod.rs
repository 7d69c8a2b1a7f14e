//! `pg-entra proxy`: a local PostgreSQL endpoint that any client (psql, pgAdmin, DBeaver, a
//! migration tool, a service in another language) connects to without a password; each
//! session is logged in upstream with verified TLS and the cached Entra token.
//!
//! Rooms: [`listen`] (listeners and who may connect), [`startup`] (the client's first packet),
//! [`session`] (one client), [`upstream`] (TLS and the login), [`cancel`] (cancel routing),
//! [`reply`] (the messages the proxy writes itself).

mod cancel;
mod listen;
mod reply;
mod session;
mod startup;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pg_entra::SslMode;
use tokio::sync::Semaphore;

use crate::exit::Failure;
use crate::server::{ServerArgs, causes};
use listen::{Accepted, Allowed, Listener, UnixSocket};
use session::{Proxy, UserRule};
use upstream::Upstream;

/// The proxy's port when none is given: clear of a local PostgreSQL (5432, and Debian's
/// further clusters from 5433) and of PgBouncer (6432).
pub(crate) const DEFAULT_PORT: u16 = 15432;

/// Arguments of `pg-entra proxy`.
#[derive(Debug, clap::Args)]
pub(crate) struct ProxyArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Where to listen for TCP clients [default: 127.0.0.1:15432, unless only
    /// --unix-socket is given]. A non-loopback address also needs --allow-remote-clients.
    #[arg(long, value_name = "ADDRESS:PORT")]
    listen: Option<SocketAddr>,
    /// Also (or only) listen on a Unix socket in this directory, named as PostgreSQL names
    /// its own (`DIR/.s.PGSQL.<port>`, the port of --listen), so that `psql -h DIR -p PORT`
    /// works.
    #[arg(long, value_name = "DIR")]
    unix_socket: Option<PathBuf>,
    /// Let clients on other hosts use this proxy's identity: every host that can reach the
    /// address logs in as it. Needed to listen on a non-loopback address.
    #[arg(long)]
    allow_remote_clients: bool,
    /// The most sessions open at once; more are refused with SQLSTATE 53300.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_sessions: u32,
    /// Seconds a client has to send its startup packet.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    startup_timeout: u64,
    /// Seconds open sessions get to finish after Ctrl-C or SIGTERM, before they are closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    grace_period: u64,
}

/// Runs the proxy until Ctrl-C or SIGTERM.
pub(crate) async fn run(args: ProxyArgs) -> Result<(), Failure> {
    init_logging();
    let ProxyArgs {
        server,
        listen,
        unix_socket,
        allow_remote_clients,
        max_sessions,
        startup_timeout,
        grace_period,
    } = args;
    let configuration = |error: &dyn std::fmt::Display| {
        eprintln!("pg-entra proxy: {error}");
        Failure::Configuration
    };
    let credential = server.chain().map_err(|e| configuration(&e))?;
    let connector = server
        .connector(Arc::new(credential), None)
        .map_err(|e| configuration(&e))?;
    if connector.target_session_attrs() != pg_entra::TargetSessionAttrs::Any {
        return Err(configuration(
            &"target_session_attrs is not applied by the proxy: name the one server to use",
        ));
    }
    let allowed = Allowed::this_account().map_err(|e| configuration(&e))?;
    let upstream = Upstream::new(connector.clone()).map_err(|e| configuration(&e))?;
    if upstream.targets().is_empty() {
        return Err(configuration(
            &"no server to log in to: set --host (or PGHOST) to the server's name",
        ));
    }

    // The token first: a proxy that cannot get one says so now, not at the first client.
    let token = connector.token_cache().token().await.map_err(|error| {
        eprintln!("pg-entra proxy: no access token for {}:", server.scope());
        for line in causes(&error) {
            eprintln!("  {line}");
        }
        Failure::Credential
    })?;
    let token_user = connector.user_for(&token);
    let users = if server.given_user().is_some() {
        UserRule::Fixed
    } else {
        UserRule::ClientOrToken {
            single_server: server.single_server.then(|| {
                upstream.targets()[0]
                    .host
                    .split('.')
                    .next()
                    .unwrap_or("")
                    .to_owned()
            }),
        }
    };
    if let (UserRule::Fixed, Err(error)) = (&users, &token_user) {
        return Err(configuration(error));
    }

    let address = match (listen, &unix_socket) {
        (Some(address), _) => Some(address),
        (None, None) => Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))),
        (None, Some(_)) => None,
    };
    let mut listeners = Vec::new();
    if let Some(address) = address {
        if !listen::is_local(address.ip()) && !allow_remote_clients {
            return Err(configuration(&format!(
                "{address} is not a loopback address: every host that reaches it would log in as this identity; add --allow-remote-clients if that is meant (a sidecar shares its pod's loopback and needs no such address)"
            )));
        }
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| configuration(&format!("cannot listen on {address}: {e}")))?;
        listeners.push(Listener::Tcp(listener));
    }
    if let Some(directory) = &unix_socket {
        // The port TCP got (port 0 picks a free one), so both names agree.
        let port = match listeners.first() {
            Some(Listener::Tcp(tcp)) => tcp.local_addr().map_or(DEFAULT_PORT, |a| a.port()),
            _ => DEFAULT_PORT,
        };
        let socket = UnixSocket::bind(directory, port).await.map_err(|e| {
            configuration(&format!(
                "cannot listen on a socket in {}: {e}",
                directory.display()
            ))
        })?;
        listeners.push(Listener::Unix(socket));
    }

    let dbname = connector
        .base_config()
        .get_dbname()
        .unwrap_or("postgres")
        .to_owned();
    announce(
        &listeners,
        &upstream,
        &users,
        token_user.as_deref().ok(),
        &dbname,
        connector.ssl_mode(),
        allow_remote_clients,
    );
    let proxy = Arc::new(Proxy {
        upstream,
        cancels: cancel::CancelKeys::default(),
        users,
        dbname,
        startup_timeout: Duration::from_secs(startup_timeout),
        sessions: Arc::new(Semaphore::new(max_sessions as usize)),
        max_sessions: max_sessions as usize,
    });
    let admission = Admission {
        allowed,
        allow_remote: allow_remote_clients,
        // Room beyond the sessions for clients still negotiating and for cancel requests.
        connections: Arc::new(Semaphore::new(max_sessions as usize + CONNECTING_ROOM)),
        own_name: std::env::var("USER").ok(),
    };
    serve(
        listeners,
        proxy,
        admission,
        Duration::from_secs(grace_period),
    )
    .await
}

/// Connections allowed beyond `--max-sessions`: clients sending their startup packet (each for
/// at most `--startup-timeout`) and cancel requests.
const CONNECTING_ROOM: usize = 64;

/// Accepts until a stop signal, then waits for open sessions up to `grace`.
async fn serve(
    listeners: Vec<Listener>,
    proxy: Arc<Proxy>,
    admission: Admission,
    grace: Duration,
) -> Result<(), Failure> {
    let listeners: Vec<Arc<Listener>> = listeners.into_iter().map(Arc::new).collect();
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel::<Accepted>(64);
    let mut acceptors = tokio::task::JoinSet::new();
    for listener in &listeners {
        let (listener, accepted_tx) = (Arc::clone(listener), accepted_tx.clone());
        acceptors.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok(accepted) => {
                        if accepted_tx.send(accepted).await.is_err() {
                            return;
                        }
                    }
                    // Out of file descriptors, say: pause rather than spin.
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    drop(accepted_tx);
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            signal = &mut stop => {
                signal.map_err(|error| {
                    eprintln!("pg-entra proxy: cannot watch for signals: {error}");
                    Failure::Internal
                })?;
                break;
            }
            accepted = accepted_rx.recv() => {
                let Some(accepted) = accepted else { break };
                admit(accepted, &proxy, &admission);
            }
        }
    }
    // No new clients from here on; the socket file goes with its listener.
    acceptors.shutdown().await;
    drop(accepted_rx);
    drop(listeners);
    let open = proxy.max_sessions - proxy.sessions.available_permits();
    if open > 0 {
        eprintln!(
            "pg-entra proxy: stopping; waiting up to {} s for {open} open session(s)",
            grace.as_secs()
        );
        let all = u32::try_from(proxy.max_sessions).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(grace, proxy.sessions.acquire_many(all)).await;
        if drained.is_err() {
            eprintln!("pg-entra proxy: closing the sessions still open");
        }
    }
    eprintln!("pg-entra proxy: stopped");
    Ok(())
}

/// Starts a connection's task: it finds the peer's account, then serves an allowed one and
/// tells any other why not. Connections beyond the cap (sessions, plus room for clients still
/// sending their startup packet and for cancel requests) are closed at once.
fn admit(accepted: Accepted, proxy: &Arc<Proxy>, policy: &Admission) {
    let Ok(slot) = Arc::clone(&policy.connections).try_acquire_owned() else {
        tracing::warn!("too many connections open at once; closing a new one");
        return;
    };
    let (proxy, allowed, allow_remote) = (Arc::clone(proxy), policy.allowed, policy.allow_remote);
    let own_name = policy.own_name.clone();
    tokio::spawn(async move {
        let uid = accepted.owner().await;
        // An account found on this host decides; no account is a remote host, admitted only
        // when remote clients are allowed (a local client that closed is refused either way:
        // a loopback address is never taken for remote).
        let permitted = match uid {
            Some(uid) => allowed.permits(uid),
            None => allow_remote && accepted.is_remote(),
        };
        let from = accepted.describe(uid);
        let account = match uid {
            Some(uid) => tokio::task::spawn_blocking(move || listen::account_name(uid))
                .await
                .ok()
                .flatten()
                // Not in /etc/passwd (a directory service): this account's `USER`, if it is
                // this account.
                .or(own_name.filter(|_| allowed.is_own(uid))),
            None => None,
        };
        match accepted {
            Accepted::Tcp { stream, .. } => {
                stream.set_nodelay(true).ok();
                start(stream, permitted, proxy, account, from).await;
            }
            Accepted::Unix { stream, .. } => start(stream, permitted, proxy, account, from).await,
        }
        drop(slot);
    });
}

/// Who may connect, and how many at once.
struct Admission {
    allowed: Allowed,
    allow_remote: bool,
    /// Every open connection holds one.
    connections: Arc<Semaphore>,
    /// This account's login name, when `/etc/passwd` does not list it.
    own_name: Option<String>,
}

async fn start<S>(
    mut stream: S,
    permitted: bool,
    proxy: Arc<Proxy>,
    account: Option<String>,
    from: String,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if permitted {
        proxy.serve(stream, account, from).await;
        return;
    }
    use tokio::io::AsyncWriteExt as _;
    tracing::warn!(%from, "refused: another account");
    // Written at once: a client reads it as the answer to its first packet, as it reads a
    // server's refusal of a connection (libpq: "received invalid response to SSL
    // negotiation" when it asked for TLS, else the error itself).
    let refusal = reply::fatal(
        "28000",
        "pg-entra proxy: this proxy serves only the account that runs it (and root); connect as that account or run your own proxy",
        None,
    );
    let _ = stream.write_all(&refusal).await;
    let _ = stream.shutdown().await;
}

/// What the proxy does, on stdout: where it listens, where it logs in, as whom.
fn announce(
    listeners: &[Listener],
    upstream: &Upstream,
    users: &UserRule,
    token_user: Option<&str>,
    dbname: &str,
    ssl_mode: SslMode,
    remote: bool,
) {
    let mut places = Vec::new();
    for listener in listeners {
        match listener {
            Listener::Tcp(tcp) => {
                if let Ok(address) = tcp.local_addr() {
                    places.push(address.to_string());
                }
            }
            Listener::Unix(socket) => places.push(socket.path().display().to_string()),
        }
    }
    let servers: Vec<String> = upstream.targets().iter().map(ToString::to_string).collect();
    println!("pg-entra proxy: listening on {}", places.join(" and "));
    println!(
        "  server:   {} (sslmode={}, token in the password)",
        servers.join(", "),
        ssl_mode.as_str()
    );
    let token_user = token_user.unwrap_or("(none: the token names no user)");
    match users {
        UserRule::Fixed => println!("  user:     {token_user} for every session"),
        UserRule::ClientOrToken { .. } => println!(
            "  user:     {token_user} (from the token), or the role a client names other than its own login name"
        ),
    }
    println!("  database: {dbname}, or the one a client names");
    if remote {
        println!("  warning:  clients on other hosts are accepted: each logs in as this identity");
    }
    if let Some(Listener::Tcp(tcp)) = listeners.first()
        && let Ok(address) = tcp.local_addr()
    {
        println!(
            "  connect:  psql \"host={} port={} dbname={dbname}\"",
            address.ip(),
            address.port()
        );
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}

/// Session events and the library's (token refreshes) on stderr; `RUST_LOG` chooses
/// (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .try_init();
}
