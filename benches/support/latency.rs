//! Running calls concurrently and summarising their latencies.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// One measured operation. Each task gets its own clone, so that the harness adds no shared
/// reference counting of its own to the calls it measures.
pub trait Call: Clone + Send + Sync + 'static {
    fn call(&self) -> impl Future<Output = ()> + Send;
}

/// `tasks` tasks that each make `iterations` calls back to back; the wall time for all.
pub async fn concurrent_calls(tasks: usize, iterations: u64, call: impl Call) -> Duration {
    let started = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                for _ in 0..iterations {
                    call.call().await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("a benchmark task panicked");
    }
    started.elapsed()
}

/// `tasks` tasks that each start a call every `pace` for `window`; every call's latency.
pub async fn paced_latencies(
    tasks: usize,
    pace: Duration,
    window: Duration,
    call: impl Call,
) -> Vec<Duration> {
    let until = Instant::now() + window;
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut ticks = tokio::time::interval(pace);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while Instant::now() < until {
                    ticks.tick().await;
                    let started = Instant::now();
                    call.call().await;
                    latencies.push(started.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.expect("a benchmark task panicked"));
    }
    all
}

/// p50, p99 and max of `latencies`, and how many calls waited longer than 1 ms.
pub struct Summary {
    pub calls: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub over_1ms: usize,
}

impl Summary {
    pub fn of(mut latencies: Vec<Duration>) -> Self {
        assert!(!latencies.is_empty(), "no calls were measured");
        latencies.sort_unstable();
        let rank = |q: f64| {
            let index = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
            latencies[index - 1]
        };
        Self {
            calls: latencies.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: latencies[latencies.len() - 1],
            over_1ms: latencies
                .iter()
                .filter(|l| **l > Duration::from_millis(1))
                .count(),
        }
    }
}
