//! sqlx 0.9: connect options with the token as password, and a pool that follows the token.
//!
//! sqlx has no per-connection password hook: its pool opens every new connection with the
//! options it holds. [`SqlxPool`] keeps those options in step with the connector's
//! [`TokenCache`](crate::TokenCache): a task listens for each new token and hands the pool
//! options carrying it, and the cache refreshes ahead of expiry on a timer while the pool
//! lives (as [`background_refresh`](crate::cache::TokenCacheBuilder::background_refresh)
//! does), so a connect never waits on the identity endpoint while the token is fresh, and
//! nobody polls.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use sqlx::postgres::PgPoolOptions;
//!
//! let connector = pg_entra::Connector::from_env()?;
//! let pool = connector.sqlx_pool(PgPoolOptions::new().max_connections(8)).await?;
//! let user: String = sqlx::query_scalar("select current_user")
//!     .fetch_one(&mut *pool.acquire().await?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # What carries over from the connector
//! One host and its port, the database, the user (given, or the token's name), the
//! application name and `options` (`-c name=value` settings), and the root certificates:
//! sqlx verifies the chain and the host name (`verify-full`) whichever verifying mode the
//! connector was given, as the connector does. Settings sqlx cannot honour (several hosts,
//! `hostaddr`, keepalives, `tcp_user_timeout`, `target_session_attrs`, `load_balance_hosts`,
//! `channel_binding`) are refused with [`Error::Config`] rather than dropped. The connect
//! timeout is the pool's `acquire_timeout`.
//!
//! sqlx also reads libpq variables from the process environment itself, whatever
//! [`Environment`](crate::Environment) the connector was given: everything it uses to reach
//! the server is set here, but `PGOPTIONS` and `PGSSLROOTCERT` cannot be unset, so a value
//! there that differs from the connector's is refused ([`Error::Config`]); `PGSSLCERT` and
//! `PGSSLKEY` (a client certificate) are used as sqlx finds them. Its native-tls backend
//! trusts only the first certificate of a root-certificate file (besides the system roots), so
//! a file that holds several (a bundle of every root Azure has used) is refused with
//! [`Error::Config`] naming the ways around it, rather than trusting one and failing every
//! acquire.
//!
//! # Rotation and revocation
//! - **Rotation:** each new physical connection logs in with the current token; connections
//!   already open stay open (PostgreSQL checks the token at login only). Azure accepts the
//!   previous token until it expires, so a connection opened while the options are being
//!   switched logs in as well. (The test bed is stricter: it accepts only the newest token, and
//!   [`SqlxPool::acquire`]'s retry covers that window.)
//! - **Revocation:** if the server refuses a login (SQLSTATE `28P01` or `28000`),
//!   [`SqlxPool::acquire`] forces the cache's rate-limited refresh
//!   ([`TokenCache::refresh_rejected`](crate::TokenCache::refresh_rejected)), puts the new
//!   token in the pool's options and tries once more. sqlx's own connect loop does not retry
//!   these codes (only `53300` too-many-connections and `57P03` cannot-connect-now, until the
//!   acquire timeout), so without this the error would reach the caller on every new connection
//!   until the next scheduled refresh. Queries run on `&PgPool` (through `Deref`) follow
//!   rotation but return a refused login as it is; the next [`SqlxPool::acquire`] recovers.
//!
//! # Secrets
//! [`SqlxConnectOptions`]' and [`SqlxPool`]'s `Debug` never show the token. sqlx's own
//! `PgConnectOptions` `Debug` does (it prints the password): do not log what
//! [`SqlxConnectOptions::into_inner`] or `PgPool::connect_options` return.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode, Postgres};
use tokio::sync::oneshot;

use crate::cache::TokenUpdates;
use crate::connector::Connector;
use crate::error::Error;
use crate::refusal::Retry;
use crate::tls::{only_root_certificate_pem, root_certificate_file};
use crate::token::Token;

/// The `-c` flag of libpq's `options`, which is all sqlx can pass on.
const SETTING_FLAG: &str = "-c";

impl Connector {
    /// sqlx connect options for the server with the current token as password (waiting for a
    /// token only when the cache has none that is usable). See the [module docs](crate::sqlx)
    /// for what carries over.
    ///
    /// The options hold one token: for a pool, use [`sqlx_pool`](Self::sqlx_pool), which
    /// replaces them as the token rotates.
    ///
    /// # Errors
    /// [`Error::Config`] for a setting sqlx cannot honour or an unreadable root certificate
    /// file; the cache's errors when there is no token; [`Error::UnknownUser`] when no user
    /// is configured and the token names none.
    pub async fn sqlx_options(&self) -> Result<SqlxConnectOptions, Error> {
        let base = SqlxBase::new(self)?;
        let token = self.token_cache().token().await?;
        base.with_token(self, token)
    }

