//! `pg-entra proxy` against the server straight, side by side in one run on the test bed:
//! pgbench select-only (`-S`, several clients on their connections) and
//! connection-per-transaction (`-S -C`), through the proxy's TCP listener and its Unix
//! socket, reported as ratios; PgBouncer in the proxy's place as a reference for `-S` (what
//! any relay costs on the machine); and the proxy's memory per idle session.
//!
//! `cargo bench --bench proxy --features cli,testing`. Every path logs in with a password over
//! verified TLS to the same server (the proxy with the token of the bed's identity, pgbench
//! straight and PgBouncer with a fixed password of their own role), and they run in turns,
//! each mode `ROUNDS` times, so that the machine's drift falls on all. pgbench itself is the harness (criterion
//! times functions, not a client program's transactions): `PG_ENTRA_PROXY_BENCH_SECONDS`
//! sets each run's length (default 10).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pg_entra::testing::TestBed;
use tokio::io::AsyncBufReadExt as _;

const PG_ENTRA: &str = env!("CARGO_BIN_EXE_pg-entra");
/// Turns per mode and path.
const ROUNDS: usize = 3;
/// Idle sessions opened for the memory figure.
const IDLE_SESSIONS: usize = 100;
/// The role pgbench uses straight to the server, with a fixed password.
const DIRECT_ROLE: &str = "bench_direct";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run());
}

async fn run() {
    let seconds: u64 = std::env::var("PG_ENTRA_PROXY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let bed = Arc::new(TestBed::start().await.expect("the test bed starts"));
    let role = bed.principal().name().to_owned();
    let admin = bed.postgres().admin().await.expect("the admin session");
    admin
        .batch_execute(&format!(
            "grant create on schema public to \"{role}\";
             create role {DIRECT_ROLE} login;"
        ))
        .await
        .expect("the roles");

    // The straight role's password is as long as the bed's tokens: the bed's PostgreSQL checks
    // a cleartext password against its SCRAM verifier, and PBKDF2 rekeys HMAC with the whole
    // password on each of its 4,096 rounds, so a 1.5 KB password costs the server far more
    // than a short one. (Azure checks a token's signature instead.) One token is asked for
    // here to measure it, before the proxy asks for its own.
    let token_length = {
        use pg_entra::TokenCredential as _;
        let scope = "https://ossrdbms-aad.database.windows.net/.default";
        let token = bed
            .credential()
            .get_token(&[scope], None)
            .await
            .expect("a token");
        token.token.secret().len()
    };
    let direct_password: String = (0..token_length)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    admin
        .batch_execute(&format!(
            "alter role {DIRECT_ROLE} password '{direct_password}'"
        ))
        .await
        .expect("the straight role's password");
    // The proxy's Unix socket lives here; private to this account, as the proxy requires.
    let socket_dir = tempfile::tempdir().expect("a directory for the proxy's socket");
    let mut proxy = tokio::process::Command::new(PG_ENTRA)
        .args(["proxy", "--listen", "127.0.0.1:0", "--max-sessions", "1000"])
        .arg("--unix-socket")
        .arg(socket_dir.path())
        .env_clear()
        .env("PATH", "/nonexistent")
        .env("RUST_LOG", "warn")
        .envs(std::env::var("TOKIO_WORKER_THREADS").map(|n| ("TOKIO_WORKER_THREADS", n)))
        .envs(bed.vars())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("pg-entra proxy starts (built by cargo bench)");
    let mut lines = tokio::io::BufReader::new(proxy.stdout.take().unwrap()).lines();
    let mut port = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(places) = line.strip_prefix("pg-entra proxy: listening on ") {
            // `127.0.0.1:PORT and DIR/.s.PGSQL.PORT`
            port = places
                .split(" and ")
                .next()
                .and_then(|tcp| tcp.rsplit(':').next())
                .map(|p| p.trim().to_owned());
            break;
        }
    }
    let port = port.expect("the proxy announces its port");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let through = format!("host=127.0.0.1 port={port} sslmode=disable");
    let through_socket = format!("host={} port={port}", socket_dir.path().display());
    let straight = format!(
        "host=localhost port={} sslmode=verify-full sslrootcert={} user={DIRECT_ROLE} dbname=postgres",
        bed.postgres().port(),
        bed.postgres().ca_certificate_path().display()
    );
    pgbench(&["-i", "-s", "10", "-q", &through], "").await;
    admin
        .batch_execute(&format!(
            "grant select on all tables in schema public to {DIRECT_ROLE}"
        ))
        .await
        .expect("the grant");

    let duration = seconds.to_string();
    let modes: [(&str, Vec<&str>, &str); 2] = [
        (
            "select-only, 8 clients (-S -c 8 -j 2)",
            vec!["-S", "-n", "-c", "8", "-j", "2", "-T", &duration],
            "without initial connection time",
        ),
        (
            "connection per transaction (-S -C -c 4 -j 2)",
            vec!["-S", "-n", "-C", "-c", "4", "-j", "2", "-T", &duration],
            "including reconnection times",
        ),
    ];
    println!(
        "pg-entra proxy against the server straight, {seconds} s per run, {ROUNDS} turns each:"
    );
    // The reference: PgBouncer, a C proxy, in the proxy's place (no TLS from pgbench, verified
    // TLS upstream, the straight role's password), to show what any process in the middle
    // costs on this machine.
    let reference = Reference::start(&bed, DIRECT_ROLE, &direct_password)
        .inspect_err(|why| println!("  (no PgBouncer reference: {why})"))
        .ok();
    let through_reference = reference.as_ref().map(|r| {
        format!(
            "host=127.0.0.1 port={} sslmode=disable dbname=postgres",
            r.port
        )
    });
    let reference_name = reference
        .as_ref()
        .map(|r| format!("through {} instead (reference)", r.version));

    // Each mode straight and through the proxy's two listeners (and PgBouncer), in turns.
    let mut paths = vec![
        ("straight", straight.as_str(), direct_password.as_str()),
        ("through the proxy over loopback TCP", through.as_str(), ""),
        (
            "through the proxy's Unix socket",
            through_socket.as_str(),
            "",
        ),
    ];
    if let (Some(connection), Some(name)) = (&through_reference, &reference_name) {
        paths.push((name, connection, ""));
    }
    for (name, args, tps_line) in &modes {
        // PgBouncer keeps server connections between clients: with -C it is no reference.
        let paths = if args.contains(&"-C") {
            &paths[..3]
        } else {
            &paths[..]
        };
        let mut figures = vec![Vec::new(); paths.len()];
        for _ in 0..ROUNDS {
            for ((_, connection, password), runs) in paths.iter().zip(&mut figures) {
                let mut path_args = args.clone();
                path_args.push(connection);
                runs.push(tps(&pgbench(&path_args, password).await, tps_line));
            }
        }
        let medians: Vec<f64> = figures.into_iter().map(median).collect();
        println!("  {name}:");
        for ((path, ..), tps) in paths.iter().zip(&medians) {
            println!("    {path}: {tps:.0} tps ({:.2}×)", tps / medians[0]);
        }
    }

    let pid = proxy.id().expect("the proxy runs");
    let before = rss_kib(pid);
    let mut idle = Vec::new();
    for _ in 0..IDLE_SESSIONS {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port.parse().unwrap())
            .user(&role)
            .dbname("postgres")
            .connect(tokio_postgres::NoTls)
            .await
            .expect("an idle session");
        tokio::spawn(connection);
        idle.push(client);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    println!(
        "  memory: {} KiB resident with {IDLE_SESSIONS} idle sessions, {before} KiB with none: {:.1} KiB per idle session",
        after,
        (after as f64 - before as f64) / IDLE_SESSIONS as f64
    );
    drop(idle);
    proxy.kill().await.ok();
    drop(reference);
}

