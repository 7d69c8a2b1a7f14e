//! The IMDS credential against a real HTTP endpoint on 127.0.0.1: retry guidance, parsing,
//! deadlines and what the errors say.

use std::sync::Arc;
use std::time::Duration;

use azure_core::time::OffsetDateTime;
use pg_entra::credential::{ImdsCredential, ManagedIdentityError, ManagedIdentityId, RetryOptions};
use pg_entra::testing::{ExpiresOnFormat, IdentityEndpoint, Principal, Reply};
use pg_entra::{Cloud, Environment, Error, TokenCache, TokenCredential};

async fn endpoint() -> (IdentityEndpoint, Principal) {
    let vm = Principal::system_assigned("imds-vm");
    let endpoint = IdentityEndpoint::builder()
        .principal(vm.clone())
        .principal(Principal::user_assigned("imds-uami"))
        .start()
        .await
        .unwrap();
    (endpoint, vm)
}

fn fast(endpoint: &IdentityEndpoint, retry: RetryOptions) -> ImdsCredential {
    ImdsCredential::builder()
        .options(Environment::empty())
        .authority_host(endpoint.authority_host())
        .retry(retry)
        .build()
        .unwrap()
}

/// A credential for `identity` at the endpoint, reading no environment.
fn for_identity(endpoint: &IdentityEndpoint, identity: ManagedIdentityId) -> ImdsCredential {
    ImdsCredential::builder()
        .options(Environment::empty())
        .authority_host(endpoint.authority_host())
        .identity(identity)
        .build()
        .unwrap()
}

fn fast_retry() -> RetryOptions {
    RetryOptions {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        ..RetryOptions::default()
    }
}

async fn fetch(
    credential: &ImdsCredential,
) -> azure_core::Result<pg_entra::credential::AccessToken> {
    credential.get_token(&[Cloud::Public.scope()], None).await
}

fn managed(error: &azure_core::Error) -> &ManagedIdentityError {
    error
        .downcast_ref::<ManagedIdentityError>()
        .expect("a ManagedIdentityError")
}

#[tokio::test]
async fn transient_statuses_are_retried_until_success() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(&endpoint, fast_retry());
    for status in [404, 408, 429, 500, 502, 503, 504] {
        let before = endpoint.requests();
        endpoint.script([Reply::status(status), Reply::status(status)]);
        fetch(&credential)
            .await
            .unwrap_or_else(|e| panic!("{status}: {e}"));
        assert_eq!(endpoint.requests() - before, 3, "status {status}");
    }
}

#[tokio::test]
async fn retries_run_out_with_a_failing_error() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(
        &endpoint,
        RetryOptions {
            max_retries: 2,
            ..fast_retry()
        },
    );
    endpoint.script(std::iter::repeat_n(Reply::status(503), 5));
    let error = fetch(&credential).await.unwrap_err();
    assert!(
        matches!(
            managed(&error),
            ManagedIdentityError::Failing {
                status: 503,
                attempts: 3,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(endpoint.requests(), 3);
}

#[tokio::test]
async fn gone_is_retried_beyond_the_retry_count_within_its_window() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(
        &endpoint,
        RetryOptions {
            max_retries: 2,
            ..fast_retry()
        },
    );
    endpoint.script(std::iter::repeat_n(Reply::status(410), 6));
    fetch(&credential).await.unwrap();
    assert_eq!(endpoint.requests(), 7);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(&endpoint, fast_retry());
    endpoint.script([Reply::status(429).retry_after(1)]);
    fetch(&credential).await.unwrap();
    let recorded = endpoint.recorded();
    let waited = recorded[1].received_at - recorded[0].received_at;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
}

#[tokio::test]
async fn refusals_are_not_retried_and_say_why() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(&endpoint, fast_retry());
    for status in [400, 401, 403] {
        let before = endpoint.requests();
        endpoint.script([Reply::status(status)]);
        let error = fetch(&credential).await.unwrap_err();
        assert_eq!(endpoint.requests() - before, 1, "{status} is not retried");
        let managed = managed(&error);
        assert!(managed.is_rejection());
        assert_eq!(managed.status(), Some(status));
    }
    // An identity the resource does not have: the endpoint's own words reach the user.
    let stranger = for_identity(
        &endpoint,
        ManagedIdentityId::ClientId("00000000-0000-0000-0000-000000000000".into()),
    );
    let error = fetch(&stranger).await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("HTTP 400 (invalid_request): Identity not found"),
        "{text}"
    );
    // Through the cache, it is a rejection the caller can match on.
    let cache = TokenCache::builder(Arc::new(stranger)).build().unwrap();
    assert!(matches!(
        cache.token().await.unwrap_err(),
        Error::TokenRefused { .. }
    ));
}

#[tokio::test]
async fn unusable_success_bodies_are_typed_errors_that_do_not_echo_the_body() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(&endpoint, fast_retry());
    for (reply, expected) in [
        (Reply::malformed_json(), "not JSON"),
        (Reply::missing_token(), "no access_token"),
    ] {
        endpoint.script([reply]);
        let error = fetch(&credential).await.unwrap_err();
        assert!(matches!(
            managed(&error),
            ManagedIdentityError::InvalidResponse { .. }
        ));
        let text = format!("{error} {error:?}");
        assert!(text.contains(expected), "{text}");
        assert!(!text.contains("eyJmalformed"), "{text}");
    }
}

#[tokio::test]
async fn expires_on_in_every_shape() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(&endpoint, fast_retry());
    endpoint.set_token_lifetime(Duration::from_secs(1800));
    for format in [
        ExpiresOnFormat::EpochString,
        ExpiresOnFormat::EpochNumber,
        ExpiresOnFormat::Absent,
        ExpiresOnFormat::LegacyDate,
    ] {
        endpoint.set_expires_on_format(format);
        let token = fetch(&credential).await.unwrap();
        let remaining = token.expires_on - OffsetDateTime::now_utc();
        assert!(
            (1795..=1800).contains(&remaining.whole_seconds()),
            "{format:?}: {remaining}"
        );
    }
}