    /// A sqlx pool whose new connections always log in with the current token, built from
    /// `options` (`PgPoolOptions::new()` for sqlx's defaults). Connections are opened on
    /// demand, as `PgPoolOptions::connect_lazy_with` does; acquire one to check the login at
    /// start-up.
    ///
    /// The task that keeps the pool's options in step with the token (and the token fresh)
    /// ends when the pool is closed or when the last [`SqlxPool`] clone is dropped.
    ///
    /// # Errors
    /// As [`sqlx_options`](Self::sqlx_options).
    pub async fn sqlx_pool(&self, options: PgPoolOptions) -> Result<SqlxPool, Error> {
        let base = SqlxBase::new(self)?;
        // Listen before the first token is read, so that no token stored after it is missed.
        let updates = self.token_cache().updates();
        let token = self.token_cache().token().await?;
        let first = base.with_token(self, token)?;
        let pool = options.connect_lazy_with(first.options);
        let follower = Arc::new(Follower {
            connector: self.clone(),
            base,
            in_pool: ArcSwap::from_pointee(first.token),
            updating: Mutex::new(()),
        });
        let (pool_for_task, follower_for_task) = (pool.clone(), Arc::clone(&follower));
        let (stop, stopped) = oneshot::channel();
        let keep_fresh = self.token_cache().keep_fresh();
        tokio::spawn(async move {
            follow(pool_for_task, follower_for_task, updates, stopped).await;
            drop(keep_fresh);
        });
        Ok(SqlxPool {
            pool,
            shared: Arc::new(Shared {
                follower,
                _stop: stop,
            }),
        })
    }
}

/// sqlx's `PgConnectOptions` with one token as the password, and a `Debug` that shows
/// everything but the password.
#[derive(Clone)]
pub struct SqlxConnectOptions {
    options: PgConnectOptions,
    token: Token,
}

impl SqlxConnectOptions {
    /// The sqlx options, to connect with (`PgConnection::connect_with`) or to adjust. Their
    /// `Debug` shows the password: do not log them.
    pub fn into_inner(self) -> PgConnectOptions {
        self.options
    }

    /// The token the options carry (its `Debug` hides the secret too).
    pub fn token(&self) -> &Token {
        &self.token
    }
}

impl From<SqlxConnectOptions> for PgConnectOptions {
    fn from(options: SqlxConnectOptions) -> Self {
        options.options
    }
}

impl fmt::Debug for SqlxConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options = &self.options;
        f.debug_struct("SqlxConnectOptions")
            .field("host", &options.get_host())
            .field("port", &options.get_port())
            .field("database", &options.get_database())
            .field("username", &options.get_username())
            .field("ssl_mode", &options.get_ssl_mode())
            .field("application_name", &options.get_application_name())
            .field("password", &"<the access token, not shown>")
            .field("token", &self.token)
            .finish()
    }
}

/// A sqlx pool that follows the connector's token; derefs to `PgPool`. Clones share the
/// pool.
///
/// Use [`acquire`](Self::acquire) for connections: it also recovers from a refused token (see
/// the [module docs](crate::sqlx)). Everything else is the `PgPool`'s:
/// `sqlx::query(..).fetch_one(&*pool)`, `pool.begin()`, `pool.close()`.
#[derive(Clone)]
pub struct SqlxPool {
    pool: PgPool,
    shared: Arc<Shared>,
}

/// Held by every [`SqlxPool`] clone; dropping the last one stops the task.
struct Shared {
    follower: Arc<Follower>,
    _stop: oneshot::Sender<()>,
}

/// What the task and [`SqlxPool::acquire`] share to put a token into the pool's options.
struct Follower {
    connector: Connector,
    base: SqlxBase,
    /// The token in the pool's options, read on every acquire without a lock.
    in_pool: ArcSwap<Token>,
    /// Makes "read the newest token, set it" one step, so that the task and a recovering
    /// acquire cannot set an older token last.
    updating: Mutex<()>,
}

