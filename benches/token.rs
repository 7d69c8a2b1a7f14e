//! Token benchmarks: pg-entra's `TokenCache` against `azure_identity`'s
//! `ManagedIdentityCredential` (App Service source, its own cache), both talking to the same
//! local identity endpoint, measured in the same run.
//!
//! ```sh
//! cargo bench --bench token                      # all of them
//! cargo bench --bench token -- fresh_read        # one of: fresh_read, config, clock, cold_herd,
//!                                                # refresh_boundary
//! ```
//!
//! - `fresh_read`: a warm token read by 1, 8 and 64 concurrent tasks, owned (`token()`) and
//!   borrowed (`with_token()`) (criterion; compare the throughputs).
//! - `config`: a connection config with the current token (`Connector::config()`) against the
//!   anchor's token plus a config clone with it as password.
//! - `clock`: the coarse wall clock the cache reads against `SystemTime::now()`.
//! - `cold_herd`: 1,000 concurrent first requests on an empty cache (criterion), and how many
//!   endpoint requests each side made.
//! - `refresh_boundary`: latency percentiles of getting a connection config for calls spread
//!   across the moment the token turns stale, with a 300 ms identity endpoint (printed table;
//!   criterion has no percentile report).

#[path = "support/anchor.rs"]
mod anchor;
#[path = "support/latency.rs"]
mod latency;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use azure_identity::ManagedIdentityCredential;
use criterion::{BenchmarkId, Criterion, Throughput};
use pg_entra::testing::{IdentityEndpoint, Principal};
use pg_entra::{Cloud, Connector, Environment, TokenCache, TokenCredential};
use tokio::runtime::Runtime;

use latency::{Call, Summary, concurrent_calls, paced_latencies};

const HERD: usize = 1000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let principal = Principal::system_assigned("bench-vm");
    let endpoint = runtime
        .block_on(
            IdentityEndpoint::builder()
                .principal(principal.clone())
                .start(),
        )
        .expect("the identity endpoint starts");
    anchor::point_app_service_at(&endpoint);
    let bench = Bench {
        runtime,
        endpoint,
        principal,
    };

    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    bench.fresh_read(&mut criterion);
    bench.config(&mut criterion);
    bench.clock(&mut criterion);
    bench.cold_herd(&mut criterion);
    criterion.final_summary();
    if selected("refresh_boundary") {
        bench.refresh_boundary();
    }
}

/// pg-entra: read the cached token.
#[derive(Clone)]
struct ReadToken(TokenCache);

impl Call for ReadToken {
    async fn call(&self) {
        black_box(self.0.token().await.expect("a token"));
    }
}

/// pg-entra: read the cached token in place and copy its secret's length out.
#[derive(Clone)]
struct BorrowToken(TokenCache);

impl Call for BorrowToken {
    async fn call(&self) {
        black_box(
            self.0
                .with_token(|token| token.secret().len())
                .await
                .expect("a token"),
        );
    }
}

/// Nothing: what the harness itself costs per call (spawned tasks, one `.await` per call).
#[derive(Clone)]
struct Nothing;

impl Call for Nothing {
    async fn call(&self) {
        black_box(());
    }
}

/// The anchor: `get_token`, which its own cache answers while the token is warm.
#[derive(Clone)]
struct AnchorToken(Arc<ManagedIdentityCredential>);

impl Call for AnchorToken {
    async fn call(&self) {
        black_box(
            self.0
                .get_token(&[Cloud::Public.scope()], None)
                .await
                .expect("an anchor token"),
        );
    }
}

/// pg-entra: a connection config with the current token.
#[derive(Clone)]
struct ConnectorConfig(Connector);

impl Call for ConnectorConfig {
    async fn call(&self) {
        black_box(self.0.config().await.expect("a config"));
    }
}

/// The anchor: the same config, built from its token.
#[derive(Clone)]
struct AnchorConfig {
    credential: Arc<ManagedIdentityCredential>,
    base: tokio_postgres::Config,
}

impl Call for AnchorConfig {
    async fn call(&self) {
        let token = self
            .credential
            .get_token(&[Cloud::Public.scope()], None)
            .await
            .expect("an anchor token");
        let mut config = self.base.clone();
        config.password(token.token.secret());
        black_box(config);
    }
}

/// Whether the command line's filter (if any) selects `name`, as criterion's filter does.
fn selected(name: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    filters.is_empty() || filters.iter().any(|filter| name.contains(filter.as_str()))
}

