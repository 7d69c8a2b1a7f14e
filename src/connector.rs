//! From settings and a credential to verified TLS connections with the token as password.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use azure_core::credentials::TokenCredential;
use postgres_native_tls::{MakeTlsConnector, TlsStream};
use tokio_postgres::config::LoadBalanceHosts;
use tokio_postgres::{Client, Socket};
use tracing::Instrument as _;

use crate::cache::TokenCache;
use crate::cache::registry::{self, CredentialKey};
use crate::cloud::Cloud;
use crate::conninfo::Settings;
use crate::credential::{CredentialOptions, DefaultAzureCredential};
use crate::environment::Environment;
use crate::error::{Error, Hinted};
use crate::jitter::unit_random;
use crate::observe;
use crate::refusal::Retry;
use crate::session_attrs::{self, TargetSessionAttrs};
use crate::tls::{LazyTls, SslMode};
use crate::token::Token;

/// Azure Database for PostgreSQL listens here.
const DEFAULT_PORT: u16 = 5432;
/// Entra roles are created in `postgres`; connecting to a database named after the role (the
/// libpq default) fails on a new server.
const DEFAULT_DBNAME: &str = "postgres";
/// The limit on one connection attempt to one host (DNS, TCP, TLS, startup and login) when
/// none is configured. libpq waits forever; a service holding a bearer token must not hang on a
/// server that accepted the connection and went silent. Azure answers in well under a second.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection half of [`Connector::connect_with_connection`]: poll it (usually by spawning
/// it) to drive the session.
pub type Connection = tokio_postgres::Connection<Socket, TlsStream<Socket>>;

/// Opens verified TLS connections to PostgreSQL with a cached Entra token as the password.
///
/// Built once, cloned cheaply (clones share the token cache). Each [`connect`](Self::connect)
/// or [`config`](Self::config) takes the current token from the cache, which refreshes it ahead
/// of expiry; a fresh token costs no I/O.
///
/// ```no_run
/// # async fn run() -> Result<(), pg_entra::Error> {
/// // PGHOST, PGUSER, ... from the environment; token from the managed identity.
/// let connector = pg_entra::Connector::from_env()?;
/// let client = connector.connect().await?;
/// let row = client.query_one("select current_user", &[]).await?;
/// let user: String = row.get(0);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    /// The merged settings, for the integrations that build their own connect options.
    #[cfg(feature = "sqlx")]
    settings: Settings,
    /// Everything but the password (and the user, when it comes from the token).
    base: tokio_postgres::Config,
    /// The same, one per host, in the order they are tried: each attempt gets its own
    /// `connect_timeout`, as in libpq.
    per_host: Vec<HostConfig>,
    connect_timeout: Duration,
    user_from_token: bool,
    /// The server name to append to user names (Single Server), if asked for.
    single_server: Option<String>,
    tokens: TokenCache,
    /// Built at the first connect, while the token is fetched.
    tls: LazyTls,
    ssl_mode: SslMode,
    /// The extra root certificate file (`sslrootcert`), as given.
    ssl_root_cert: Option<String>,
    /// The kind of server to reach (`target_session_attrs`).
    session_attrs: TargetSessionAttrs,
    /// A cache for the PostgreSQL resource the server named when it refused the configured
    /// scope's token, used from then on.
    named_resource: ArcSwapOption<TokenCache>,
    /// Every resource's cache a server has named, kept for their backoff.
    followed: std::sync::Mutex<Vec<TokenCache>>,
    /// The cloud the connector's scope belongs to.
    cloud: Cloud,
    /// The configurations with the current token's password and user, built once per token
    /// rather than once per connect.
    token_configs: ArcSwapOption<TokenConfigs>,
}

/// The connector's configurations with one token filled in.
struct TokenConfigs {
    /// The token they carry (compared by identity, not by value).
    token: Token,
    /// Every host, for [`Connector::config`].
    all_hosts: Arc<tokio_postgres::Config>,
    /// One per host, in the order of `ConnectorInner::per_host`.
    per_host: Vec<tokio_postgres::Config>,
}

impl Connector {
    /// A builder. It falls back on the process's libpq environment variables (`PGHOST`,
    /// `PGPORT`, `PGDATABASE`, `PGUSER`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGAPPNAME`,
    /// `PGCONNECT_TIMEOUT`, `PGOPTIONS`) for anything not set on it; see
    /// [`ConnectorBuilder::environment`].
    pub fn builder() -> ConnectorBuilder {
        ConnectorBuilder::default()
    }

    /// A connector configured entirely by the environment: libpq variables for the server, and
    /// a [`DefaultAzureCredential`] (service principal, workload identity, managed identity,
    /// Azure CLI, Azure Developer CLI) for the token.
    ///
    /// Build it once and clone it (clones share everything). Connectors that build their own
    /// credential chain, as this one does, still share one token cache per identity and scope
    /// in the process, keyed by the variables that choose the identity (`AZURE_CLIENT_ID`,
    /// `AZURE_TENANT_ID`, the endpoint variables, …, never a secret): a connector built per
    /// request, or one per server (a primary, its replicas, a PgBouncer in front), asks the
    /// identity endpoint once, not once each, and the IMDS probe is made once per process.
    /// A credential or token cache given to the builder is not shared this way.
    pub fn from_env() -> Result<Self, Error> {
        Self::builder().build()
    }

    /// A tokio-postgres configuration with the current token as password, for callers that
    /// connect themselves. Use it with [`tls_connector`](Self::tls_connector): its TLS mode is
    /// `require`, which only that connector makes verifying.
    ///
    /// The configuration is built once per token and shared: while the token is fresh this
    /// allocates nothing and costs a few nanoseconds. Clone it (`(*config).clone()`) to change
    /// it.
    pub async fn config(&self) -> Result<Arc<tokio_postgres::Config>, Error> {
        self.inner
            .tokens
            .with_token(|token| match self.inner.token_configs.load().as_deref() {
                Some(configs) if configs.token.is_same(token) => Ok(Arc::clone(&configs.all_hosts)),
                _ => Ok(Arc::clone(&self.configs_for(token)?.all_hosts)),
            })
            .await?
    }

