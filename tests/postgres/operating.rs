//! Operating a service: readiness (warm-up), the health snapshot, spans with OpenTelemetry's
//! attribute names, and metrics with exact counts under scripted faults.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pg_entra::cache::RefreshResult;
use pg_entra::testing::{Reply, TestBed};
use pg_entra::{Connector, Environment, Error, WarmUp};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};

use super::bed;

/// A connector as a service builds it: the default chain from the bed's environment.
fn service_connector(bed: &TestBed) -> Connector {
    Connector::builder()
        .environment(Environment::from_vars(bed.vars()))
        .build()
        .unwrap()
}

async fn revoke(bed: &TestBed) {
    let until = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    bed.postgres()
        .password_setter()
        .set_password(bed.principal().name(), "revoked-by-an-admin", until)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_gets_a_token_or_a_login_or_says_why_not() {
    let bed = bed().await;
    let connector = bed.connector_builder().build().unwrap();
    connector
        .warm_up(WarmUp::Token, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(bed.identity().tokens_issued(), 1);
    assert!(connector.token_cache().health().ready);
    connector
        .warm_up(WarmUp::Login, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(bed.postgres().log().contains("connection authorized"));
    assert_eq!(
        bed.identity().tokens_issued(),
        1,
        "the login used the warm token"
    );

    // A role the server does not know: the login's own typed error.
    let stranger = bed.connector_builder().user("stranger").build().unwrap();
    let error = stranger
        .warm_up(WarmUp::Login, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(error.is_auth_failure(), "{error:?}");

    // An endpoint that does not answer: the bound, and what was awaited.
    let bed = bed_held().await;
    let connector = bed.0.connector_builder().build().unwrap();
    let error = connector
        .warm_up(WarmUp::Token, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::NotReady {
                waiting_for: "a token",
                last_error: None,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.hint().is_some());
}

/// A bed whose identity endpoint holds every request until the guard is dropped.
async fn bed_held() -> (TestBed, pg_entra::testing::HoldGuard) {
    let bed = bed().await;
    let hold = bed.identity().hold();
    (bed, hold)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_shows_the_cache_without_waiting() {
    let bed = bed().await;
    let connector = service_connector(&bed);
    let cache = connector.token_cache();
    let empty = cache.health();
    assert!(!empty.ready);
    assert_eq!(empty.last_refresh, None);
    assert_eq!(empty.credential, "DefaultAzureCredential");

    let token = cache.token().await.unwrap();
    let health = cache.health();
    assert!(health.ready);
    assert_eq!(health.expires_on, Some(token.expires_on()));
    assert!(health.refresh_at.unwrap() < token.expires_on());
    assert_eq!(health.last_refresh, Some(RefreshResult::Refreshed));
    assert!(health.last_refresh_at.is_some());
    assert_eq!(health.consecutive_failures, 0);
    assert_eq!(health.backing_off_until, None);
    assert_eq!(health.credential, "ManagedIdentityCredential");
    assert!(!format!("{health:?}").contains(token.secret()));

    // A refused forced refresh: the failure, its count and the backoff show, the token is
    // still there.
    bed.identity().script([Reply::status(403)]);
    let forced = cache.refresh_rejected(&token).await;
    assert!(forced.is_err());
    let health = cache.health();
    assert!(health.ready, "the cached token is still usable");
    assert_eq!(health.last_refresh, Some(RefreshResult::Failed));
    assert_eq!(health.consecutive_failures, 1);
    assert!(health.backing_off_until.is_some());
    assert!(
        health.last_error.as_deref().unwrap().contains("403"),
        "{health:?}"
    );
}

/// A span's name and its fields.
type SpanRecord = (String, Vec<(String, String)>);

/// Spans, as a `tracing-opentelemetry` layer would see them.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanRecord>>>);

struct FieldsOf<'a>(&'a mut Vec<(String, String)>);

impl Visit for FieldsOf<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: Context<'_, S>) {
        let mut fields = Vec::new();
        attrs.record(&mut FieldsOf(&mut fields));
        let name = attrs.metadata().name().to_owned();
        self.0.lock().unwrap().push((name, fields));
    }
    fn on_record(&self, _id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        let mut fields = Vec::new();
        values.record(&mut FieldsOf(&mut fields));
        if let Some(last) = self.0.lock().unwrap().last_mut() {
            last.1.extend(fields);
        }
    }
}

impl Spans {
    /// Records this thread's spans (and those of a current-thread runtime on it) until the
    /// guard drops.
    fn capture() -> (Self, tracing::dispatcher::DefaultGuard) {
        let spans = Self::default();
        let guard = crate::log_to(&tracing::Dispatch::new(
            Registry::default().with(spans.clone()),
        ));
        (spans, guard)
    }

    fn named(&self, name: &str) -> Vec<Vec<(String, String)>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, fields)| fields.clone())
            .collect()
    }
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A connect, a token acquisition through the chain, a refresh on demand and a forced one,
/// each in its span with OpenTelemetry's database-client attribute names; no field holds the
/// token.
#[tokio::test]
async fn connects_and_refreshes_are_spans_with_opentelemetry_names() {
    // This runtime is this thread: every task's spans reach this subscriber.
    let (spans, _guard) = Spans::capture();
    let bed = bed().await;
    let connector = service_connector(&bed);
    let client = connector.connect().await.unwrap();
    client.simple_query("select 1").await.unwrap();
    revoke(&bed).await;
    connector.connect().await.unwrap();

    let port = bed.postgres().port().to_string();
    let connects = spans.named("pg_entra.connect");
    assert_eq!(connects.len(), 2);
    for fields in &connects {
        assert_eq!(field(fields, "db.system.name"), Some("postgresql"));
        assert_eq!(field(fields, "db.namespace"), Some("postgres"));
        assert_eq!(field(fields, "server.address"), Some("localhost"));
        assert_eq!(field(fields, "server.port"), Some(port.as_str()));
    }
    // One attempt for the first connect; the refused one and its retry for the second.
    let attempts = spans.named("pg_entra.connect.attempt");
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts
            .iter()
            .all(|f| field(f, "server.port") == Some(&port))
    );
    let refreshes = spans.named("pg_entra.token.refresh");
    let triggers: Vec<_> = refreshes
        .iter()
        .map(|f| field(f, "trigger").unwrap())
        .collect();
    assert_eq!(triggers, ["on_demand", "forced"]);
    assert!(
        refreshes.iter().all(
            |f| field(f, "scope") == Some("https://ossrdbms-aad.database.windows.net/.default")
        )
    );
    // The chain names its member once it has answered.
    assert_eq!(
        field(&refreshes[1], "credential"),
        Some("ManagedIdentityCredential")
    );
    let acquired = spans.named("pg_entra.token.acquire");
    assert!(
        acquired
            .iter()
            .any(|f| field(f, "credential") == Some("ManagedIdentityCredential")),
        "{acquired:?}"
    );
    let token = connector.token_cache().cached().unwrap();
    let everything = format!("{:?}", spans.0.lock().unwrap());
    assert!(!everything.contains(token.secret()));
    assert!(!everything.contains(&token.secret()[..40]));
}

