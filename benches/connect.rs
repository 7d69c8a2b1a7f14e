//! Connect overhead: a full TLS connect and `SELECT 1` through pg-entra's `Connector` against
//! plain tokio-postgres with the same token as a fixed password, same local server, same run.
//!
//! ```sh
//! cargo bench --bench connect
//! ```
//!
//! Needs the PostgreSQL server binaries, as the tests do.

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use pg_entra::testing::TestBed;
use postgres_native_tls::MakeTlsConnector;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let bed = runtime
        .block_on(TestBed::start())
        .expect("the test bed starts");
    let connector = bed.connector_builder().build().expect("a connector");
    // The token the connector will keep using (an hour long), as a fixed password.
    let fixed = runtime.block_on(connector.config()).expect("a first token");
    let plain_tls = {
        let pem = std::fs::read(bed.postgres().ca_certificate_path()).expect("the bed's CA");
        let root = native_tls::Certificate::from_pem(&pem).expect("a PEM certificate");
        let tls = native_tls::TlsConnector::builder()
            .add_root_certificate(root)
            .build()
            .expect("a TLS connector");
        MakeTlsConnector::new(tls)
    };

    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(12))
        .sample_size(40)
        .configure_from_args();
    let mut group = criterion.benchmark_group("connect");
    group.bench_function("pg-entra", |b| {
        b.to_async(&runtime).iter(|| async {
            let client = connector.connect().await.expect("connects");
            black_box(client.simple_query("SELECT 1").await.expect("selects"));
        })
    });
    group.bench_function("tokio-postgres", |b| {
        b.to_async(&runtime).iter(|| async {
            let (client, connection) = fixed.connect(plain_tls.clone()).await.expect("connects");
            tokio::spawn(connection);
            black_box(client.simple_query("SELECT 1").await.expect("selects"));
        })
    });
    group.finish();
    criterion.final_summary();
    drop(bed);
}
