//! TLS cannot be turned off, and an unverified server never sees the token.

use std::sync::Arc;

use pg_entra::Error;
use pg_entra::testing::{TestBed, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::bed;

#[tokio::test]
async fn plaintext_modes_are_refused_before_any_token_is_fetched() {
    let bed = bed().await;
    for mode in ["disable", "allow", "prefer"] {
        let mut vars = bed.postgres().libpq_vars();
        vars.push(("PGSSLMODE".into(), mode.into()));
        let error = pg_entra::Connector::builder()
            .environment(pg_entra::Environment::from_vars(vars))
            .credential(Arc::new(bed.credential()))
            .build()
            .unwrap_err();
        assert!(
            matches!(error, Error::TlsRequired { .. }),
            "{mode}: {error:?}"
        );
    }
    assert_eq!(bed.identity().requests(), 0);
}

#[tokio::test]
async fn an_untrusted_server_certificate_fails_before_authentication() {
    let bed = bed().await;
    // System roots only: the bed's CA is not among them.
    let connector = bed
        .connector_builder()
        .ssl_root_cert("system")
        .build()
        .unwrap();
    let error = connector.connect().await.unwrap_err();
    assert!(matches!(error, Error::Tls { .. }), "{error:?}");
    assert_no_login_reached(&bed);
}

/// The bed's server saw no login from its principal: no authorization, no password check.
pub(super) fn assert_no_login_reached(bed: &TestBed) {
    let log = bed.postgres().log();
    let role = bed.principal().name();
    assert!(
        !log.contains(&format!("connection authorized: user={role}")),
        "{log}"
    );
    assert!(!log.contains("password authentication"), "{log}");
}

#[tokio::test]
async fn a_host_name_the_certificate_does_not_cover_fails() {
    let bed = bed().await;
    let connector = bed
        .connector_builder()
        .host("db.example.invalid")
        .connection_string("hostaddr=127.0.0.1")
        .build()
        .unwrap();
    let error = connector.connect().await.unwrap_err();
    assert!(matches!(error, Error::Tls { .. }), "{error:?}");
    assert_no_login_reached(&bed);
}

/// Records every byte a client sends, answering the TLS request with `reply`, then (for `S`)
/// a TLS handshake with a certificate from a CA the client does not trust. The task returns
/// the bytes and, for `S`, whether the handshake completed.
pub(super) async fn recording_server(reply: u8) -> (u16, JoinHandle<(Vec<u8>, Option<bool>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let untrusted = TestCa::generate("not trusted")
        .unwrap()
        .issue_server_certificate()
        .unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut bytes = vec![0u8; 8];
        stream.read_exact(&mut bytes).await.unwrap();
        stream.write_all(&[reply]).await.unwrap();
        if reply != b'S' {
            let _ = stream.read_to_end(&mut bytes).await;
            return (bytes, None);
        }
        let identity =
            native_tls::Identity::from_pkcs8(&untrusted.certificate_pem, &untrusted.key_pem)
                .unwrap();
        let acceptor =
            tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).unwrap());
        match acceptor.accept(stream).await {
            Ok(mut tls) => {
                let _ = tls.read_to_end(&mut bytes).await;
                (bytes, Some(true))
            }
            Err(_) => (bytes, Some(false)),
        }
    });
    (port, task)
}

#[tokio::test]
async fn no_token_reaches_a_server_that_fails_verification_or_refuses_tls() {
    let bed = bed().await;
    for reply in [b'S', b'N'] {
        let (port, server) = recording_server(reply).await;
        let connector = bed.connector_builder().port(port).build().unwrap();
        let error = connector.connect().await.unwrap_err();
        assert!(matches!(error, Error::Tls { .. }), "{error:?}");
        let token = connector.token_cache().cached().unwrap();
        let (bytes, handshake_ok) = server.await.unwrap();
        // Only the 8-byte SSLRequest arrived in the clear; no startup message, no password.
        assert_eq!(&bytes[..8], &[0, 0, 0, 8, 4, 210, 22, 47]);
        assert_eq!(
            bytes.len(),
            8,
            "bytes after the SSLRequest: {:?}",
            &bytes[8..]
        );
        assert!(
            !bytes
                .windows(16)
                .any(|w| token.secret().as_bytes().starts_with(w))
        );
        if reply == b'S' {
            assert_eq!(
                handshake_ok,
                Some(false),
                "the client aborted the handshake"
            );
        }
    }
}