impl SqlxPool {
    /// A connection from the pool, as `PgPool::acquire`; if opening it was refused at login
    /// (`28P01`/`28000`), one forced token refresh and one more try (see the
    /// [module docs](crate::sqlx)). When a newer token reached the pool's options while the
    /// refused connection was being opened, that token is tried first, without a refresh.
    ///
    /// # Errors
    /// sqlx's errors, as `PgPool::acquire` returns them; a refused login that the forced
    /// refresh could not cure (or that came within the refresh's rate limit) is returned as
    /// it is.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let before = self.shared.follower.token_in_pool();
        // A refusal that quotes a token is withheld, whichever token the login carried.
        self.acquire_recovering(&before).await.map_err(|error| {
            let after = self.shared.follower.token_in_pool();
            withheld(error, &[before.secret(), after.secret()])
        })
    }

    async fn acquire_recovering(
        &self,
        before: &Token,
    ) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let follower = &self.shared.follower;
        // Either token may have been the one sent; a server that repeats it is not sent
        // another, and its words are not logged.
        let repeats = |error: &sqlx::Error| {
            quotes_a_token(error, &[before.secret(), follower.token_in_pool().secret()])
        };
        let mut error = match self.pool.acquire().await {
            Err(error) if repeats(&error) => return Err(error),
            Err(error) if login_refused(&error) => error,
            done => return done,
        };
        // sqlx does not say which token the refused login used. If the options moved on while
        // the connection was being opened, it may have been the older one: try the newer
        // token, which no login has been refused with yet, before forcing a refresh.
        let mut refused = follower.token_in_pool();
        if !refused.is_same(before) {
            match self.pool.acquire().await {
                Err(again) if repeats(&again) => return Err(again),
                Err(again) if login_refused(&again) => {
                    error = again;
                    refused = follower.token_in_pool();
                }
                done => return done,
            }
        }
        match follower
            .connector
            .token_cache()
            .refresh_rejected(&refused)
            .await
        {
            Ok(Some(_)) => {
                let code = match &error {
                    sqlx::Error::Database(database) => database.code().map(|c| c.into_owned()),
                    _ => None,
                };
                tracing::info!(
                    sqlstate = code.as_deref().unwrap_or("-"),
                    "the server refused the token; retrying once with a new token"
                );
                follower.update(&self.pool);
                self.pool.acquire().await
            }
            Ok(None) => Err(error),
            Err(refresh_error) => {
                tracing::warn!(%refresh_error, "cannot refresh the token the server refused");
                Err(error)
            }
        }
    }

    /// The sqlx pool (also reachable through `Deref`). A clone of it keeps working only while
    /// a [`SqlxPool`] is alive: the last one dropped stops the token updates.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The token new connections log in with.
    pub fn token(&self) -> Token {
        self.shared.follower.token_in_pool()
    }
}

impl Deref for SqlxPool {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self.pool
    }
}

impl fmt::Debug for SqlxPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // sqlx's pool `Debug` shows its pool options, not the connect options.
        f.debug_struct("SqlxPool")
            .field("pool", &self.pool)
            .field("token", &self.token())
            .finish()
    }
}

impl Follower {
    fn token_in_pool(&self) -> Token {
        Token::clone(&self.in_pool.load())
    }

    /// Puts the cache's newest token into the pool's options, if it is not there yet.
    fn update(&self, pool: &PgPool) {
        let _only_writer = crate::lock::lock(&self.updating);
        let Some(newest) = self.connector.token_cache().cached() else {
            return;
        };
        if newest.is_same(&self.in_pool.load()) {
            return;
        }
        match self.base.with_token(&self.connector, newest) {
            Ok(options) => {
                tracing::debug!(
                    expires_on = %options.token.expires_on(),
                    "new token in the sqlx pool's connect options"
                );
                pool.set_connect_options(options.options);
                self.in_pool.store(Arc::new(options.token));
            }
            // Only the user name can fail here (a token without one): keep the old options,
            // whose login will fail and say so, rather than guess a name.
            Err(error) => tracing::warn!(%error, "cannot use the new token in the sqlx pool"),
        }
    }
}

/// Follows the cache until the pool is closed, the last [`SqlxPool`] is dropped, or the
/// cache is dropped.
async fn follow(
    pool: PgPool,
    follower: Arc<Follower>,
    mut updates: TokenUpdates,
    mut stopped: oneshot::Receiver<()>,
) {
    // A token may have landed between the pool's first options and the listener.
    follower.update(&pool);
    loop {
        tokio::select! {
            token = updates.next() => match token {
                Some(_) => follower.update(&pool),
                None => break,
            },
            _ = pool.close_event() => break,
            _ = &mut stopped => break,
        }
    }
    tracing::debug!("the sqlx pool no longer follows the token");
}

/// Whether anything of a database error (any field: `Debug` shows them all) quotes one of
/// `tokens`.
fn quotes_a_token(error: &sqlx::Error, tokens: &[&str]) -> bool {
    match error {
        sqlx::Error::Database(database) => {
            crate::redact::echoes_any(&format!("{database}\n{database:?}"), tokens)
        }
        _ => false,
    }
}