    /// The configurations carrying `token`: the shared ones if they were built for it, else
    /// new ones, which replace them.
    fn configs_for(&self, token: &Token) -> Result<Arc<TokenConfigs>, Error> {
        if let Some(configs) = self.inner.token_configs.load_full()
            && configs.token.is_same(token)
        {
            return Ok(configs);
        }
        let per_host = self
            .inner
            .per_host
            .iter()
            .map(|host| self.with_credentials(&host.config, token))
            .collect::<Result<Vec<_>, Error>>()?;
        let configs = Arc::new(TokenConfigs {
            token: token.clone(),
            all_hosts: Arc::new(self.with_credentials(&self.inner.base, token)?),
            per_host,
        });
        self.inner.token_configs.store(Some(Arc::clone(&configs)));
        Ok(configs)
    }

    /// Connects and spawns the connection task on the current Tokio runtime. Connection errors
    /// after the handshake are logged with `tracing`.
    ///
    /// If the server refuses the login (SQLSTATE `28P01` or `28000`), the token is treated as
    /// revoked: the cache forces one refresh (rate-limited, see
    /// [`TokenCache::refresh_rejected`]) and the connect is retried once with the new token.
    /// No other error is retried.
    pub async fn connect(&self) -> Result<Client, Error> {
        let (client, connection, token) = self.connect_logged_in().await?;
        tokio::spawn(drive(connection, token));
        Ok(client)
    }

    /// Connects and returns the connection for the caller to drive. Retries a refused login
    /// once, as [`connect`](Self::connect) does.
    ///
    /// Driving it with `.await` lets tokio-postgres log the server's notices through the `log`
    /// crate as they come; [`connect`](Self::connect) instead logs them with `tracing`, and
    /// withholds any that quotes the token.
    pub async fn connect_with_connection(&self) -> Result<(Client, Connection), Error> {
        let (client, connection, _) = self.connect_logged_in().await?;
        Ok((client, connection))
    }

    /// A logged-in session and the token it logged in with. A refused login is retried once
    /// where a new token can cure it ([`LoginRefusal`](crate::LoginRefusal)): with a forced
    /// refresh, or with a token for the PostgreSQL resource the server names.
    /// A connect in its span, counted and timed.
    async fn connect_logged_in(&self) -> Result<(Client, Connection, Token), Error> {
        let (host, port) = self.hosts().next().unwrap_or(("", DEFAULT_PORT));
        let span = observe::connect_span(self.inner.base.get_dbname(), host, port);
        let started = std::time::Instant::now();
        let result = self.connect_retrying().instrument(span).await;
        observe::connected(observe::ConnectOutcome::of(&result), started.elapsed());
        result
    }

    /// Connects; retries a refused login once where a new token can help.
    async fn connect_retrying(&self) -> Result<(Client, Connection, Token), Error> {
        // A server that named its resource before is asked with a token for it at once.
        let named = self.inner.named_resource.load_full();
        let tokens = named.as_deref().unwrap_or(&self.inner.tokens);
        // The first connect builds the TLS connector (it parses the system's roots) while
        // the token request is under way, not before it.
        let (token, _) = tokio::join!(tokens.token(), self.build_tls_aside());
        let token = token?;
        let error = match self.connect_once(&token).await {
            Ok((client, connection)) => return Ok((client, connection, token)),
            Err(error) => error,
        };
        let refusal = error.login_refusal();
        if let Some(refusal) = &refusal {
            observe::login_refused(refusal);
        }
        let retry = match &error {
            // A server that repeats the password is not sent another token.
            Error::PostgresMessageWithheld { .. } => Retry::No,
            _ => refusal.map_or(Retry::No, |refusal| refusal.retry()),
        };
        match retry {
            Retry::No => Err(error),
            Retry::WithRefreshedToken => match tokens.refresh_rejected(&token).await {
                Ok(Some(next)) => {
                    tracing::info!(
                        %error,
                        "the server refused the token; retrying once with a new token"
                    );
                    let (client, connection) =
                        self.connect_once(&next).await.inspect_err(|error| {
                            if let Some(refusal) = error.login_refusal() {
                                observe::login_refused(&refusal);
                            }
                        })?;
                    Ok((client, connection, next))
                }
                Ok(None) => Err(error),
                Err(refresh_error) => {
                    tracing::warn!(%refresh_error, "cannot refresh the token the server refused");
                    Err(error)
                }
            },
            Retry::WithTokenFor(resource) => self.connect_for_resource(&resource, error).await,
        }
    }

    /// The server refused the token's audience and named `resource`: one token for it and
    /// one more try, if it is a PostgreSQL audience; never a token for anything else.
    async fn connect_for_resource(
        &self,
        resource: &str,
        refused: Error,
    ) -> Result<(Client, Connection, Token), Error> {
        if !self.may_follow(resource) {
            return Err(match refused {
                Error::Postgres { source } | Error::PoolerRefused { source, .. } => {
                    Error::UnexpectedResource {
                        resource: resource.to_owned(),
                        source,
                    }
                }
                other => other,
            });
        }
        let scope = format!("{resource}/.default");
        // One cache per followed resource, kept whatever the login's outcome: its backoff
        // holds across connects, so a refusal that repeats does not become a token request
        // per connect.
        let cache = {
            let mut followed = crate::lock::lock(&self.inner.followed);
            match followed.iter().find(|cache| cache.scope() == scope) {
                Some(cache) => cache.clone(),
                None => {
                    let cache = self.inner.tokens.for_scope(&scope)?;
                    followed.push(cache.clone());
                    cache
                }
            }
        };
        let token = cache.token().await?;
        let connected = self.connect_once(&token).await?;
        if self.inner.named_resource.load().is_none() {
            tracing::warn!(
                configured = self.inner.tokens.scope(),
                asked_for = %scope,
                "the server takes tokens for another resource than the configured scope; \
                 logging in with a token for it from now on: set the scope to it"
            );
        }
        self.inner.named_resource.store(Some(Arc::new(cache)));
        Ok((connected.0, connected.1, token))
    }

