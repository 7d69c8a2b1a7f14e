//! A small HTTP service of the kind our users write: axum, a sqlx pool from pg-entra, a
//! warm-up before it serves, a readiness probe read from the token cache's health, Prometheus
//! metrics, a health check and one endpoint that queries the database.
//!
//! ```sh
//! # locally, no Azure: a test bed whose tokens live 60 s
//! cargo run --example service --features sqlx,metrics
//! curl http://127.0.0.1:3000/readyz      # {"ready":true,"expires_on":"…",…}
//! curl http://127.0.0.1:3000/metrics     # pg_entra_token_refreshes{…} 1 …
//! curl http://127.0.0.1:3000/healthz     # ok
//! curl http://127.0.0.1:3000/whoami      # {"user":"pg-entra-test-vm","server_version":"15.18 …","tls_cipher":"TLS_AES_256_GCM_SHA384"}
//! # on Azure: PGHOST etc. and a managed identity, as for `examples/connect.rs`
//! PGHOST=myserver.postgres.database.azure.com cargo run --example service --features sqlx,metrics
//! ```
//!
//! `SERVICE_ADDR` sets the listening address (default `127.0.0.1:3000`). Ctrl-C stops it.
//! The token rotates under the running service: each new database connection logs in with the
//! current one, and no request waits for the identity endpoint.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pg_entra::sqlx::SqlxPool;
use pg_entra::testing::TestBed;
use pg_entra::{Connector, TokenCache, WarmUp};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;

const DEFAULT_ADDR: &str = "127.0.0.1:3000";
/// How long start-up may take to get a token and make one login before giving up.
const WARM_UP_WITHIN: Duration = Duration::from_secs(30);
/// Token lifetime on the local bed: short, so that a few minutes' run sees rotations.
const LOCAL_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// What `/whoami` answers: who the service is in the database, over what.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct WhoAmI {
    /// `current_user`: the Entra principal's role.
    pub user: String,
    /// The server's version.
    pub server_version: String,
    /// The TLS cipher of this session, from `pg_stat_ssl`.
    pub tls_cipher: Option<String>,
}

/// What the handlers share.
#[derive(Clone)]
pub struct App {
    /// The database.
    pub pool: SqlxPool,
    /// The connector's token cache, for `/readyz`.
    pub tokens: TokenCache,
    /// The Prometheus exporter's handle, for `/metrics`.
    pub metrics: PrometheusHandle,
}

/// What `/readyz` answers: the token cache's health.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Readiness {
    /// A usable token is cached: a connect needs no identity request.
    pub ready: bool,
    /// When it expires (RFC 3339).
    pub expires_on: Option<String>,
    /// When the background refresh is due.
    pub refresh_at: Option<String>,
    /// How the last refresh ended (`Refreshed`, `NoNewerToken`, `Failed`).
    pub last_refresh: Option<String>,
    /// When it ended.
    pub last_refresh_at: Option<String>,
    /// Failed refreshes in a row.
    pub consecutive_failures: u32,
    /// No refresh starts before this, after failures.
    pub backing_off_until: Option<String>,
    /// The credential that produced the token.
    pub credential: String,
}

/// The service's routes.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/whoami", get(whoami))
        .with_state(app)
}

/// Serves `router(app)` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
}

/// 200 while a usable token is cached, else 503; either way the cache's state, read without
/// waiting (no identity request, no database round trip).
async fn readyz(State(app): State<App>) -> (StatusCode, Json<Readiness>) {
    let health = app.tokens.health();
    let date = |at: Option<time::OffsetDateTime>| {
        at.and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
    };
    let status = if health.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let readiness = Readiness {
        ready: health.ready,
        expires_on: date(health.expires_on),
        refresh_at: date(health.refresh_at),
        last_refresh: health.last_refresh.map(|r| format!("{r:?}")),
        last_refresh_at: date(health.last_refresh_at),
        consecutive_failures: health.consecutive_failures,
        backing_off_until: date(health.backing_off_until),
        credential: health.credential.to_owned(),
    };
    (status, Json(readiness))
}

/// The Prometheus text exposition of every metric recorded.
async fn metrics(State(app): State<App>) -> String {
    app.metrics.render()
}

/// `select 1` on a pooled connection.
async fn healthz(State(app): State<App>) -> Result<&'static str, DatabaseError> {
    let mut connection = app.pool.acquire().await?;
    let _: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&mut *connection)
        .await?;
    Ok("ok\n")
}

/// The role, server version and TLS cipher of a pooled session.
async fn whoami(State(app): State<App>) -> Result<Json<WhoAmI>, DatabaseError> {
    let mut connection = app.pool.acquire().await?;
    let (user, server_version, tls_cipher) = sqlx::query_as(
        "select current_user::text, current_setting('server_version'), \
         (select cipher from pg_stat_ssl where pid = pg_backend_pid())",
    )
    .fetch_one(&mut *connection)
    .await?;
    Ok(Json(WhoAmI {
        user,
        server_version,
        tls_cipher,
    }))
}

/// A database failure: logged in full, answered with 503 and no detail.
struct DatabaseError(sqlx::Error);

impl From<sqlx::Error> for DatabaseError {
    fn from(error: sqlx::Error) -> Self {
        Self(error)
    }
}

impl IntoResponse for DatabaseError {
    fn into_response(self) -> Response {
        tracing::error!(error = %self.0, "database request failed");
        (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Before anything records: every metric goes to the exporter.
    let metrics = PrometheusBuilder::new().install_recorder()?;
    // The exporter keeps histogram samples until its upkeep drains them.
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    // Kept alive while the service runs, when local.
    let mut bed = None;
    let connector = if std::env::var_os("PGHOST").is_none() {
        eprintln!(
            "PGHOST is not set: starting a local test bed with {LOCAL_TOKEN_LIFETIME:?} tokens"
        );
        let started = TestBed::start().await?;
        started.identity().set_token_lifetime(LOCAL_TOKEN_LIFETIME);
        let connector = started.connector_builder().build()?;
        bed = Some(started);
        connector
    } else {
        Connector::from_env()?
    };
    // Ready before serving: a token and one login, or the start-up fails with the cause.
    connector.warm_up(WarmUp::Login, WARM_UP_WITHIN).await?;
    let pool = connector
        .sqlx_pool(PgPoolOptions::new().max_connections(8))
        .await?;
    let app = App {
        pool: pool.clone(),
        tokens: connector.token_cache().clone(),
        metrics,
    };
    let addr = std::env::var("SERVICE_ADDR").unwrap_or_else(|_| DEFAULT_ADDR.to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!(
        "listening on http://{}  (try /readyz, /metrics, /healthz and /whoami; Ctrl-C stops)",
        listener.local_addr()?
    );
    serve(listener, app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    pool.close().await;
    drop(bed);
    Ok(())
}
