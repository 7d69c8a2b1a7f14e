//! Faults in the network itself. The pool's client runs on a test host: a network namespace
//! this test creates, joined to this host by a veth pair on addresses of the benchmarking
//! range (198.18.0.0/15, RFC 2544). PostgreSQL and the identity endpoint are reached across
//! that link (through plain TCP forwarders on this host's end of it, since the bed listens on
//! loopback), and the test host's packet filter (nftables, in the namespace only) drops,
//! loses and resets packets:
//!
//! 1. the identity endpoint unreachable (dropped) for 12 s while the token is still valid;
//! 2. 2 % of packets lost for 8 s (and 100 ms of delay where the kernel has `sch_netem`);
//! 3. a 10 s partition: every packet dropped, nothing refused;
//! 4. a reset in the middle of the TLS handshake (the server's ServerHello answered with a
//!    TCP reset, which both ends see) for 4 s.
//!
//! Asserted as the soak asserts: queries outside the fault windows succeed; inside the
//! partition, connects fail with `ConnectTimeout` (the limit holds on dropped packets) and no
//! error is untyped; the pool serves again within `RECOVERY_BOUND` of each fault's end; while
//! the identity endpoint is unreachable no query fails and identity requests stay bounded; no
//! token reaches a log line. Needs root, `ip` (iproute2) and `nft` (nftables); skipped
//! otherwise, unless `PG_ENTRA_REQUIRE_NETNS` (set by `.ci/run` as root) makes that a failure.
//! `--nocapture` prints the figures the README's table shows.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_entra::pool::deadpool::Runtime;
use pg_entra::pool::deadpool::managed::{Pool, PoolError};
use pg_entra::pool::{DeadpoolManager, DeadpoolPool};
use pg_entra::{Connector, Environment, Error};

use super::{Captured, assert_no_piece_of};

/// The connect limit under test: a connect whose packets are dropped ends with
/// `ConnectTimeout` after it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How soon after a fault ends the pool must serve again.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
/// Tokens live long enough to outlast the identity endpoint's outage (refreshed half-way).
const TOKEN_LIFETIME: Duration = Duration::from_secs(40);
/// Few and unhurried: the test shares the machine with the rest of the suite.
const WORKERS: usize = 4;
const POOL_SIZE: usize = 4;

/// A network namespace with one veth pair to this host, removed on drop.
struct TestHost {
    name: String,
    host_veth: String,
    /// The pair's end inside the namespace.
    own_veth: String,
    host_side: Ipv4Addr,
    own_side: Ipv4Addr,
}

impl TestHost {
    /// Creates it on a /30 of 198.18.0.0/15 chosen by the process ID.
    fn create() -> Result<Self, String> {
        let pid = std::process::id();
        let (third, fourth) = (((pid >> 6) & 0xff) as u8, ((pid & 0x3f) * 4) as u8);
        let host = Self {
            name: format!("pge-faults-{pid}"),
            host_veth: format!("pgef{pid}a"),
            own_veth: format!("pgef{pid}b"),
            host_side: Ipv4Addr::new(198, 18, third, fourth + 1),
            own_side: Ipv4Addr::new(198, 18, third, fourth + 2),
        };
        let peer = host.own_veth.clone();
        let (host_address, own_address) = (
            format!("{}/30", host.host_side),
            format!("{}/30", host.own_side),
        );
        let steps: [&[&str]; 8] = [
            &["ip", "netns", "add", &host.name],
            &["ip", "-n", &host.name, "link", "set", "lo", "up"],
            &[
                "ip",
                "link",
                "add",
                &host.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &host.name,
            ],
            &["ip", "addr", "add", &host_address, "dev", &host.host_veth],
            &["ip", "link", "set", &host.host_veth, "up"],
            &[
                "ip",
                "-n",
                &host.name,
                "addr",
                "add",
                &own_address,
                "dev",
                &peer,
            ],
            &["ip", "-n", &host.name, "link", "set", &peer, "up"],
            &["ip", "-n", &host.name, "link", "set", &peer, "mtu", "1500"],
        ];
        for step in steps {
            run(step)?;
        }
        Ok(host)
    }