    fn with_credentials(
        &self,
        base: &tokio_postgres::Config,
        token: &Token,
    ) -> Result<tokio_postgres::Config, Error> {
        let mut config = base.clone();
        if self.inner.user_from_token {
            config.user(self.user_for(token)?);
        }
        config.password(token.secret());
        Ok(config)
    }

    /// The role a login with `token` uses: the one configured, else the name the token's
    /// claims imply ([`Token::username`]), with the Single Server suffix when asked for. An
    /// error when neither exists (a service principal's token with no user configured).
    pub fn user_for(&self, token: &Token) -> Result<String, Error> {
        match self.inner.base.get_user() {
            Some(user) if !self.inner.user_from_token => Ok(user.to_owned()),
            _ => Ok(single_server_user(
                token.require_username()?,
                self.inner.single_server.as_deref(),
            )
            .into_owned()),
        }
    }

    /// Whether a server that names `resource` may be sent a token for it: only an Azure
    /// Database for PostgreSQL audience of the connector's cloud, and, when a host name tells
    /// its server kind, only that kind's. A server can then not collect a token for another
    /// kind (or cloud) of PostgreSQL than the one it is.
    fn may_follow(&self, resource: &str) -> bool {
        if Cloud::of_postgres_resource(resource) != Some(self.inner.cloud) {
            return false;
        }
        let known: Vec<&str> = self
            .inner
            .per_host
            .iter()
            .filter_map(|host| Cloud::server_scope(&host.host))
            .collect();
        known.is_empty()
            || known
                .iter()
                .any(|scope| scope.strip_suffix("/.default") == Some(resource))
    }

    /// The settings the connector was built from (defaults not filled in).
    #[cfg(feature = "sqlx")]
    pub(crate) fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Each host and its port, in the order given.
    pub(crate) fn hosts(&self) -> impl Iterator<Item = (&str, u16)> {
        self.inner
            .per_host
            .iter()
            .map(|host| (host.host.as_str(), host.port))
    }

    /// The database (after defaults).
    #[cfg(feature = "sqlx")]
    pub(crate) fn dbname(&self) -> &str {
        self.inner.base.get_dbname().unwrap_or(DEFAULT_DBNAME)
    }

    /// Tries each host in turn, each attempt bounded as a whole (DNS, TCP, TLS, startup,
    /// login, and the `target_session_attrs` check) by the connect timeout; the last host's
    /// error is returned. `prefer-standby` goes over the hosts twice, as libpq does: for a
    /// standby, then for any server.
    async fn connect_once(&self, token: &Token) -> Result<(Client, Connection), Error> {
        let configs = self.configs_for(token)?;
        let order = self.host_order(&configs);
        let mut failed = FailedAttempts::default();
        for &standby in self.inner.session_attrs.passes() {
            for &(host, config) in &order {
                tracing::debug!(
                    host = %host.host,
                    port = host.port,
                    user = config.get_user().unwrap_or("-"),
                    "connecting to PostgreSQL with an access token"
                );
                let attempt = self
                    .connect_host(host, config, token, standby)
                    .instrument(observe::attempt_span(&host.host, host.port));
                let error = match tokio::time::timeout(self.inner.connect_timeout, attempt).await {
                    Ok(Ok(connected)) => return Ok(connected),
                    Ok(Err(error)) if !timed_out(&error) => error,
                    // tokio-postgres's own timer on the TCP connect (the same limit, set on
                    // its configuration) fires first when packets are dropped: the same
                    // limit, reported as the same error.
                    Ok(Err(_)) | Err(_) => Error::ConnectTimeout {
                        host: host.host.clone(),
                        port: host.port,
                        timeout: self.inner.connect_timeout,
                    },
                };
                tracing::debug!(host = %host.host, port = host.port, %error, "connection attempt failed");
                failed.record(error);
            }
        }
        Err(failed.into_error())
    }