/// `error`, unless it quotes one of `tokens`: then a protocol error that keeps only the
/// SQLSTATE (sqlx's error type has no variant without the server's text).
fn withheld(error: sqlx::Error, tokens: &[&str]) -> sqlx::Error {
    if !quotes_a_token(&error, tokens) {
        return error;
    }
    let code = match &error {
        sqlx::Error::Database(database) => database.code().map(|code| code.into_owned()),
        _ => None,
    };
    sqlx::Error::Protocol(format!(
        "PostgreSQL refused the login (SQLSTATE {}) with a message that quoted the access \
         token; the message is withheld",
        code.as_deref().unwrap_or("none")
    ))
}

/// True for a login the server refused: the token, or the role, was not accepted.
/// Only refusals a refreshed token can cure count ([`LoginRefusal`](crate::LoginRefusal)).
fn login_refused(error: &sqlx::Error) -> bool {
    match error {
        // Through PgBouncer the server's refusal arrives as 08P01: `classify` reads both.
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            crate::LoginRefusal::classify(&code, error.message())
                .is_some_and(|refusal| refusal.retry() == Retry::WithRefreshedToken)
        }),
        _ => false,
    }
}

/// Everything in the connect options but the user and password, checked once.
struct SqlxBase {
    options: PgConnectOptions,
}

impl SqlxBase {
    fn new(connector: &Connector) -> Result<Self, Error> {
        let settings = connector.settings();
        let mut hosts = connector.hosts();
        let (host, port) = hosts
            .next()
            .ok_or_else(|| Error::missing("host", "no server host"))?;
        if hosts.next().is_some() {
            return Err(Error::unsupported(
                "host",
                "sqlx connects to one host; give the connector a single host for a sqlx pool",
            ));
        }
        let refused = [
            ("hostaddr", settings.hostaddrs.is_some()),
            ("keepalives", settings.keepalives.is_some()),
            ("keepalives_idle", settings.keepalives_idle.is_some()),
            (
                "keepalives_interval",
                settings.keepalives_interval.is_some(),
            ),
            ("keepalives_count", settings.keepalives_count.is_some()),
            ("tcp_user_timeout", settings.tcp_user_timeout.is_some()),
            (
                "target_session_attrs",
                settings.target_session_attrs.is_some(),
            ),
            ("load_balance_hosts", settings.load_balance_hosts.is_some()),
            ("channel_binding", settings.channel_binding.is_some()),
        ];
        if let Some((setting, _)) = refused.into_iter().find(|(_, set)| *set) {
            return Err(Error::unsupported(
                setting,
                format!("sqlx cannot apply {setting}; remove it to use a sqlx pool"),
            ));
        }
        // sqlx fills in what it finds in the process environment; everything it would use to
        // reach the server is set here.
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(host)
            .port(port)
            .database(connector.dbname())
            // Every mode this crate accepts verifies the host name too.
            .ssl_mode(PgSslMode::VerifyFull);
        if let Some(name) = settings
            .application_name
            .as_ref()
            .or(settings.fallback_application_name.as_ref())
        {
            options = options.application_name(name);
        }
        // sqlx took PGOPTIONS and PGSSLROOTCERT from the process environment and cannot be
        // told to drop them: they must agree with the connector, or be replaced.
        let process_options = options.get_options().map(str::to_owned);
        agree_with_process(
            "PGOPTIONS",
            "options",
            process_options.as_deref(),
            settings.options.as_deref(),
        )?;
        if let Some(raw) = &settings.options
            && process_options.is_none()
        {
            options = options.options(server_settings(raw)?);
        }
        match root_certificate_file(settings.ssl_root_cert.as_deref()) {
            Some(path) => {
                options = options.ssl_root_cert_from_pem(only_root_certificate_pem(path)?)
            }
            None => agree_with_process(
                "PGSSLROOTCERT",
                "sslrootcert",
                std::env::var("PGSSLROOTCERT").ok().as_deref(),
                None,
            )?,
        }
        Ok(Self { options })
    }

    fn with_token(&self, connector: &Connector, token: Token) -> Result<SqlxConnectOptions, Error> {
        let options = self
            .options
            .clone()
            .username(&connector.user_for(&token)?)
            .password(token.secret());
        Ok(SqlxConnectOptions { options, token })
    }
}