    /// Replaces the test host's packet filter with `rules` (nft syntax, inside an output
    /// chain; empty: no filter).
    fn filter(&self, rules: &str) {
        let ruleset = format!(
            "flush ruleset\n\
             table inet faults {{\n\
               chain out {{ type filter hook output priority 0; policy accept;\n{rules}\n}}\n\
             }}\n"
        );
        let mut nft = bounded("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft runs");
        use std::io::Write as _;
        nft.stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft took {ruleset}");
    }

    /// `tc netem` on both ends of the link, if this kernel has it; whether it took.
    fn delay(&self, delay_ms: u32) -> bool {
        let delay = format!("{delay_ms}ms");
        let peer = &self.own_veth;
        run(&[
            "tc",
            "qdisc",
            "add",
            "dev",
            &self.host_veth,
            "root",
            "netem",
            "delay",
            &delay,
        ])
        .is_ok()
            && run(&[
                "tc", "-n", &self.name, "qdisc", "add", "dev", peer, "root", "netem", "delay",
                &delay,
            ])
            .is_ok()
    }

    fn clear_delay(&self) {
        let peer = &self.own_veth;
        let _ = run(&["tc", "qdisc", "del", "dev", &self.host_veth, "root"]);
        let _ = run(&["tc", "-n", &self.name, "qdisc", "del", "dev", peer, "root"]);
    }

