//! No token in a log line (at TRACE), a `Debug`, a `Display` or an error.

use std::time::Duration;

use pg_entra::testing::Reply;

use super::{Captured, bed, current_user};

#[tokio::test]
async fn tokens_stay_out_of_logs_debug_display_and_errors() {
    let captured = Captured::default();
    let subscriber = captured.subscriber();
    // Global: the refresh runs in spawned tasks, and the other tests' logs are checked too.
    tracing::subscriber::set_global_default(subscriber).expect("only this test sets it");

    let bed = bed().await;
    bed.identity().set_token_lifetime(Duration::from_secs(3600));
    let connector = bed.connector_builder().build().unwrap();
    let mut tokens = Vec::new();
    let mut shown = Vec::new();

    // Success.
    assert_eq!(
        current_user(&connector).await.unwrap(),
        bed.principal().name()
    );
    let token = connector.token_cache().cached().unwrap();
    tokens.push(token.secret().to_owned());
    shown.push(format!(
        "{token:?} {connector:?} {:?}",
        connector.token_cache()
    ));
    shown.push(format!("{:?}", connector.config().await.unwrap()));

    // Login refused by the server (wrong user): error Display, Debug and source chain.
    let wrong_user = bed.connector_builder().user("nobody").build().unwrap();
    let error = wrong_user.connect().await.unwrap_err();
    tokens.push(
        wrong_user
            .token_cache()
            .cached()
            .unwrap()
            .secret()
            .to_owned(),
    );
    shown.push(describe(&error));

    // Endpoint failures, including a malformed body that holds a token-shaped string.
    for reply in [
        Reply::malformed_json(),
        Reply::status(400),
        Reply::missing_token(),
    ] {
        bed.identity().script([reply]);
        let failing = bed.connector_builder().build().unwrap();
        shown.push(describe(&failing.connect().await.unwrap_err()));
    }
    tokens.push("eyJmalformed.eyJbody.c2ln".to_owned());

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("access token refreshed"),
        "tracing was captured"
    );
    for token in &tokens {
        // Every part of a token: the header is shared by all bed tokens, the payload and the
        // signature are each token's own. A leak of any of them fails.
        for part in token.split('.') {
            let needle = &part[part.len().saturating_sub(24)..];
            assert!(!logs.contains(needle), "part of a token reached the logs");
            for text in &shown {
                assert!(!text.contains(needle), "part of a token reached: {text}");
            }
        }
    }
}

fn describe(error: &pg_entra::Error) -> String {
    let mut text = format!("{error} | {error:?}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(" | {cause} | {cause:?}"));
        source = cause.source();
    }
    text
}

/// A server that logs the client in and then sends a notice repeating the password: the
/// connector logs that a notice was withheld, and nothing of the token.
#[tokio::test]
async fn a_notice_repeating_the_password_is_not_logged() {
    use std::sync::Arc;

    use pg_entra::testing::{FakeCredential, LoginAnswer, Principal, ScriptedPostgres};
    let captured = Captured::default();
    let subscriber = captured.subscriber();
    // This test's runtime runs on this thread, the connection's task included.
    let _guard = crate::log_to(&tracing::Dispatch::new(subscriber));
    let server = ScriptedPostgres::start_trusted(LoginAnswer::AcceptNoticingPassword)
        .await
        .unwrap();
    let connector = server
        .connector_builder()
        .credential(Arc::new(FakeCredential::new(Principal::user_assigned(
            "orders-api",
        ))))
        .build()
        .unwrap();
    let client = connector.connect().await.unwrap();
    // The scripted server answers a query with an error: by then the notice was read.
    let _ = client.simple_query("select 1").await;
    let logs = captured.text();
    assert!(logs.contains("quoted the access token; withheld"), "{logs}");
    let secret = connector
        .token_cache()
        .cached()
        .unwrap()
        .secret()
        .to_owned();
    super::assert_no_piece_of(&secret, &logs);
}

/// The same notice when the connector asks the server whether it is a standby
/// (`target_session_attrs=standby`) before the session is spawned: withheld there too, and
/// the check's error (the scripted server answers every query with one) says nothing of the
/// token.
#[tokio::test]
async fn a_notice_repeating_the_password_during_the_session_kind_check_is_not_logged() {
    use std::sync::Arc;

    use pg_entra::testing::{FakeCredential, LoginAnswer, Principal, ScriptedPostgres};
    let captured = Captured::default();
    let subscriber = captured.subscriber();
    let _guard = crate::log_to(&tracing::Dispatch::new(subscriber));
    let server = ScriptedPostgres::start_trusted(LoginAnswer::AcceptNoticingPassword)
        .await
        .unwrap();
    let connector = server
        .connector_builder()
        .connection_string("target_session_attrs=standby")
        .credential(Arc::new(FakeCredential::new(Principal::user_assigned(
            "orders-api",
        ))))
        .build()
        .unwrap();
    let error = connector.connect().await.unwrap_err();
    let logs = captured.text();
    assert!(logs.contains("quoted the access token; withheld"), "{logs}");
    let secret = connector
        .token_cache()
        .cached()
        .unwrap()
        .secret()
        .to_owned();
    let shown = format!("{error} {error:?} {logs}");
    super::assert_no_piece_of(&secret, &shown);
}

/// A server that repeats the password in its refusal: the error keeps the SQLSTATE and
/// withholds the message, so no piece of the token reaches `Display`, `Debug` or a cause.
#[tokio::test]
async fn a_server_repeating_the_password_is_not_quoted() {
    use std::sync::Arc;

    use pg_entra::testing::{FakeCredential, LoginAnswer, Principal, ScriptedPostgres};
    let server = ScriptedPostgres::start_trusted(LoginAnswer::RefuseRepeatingPassword)
        .await
        .unwrap();
    let connector = server
        .connector_builder()
        .credential(Arc::new(FakeCredential::new(Principal::user_assigned(
            "orders-api",
        ))))
        .build()
        .unwrap();
    let error = connector.connect().await.unwrap_err();
    assert!(
        server.passwords_received() >= 1,
        "the control: a login happened"
    );
    assert!(
        matches!(&error, pg_entra::Error::PostgresMessageWithheld { code } if code.as_deref() == Some("28P01")),
        "{error:?}"
    );
    assert!(error.is_auth_failure());
    let token = connector.token_cache().cached().unwrap();
    let shown = describe(&error);
    super::assert_no_piece_of(token.secret(), &shown);
}