    /// Builds the TLS connector on the blocking pool, if not built yet; its errors come back
    /// from the connect that needs it.
    async fn build_tls_aside(&self) {
        if self.inner.tls.is_built() {
            return;
        }
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.inner.tls.get()).await;
    }

    /// One attempt at one host; with `standby` set, the server must (`true`) or must not
    /// (`false`) be in recovery.
    async fn connect_host(
        &self,
        host: &HostConfig,
        config: &tokio_postgres::Config,
        token: &Token,
        standby: Option<bool>,
    ) -> Result<(Client, Connection), Error> {
        let (client, mut connection) =
            config
                .connect(self.inner.tls.get()?)
                .await
                .map_err(|error| {
                    name_mismatch_advice(Error::from_login(error, token.secret()), &host.host)
                })?;
        if let Some(wanted) = standby {
            let in_recovery = session_attrs::in_recovery(&client, &mut connection, token).await?;
            if in_recovery != wanted {
                return Err(Error::SessionAttrsNotMet {
                    host: host.host.clone(),
                    port: host.port,
                    wanted: self.inner.session_attrs,
                    standby: in_recovery,
                });
            }
        }
        Ok((client, connection))
    }

    /// The kind of server connections must reach (`target_session_attrs`; default `any`).
    pub fn target_session_attrs(&self) -> TargetSessionAttrs {
        self.inner.session_attrs
    }

    /// The verifying TLS connector (system roots plus `PGSSLROOTCERT`), built at the first
    /// connect or call: the system roots alone are parsed once per process, and shared.
    ///
    /// # Errors
    /// [`Error::Tls`] when the TLS library cannot be set up.
    pub fn tls_connector(&self) -> Result<MakeTlsConnector, Error> {
        self.inner.tls.get()
    }

    /// The token cache, shared by all clones of this connector.
    pub fn token_cache(&self) -> &TokenCache {
        &self.inner.tokens
    }

    /// Each host with its configuration carrying `token`, in the order a connect tries them
    /// (shuffled for `load_balance_hosts=random`): for the blocking stacks, which make their
    /// own attempts.
    #[cfg(feature = "postgres-sync")]
    pub(crate) fn hosts_with(
        &self,
        token: &Token,
    ) -> Result<Vec<(String, u16, tokio_postgres::Config)>, Error> {
        let configs = self.configs_for(token)?;
        Ok(self
            .host_order(&configs)
            .into_iter()
            .map(|(host, config)| (host.host.clone(), host.port, config.clone()))
            .collect())
    }

    /// The hosts in the order they are tried: as given, or shuffled for
    /// `load_balance_hosts=random`.
    fn host_order<'a>(
        &'a self,
        configs: &'a TokenConfigs,
    ) -> Vec<(&'a HostConfig, &'a tokio_postgres::Config)> {
        let mut order: Vec<(&HostConfig, &tokio_postgres::Config)> =
            self.inner.per_host.iter().zip(&configs.per_host).collect();
        if self.inner.base.get_load_balance_hosts() == LoadBalanceHosts::Random {
            // Fisher-Yates with the crate's jitter source, as tokio-postgres shuffles its hosts.
            for i in (1..order.len()).rev() {
                let j = ((unit_random() * (i + 1) as f64) as usize).min(i);
                order.swap(i, j);
            }
        }
        order
    }

    /// The limit on one connection attempt to one host.
    #[cfg(any(
        feature = "diesel-async",
        feature = "postgres-sync",
        feature = "diesel-sync"
    ))]
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.inner.connect_timeout
    }

    /// The root certificate file given as `sslrootcert` (or `PGSSLROOTCERT`), as given: a
    /// path, or libpq's keyword `system`. Its certificates are trusted besides the system's
    /// roots. `None` when none was given.
    pub fn ssl_root_cert(&self) -> Option<&str> {
        self.inner.ssl_root_cert.as_deref()
    }

    /// The TLS mode asked for (all of them verify; see [`SslMode`]).
    pub fn ssl_mode(&self) -> SslMode {
        self.inner.ssl_mode
    }

    /// The configuration every connection starts from: hosts, ports, database, the user when
    /// one was configured, application name, connect timeout. It holds no password, and its
    /// TLS mode is `require` (verification is the [`tls_connector`](Self::tls_connector)'s).
    pub fn base_config(&self) -> &tokio_postgres::Config {
        &self.inner.base
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio_postgres::Config's Debug redacts the password; the base has none anyway.
        f.debug_struct("Connector")
            .field("config", &self.inner.base)
            .field("user_from_token", &self.inner.user_from_token)
            .field("ssl_mode", &self.inner.ssl_mode)
            .field("tokens", &self.inner.tokens)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Connector`].
///
/// Values set here beat the connection string, which beats the environment.
#[derive(Default)]
pub struct ConnectorBuilder {
    explicit: Settings,
    conninfo: Option<String>,
    environment: Environment,
    credential: Option<Arc<dyn TokenCredential>>,
    token_cache: Option<TokenCache>,
    scope: Option<String>,
    cloud: Option<Cloud>,
    single_server: bool,
}

impl fmt::Debug for ConnectorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection string is not shown: it may hold a password (refused by `build`, but
        // not before someone prints the builder).
        f.debug_struct("ConnectorBuilder")
            .field("settings", &self.explicit)
            .field(
                "connection_string",
                &self.conninfo.as_ref().map(|_| "<not shown>"),
            )
            .field("environment", &self.environment)
            .field("credential", &self.credential)
            .field("token_cache", &self.token_cache)
            .field("scope", &self.scope)
            .field("cloud", &self.cloud)
            .field("single_server", &self.single_server)
            .finish()
    }
}

impl ConnectorBuilder {
    /// A `postgresql://` URL or libpq `key=value` string, read exactly as libpq reads it;
    /// parsed by [`build`](Self::build), which refuses a keyword libpq does not know, a
    /// password, a Unix socket, a plaintext `sslmode` and the libpq features this crate cannot
    /// use (see the README's configuration section).
    pub fn connection_string(mut self, conninfo: impl Into<String>) -> Self {
        self.conninfo = Some(conninfo.into());
        self
    }

    /// The server's host name (one; for several, use a connection string).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.explicit.hosts = Some(vec![host.into()]);
        self
    }

    /// The server's port (default 5432).
    pub fn port(mut self, port: u16) -> Self {
        self.explicit.ports = Some(vec![Some(port)]);
        self
    }

    /// The database (default `postgres`).
    pub fn dbname(mut self, dbname: impl Into<String>) -> Self {
        self.explicit.dbname = Some(dbname.into());
        self
    }

    /// The PostgreSQL role: the Entra principal's name. Without it (here, in the connection
    /// string or in `PGUSER`) the name is derived from each token's claims.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.explicit.user = Some(user.into());
        self
    }

    /// The TLS mode (default [`SslMode::VerifyFull`]).
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.explicit.ssl_mode = Some(mode);
        self
    }

    /// An extra trusted root certificate file (PEM bundle or DER), like `PGSSLROOTCERT`;
    /// `system` for the system roots only.
    pub fn ssl_root_cert(mut self, path: impl Into<String>) -> Self {
        self.explicit.ssl_root_cert = Some(path.into());
        self
    }

    /// The `application_name` the server shows in `pg_stat_activity`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.explicit.application_name = Some(name.into());
        self
    }

    /// The limit on one connection attempt to one host, as a whole: DNS, TCP, the TLS request
    /// and handshake, startup and login (default 30 s; `PGCONNECT_TIMEOUT` or
    /// `connect_timeout` in the connection string; 0 there means the default, not forever).
    /// With several hosts, each gets this long, as in libpq.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.explicit.connect_timeout = Some(Some(timeout));
        self
    }

    /// Where libpq variables and the default credential's variables are read (default: the
    /// process environment). [`Environment::empty`] ignores the environment.
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = environment;
        self
    }

    /// The credential to get tokens from (default: [`DefaultAzureCredential`] from the
    /// builder's environment, for the server's cloud; pass an
    /// [`ImdsCredential`](crate::credential::ImdsCredential) to use IMDS alone).
    pub fn credential(mut self, credential: Arc<dyn TokenCredential>) -> Self {
        self.credential = Some(credential);
        self
    }

    /// A token cache to use (and share with other connectors) instead of a new one. Its
    /// credential and scope are used as they are.
    pub fn token_cache(mut self, cache: TokenCache) -> Self {
        self.token_cache = Some(cache);
        self
    }

    /// Azure Database for PostgreSQL Single Server (retiring) wants user names as
    /// `<name>@<servername>`: when set, `@` and the host's first label are appended to the user
    /// name (given or from the token) unless it already contains `@`. Flexible Server and
    /// Cosmos DB for PostgreSQL take the plain name (the default).
    pub fn single_server(mut self, enabled: bool) -> Self {
        self.single_server = enabled;
        self
    }

    /// The token scope. Default: the scope of the cloud the host name belongs to
    /// ([`Cloud::from_host`]), else the public cloud's.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// The cloud whose scope to use, when the host name does not tell (a custom DNS name).
    pub fn cloud(mut self, cloud: Cloud) -> Self {
        self.cloud = Some(cloud);
        self
    }

    /// Checks the settings and builds the connector. Reads the root certificate file; does
    /// no network I/O.
    pub fn build(self) -> Result<Connector, Error> {
        let from_conninfo = match &self.conninfo {
            Some(conninfo) => Settings::parse(conninfo)?,
            None => Settings::default(),
        };
        let settings = self
            .explicit
            .over(from_conninfo)
            .over(Settings::from_env(&self.environment)?);

        let hosts = settings.hosts.clone().unwrap_or_default();
        if hosts.is_empty() || hosts.iter().any(|h| h.is_empty()) {
            return Err(Error::missing(
                "host",
                "no server host: set PGHOST, a host in the connection string, or the builder's host",
            ));
        }
        for host in &hosts {
            // libpq reads a comma as a list, and an empty item as the default Unix socket.
            if host.contains(',') {
                return Err(Error::invalid(
                    "host",
                    format!(
                        "{host:?} holds a comma: the builder takes one host name; give several \
                         in a connection string (host=a,b)"
                    ),
                ));
            }
            if host.starts_with('/') || host.starts_with('@') {
                return Err(Error::unsupported(
                    "host",
                    format!(
                        "{host:?} is a Unix-domain socket, which cannot carry TLS; use the server's \
                     host name"
                    ),
                ));
            }
        }
        let ports: Vec<u16> = settings
            .ports
            .clone()
            .unwrap_or_else(|| vec![None])
            .into_iter()
            .map(|port| port.unwrap_or(DEFAULT_PORT))
            .collect();
        if ports.len() != 1 && ports.len() != hosts.len() {
            return Err(Error::conflict(
                "port",
                format!(
                    "{} ports for {} hosts: give one port, or one per host",
                    ports.len(),
                    hosts.len()
                ),
            ));
        }
        let port_of = |index: usize| ports.get(index).copied().unwrap_or(ports[0]);
        // Single Server wants `<name>@<server>`; the server is the host's first label.
        let single_server = match self.single_server {
            false => None,
            true => Some(hosts[0].split('.').next().unwrap_or_default().to_owned()),
        };
        let connect_timeout = settings
            .connect_timeout
            .flatten()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let hostaddrs = settings.hostaddrs.clone().unwrap_or_default();
        if !hostaddrs.is_empty() && hostaddrs.len() != hosts.len() {
            return Err(Error::conflict(
                "hostaddr",
                format!(
                    "{} host addresses for {} hosts: give one hostaddr per host",
                    hostaddrs.len(),
                    hosts.len()
                ),
            ));
        }
        // Everything but hosts, ports and host addresses, the same for every host.
        let common = || {
            let mut config = tokio_postgres::Config::new();
            settings.apply(&mut config);
            config.dbname(
                settings
                    .dbname
                    .as_deref()
                    .filter(|name| !name.is_empty())
                    .unwrap_or(DEFAULT_DBNAME),
            );
            if let Some(user) = &settings.user {
                config.user(single_server_user(user, single_server.as_deref()));
            }
            config.connect_timeout(connect_timeout);
            // Verification happens in the TLS connector; `require` makes tokio-postgres refuse
            // a server that will not do TLS, before anything else is sent.
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            config
        };
        let mut base = common();
        let mut per_host = Vec::with_capacity(hosts.len());
        for (index, host) in hosts.iter().enumerate() {
            base.host(host);
            let mut config = common();
            config.host(host).port(port_of(index));
            if let Some(address) = hostaddrs.get(index) {
                base.hostaddr(*address);
                config.hostaddr(*address);
            }
            per_host.push(HostConfig {
                host: host.clone(),
                port: port_of(index),
                config,
            });
        }
        for port in &ports {
            base.port(*port);
        }
        let ssl_mode = settings.ssl_mode.unwrap_or_default();
        let tls = LazyTls::new(settings.ssl_root_cert.as_deref())?;

        let connector_cloud = self
            .cloud
            .or_else(|| hosts.iter().find_map(|h| Cloud::from_host(h)))
            .unwrap_or_default();
        let tokens = match (self.token_cache, self.credential) {
            (Some(_), Some(_)) => {
                return Err(Error::conflict(
                    "credential",
                    "give either a credential or a token cache, not both",
                ));
            }
            (Some(cache), None) => cache,
            (None, credential) => {
                let cloud = connector_cloud;
                // The server kind's own scope (Cosmos DB for PostgreSQL has one), unless a
                // scope was chosen, or a cloud the host does not belong to.
                let scope = self.scope.unwrap_or_else(|| {
                    let by_host = hosts.iter().find_map(|h| {
                        Cloud::server_scope(h)
                            .filter(|_| self.cloud.is_none_or(|c| Cloud::from_host(h) == Some(c)))
                    });
                    by_host.unwrap_or(cloud.scope()).to_owned()
                });
                let scope = crate::credential::normalize_scope(&scope)?;
                match credential {
                    // A credential given is the caller's to share.
                    Some(credential) => TokenCache::builder(credential).scope(scope).build()?,
                    // The default chain: one cache per identity and scope in the process.
                    None => {
                        let key =
                            CredentialKey::for_default_chain(&self.environment, cloud, &scope);
                        registry::shared(key, || {
                            let chain = DefaultAzureCredential::builder()
                                .options(
                                    CredentialOptions::default()
                                        .environment(self.environment.clone())
                                        .cloud(cloud),
                                )
                                .build()?;
                            let chain = Arc::new(chain);
                            let named = Arc::clone(&chain);
                            TokenCache::builder(chain)
                                .scope(scope.clone())
                                .credential_name("DefaultAzureCredential")
                                .credential_name_from(Arc::new(move || named.selected_credential()))
                                .build()
                        })?
                    }
                }
            }
        };

        Ok(Connector {
            inner: Arc::new(ConnectorInner {
                base,
                per_host,
                connect_timeout,
                user_from_token: settings.user.is_none(),
                single_server,
                tokens,
                tls,
                ssl_mode,
                ssl_root_cert: settings.ssl_root_cert.clone(),
                session_attrs: settings.target_session_attrs.unwrap_or_default(),
                named_resource: ArcSwapOption::empty(),
                followed: std::sync::Mutex::new(Vec::new()),
                cloud: connector_cloud,
                token_configs: ArcSwapOption::empty(),
                // Last: the fields above read it.
                #[cfg(feature = "sqlx")]
                settings,
            }),
        })
    }
}