/// A certificate refused for its name when the host is an address or a privatelink name:
/// the hint is libpq's way (the server's name in host, the address in hostaddr), not a root
/// file; for any other name, the general TLS hint.
#[tokio::test]
async fn a_name_mismatch_on_an_address_or_privatelink_name_advises_hostaddr() {
    use std::sync::Arc;

    use pg_entra::testing::{
        FakeCredential, LoginAnswer, Principal, ScriptedPostgres, TestCa, TlsOffer,
    };
    use pg_entra::{Connector, Environment};

    let ca = TestCa::generate("scripted CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.certificate_pem().unwrap()).unwrap();
    let server = ScriptedPostgres::start(
        TlsOffer::Certificate(
            ca.issue_certificate_for("orders.postgres.database.azure.com")
                .unwrap(),
        ),
        LoginAnswer::Accept,
    )
    .await
    .unwrap();
    for (host, hostaddr, advice) in [
        ("127.0.0.1", None, true),
        (
            "orders.privatelink.postgres.database.azure.com",
            Some("127.0.0.1"),
            true,
        ),
        ("db.example.invalid", Some("127.0.0.1"), false),
    ] {
        let mut vars = vec![
            ("PGHOST", host.to_owned()),
            ("PGPORT", server.port().to_string()),
            ("PGSSLROOTCERT", ca_file.display().to_string()),
        ];
        if let Some(address) = hostaddr {
            vars.push(("PGHOSTADDR", address.to_owned()));
        }
        let connector = Connector::builder()
            .environment(Environment::from_vars(vars))
            .credential(Arc::new(FakeCredential::new(Principal::user_assigned(
                "orders-api",
            ))))
            .build()
            .unwrap();
        let error = connector.connect().await.unwrap_err();
        assert!(matches!(error, Error::Tls { .. }), "{host}: {error:?}");
        let hint = error.hint().unwrap();
        assert_eq!(hint.contains("hostaddr"), advice, "{host}: {hint}");
        assert_eq!(hint.contains("PGSSLROOTCERT"), !advice, "{host}: {hint}");
    }
    assert_eq!(server.passwords_received(), 0);
}

/// A server that agrees to TLS and then resets the connection, or closes it, before the
/// handshake ends: the error says the connection broke (with a hint about the network), not
/// that the certificate could not be verified, and no token was sent.
#[tokio::test]
async fn a_connection_broken_in_the_handshake_is_not_blamed_on_the_certificate() {
    let bed = bed().await;
    for reset in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut ssl_request = [0u8; 8];
            stream.read_exact(&mut ssl_request).await.unwrap();
            stream.write_all(b"S").await.unwrap();
            // The ClientHello arrives, whole; the answer is a reset (linger 0) or a plain
            // close.
            let mut header = [0u8; 5];
            stream.read_exact(&mut header).await.unwrap();
            let mut hello = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
            stream.read_exact(&mut hello).await.unwrap();
            if reset {
                stream.set_zero_linger().unwrap();
            } else {
                stream.shutdown().await.unwrap();
            }
            drop(stream);
        });
        let mut vars = bed.postgres().libpq_vars();
        vars.retain(|(name, _)| name != "PGPORT");
        vars.push(("PGPORT".into(), port.to_string()));
        let connector = pg_entra::Connector::builder()
            .environment(pg_entra::Environment::from_vars(vars))
            .credential(Arc::new(bed.credential()))
            .build()
            .unwrap();
        let error = connector.connect().await.unwrap_err();
        server.await.unwrap();
        let shown = error.to_string();
        assert!(matches!(error, Error::Tls { .. }), "{error:?}");
        assert!(
            shown.contains("broke during the TLS handshake"),
            "reset {reset}: {shown}"
        );
        assert!(error.hint().unwrap().contains("network"), "{error:?}");
    }
}
