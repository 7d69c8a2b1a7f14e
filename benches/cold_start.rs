//! Cold start: from process start to the first identity request on the wire, and to the first
//! row, for a fresh process using pg-entra (`Connector::from_env`, the default chain, IMDS)
//! against a floor program in the same run: tokio-postgres with native-tls, its password from
//! one plain HTTP GET to the same endpoint, nothing else.
//!
//! ```sh
//! cargo bench --bench cold_start            # 30 runs of each, alternating
//! COLD_START_RUNS=100 cargo bench --bench cold_start
//! ```
//!
//! Both programs are this executable run again (`--child ours|floor`), so they start from the
//! same binary. Times are taken by this process: from just before `spawn` to the endpoint's
//! receipt of the first request (`RecordedRequest::received_at`), and to the child's line
//! saying it has its row. Needs the PostgreSQL server binaries, as the tests do.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pg_entra::testing::TestBed;

const RUNS: usize = 30;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(position) = args.iter().position(|a| a == "--child") {
        let exit = match args.get(position + 1).map(String::as_str) {
            Some("ours") => child_ours(),
            Some("floor") => child_floor(),
            other => Err(format!("unknown child {other:?}")),
        };
        if let Err(error) = exit {
            eprintln!("child failed: {error}");
            std::process::exit(1);
        }
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it with no argument.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let runs = std::env::var("COLD_START_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(RUNS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let bed = runtime
        .block_on(TestBed::start())
        .expect("the test bed starts");
    let vars = bed.vars();
    let endpoint = vars
        .iter()
        .find(|(k, _)| k == "AZURE_POD_IDENTITY_AUTHORITY_HOST")
        .map(|(_, v)| v.clone())
        .expect("the bed's IMDS address");
    let me = std::env::current_exe().expect("this executable");

    let mut ours = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..runs {
        for (kind, into) in [("ours", &mut ours), ("floor", &mut floor)] {
            let before = bed.identity().recorded().len();
            let mut command = Command::new(&me);
            command
                .args(["--child", kind])
                .env_clear()
                .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("FLOOR_USER", bed.principal().name())
                .env("FLOOR_ENDPOINT", &endpoint)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let started = Instant::now();
            let mut child = command.spawn().expect("the child starts");
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("its stdout"))
                .read_line(&mut line)
                .expect("its line");
            let row = started.elapsed();
            assert_eq!(line.trim(), "row", "{kind} got no row");
            child.wait().expect("the child ends");
            let recorded = bed.identity().recorded();
            let first = recorded
                .get(before)
                .expect("the child asked the endpoint")
                .received_at
                .saturating_duration_since(started);
            into.push((first, row));
        }
    }
    report("pg-entra", &ours);
    report("floor", &floor);
    let median_row = |runs: &[(Duration, Duration)]| median(runs.iter().map(|r| r.1).collect());
    println!(
        "first row, pg-entra / floor (medians): {:.2}",
        median_row(&ours).as_secs_f64() / median_row(&floor).as_secs_f64()
    );
}

fn report(name: &str, runs: &[(Duration, Duration)]) {
    let first = median(runs.iter().map(|r| r.0).collect());
    let row = median(runs.iter().map(|r| r.1).collect());
    let worst_first = runs.iter().map(|r| r.0).max().unwrap_or_default();
    println!(
        "{name:>9}: first identity request {:.2} ms (median; worst {:.2} ms), first row {:.2} ms (median), {} runs",
        first.as_secs_f64() * 1e3,
        worst_first.as_secs_f64() * 1e3,
        row.as_secs_f64() * 1e3,
        runs.len()
    );
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// A service's start: the connector from the environment, one connect, one row.
fn child_ours() -> Result<(), String> {
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let connector = pg_entra::Connector::from_env().map_err(|e| e.to_string())?;
        let client = connector.connect().await.map_err(|e| e.to_string())?;
        client
            .query_one("select 1", &[])
            .await
            .map_err(|e| e.to_string())?;
        println!("row");
        Ok(())
    })
}

/// The least a program can do: one plain HTTP GET for the token, then tokio-postgres over
/// native-tls with it as the password.
fn child_floor() -> Result<(), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
        let endpoint = var("FLOOR_ENDPOINT")?;
        let address = endpoint.trim_start_matches("http://").to_owned();
        let mut stream = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(|e| e.to_string())?;
        let request = format!(
            "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fossrdbms-aad.database.windows.net HTTP/1.1\r\nHost: {address}\r\nMetadata: true\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        let answer = String::from_utf8_lossy(&answer);
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let json: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
        let token = json["access_token"].as_str().ok_or("no access_token")?;

        let root = std::fs::read(var("PGSSLROOTCERT")?).map_err(|e| e.to_string())?;
        let tls = native_tls::TlsConnector::builder()
            .add_root_certificate(
                native_tls::Certificate::from_pem(&root).map_err(|e| e.to_string())?,
            )
            .build()
            .map_err(|e| e.to_string())?;
        let port: u16 = var("PGPORT")?.parse().map_err(|_| "PGPORT")?;
        let (client, connection) = tokio_postgres::Config::new()
            .host(var("PGHOST")?)
            .port(port)
            .dbname("postgres")
            .user(var("FLOOR_USER")?)
            .password(token)
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect(postgres_native_tls::MakeTlsConnector::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        client
            .query_one("select 1", &[])
            .await
            .map_err(|e| e.to_string())?;
        println!("row");
        Ok(())
    })
}