/// Whether a connect failed on a timeout of its own socket (`ETIMEDOUT`: tokio-postgres's
/// connect timer, or the kernel giving up on a peer that does not answer).
fn timed_out(error: &Error) -> bool {
    matches!(error, Error::Postgres { source } if socket_timed_out(source))
}

/// Whether a tokio-postgres error is a socket's timeout (its connect timer, the kernel's).
pub(crate) fn socket_timed_out(error: &tokio_postgres::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|cause| cause.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
}

/// A certificate refused for its name when `host` is an address or a `privatelink.` name:
/// Azure's certificates cover `*.postgres.database.azure.com` only, so the advice is libpq's
/// way, the server's name in `host` and the address in `hostaddr`, not another root file.
pub(crate) fn name_mismatch_advice(error: Error, host: &str) -> Error {
    let private = host.parse::<std::net::IpAddr>().is_ok()
        || host.to_ascii_lowercase().contains(".privatelink.");
    match error {
        Error::Tls { message, source }
            if private && message.to_ascii_lowercase().contains("mismatch") =>
        {
            let mut hinted = Hinted::new(
                format!("the certificate does not name {host}"),
                "keep the server's own name in host (<server>.postgres.database.azure.com) and \
                 put the address in hostaddr, as libpq does (PGHOSTADDR, or hostaddr= in the \
                 connection string); Azure's certificates name *.postgres.database.azure.com, \
                 not addresses or privatelink names",
            );
            if let Some(source) = source {
                hinted = hinted.caused_by(BoxedError(source));
            }
            Error::Tls {
                message,
                source: Some(Box::new(hinted)),
            }
        }
        other => other,
    }
}