#[tokio::test]
async fn a_slow_endpoint_runs_into_the_deadline() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(
        &endpoint,
        RetryOptions {
            attempt_timeout: Duration::from_millis(100),
            deadline: Duration::from_millis(400),
            ..fast_retry()
        },
    );
    endpoint.script(std::iter::repeat_n(
        Reply::token().delay(Duration::from_secs(30)),
        20,
    ));
    let error = fetch(&credential).await.unwrap_err();
    assert!(
        matches!(
            managed(&error),
            ManagedIdentityError::DeadlineExceeded { .. }
                | ManagedIdentityError::Unreachable { .. }
        ),
        "{error}"
    );
    assert!(endpoint.requests() >= 2, "timeouts are retried");
}

#[tokio::test]
async fn nothing_listening_is_unreachable_with_a_hint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let credential = ImdsCredential::builder()
        .options(Environment::from_vars([(
            "AZURE_POD_IDENTITY_AUTHORITY_HOST",
            format!("http://127.0.0.1:{port}"),
        )]))
        .retry(RetryOptions {
            max_retries: 2,
            ..fast_retry()
        })
        .build()
        .unwrap();
    let error = fetch(&credential).await.unwrap_err();
    assert!(
        matches!(
            managed(&error),
            ManagedIdentityError::Unreachable { attempts: 3, .. }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("AZURE_CLIENT_ID"), "{error}");
    let cache = TokenCache::builder(Arc::new(credential)).build().unwrap();
    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, Error::TokenUnavailable { .. }));
    assert!(error.hint().is_some());
}

#[tokio::test]
async fn user_assigned_selectors_reach_the_endpoint() {
    let (endpoint, _) = endpoint().await;
    let uami = Principal::user_assigned("imds-uami");
    for (id, param, value) in [
        (
            ManagedIdentityId::ClientId(uami.client_id().into()),
            "client_id",
            uami.client_id(),
        ),
        (
            ManagedIdentityId::ObjectId(uami.object_id().into()),
            "object_id",
            uami.object_id(),
        ),
        (
            ManagedIdentityId::ResourceId(uami.resource_id().into()),
            "msi_res_id",
            uami.resource_id(),
        ),
    ] {
        let credential = for_identity(&endpoint, id);
        let token = pg_entra::Token::from(fetch(&credential).await.unwrap());
        assert_eq!(token.username(), Some("imds-uami"));
        assert_eq!(
            endpoint.recorded().last().unwrap().param(param),
            Some(value)
        );
    }
}

#[tokio::test]
async fn exactly_one_scope_is_required() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(&endpoint, fast_retry());
    let error = credential
        .get_token(&[Cloud::Public.scope(), "x"], None)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("exactly one scope; 2 were given"),
        "{error}"
    );
    assert_eq!(endpoint.requests(), 0);
}

#[tokio::test]
async fn numbers_from_the_endpoint_or_the_settings_never_panic() {
    let (endpoint, _) = endpoint().await;
    // Retry-After: u64::MAX seconds. The wait cannot fit in the deadline: give up at once.
    let credential = fast(&endpoint, fast_retry());
    endpoint.script([Reply::status(429).retry_after(u64::MAX)]);
    let error = fetch(&credential).await.unwrap_err();
    // The endpoint asked for the wait: the error says so, and not "no token within".
    assert!(
        matches!(
            managed(&error),
            ManagedIdentityError::AskedToWaitTooLong { status: 429, .. }
        ),
        "{error}"
    );
    let text = error.to_string();
    assert!(text.contains("asked to wait"), "{text}");
    assert!(text.contains("longer than the"), "{text}");
    assert!(!text.contains("no token"), "{text}");
    // Through the cache the caller gets the credential's error, not "the credential panicked".
    endpoint.script([Reply::status(503).retry_after(u64::MAX)]);
    let cache = TokenCache::builder(Arc::new(fast(&endpoint, fast_retry())))
        .build()
        .unwrap();
    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, Error::TokenUnavailable { .. }), "{error:?}");
    assert!(!format!("{error:?}").contains("panicked"), "{error:?}");

    // Settings of `Duration::MAX` everywhere: still a token, or a typed error.
    let unbounded = fast(
        &endpoint,
        RetryOptions {
            initial_backoff: Duration::MAX,
            max_backoff: Duration::MAX,
            gone_window: Duration::MAX,
            attempt_timeout: Duration::MAX,
            deadline: Duration::MAX,
            ..RetryOptions::default()
        },
    );
    fetch(&unbounded).await.unwrap();
    endpoint.script([Reply::status(500).retry_after(u64::MAX)]);
    let error = fetch(&unbounded).await.unwrap_err();
    assert!(
        matches!(
            managed(&error),
            ManagedIdentityError::DeadlineExceeded { .. }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn oversized_answers_are_refused_without_reading_them_whole() {
    let (endpoint, _) = endpoint().await;
    let credential = fast(&endpoint, fast_retry());
    let huge = format!(
        r#"{{"access_token":"eyJhuge.eyJbody.c2ln","expires_in":"3599","padding":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    endpoint.script([Reply::raw(200, "application/json", huge)]);
    let error = fetch(&credential).await.unwrap_err();
    assert!(
        matches!(
            managed(&error),
            ManagedIdentityError::InvalidResponse { .. }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("larger than 64 KiB"), "{error}");
    assert!(!error.to_string().contains("eyJhuge"), "{error}");
}