    /// Moves the calling thread into the namespace: the sockets it (and the threads it
    /// starts) opens from then on are the test host's.
    fn enter(&self) {
        let namespace = File::open(format!("/run/netns/{}", self.name)).expect("the namespace");
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns(2) with a namespace file descriptor this thread owns; it changes only
        // the calling thread's network namespace.
        let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.clear_delay();
        // Deleting one end of the pair deletes both; the namespace takes its filter with it.
        let _ = run(&["ip", "link", "del", &self.host_veth]);
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// `tool`, under coreutils' `timeout`: a stuck network tool ends the test, not the run.
fn bounded(tool: &str) -> Command {
    let mut command = Command::new("timeout");
    command.args(["--kill-after=5", "30", tool]);
    command
}

fn run(command: &[&str]) -> Result<(), String> {
    let output = bounded(command[0])
        .args(&command[1..])
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Whether this machine can run the test: root, `ip` and `nft`.
fn can_make_test_hosts() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|status| {
            status
                .lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let tools = ["ip", "nft"].iter().all(|tool| {
        bounded(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            // `timeout` itself runs anywhere: the tool's own exit says whether it is there.
            .is_ok_and(|status| status.success())
    });
    if !(root && tools) {
        assert!(
            std::env::var_os("PG_ENTRA_REQUIRE_NETNS").is_none(),
            "the network fault test needs root, iproute2 and nftables"
        );
        eprintln!("SKIPPED: network faults need root, `ip` (iproute2) and `nft` (nftables)");
    }
    root && tools
}

/// Forwards every connection to `listen` (on this host's end of the link) to `target` on
/// loopback, until the runtime stops.
async fn forwarder(listen: Ipv4Addr, target: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((listen, 0)).await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    address
}

/// One checkout and `select 1`: when it started and ended, and what failed.
#[derive(Debug, Clone)]
struct Outcome {
    started: Instant,
    finished: Instant,
    failure: Option<String>,
}

/// A fault's window, and what the test host's filter did in it.
struct Window {
    name: &'static str,
    from: Instant,
    to: Instant,
}

#[test]
fn network_faults() {
    if !can_make_test_hosts() {
        return;
    }
    let captured = Captured::default();
    let dispatch = tracing::Dispatch::new(captured.subscriber());
    let _logging = crate::log_to(&dispatch);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (bed, pg_forward, identity_forward, host) = runtime.block_on(async {
        let bed = super::bed().await;
        bed.identity().set_token_lifetime(TOKEN_LIFETIME);
        let host = TestHost::create().expect("the test host");
        let pg = SocketAddr::from((Ipv4Addr::LOCALHOST, bed.postgres().port()));
        let identity_port: u16 = bed
            .identity()
            .authority_host()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let identity = SocketAddr::from((Ipv4Addr::LOCALHOST, identity_port));
        let pg_forward = forwarder(host.host_side, pg).await;
        let identity_forward = forwarder(host.host_side, identity).await;
        (bed, pg_forward, identity_forward, host)
    });
    let host = Arc::new(host);

    // What a service on the test host sees: the server's name for TLS, its address across
    // the link, the identity endpoint across it too.
    let mut vars: Vec<(String, String)> = bed
        .vars()
        .into_iter()
        .filter(|(name, _)| name != "PGPORT" && !name.starts_with("AZURE_POD"))
        .collect();
    vars.extend([
        ("PGHOSTADDR".to_owned(), pg_forward.ip().to_string()),
        ("PGPORT".to_owned(), pg_forward.port().to_string()),
        (
            "PGCONNECT_TIMEOUT".to_owned(),
            CONNECT_TIMEOUT.as_secs().to_string(),
        ),
        (
            "AZURE_POD_IDENTITY_AUTHORITY_HOST".to_owned(),
            format!("http://{identity_forward}"),
        ),
    ]);
    let connector = Connector::builder()
        .environment(Environment::from_vars(vars))
        .build()
        .unwrap();

    // The client: its own thread in the test host's namespace, with a runtime of its own.
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let tokens = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (host, connector, outcomes, tokens, stop, dispatch) = (
            Arc::clone(&host),
            connector.clone(),
            Arc::clone(&outcomes),
            Arc::clone(&tokens),
            Arc::clone(&stop),
            dispatch.clone(),
        );
        std::thread::spawn(move || {
            let _logging = crate::log_to(&dispatch);
            host.enter();
            // Built after entering: its threads start in the namespace too.
            let runtime = super::logging_runtime(&dispatch);
            runtime.block_on(workload(connector, outcomes, tokens, stop));
        })
    };

    let started = Instant::now();
    let mut windows = Vec::new();
    let pg = pg_forward.port();
    let id = identity_forward.port();
    let link = host.host_side;
    let wait = |seconds: u64| std::thread::sleep(Duration::from_secs(seconds));

    // 1. The identity endpoint unreachable while the token is valid: from 13 s after the
    //    first token until 25 s, so that its refresh (due half-way, at 20 s) falls in the
    //    outage and the token (valid 40 s) outlives it.
    let deadline = Instant::now() + TOKEN_LIFETIME;
    while bed.identity().tokens_issued() == 0 {
        assert!(Instant::now() < deadline, "the client gets a token");
        std::thread::sleep(Duration::from_millis(10));
    }
    let first_token = Instant::now();
    std::thread::sleep(
        (first_token + Duration::from_secs(13)).saturating_duration_since(Instant::now()),
    );
    let requests_before = bed.identity().requests();
    host.filter(&format!("ip daddr {link} tcp dport {id} drop"));
    let unreachable_from = Instant::now();
    wait(12);
    let health = connector.token_cache().health();
    host.filter("");
    let unreachable_to = Instant::now();
    // The refresh goes through once the endpoint is back.
    let refreshed = loop {
        let now = connector.token_cache().health();
        if now.last_refresh_at.is_some() && now.last_refresh_at > health.last_refresh_at {
            break Instant::now();
        }
        assert!(
            unreachable_to.elapsed() < RECOVERY_BOUND,
            "no refresh within {RECOVERY_BOUND:?} of the endpoint's return: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let requests_during = bed.identity().requests() - requests_before;
    wait(3);

    // 2. Loss (and delay, where netem exists).
    let delayed = host.delay(100);
    host.filter(&format!("ip daddr {link} numgen random mod 100 < 2 drop"));
    let from = Instant::now();
    wait(8);
    host.filter("");
    host.clear_delay();
    windows.push(Window {
        name: "2% loss",
        from,
        to: Instant::now(),
    });
    wait(3);

    // 3. A 10 s partition: dropped, not refused.
    host.filter(&format!("ip daddr {link} drop"));
    let from = Instant::now();
    wait(10);
    host.filter("");
    windows.push(Window {
        name: "10 s partition",
        from,
        to: Instant::now(),
    });
    wait(RECOVERY_BOUND.as_secs() + 2);

    // 4. A reset in the middle of the TLS handshake: the server's ServerHello (a TLS
    //    handshake record, 16 03 03) arriving on the test host is answered with a TCP reset,
    //    so both ends of the connection see one. Sessions already open are untouched.
    host.filter(&format!(
        "}}\nchain in {{ type filter hook input priority 0; policy accept;\n\
         ip saddr {link} tcp sport {pg} @ih,0,24 0x160303 reject with tcp reset"
    ));
    let from = Instant::now();
    wait(4);
    host.filter("");
    windows.push(Window {
        name: "reset in the TLS handshake",
        from,
        to: Instant::now(),
    });
    wait(5);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    client.join().expect("the client thread");
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let total = outcomes.len();
    if std::env::var_os("PG_ENTRA_FAULTS_DEBUG").is_some() {
        eprintln!("health during the outage: {health:?}");
        for line in captured
            .text()
            .lines()
            .filter(|l| l.contains("pg_entra::cache") || l.contains("credential"))
        {
            eprintln!("{line}");
        }
    }

    // A window's failures: from its start until the pool has had time to recover, or the
    // next fault begins, whichever is first (each failure belongs to one fault).
    let ends: Vec<Instant> = (0..windows.len())
        .map(|i| {
            let recovered = windows[i].to + RECOVERY_BOUND;
            windows
                .get(i + 1)
                .map_or(recovered, |next| recovered.min(next.from))
        })
        .collect();
    let in_window = |o: &Outcome, w: &Window| {
        let i = windows.iter().position(|x| std::ptr::eq(x, w)).unwrap();
        o.finished >= w.from && o.started <= ends[i]
    };
    // Outside every window, everything succeeded.
    let outside_failures: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.failure.is_some() && !windows.iter().any(|w| in_window(o, w)))
        .collect();
    let at = |instant: Instant| instant.saturating_duration_since(started).as_secs_f64();
    // The identity endpoint's outage is in no window: its checkouts are held to this too.
    assert!(
        outside_failures.is_empty(),
        "failures outside the fault windows ({}), at: {:?}",
        windows
            .iter()
            .map(|w| format!("{} {:.1}–{:.1} s", w.name, at(w.from), at(w.to)))
            .collect::<Vec<_>>()
            .join(", "),
        outside_failures
            .iter()
            .map(|o| format!(
                "{:.1}–{:.1} s {:?}",
                at(o.started),
                at(o.finished),
                o.failure
            ))
            .collect::<Vec<_>>()
    );
    // The outage was met (the refresh due in it could not finish), the token stayed usable,
    // the cache refreshed soon after the endpoint's return, and with few requests.
    assert!(
        health.refreshing || health.consecutive_failures > 0,
        "a refresh fell in the outage: {health:?}"
    );
    assert!(health.ready, "the token stayed usable: {health:?}");
    assert!(
        requests_during <= 8,
        "{requests_during} identity requests from the outage's start to the refresh after it"
    );
    let refresh_delay = refreshed.saturating_duration_since(unreachable_to);

    println!(
        "network faults, {total} checkouts in {:.0} s:",
        started.elapsed().as_secs_f64()
    );
    // Each failure is counted for the first fault whose span it meets.
    let window_of = |o: &Outcome| windows.iter().position(|w| in_window(o, w));
    for (index, window) in windows.iter().enumerate() {
        let failures: Vec<&String> = outcomes
            .iter()
            .filter(|o| window_of(o) == Some(index))
            .filter_map(|o| o.failure.as_ref())
            .collect();
        // Only the network's failures: timeouts, resets, closed connections, I/O errors by
        // kind, TLS failures; never a refused login or a server error.
        for failure in &failures {
            assert!(
                [
                    "ConnectTimeout",
                    "closed",
                    "reset",
                    "timed out",
                    "TLS",
                    "io "
                ]
                .iter()
                .any(|kind| failure.contains(kind))
                    && !failure.contains("db error"),
                "{}: not a network failure: {failure}",
                window.name
            );
        }
        let recovered = outcomes
            .iter()
            .filter(|o| o.failure.is_none() && o.started >= window.to)
            .map(|o| o.finished.saturating_duration_since(window.to))
            .min()
            .expect("a success after the fault");
        assert!(
            recovered <= RECOVERY_BOUND,
            "{}: first success {recovered:?} after the fault ended",
            window.name
        );
        let mut kinds: Vec<&str> = failures.iter().map(|f| f.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        println!(
            "  {}: {} failed checkouts ({}); first success {:.2} s after it ended",
            window.name,
            failures.len(),
            kinds.join(", "),
            recovered.as_secs_f64()
        );
        if window.name == "reset in the TLS handshake" {
            // Said as what it is: a broken connection, not an untrusted certificate.
            assert!(
                failures
                    .iter()
                    .any(|f| f.contains("broke during the TLS handshake")),
                "{failures:?}"
            );
            assert!(
                !failures.iter().any(|f| f.contains("could not verify")),
                "{failures:?}"
            );
        }
        if window.name == "10 s partition" {
            // Connects into dropped packets end at the connect limit, as its own error.
            assert!(
                failures.iter().any(|f| f.contains("ConnectTimeout")),
                "connects into the partition end with ConnectTimeout"
            );
            assert!(
                !failures.iter().any(|f| f.contains("io TimedOut")),
                "{failures:?}"
            );
        }
    }
    println!(
        "  identity endpoint unreachable {:.0} s with a valid token: 0 failed checkouts; refreshed {:.2} s after its return, {requests_during} identity requests in all",
        (unreachable_to - unreachable_from).as_secs_f64(),
        refresh_delay.as_secs_f64()
    );
    if !delayed {
        println!("  (no 100 ms delay: this kernel has no sch_netem)");
    }

    let logs = captured.text();
    for token in tokens.lock().unwrap().iter() {
        assert_no_piece_of(token, &logs);
    }
    drop(host);
    drop(runtime);
    drop(bed);
}

/// `WORKERS` tasks that check out, `select 1` and return, with connections renewed every
/// half second, until `stop`; every token the cache holds is kept to look for in the logs.
async fn workload(
    connector: Connector,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tokens: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let pool: DeadpoolPool = Pool::builder(
        DeadpoolManager::new(connector.clone()).max_lifetime(Some(Duration::from_millis(500))),
    )
    .max_size(POOL_SIZE)
    .runtime(Runtime::Tokio1)
    .wait_timeout(Some(Duration::from_secs(5)))
    .create_timeout(Some(Duration::from_secs(5)))
    .recycle_timeout(Some(Duration::from_secs(2)))
    .build()
    .unwrap();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (pool, outcomes, stop) = (pool.clone(), Arc::clone(&outcomes), Arc::clone(&stop));
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let failure = match pool.get().await {
                    Ok(client) => {
                        match tokio::time::timeout(
                            Duration::from_secs(5),
                            client.query_one("select 1", &[]),
                        )
                        .await
                        {
                            Ok(Ok(_)) => None,
                            Ok(Err(error)) if error.is_closed() => Some("query: closed".into()),
                            Ok(Err(error)) => Some(format!("query: {error}")),
                            Err(_) => Some("query: timed out".into()),
                        }
                    }
                    Err(PoolError::Backend(error)) => Some(kind(&error)),
                    Err(PoolError::Timeout(_)) => Some("pool: timed out".into()),
                    Err(other) => Some(format!("pool: {other}")),
                };
                let failed = failure.is_some();
                outcomes.lock().unwrap().push(Outcome {
                    started,
                    finished: Instant::now(),
                    failure,
                });
                tokio::time::sleep(Duration::from_millis(if failed { 50 } else { 20 })).await;
            }
        }));
    }
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Some(token) = connector.token_cache().cached() {
            let secret = token.secret().to_owned();
            let mut seen = tokens.lock().unwrap();
            if !seen.contains(&secret) {
                seen.push(secret);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for worker in workers {
        let _ = worker.await;
    }
}

/// A connect failure's kind, for the report.
fn kind(error: &Error) -> String {
    match error {
        Error::ConnectTimeout { .. } => "ConnectTimeout".into(),
        Error::Postgres { source } if source.is_closed() => "connect: closed".into(),
        Error::Postgres { source } => {
            use std::error::Error as _;
            if let Some(io) = source
                .source()
                .and_then(|s| s.downcast_ref::<std::io::Error>())
            {
                return format!("connect: io {:?}", io.kind());
            }
            let text = source.to_string();
            if text.contains("reset") {
                "connect: reset".into()
            } else if text.contains("TLS") || text.contains("tls") || text.contains("ssl") {
                format!("connect: TLS ({text})")
            } else {
                format!("connect: {text}")
            }
        }
        other => format!("connect: {other}"),
    }
}
