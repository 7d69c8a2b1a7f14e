//! A small HTTP service of the kind our users write: axum, a sqlx pool from pg-entra, a health
//! check and one endpoint that queries the database.
//!
//! ```sh
//! # locally, no Azure: a test bed whose tokens live 60 s
//! cargo run --example service --features sqlx
//! curl http://127.0.0.1:3000/healthz     # ok
//! curl http://127.0.0.1:3000/whoami      # {"user":"pg-entra-test-vm","server_version":"15.18 …","tls_cipher":"TLS_AES_256_GCM_SHA384"}
//! # on Azure: PGHOST etc. and a managed identity, as for `examples/connect.rs`
//! PGHOST=myserver.postgres.database.azure.com cargo run --example service --features sqlx
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
use pg_entra::Connector;
use pg_entra::sqlx::SqlxPool;
use pg_entra::testing::TestBed;
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;

const DEFAULT_ADDR: &str = "127.0.0.1:3000";
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

/// The service's routes over `pool`.
pub fn router(pool: SqlxPool) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/whoami", get(whoami))
        .with_state(pool)
}

/// Serves `router(pool)` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pool: SqlxPool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(pool))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `select 1` on a pooled connection.
async fn healthz(State(pool): State<SqlxPool>) -> Result<&'static str, DatabaseError> {
    let mut connection = pool.acquire().await?;
    let _: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&mut *connection)
        .await?;
    Ok("ok\n")
}

/// The role, server version and TLS cipher of a pooled session.
async fn whoami(State(pool): State<SqlxPool>) -> Result<Json<WhoAmI>, DatabaseError> {
    let mut connection = pool.acquire().await?;
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
    let pool = connector
        .sqlx_pool(PgPoolOptions::new().max_connections(8))
        .await?;
    let addr = std::env::var("SERVICE_ADDR").unwrap_or_else(|_| DEFAULT_ADDR.to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!(
        "listening on http://{}  (try /healthz and /whoami; Ctrl-C stops)",
        listener.local_addr()?
    );
    serve(listener, pool.clone(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    pool.close().await;
    drop(bed);
    Ok(())
}