/// PgBouncer in session pooling on 127.0.0.1, in the proxy's place: plain text from clients,
/// `verify-full` to the bed's server, logging in as `role` with `password` whoever connects
/// (`auth_type = any`: for the bench's throwaway role on the bed's throwaway server only).
struct Reference {
    port: u16,
    /// What `--version` said, for the report.
    version: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Reference {
    /// The same program the test bed runs: `PG_ENTRA_PGBOUNCER`, else Debian's.
    fn program() -> PathBuf {
        std::env::var_os("PG_ENTRA_PGBOUNCER")
            .map_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"), PathBuf::from)
    }

    /// Starts it, or says why it cannot run here.
    fn start(bed: &TestBed, role: &str, password: &str) -> Result<Self, String> {
        let program = Self::program();
        let version = std::process::Command::new(&program)
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("PgBouncer")
            .to_owned();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ca = dir.path().join("ca.crt");
        std::fs::copy(bed.postgres().ca_certificate_path(), &ca).map_err(|e| e.to_string())?;
        let config = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &config,
            format!(
                "[databases]\n\
                 * = host=localhost port={} user={role} password={password}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = any\n\
                 pool_mode = session\n\
                 max_client_conn = 100\n\
                 default_pool_size = 20\n\
                 server_tls_sslmode = verify-full\n\
                 server_tls_ca_file = {}\n",
                bed.postgres().port(),
                ca.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        // PgBouncer refuses to run as root: as root, it runs as the server's account, which
        // is then given the directory (0700, so the password stays the account's).
        let mut command = if rustix::process::geteuid().is_root() {
            let account = std::process::Command::new("id")
                .args(["-u", "postgres"])
                .output()
                .map_err(|e| e.to_string())?;
            let uid: u32 = String::from_utf8_lossy(&account.stdout)
                .trim()
                .parse()
                .map_err(|_| "no `postgres` account to run PgBouncer as".to_owned())?;
            for path in [dir.path(), &ca, &config] {
                std::os::unix::fs::chown(path, Some(uid), None).map_err(|e| e.to_string())?;
            }
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            std::process::Command::new(&program)
        };
        // A group of its own, so that the whole of it (runuser and PgBouncer) is stopped.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        let reference = Self {
            port,
            version,
            child,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(reference);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("it did not listen within 5 s".to_owned())
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        // KILL, not TERM: nothing of it is worth keeping, and the wait below must end.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// Runs pgbench with `args` (and `password` for a server that asks); its output, or a panic
/// with it if it failed.
async fn pgbench(args: &[&str], password: &str) -> String {
    let output = tokio::process::Command::new(pgbench_path())
        .args(args)
        .env_clear()
        .env("PGPASSWORD", password)
        .output()
        .await
        .expect("pgbench runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "pgbench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn pgbench_path() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.flatten()
                .map(|d| d.path().join("bin/pgbench"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("pgbench"))
}

/// The `tps = …` figure of the line that names `which`.
fn tps(output: &str, which: &str) -> f64 {
    output
        .lines()
        .find(|line| line.starts_with("tps = ") && line.contains(which))
        .and_then(|line| line["tps = ".len()..].split(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no tps line ({which}) in:\n{output}"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The process's resident set, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