/// A boxed error as an error of its own, to be a source again.
#[derive(Debug)]
struct BoxedError(Box<dyn std::error::Error + Send + Sync>);

impl fmt::Display for BoxedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BoxedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Drives a session's connection until it ends. The server's notices are logged with
/// `tracing` (tokio-postgres would log them through `log`, unexamined), and a notice or an
/// error that quotes the token the session logged in with is withheld.
/// Logs a server notice through `tracing`, withheld when it quotes the token.
pub(crate) fn log_notice(notice: &tokio_postgres::error::DbError, token: &Token) {
    let severity = notice.severity();
    let code = notice.code().code();
    if crate::redact::echoes(&format!("{notice:?}"), token.secret()) {
        tracing::warn!(
            %severity,
            %code,
            "the server sent a notice that quoted the access token; withheld"
        );
    } else {
        tracing::info!(%severity, %code, message = notice.message(), "PostgreSQL notice");
    }
}

async fn drive(mut connection: Connection, token: Token) {
    use futures_util::StreamExt as _;
    use tokio_postgres::AsyncMessage;

    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notice(notice)) => log_notice(&notice, &token),
            Ok(_) => {}
            Err(error) => {
                if crate::redact::echoes(&format!("{error}\n{error:?}"), token.secret()) {
                    tracing::warn!(
                        "PostgreSQL connection ended with an error that quoted the access token; withheld"
                    );
                } else {
                    tracing::warn!(%error, "PostgreSQL connection ended with an error");
                }
                return;
            }
        }
    }
}

/// One host's settings, tried on its own.
struct HostConfig {
    host: String,
    port: u16,
    config: tokio_postgres::Config,
}

/// `name@server` for Single Server, unless the name already ends with `@server` (any case).
/// Its gateway strips only the last `@server`, so an Entra user's UPN keeps its own `@`:
/// `alice@contoso.com` logs in as `alice@contoso.com@mysrv`.
fn single_server_user<'a>(name: &'a str, server: Option<&str>) -> std::borrow::Cow<'a, str> {
    match server {
        Some(server) if !ends_with_server(name, server) => format!("{name}@{server}").into(),
        _ => name.into(),
    }
}

/// Whether `name` already ends with `@server`, ASCII case ignored (host names are).
pub(crate) fn ends_with_server(name: &str, server: &str) -> bool {
    let suffix_len = server.len() + 1;
    name.len() > suffix_len
        && name.is_char_boundary(name.len() - suffix_len)
        && name[name.len() - suffix_len..].starts_with('@')
        && name[name.len() - server.len()..].eq_ignore_ascii_case(server)
}