struct Bench {
    runtime: Runtime,
    endpoint: IdentityEndpoint,
    principal: Principal,
}

impl Bench {
    fn cache(&self) -> TokenCache {
        TokenCache::builder(Arc::new(self.endpoint.credential_for(&self.principal)))
            .build()
            .expect("default cache settings are valid")
    }

    fn fresh_read(&self, criterion: &mut Criterion) {
        let cache = self.cache();
        let ours = ReadToken(cache.clone());
        let borrowed = BorrowToken(cache);
        let theirs = AnchorToken(anchor::credential());
        self.runtime.block_on(async {
            ours.call().await;
            theirs.call().await;
        });
        let mut group = criterion.benchmark_group("fresh_read");
        for tasks in [1usize, 8, 64] {
            group.throughput(Throughput::Elements(tasks as u64));
            group.bench_with_input(BenchmarkId::new("pg-entra", tasks), &tasks, |b, &tasks| {
                b.to_async(&self.runtime)
                    .iter_custom(|iterations| concurrent_calls(tasks, iterations, ours.clone()))
            });
            group.bench_with_input(
                BenchmarkId::new("harness-floor", tasks),
                &tasks,
                |b, &tasks| {
                    b.to_async(&self.runtime)
                        .iter_custom(|iterations| concurrent_calls(tasks, iterations, Nothing))
                },
            );
            group.bench_with_input(
                BenchmarkId::new("pg-entra-borrowed", tasks),
                &tasks,
                |b, &tasks| {
                    b.to_async(&self.runtime).iter_custom(|iterations| {
                        concurrent_calls(tasks, iterations, borrowed.clone())
                    })
                },
            );
            group.bench_with_input(
                BenchmarkId::new("azure_identity", tasks),
                &tasks,
                |b, &tasks| {
                    b.to_async(&self.runtime).iter_custom(|iterations| {
                        concurrent_calls(tasks, iterations, theirs.clone())
                    })
                },
            );
        }
        group.finish();
    }

    /// What a connect pays before it touches the network: a config with the current token.
    fn config(&self, criterion: &mut Criterion) {
        let connector = Connector::builder()
            .environment(Environment::empty())
            .host("localhost")
            .token_cache(self.cache())
            .build()
            .expect("a connector");
        let ours = ConnectorConfig(connector);
        let theirs = AnchorConfig {
            credential: anchor::credential(),
            base: {
                let mut config = tokio_postgres::Config::new();
                config
                    .host("localhost")
                    .dbname("postgres")
                    .user(self.principal.name());
                config
            },
        };
        self.runtime.block_on(async {
            ours.call().await;
            theirs.call().await;
        });
        let mut group = criterion.benchmark_group("config");
        group.throughput(Throughput::Elements(1));
        group.bench_function("pg-entra", |b| {
            b.to_async(&self.runtime)
                .iter_custom(|iterations| concurrent_calls(1, iterations, ours.clone()))
        });
        group.bench_function("azure_identity", |b| {
            b.to_async(&self.runtime)
                .iter_custom(|iterations| concurrent_calls(1, iterations, theirs.clone()))
        });
        group.finish();
    }

    /// The wall clock freshness is judged on: the coarse one the cache uses, against
    /// `SystemTime::now()`.
    fn clock(&self, criterion: &mut Criterion) {
        use pg_entra::cache::Clock as _;
        let mut group = criterion.benchmark_group("clock");
        group.bench_function("SystemClock (CLOCK_REALTIME_COARSE)", |b| {
            b.iter(|| black_box(pg_entra::cache::SystemClock.now()))
        });
        group.bench_function("SystemTime::now", |b| {
            b.iter(|| black_box(std::time::SystemTime::now()))
        });
        group.finish();
    }

