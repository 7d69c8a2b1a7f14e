//! `examples/service.rs`, the example's own code, served on loopback and called over HTTP
//! across two token rotations: every answer is checked.

use std::time::Duration;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pg_entra::WarmUp;
use pg_entra::testing::{Reply, TestBed};
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::rotation::{rotating_bed, workload};

#[path = "../../examples/service.rs"]
#[allow(dead_code)] // its `main` and `run` are the example's, not the test's
mod example;

/// One `GET` over a new TCP connection: the status code and the body; an error after 30 s.
async fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    tokio::time::timeout(Duration::from_secs(30), get_unbounded(port, path))
        .await
        .map_err(|_| format!("GET {path}: no answer within 30 s"))?
}

async fn get_unbounded(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {answer:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The process's Prometheus recorder: installed once, shared by the tests that serve.
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
        .clone()
}

async fn start(bed: &TestBed) -> u16 {
    // Installed before anything records, as the example does.
    let metrics = prometheus();
    let connector = bed.connector_builder().build().unwrap();
    connector
        .warm_up(WarmUp::Login, Duration::from_secs(30))
        .await
        .unwrap();
    let pool = connector
        .sqlx_pool(
            PgPoolOptions::new()
                .max_connections(8)
                // New logins keep happening, so that each token is used to log in.
                .max_lifetime(Duration::from_millis(300))
                .acquire_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = example::App {
        pool,
        tokens: connector.token_cache().clone(),
        metrics,
    };
    tokio::spawn(example::serve(listener, app, std::future::pending()));
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_answers_every_request_across_two_token_rotations() {
    let bed = rotating_bed().await;
    let port = start(&bed).await;
    let name = bed.principal().name().to_owned();

    let answers = workload({
        let name = name.clone();
        move || {
            let name = name.clone();
            async move {
                let health = get(port, "/healthz").await?;
                assert_eq!(health, (200, "ok\n".to_owned()));
                let (status, body) = get(port, "/whoami").await?;
                assert_eq!(status, 200, "{body}");
                let who: example::WhoAmI =
                    serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
                assert_eq!(who.user, name);
                assert!(who.server_version.starts_with(char::is_numeric), "{body}");
                assert!(who.tls_cipher.is_some_and(|c| !c.is_empty()), "{body}");
                Ok(())
            }
        }
    })
    .await;

    assert!(answers.len() > 16, "{} request pairs", answers.len());
    let issued = bed.identity().tokens_issued();
    assert!(issued >= 3, "two rotations need three tokens, got {issued}");
    assert_eq!(get(port, "/nowhere").await.unwrap().0, 404);
}

/// `/readyz` from the token cache's health and `/metrics` from the Prometheus exporter, over
/// HTTP: ready with a token, 503 naming the failures once the token is gone and the endpoint
/// refuses, and the library's metrics in Prometheus' text format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics_answer_over_http() {
    let bed = super::bed().await;
    bed.identity().set_token_lifetime(Duration::from_secs(4));
    let port = start(&bed).await;

    let (status, body) = get(port, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let ready: example::Readiness = serde_json::from_str(&body).unwrap();
    assert!(ready.ready);
    assert_eq!(ready.last_refresh.as_deref(), Some("Refreshed"));
    assert_eq!(ready.consecutive_failures, 0);
    assert!(ready.expires_on.is_some() && ready.refresh_at.is_some());

    let (status, body) = get(port, "/whoami").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, text) = get(port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for line in [
        "# TYPE pg_entra_token_refreshes counter",
        "pg_entra_token_refreshes{outcome=\"success\",trigger=\"on_demand\",credential=\"custom\"}",
        "pg_entra_identity_requests{source=\"imds\",status=\"200\"}",
        "pg_entra_connects{outcome=\"success\"}",
        "pg_entra_token_time_to_expiry",
    ] {
        assert!(text.contains(line), "{line} not in:\n{text}");
    }

    // The endpoint refuses from now on; once the token is no longer handed out, not ready.
    bed.identity()
        .script(std::iter::repeat_with(|| Reply::status(403)).take(50));
    // The token is handed out for 3 of its 4 s; the wait is bounded well past that.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let unready = loop {
        let _ = get(port, "/whoami").await;
        let (status, body) = get(port, "/readyz").await.unwrap();
        if status == 503 {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "/readyz still ready after 30 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let unready: example::Readiness = serde_json::from_str(&unready).unwrap();
    assert!(!unready.ready);
    assert_eq!(unready.last_refresh.as_deref(), Some("Failed"));
    assert!(unready.consecutive_failures >= 1);
}