/// The failed host attempts of one connect, for the error it returns once every host failed.
#[derive(Default)]
pub(crate) struct FailedAttempts {
    refused: Option<Error>,
    last: Option<Error>,
}

impl FailedAttempts {
    /// Keeps `error`. The first refused login outranks what later hosts say: it is what a
    /// new token can cure, and what the caller's retry reads.
    pub(crate) fn record(&mut self, error: Error) {
        if self.refused.is_none() && error.login_refusal().is_some() {
            self.refused = Some(error);
        } else {
            self.last = Some(error);
        }
    }

    /// The first refused login, else the last error.
    pub(crate) fn into_error(self) -> Error {
        self.refused
            .or(self.last)
            .unwrap_or_else(|| Error::missing("host", "no server host"))
    }
}

#[cfg(test)]
mod tests {

    /// A connector's first token, from a plain-HTTP identity endpoint, sets up no TLS: the
    /// TLS connector waits for the connect that needs it.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn a_token_over_plain_http_sets_up_no_tls() {
        let endpoint = crate::testing::IdentityEndpoint::builder()
            .principal(crate::testing::Principal::system_assigned("orders-vm"))
            .start()
            .await
            .unwrap();
        let connector = Connector::builder()
            .environment(Environment::from_vars([
                ("PGHOST", "localhost"),
                (
                    crate::credential::vars::POD_IDENTITY_AUTHORITY_HOST_VAR,
                    endpoint.authority_host().as_str(),
                ),
            ]))
            .build()
            .unwrap();
        connector.token_cache().token().await.unwrap();
        assert!(!connector.inner.tls.is_built());
        connector.tls_connector().unwrap();
        assert!(connector.inner.tls.is_built());
    }

    use super::*;
    use crate::cloud::{CHINA_SCOPE, PUBLIC_SCOPE, US_GOVERNMENT_SCOPE};

    fn build(
        env: &[(&str, &str)],
        configure: impl FnOnce(ConnectorBuilder) -> ConnectorBuilder,
    ) -> Result<Connector, Error> {
        configure(Connector::builder().environment(Environment::from_vars(env.iter().copied())))
            .build()
    }

    #[test]
    fn builder_debug_never_shows_the_connection_string() {
        let builder = Connector::builder()
            .connection_string("postgresql://app:hunter2@srv.postgres.database.azure.com/db")
            .connection_string("host=h password='s3cret pass'");
        let debug = format!("{builder:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<not shown>"), "{debug}");
        // And building refuses the password without repeating it.
        let error = builder.build().unwrap_err().to_string();
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn connect_timeout_defaults_and_zero_means_the_default() {
        let timeout = |vars: &[(&str, &str)]| build(vars, |b| b).unwrap().inner.connect_timeout;
        assert_eq!(timeout(&[("PGHOST", "h")]), DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(
            timeout(&[("PGHOST", "h"), ("PGCONNECT_TIMEOUT", "0")]),
            DEFAULT_CONNECT_TIMEOUT
        );
        assert_eq!(
            timeout(&[("PGHOST", "h"), ("PGCONNECT_TIMEOUT", "7")]),
            Duration::from_secs(7)
        );
        let per_host = build(&[("PGHOST", "a,b"), ("PGPORT", "1,2")], |b| b).unwrap();
        let targets: Vec<_> = per_host
            .inner
            .per_host
            .iter()
            .map(|h| (h.host.as_str(), h.port, h.config.get_hosts().len()))
            .collect();
        assert_eq!(targets, [("a", 1, 1), ("b", 2, 1)]);
    }

    #[test]
    fn single_server_user_names() {
        let user = |pguser: &str, single: bool| {
            let connector = build(
                &[
                    ("PGHOST", "mysrv.postgres.database.azure.com"),
                    ("PGUSER", pguser),
                ],
                |b| b.single_server(single),
            )
            .unwrap();
            connector.inner.base.get_user().unwrap().to_owned()
        };
        assert_eq!(user("reporting-app", true), "reporting-app@mysrv");
        assert_eq!(user("reporting-app@mysrv", true), "reporting-app@mysrv");
        assert_eq!(user("reporting-app", false), "reporting-app");
        // Names from tokens get the same treatment.
        assert_eq!(single_server_user("my-vm", Some("mysrv")), "my-vm@mysrv");
        // The gateway strips only the last `@mysrv`: a UPN keeps its own `@`.
        for (name, login) in [
            ("alice@contoso.com", "alice@contoso.com@mysrv"),
            ("alice@contoso.com@mysrv", "alice@contoso.com@mysrv"),
            ("alice@contoso.com@MYSRV", "alice@contoso.com@MYSRV"),
            (
                "alice_contoso.com#EXT#@fabrikam.onmicrosoft.com",
                "alice_contoso.com#EXT#@fabrikam.onmicrosoft.com@mysrv",
            ),
            ("@mysrv", "@mysrv@mysrv"),
            ("x@mysrv2", "x@mysrv2@mysrv"),
        ] {
            assert_eq!(single_server_user(name, Some("mysrv")), login, "{name}");
        }
        assert_eq!(single_server_user("my-vm", None), "my-vm");
    }

    #[test]
    fn cosmos_db_hosts_use_their_own_scope() {
        let connector = build(
            &[("PGHOST", "c-cluster.abc123.postgres.cosmos.azure.com")],
            |b| b,
        )
        .unwrap();
        assert_eq!(
            connector.token_cache().scope(),
            "https://token.postgres.cosmos.azure.com/.default"
        );
        // A scope given in any form is the same scope; a wrong one is refused at build.
        for given in [
            "https://ossrdbms-aad.database.windows.net",
            "https://ossrdbms-aad.database.windows.net/",
            "https://ossrdbms-aad.database.windows.net/.default",
        ] {
            let connector = build(&[("PGHOST", "h")], |b| b.scope(given)).unwrap();
            assert_eq!(connector.token_cache().scope(), PUBLIC_SCOPE, "{given}");
        }
        // A cloud chosen that the Cosmos host belongs to keeps Cosmos's scope.
        let chosen = build(
            &[("PGHOST", "c-cluster.abc123.postgres.cosmos.azure.com")],
            |b| b.cloud(Cloud::Public),
        )
        .unwrap();
        assert_eq!(
            chosen.token_cache().scope(),
            "https://token.postgres.cosmos.azure.com/.default"
        );
        let wrong = build(&[("PGHOST", "h")], |b| b.scope("ossrdbms-aad")).unwrap_err();
        assert!(
            wrong
                .to_string()
                .contains("https://ossrdbms-aad.database.windows.net/.default"),
            "{wrong}"
        );
    }

    #[test]
    fn builder_beats_connection_string_beats_environment() {
        let connector = build(
            &[
                ("PGHOST", "env.postgres.database.azure.com"),
                ("PGUSER", "env-user"),
                ("PGDATABASE", "envdb"),
            ],
            |b| {
                b.connection_string("user=url-user port=6432")
                    .user("explicit")
            },
        )
        .unwrap();
        let base = &connector.inner.base;
        assert_eq!(base.get_user(), Some("explicit"));
        assert_eq!(base.get_ports(), [6432]);
        assert_eq!(base.get_dbname(), Some("envdb"));
        assert!(!connector.inner.user_from_token);
        assert_eq!(
            base.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn defaults_and_user_from_token() {
        let connector = build(&[("PGHOST", "srv.postgres.database.azure.com")], |b| b).unwrap();
        assert_eq!(connector.inner.base.get_dbname(), Some(DEFAULT_DBNAME));
        assert_eq!(connector.inner.base.get_ports(), [DEFAULT_PORT]);
        assert!(connector.inner.user_from_token);
        assert_eq!(connector.ssl_mode(), SslMode::VerifyFull);
    }

    #[test]
    fn missing_host_and_unix_sockets_are_explained() {
        let none = build(&[], |b| b).unwrap_err();
        assert!(none.to_string().contains("PGHOST"), "{none}");
        let socket = build(&[("PGHOST", "/var/run/postgresql")], |b| b).unwrap_err();
        assert!(socket.to_string().contains("cannot carry TLS"), "{socket}");
        // A list smuggled through the one-host setter (libpq would read `srv,` as `srv` and
        // the default Unix socket).
        for host in ["srv,", "srv,/tmp", "srv,@x", "a,b"] {
            let error = build(&[], |b| b.host(host)).unwrap_err();
            assert!(error.to_string().contains("holds a comma"), "{error}");
        }
        let empty = build(&[("PGHOST", "srv,")], |b| b).unwrap_err();
        assert!(empty.to_string().contains("no server host"), "{empty}");
    }

    /// A root certificate file that is a FIFO (with no writer) or a device: refused at once,
    /// not waited on or read for ever.
    #[cfg(unix)]
    #[test]
    fn a_root_file_that_is_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("roots.pem");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for (file, says) in [
            (fifo.to_str().unwrap(), "it is a FIFO"),
            ("/dev/zero", "it is a character device"),
        ] {
            let error = build(&[("PGHOST", "h"), ("PGSSLROOTCERT", file)], |b| b).unwrap_err();
            assert!(error.to_string().contains(says), "{error}");
        }
    }

    #[test]
    fn plaintext_is_refused_from_every_source() {
        assert!(matches!(
            build(&[("PGHOST", "h"), ("PGSSLMODE", "disable")], |b| b).unwrap_err(),
            Error::TlsRequired { .. }
        ));
        assert!(matches!(
            build(&[("PGHOST", "h")], |b| b
                .connection_string("sslmode=prefer"))
            .unwrap_err(),
            Error::TlsRequired { .. }
        ));
    }

    #[test]
    fn scope_follows_the_cloud_of_the_host_unless_set() {
        let scope_for = |host: &str| {
            build(&[("PGHOST", host)], |b| b)
                .unwrap()
                .token_cache()
                .scope()
                .to_owned()
        };
        assert_eq!(scope_for("a.postgres.database.azure.com"), PUBLIC_SCOPE);
        assert_eq!(
            scope_for("a.postgres.database.usgovcloudapi.net"),
            US_GOVERNMENT_SCOPE
        );
        assert_eq!(
            scope_for("a.postgres.database.chinacloudapi.cn"),
            CHINA_SCOPE
        );
        assert_eq!(scope_for("db.internal.example"), PUBLIC_SCOPE);
        let explicit = build(
            &[("PGHOST", "a.postgres.database.usgovcloudapi.net")],
            |b| b.scope("api://custom/.default"),
        )
        .unwrap();
        assert_eq!(explicit.token_cache().scope(), "api://custom/.default");
        let by_cloud = build(&[("PGHOST", "db.internal.example")], |b| {
            b.cloud(Cloud::China)
        })
        .unwrap();
        assert_eq!(by_cloud.token_cache().scope(), CHINA_SCOPE);
    }

    #[test]
    fn libpq_options_reach_tokio_postgres_as_typed_fields() {
        let connector = build(
            &[("PGHOST", "h"), ("PGTARGETSESSIONATTRS", "read-write")],
            |b| {
                b.connection_string(
                    "keepalives_idle=45 keepalives_count=3 tcp_user_timeout=1500 \
                 fallback_application_name=fallback options='-c search_path=app'",
                )
            },
        )
        .unwrap();
        let base = &connector.inner.base;
        assert_eq!(base.get_keepalives_idle(), Duration::from_secs(45));
        assert_eq!(base.get_keepalives_retries(), Some(3));
        assert_eq!(
            base.get_tcp_user_timeout(),
            Some(&Duration::from_millis(1500))
        );
        assert_eq!(base.get_application_name(), Some("fallback"));
        assert_eq!(base.get_options(), Some("-c search_path=app"));
        assert_eq!(
            base.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        let unknown =
            build(&[("PGHOST", "h")], |b| b.connection_string("frobnicate=1")).unwrap_err();
        assert!(unknown.to_string().contains("\"frobnicate\""), "{unknown}");
    }
}
