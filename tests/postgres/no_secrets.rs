//! No token in a log line (at TRACE), a `Debug`, a `Display` or an error.

use std::time::Duration;

use pg_entra::testing::Reply;

use super::{Captured, bed, current_user};

#[tokio::test]
async fn tokens_stay_out_of_logs_debug_display_and_errors() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(captured.clone())
        .with_ansi(false)
        .finish();
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