/// A connect through two hosts, the first of which refuses TCP: one connect span, and one
/// attempt span per host, each naming its port.
#[tokio::test]
async fn each_host_attempt_is_a_span() {
    let (spans, _guard) = Spans::capture();
    let bed = bed().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port = bed.postgres().port();
    let vars = bed
        .vars()
        .into_iter()
        .map(|(name, value)| match name.as_str() {
            "PGHOST" => (name, format!("{value},{value}")),
            "PGPORT" => (name, format!("{closed},{port}")),
            _ => (name, value),
        });
    let connector = Connector::builder()
        .environment(Environment::from_vars(vars))
        .build()
        .unwrap();
    connector.connect().await.unwrap();
    assert_eq!(spans.named("pg_entra.connect").len(), 1);
    let ports: Vec<_> = spans
        .named("pg_entra.connect.attempt")
        .iter()
        .map(|f| field(f, "server.port").unwrap().to_owned())
        .collect();
    assert_eq!(ports, [closed.to_string(), port.to_string()]);
}

/// A read after the token's refresh time returns the cached token and refreshes it in the
/// background: that refresh is a span of its own, with the `background` trigger.
#[tokio::test]
async fn a_refresh_ahead_of_expiry_is_a_background_span() {
    let (spans, _guard) = Spans::capture();
    let bed = bed().await;
    bed.identity().set_token_lifetime(Duration::from_secs(4));
    let connector = service_connector(&bed);
    let cache = connector.token_cache();
    let first = cache.token().await.unwrap();
    let refresh_at = cache.health().refresh_at.unwrap();
    // The cache reads the coarse wall clock (a few milliseconds behind): wait a little past.
    let wait = refresh_at - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(50);
    tokio::time::sleep(wait.try_into().unwrap_or_default()).await;
    // Still usable: this read gets it back at once and starts the refresh.
    assert_eq!(cache.token().await.unwrap().secret(), first.secret());
    for _ in 0..100 {
        if bed.identity().tokens_issued() == 2 && !cache.health().refreshing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let triggers: Vec<_> = spans
        .named("pg_entra.token.refresh")
        .iter()
        .map(|f| field(f, "trigger").unwrap().to_owned())
        .collect();
    assert_eq!(triggers, ["on_demand", "background"]);
}

#[cfg(feature = "metrics")]
mod metrics {
    use ::metrics::{SharedString, Unit};
    use metrics_util::CompositeKey;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// The tokens' lifetime in the fault run.
    const LIFETIME: Duration = Duration::from_secs(1800);

    type Snapshot = Vec<(CompositeKey, Option<Unit>, Option<SharedString>, DebugValue)>;

    /// A counter's value by name and labels (`None` when it was never touched).
    fn counter(snapshot: &Snapshot, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        match value(snapshot, name, labels)? {
            DebugValue::Counter(count) => Some(*count),
            _ => None,
        }
    }

    /// A metric's recorded value by name and labels (`None` when it was never touched).
    fn value<'a>(
        snapshot: &'a Snapshot,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<&'a DebugValue> {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let matches = key.name() == name
                && labels.len() == key.labels().count()
                && labels.iter().all(|(k, v)| {
                    key.labels()
                        .any(|label| label.key() == *k && label.value() == *v)
                });
            matches.then_some(value)
        })
    }

    /// How many samples a histogram holds, by name and labels.
    fn samples(snapshot: &Snapshot, name: &str, labels: &[(&str, &str)]) -> Option<usize> {
        match value(snapshot, name, labels)? {
            DebugValue::Histogram(samples) => Some(samples.len()),
            _ => None,
        }
    }

    /// Runs `run` with a new bed on a runtime of this thread, under a recorder of its own;
    /// what it recorded.
    fn recorded<F: std::future::Future<Output = ()>>(run: impl FnOnce(TestBed) -> F) -> Snapshot {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async { run(bed().await).await });
        });
        // One snapshot: taking it resets the recorder's counters.
        snapshotter.snapshot().into_vec()
    }

    /// A scripted fault run with exact counts: two 429s before the first token, a revoked
    /// token recovered by one forced refresh, a second revocation within the forced-refresh
    /// interval refused without one.
    #[test]
    fn a_fault_run_is_counted_exactly() {
        let snapshot = recorded(|bed| async move {
            bed.identity().set_token_lifetime(LIFETIME);
            bed.identity().script([
                Reply::status(429).retry_after(0),
                Reply::status(429).retry_after(0),
            ]);
            let connector = bed.connector_builder().build().unwrap();
            connector.connect().await.unwrap();
            revoke(&bed).await;
            connector.connect().await.unwrap();
            revoke(&bed).await;
            let refused = connector.connect().await.unwrap_err();
            assert!(refused.is_auth_failure());
            connector.token_cache().health();
        });
        let count = |name: &str, labels: &[(&str, &str)]| counter(&snapshot, name, labels);
        assert_eq!(
            count(
                "pg_entra.identity.requests",
                &[("source", "imds"), ("status", "429")]
            ),
            Some(2)
        );
        assert_eq!(
            count(
                "pg_entra.identity.requests",
                &[("source", "imds"), ("status", "200")]
            ),
            Some(2)
        );
        assert_eq!(
            count(
                "pg_entra.token.refreshes",
                &[
                    ("outcome", "success"),
                    ("trigger", "on_demand"),
                    ("credential", "custom")
                ]
            ),
            Some(1)
        );
        assert_eq!(
            count(
                "pg_entra.token.refreshes",
                &[
                    ("outcome", "success"),
                    ("trigger", "forced"),
                    ("credential", "custom")
                ]
            ),
            Some(1)
        );
        assert_eq!(
            count("pg_entra.token.forced_refreshes", &[("outcome", "started")]),
            Some(1)
        );
        assert_eq!(
            count(
                "pg_entra.token.forced_refreshes",
                &[("outcome", "rate_limited")]
            ),
            Some(1)
        );
        assert_eq!(
            count("pg_entra.login.refusals", &[("kind", "password_failed")]),
            Some(2)
        );
        assert_eq!(
            count("pg_entra.connects", &[("outcome", "success")]),
            Some(2)
        );
        assert_eq!(
            count("pg_entra.connects", &[("outcome", "refused")]),
            Some(1)
        );
        // A sample per connect and per refresh, under the same labels as their counters.
        let create_time = |outcome| {
            samples(
                &snapshot,
                "db.client.connection.create_time",
                &[("db.system.name", "postgresql"), ("outcome", outcome)],
            )
        };
        assert_eq!(create_time("success"), Some(2));
        assert_eq!(create_time("refused"), Some(1));
        assert_eq!(
            samples(
                &snapshot,
                "pg_entra.token.refresh.duration",
                &[("outcome", "success"), ("credential", "custom")]
            ),
            Some(2)
        );
        // Set last by `health()`: the token's lifetime less the few seconds the run took.
        let Some(DebugValue::Gauge(left)) = value(&snapshot, "pg_entra.token.time_to_expiry", &[])
        else {
            panic!("no time to expiry in {snapshot:?}");
        };
        let lifetime = LIFETIME.as_secs_f64();
        assert!(
            (lifetime - 60.0..=lifetime).contains(&left.into_inner()),
            "{left} s of {lifetime} s"
        );
        // Pools are counted by what they add: none here.
        assert_eq!(
            snapshot
                .iter()
                .filter(|(key, ..)| key.key().name() == "pg_entra.pool.connections.created")
                .count(),
            0
        );
    }

    /// Each pool counts the physical connections it makes through the connector, under its
    /// own name, and each is a connect.
    #[cfg(all(feature = "deadpool", feature = "bb8"))]
    #[test]
    fn pool_connections_are_counted_by_pool() {
        let snapshot = recorded(|bed| async move {
            let connector = bed.connector_builder().build().unwrap();
            let deadpool = connector.deadpool_pool(4).unwrap();
            let (a, b) = (deadpool.get().await.unwrap(), deadpool.get().await.unwrap());
            a.simple_query("select 1").await.unwrap();
            b.simple_query("select 1").await.unwrap();
            drop((a, b));
            // Back in the pool: no new connection for these.
            for _ in 0..3 {
                drop(deadpool.get().await.unwrap());
            }
            let bb8 = connector.bb8_pool(1).unwrap();
            for _ in 0..3 {
                bb8.get()
                    .await
                    .unwrap()
                    .simple_query("select 1")
                    .await
                    .unwrap();
            }
        });
        let created = |pool| {
            counter(
                &snapshot,
                "pg_entra.pool.connections.created",
                &[("pool", pool)],
            )
        };
        assert_eq!(created("deadpool"), Some(2));
        assert_eq!(created("bb8"), Some(1));
        assert_eq!(
            counter(&snapshot, "pg_entra.connects", &[("outcome", "success")]),
            Some(3)
        );
    }
}