/// Refuses a libpq variable that sqlx read from the process environment (`process`) when the
/// connector's value (`ours`) differs: sqlx would use it all the same.
fn agree_with_process(
    variable: &str,
    setting: &'static str,
    process: Option<&str>,
    ours: Option<&str>,
) -> Result<(), Error> {
    match process {
        Some(value) if Some(value) != ours => Err(Error::conflict(
            setting,
            format!(
                "sqlx reads {variable} from the process environment itself and cannot be told \
                 to ignore it; it is {value:?} there, but the connector has {}: unset {variable} \
                 or give the connector the same value",
                ours.map_or_else(|| "none".to_owned(), |v| format!("{v:?}"))
            ),
        )),
        _ => Ok(()),
    }
}

/// The `name=value` pairs of a libpq `options` string made only of `-c name=value` (or
/// `-cname=value`, `--name=value`) settings, unescaped as libpq does (a backslash keeps the
/// next character, whitespace separates).
fn server_settings(raw: &str) -> Result<Vec<(String, String)>, Error> {
    let words = split_options(raw);
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == SETTING_FLAG {
            words.next().unwrap_or_default()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_owned()
        } else if let Some(rest) = word.strip_prefix(SETTING_FLAG) {
            rest.to_owned()
        } else {
            return Err(unsupported_options(&word));
        };
        match setting.split_once('=') {
            Some((name, value)) if !name.is_empty() => {
                settings.push((name.to_owned(), value.to_owned()));
            }
            _ => return Err(unsupported_options(&setting)),
        }
    }
    Ok(settings)
}

fn unsupported_options(word: &str) -> Error {
    Error::unsupported(
        "options",
        format!(
            "sqlx passes only `-c name=value` server settings; {word:?} is not one (write \
             options as `-c name=value`)"
        ),
    )
}

/// Splits on unescaped whitespace; a backslash keeps the character after it.
fn split_options(raw: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(raw: &str) -> Vec<(String, String)> {
        server_settings(raw).unwrap()
    }

    #[test]
    fn options_in_every_libpq_spelling() {
        let expected = vec![
            ("search_path".to_owned(), "app, public".to_owned()),
            ("geqo".to_owned(), "off".to_owned()),
            ("work_mem".to_owned(), "64MB".to_owned()),
        ];
        assert_eq!(
            pairs(r"-c search_path=app,\ public -cgeqo=off --work_mem=64MB"),
            expected
        );
        assert!(pairs("  ").is_empty());
    }

    #[test]
    fn options_sqlx_cannot_pass_are_refused_by_name() {
        for raw in ["-d 5", "-c", "-c =x", "statement_timeout=5"] {
            let error = server_settings(raw).unwrap_err();
            let Error::Config(config) = &error else {
                panic!("{raw}: {error:?}");
            };
            assert_eq!(config.setting(), "options", "{raw}");
        }
    }

    #[test]
    fn process_variables_sqlx_cannot_drop_must_agree() {
        assert!(agree_with_process("PGOPTIONS", "options", None, Some("-c a=b")).is_ok());
        assert!(agree_with_process("PGOPTIONS", "options", Some("-c a=b"), Some("-c a=b")).is_ok());
        for (process, ours) in [("-c a=b", None), ("-c a=b", Some("-c a=c"))] {
            let Err(Error::Config(error)) =
                agree_with_process("PGOPTIONS", "options", Some(process), ours)
            else {
                panic!("{process:?} against {ours:?} was accepted");
            };
            assert_eq!(error.setting(), "options");
            assert!(error.to_string().contains("unset PGOPTIONS"), "{error}");
        }
        // With system roots only, any PGSSLROOTCERT sqlx would read is refused, even `system`
        // (which sqlx would open as a file).
        assert!(agree_with_process("PGSSLROOTCERT", "sslrootcert", Some("system"), None).is_err());
        assert!(agree_with_process("PGSSLROOTCERT", "sslrootcert", None, None).is_ok());
    }

    proptest! {
        #[test]
        fn any_options_string_gives_settings_or_a_typed_error(raw in ".{0,64}") {
            match server_settings(&raw) {
                Ok(settings) => prop_assert!(settings.iter().all(|(name, _)| !name.is_empty())),
                Err(error) => prop_assert!(matches!(error, Error::Config(_))),
            }
        }

        #[test]
        fn settings_survive_libpq_escaping(
            settings in proptest::collection::vec(("[a-z_]{1,12}", "[ -~]{0,12}"), 0..4)
        ) {
            let escape = |s: &str| s.replace('\\', "\\\\").replace(' ', "\\ ");
            let raw = settings
                .iter()
                .map(|(name, value)| format!("-c {}={}", name, escape(value)))
                .collect::<Vec<_>>()
                .join(" ");
            prop_assert_eq!(server_settings(&raw).unwrap(), settings);
        }
    }
}
