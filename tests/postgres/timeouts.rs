//! Every connection attempt is bounded as a whole, per host, as libpq bounds it: a server that
//! accepts and goes silent (before TLS, or in the middle of the handshake) cannot hang a
//! connect, and the next host still gets its full turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_entra::testing::{IdentityEndpoint, Principal};
use pg_entra::{Connector, Environment, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{bed, current_user};

/// How far a silent server lets a client get.
#[derive(Clone, Copy, Debug)]
enum Silence {
    /// Accepts the TCP connection and never sends a byte.
    AfterAccept,
    /// Answers the SSLRequest with `S` (TLS is fine) and then says nothing: the client hangs
    /// inside the TLS handshake.
    InsideTlsHandshake,
}

/// A server that misbehaves as `silence` says; returns its port. Connections are held open
/// until the test ends.
async fn silent_server(silence: Silence) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            if let Silence::InsideTlsHandshake = silence {
                let mut request = [0u8; 8];
                if stream.read_exact(&mut request).await.is_ok() {
                    let _ = stream.write_all(b"S").await;
                }
            }
            held.push(stream);
        }
    });
    port
}

/// A connector for `principal` at 127.0.0.1:`port`, its token from `endpoint`.
fn connector(
    endpoint: &IdentityEndpoint,
    principal: &Principal,
    vars: Vec<(&str, String)>,
) -> pg_entra::ConnectorBuilder {
    Connector::builder()
        .environment(Environment::from_vars(vars))
        .credential(Arc::new(endpoint.credential_for(principal)))
}

/// Hang guard only: a connect that is not bounded never returns, and this turns that into a
/// failure instead of a stuck test run.
async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("the connect is bounded by its connect timeout")
}

#[tokio::test]
async fn pgconnect_timeout_bounds_a_server_that_never_answers() {
    let vm = Principal::system_assigned("timeout-vm");
    let endpoint = IdentityEndpoint::builder()
        .principal(vm.clone())
        .start()
        .await
        .unwrap();
    let port = silent_server(Silence::AfterAccept).await;
    let connector = connector(
        &endpoint,
        &vm,
        vec![
            ("PGHOST", "127.0.0.1".into()),
            ("PGPORT", port.to_string()),
            ("PGCONNECT_TIMEOUT", "1".into()),
        ],
    )
    .build()
    .unwrap();
    let started = Instant::now();
    let error = bounded(connector.connect()).await.unwrap_err();
    eprintln!("gave up after {:?}", started.elapsed());
    match &error {
        Error::ConnectTimeout {
            host,
            port: p,
            timeout,
        } => {
            assert_eq!((host.as_str(), *p), ("127.0.0.1", port));
            assert_eq!(*timeout, Duration::from_secs(1));
        }
        other => panic!("expected a connect timeout, got {other:?}"),
    }
    assert!(error.hint().unwrap().contains("PGCONNECT_TIMEOUT"));
}

#[tokio::test]
async fn the_tls_handshake_is_inside_the_bound() {
    let vm = Principal::system_assigned("handshake-vm");
    let endpoint = IdentityEndpoint::builder()
        .principal(vm.clone())
        .start()
        .await
        .unwrap();
    let port = silent_server(Silence::InsideTlsHandshake).await;
    let connector = connector(
        &endpoint,
        &vm,
        vec![("PGHOST", "127.0.0.1".into()), ("PGPORT", port.to_string())],
    )
    .connect_timeout(Duration::from_millis(500))
    .build()
    .unwrap();
    let error = bounded(connector.connect()).await.unwrap_err();
    assert!(matches!(error, Error::ConnectTimeout { .. }), "{error:?}");
}

#[tokio::test]
async fn each_host_gets_its_own_bound_and_the_next_host_is_tried() {
    let bed = bed().await;
    let silent = silent_server(Silence::AfterAccept).await;
    let real = bed.postgres().port();
    let connector = bed
        .connector_builder()
        .connection_string(format!(
            "host=localhost,localhost port={silent},{real} connect_timeout=1"
        ))
        .build()
        .unwrap();
    let user = bounded(current_user(&connector)).await.unwrap();
    assert_eq!(user, bed.principal().name());
}