    fn cold_herd(&self, criterion: &mut Criterion) {
        let mut group = criterion.benchmark_group("cold_herd");
        group
            .sample_size(10)
            .throughput(Throughput::Elements(HERD as u64));
        let requests = |herds: &AtomicUsize, before: usize| {
            herds.fetch_add(1, Ordering::Relaxed);
            self.endpoint.requests() - before
        };
        let (our_herds, our_requests) = (AtomicUsize::new(0), AtomicUsize::new(0));
        group.bench_function(BenchmarkId::new("pg-entra", HERD), |b| {
            b.to_async(&self.runtime).iter_custom(|iterations| {
                let caches: Vec<_> = (0..iterations).map(|_| self.cache()).collect();
                let (herds, counted) = (&our_herds, &our_requests);
                async move {
                    let mut total = Duration::ZERO;
                    for cache in caches {
                        let before = self.endpoint.requests();
                        total += concurrent_calls(HERD, 1, ReadToken(cache)).await;
                        counted.fetch_add(requests(herds, before), Ordering::Relaxed);
                    }
                    total
                }
            })
        });
        let (their_herds, their_requests) = (AtomicUsize::new(0), AtomicUsize::new(0));
        group.bench_function(BenchmarkId::new("azure_identity", HERD), |b| {
            b.to_async(&self.runtime).iter_custom(|iterations| {
                let credentials: Vec<_> = (0..iterations).map(|_| anchor::credential()).collect();
                let (herds, counted) = (&their_herds, &their_requests);
                async move {
                    let mut total = Duration::ZERO;
                    for credential in credentials {
                        let before = self.endpoint.requests();
                        total += concurrent_calls(HERD, 1, AnchorToken(credential)).await;
                        counted.fetch_add(requests(herds, before), Ordering::Relaxed);
                    }
                    total
                }
            })
        });
        group.finish();
        for (name, herds, requests) in [
            ("pg-entra", &our_herds, &our_requests),
            ("azure_identity", &their_herds, &their_requests),
        ] {
            let herds = herds.load(Ordering::Relaxed);
            if herds > 0 {
                println!(
                    "cold_herd/{name}: {:.2} identity-endpoint requests per {HERD} callers \
                     ({herds} herds)",
                    requests.load(Ordering::Relaxed) as f64 / herds as f64
                );
            }
        }
    }

    fn refresh_boundary(&self) {
        const TASKS: usize = 8;
        const PACE: Duration = Duration::from_millis(2);
        const WINDOW: Duration = Duration::from_millis(2500);
        self.endpoint.set_latency(Duration::from_millis(300));
        let base = {
            let mut config = tokio_postgres::Config::new();
            config
                .host("localhost")
                .dbname("postgres")
                .user(self.principal.name());
            config
        };

        // pg-entra: 4 s tokens, stale 2 s after issue (refresh margin 2 s, no jitter).
        self.endpoint.set_token_lifetime(Duration::from_secs(4));
        let cache = TokenCache::builder(Arc::new(self.endpoint.credential_for(&self.principal)))
            .refresh_margin(Duration::from_secs(2))
            .refresh_jitter(Duration::ZERO)
            .expiry_margin(Duration::from_millis(500))
            .build()
            .expect("valid cache settings");
        let connector = Connector::builder()
            .environment(Environment::empty())
            .host("localhost")
            .token_cache(cache)
            .build()
            .expect("a connector");
        let (ours, our_requests) = self.runtime.block_on(async {
            connector.config().await.expect("first token");
            let before = self.endpoint.requests();
            let latencies = paced_latencies(TASKS, PACE, WINDOW, ConnectorConfig(connector)).await;
            (Summary::of(latencies), self.endpoint.requests() - before)
        });

        // azure_identity refreshes once 300 s or less remain: 302 s tokens turn stale at 2 s.
        self.endpoint.set_token_lifetime(Duration::from_secs(302));
        let theirs = anchor::credential();
        let (anchor_summary, their_requests) = self.runtime.block_on(async {
            AnchorToken(Arc::clone(&theirs)).call().await;
            let before = self.endpoint.requests();
            let latencies = paced_latencies(
                TASKS,
                PACE,
                WINDOW,
                AnchorConfig {
                    credential: theirs,
                    base,
                },
            )
            .await;
            (Summary::of(latencies), self.endpoint.requests() - before)
        });
        self.endpoint.set_latency(Duration::ZERO);

        println!(
            "refresh_boundary: {TASKS} tasks, one config every {PACE:?} each, for {WINDOW:?} \
             across the moment the token turns stale; identity endpoint latency 300 ms"
        );
        println!(
            "{:<16} {:>6} {:>12} {:>12} {:>14} {:>10} {:>9}",
            "", "calls", "p50", "p99", "max", "over 1 ms", "requests"
        );
        for (name, summary, requests) in [
            ("pg-entra", ours, our_requests),
            ("azure_identity", anchor_summary, their_requests),
        ] {
            println!(
                "{name:<16} {:>6} {:>12?} {:>12?} {:>14?} {:>10} {requests:>9}",
                summary.calls, summary.p50, summary.p99, summary.max, summary.over_1ms
            );
        }
    }
}
