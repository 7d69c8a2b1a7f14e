//! Every managed identity source against a real HTTP endpoint on 127.0.0.1: App Service (and
//! its user-assigned parameters), Azure Arc with a real key file and challenge, Cloud Shell,
//! the legacy App Service protocol with its date format, and source detection.

use std::time::Duration;

use pg_entra::credential::{
    ManagedIdentityCredential, ManagedIdentityError, ManagedIdentityId, RetryOptions,
};
use pg_entra::testing::{IdentityEndpoint, Principal, Reply};
use pg_entra::{Cloud, Environment, Error, Token, TokenCredential};

async fn endpoint() -> (IdentityEndpoint, Principal, Principal) {
    let app = Principal::system_assigned("my-web-app");
    let uami = Principal::user_assigned("app-uami");
    let endpoint = IdentityEndpoint::builder()
        .principal(app.clone())
        .principal(uami.clone())
        .start()
        .await
        .unwrap();
    (endpoint, app, uami)
}

fn credential(
    vars: Vec<(&str, String)>,
    identity: Option<ManagedIdentityId>,
    endpoint: &IdentityEndpoint,
) -> Result<ManagedIdentityCredential, Error> {
    let mut builder = ManagedIdentityCredential::builder()
        .options(Environment::from_vars(vars))
        .arc_key_directory(endpoint.arc_key_directory())
        .retry(RetryOptions {
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            ..RetryOptions::default()
        });
    if let Some(identity) = identity {
        builder = builder.identity(identity);
    }
    builder.build()
}

fn app_service_vars(endpoint: &IdentityEndpoint) -> Vec<(&'static str, String)> {
    vec![
        ("IDENTITY_ENDPOINT", endpoint.app_service_endpoint()),
        ("IDENTITY_HEADER", endpoint.identity_header().to_owned()),
    ]
}

/// The bed issues one-hour tokens; a legacy date parsed right gives back that hour.
fn assert_lives_about_an_hour(token: &pg_entra::credential::AccessToken) {
    let lifetime = token.expires_on - azure_core::time::OffsetDateTime::now_utc();
    assert!(
        lifetime > time::Duration::minutes(59) && lifetime <= time::Duration::hours(1),
        "{lifetime}"
    );
}

async fn user_of(credential: &ManagedIdentityCredential) -> String {
    let token = Token::from(
        credential
            .get_token(&[Cloud::Public.scope()], None)
            .await
            .unwrap(),
    );
    token.username().unwrap().to_owned()
}

#[tokio::test]
async fn app_service_system_and_user_assigned() {
    let (endpoint, app, uami) = endpoint().await;
    let system = credential(app_service_vars(&endpoint), None, &endpoint).unwrap();
    assert_eq!(system.source_name(), "App Service");
    assert!(!format!("{system:?}").contains(endpoint.identity_header()));
    assert_eq!(user_of(&system).await, app.name());
    let request = &endpoint.recorded()[0];
    assert_eq!(request.param("api-version"), Some("2019-08-01"));
    assert_eq!(
        request.identity_header.as_deref(),
        Some(endpoint.identity_header())
    );
    assert!(!request.metadata_header);

    for (identity, param) in [
        (
            ManagedIdentityId::ClientId(uami.client_id().into()),
            "client_id",
        ),
        (
            ManagedIdentityId::ObjectId(uami.object_id().into()),
            "principal_id",
        ),
        (
            ManagedIdentityId::ResourceId(uami.resource_id().into()),
            "mi_res_id",
        ),
    ] {
        let user_assigned =
            credential(app_service_vars(&endpoint), Some(identity), &endpoint).unwrap();
        assert_eq!(user_of(&user_assigned).await, uami.name());
        assert!(endpoint.recorded().last().unwrap().param(param).is_some());
    }

    // AZURE_CLIENT_ID selects a user-assigned identity here too.
    let mut vars = app_service_vars(&endpoint);
    vars.push(("AZURE_CLIENT_ID", uami.client_id().to_owned()));
    assert_eq!(
        user_of(&credential(vars, None, &endpoint).unwrap()).await,
        uami.name()
    );
}

#[tokio::test]
async fn app_service_with_the_wrong_secret_is_refused_without_retries() {
    let (endpoint, _, _) = endpoint().await;
    let vars = vec![
        ("IDENTITY_ENDPOINT", endpoint.app_service_endpoint()),
        ("IDENTITY_HEADER", "not-the-secret".to_owned()),
    ];
    let error = credential(vars, None, &endpoint)
        .unwrap()
        .get_token(&[Cloud::Public.scope()], None)
        .await
        .unwrap_err();
    let managed = error.downcast_ref::<ManagedIdentityError>().unwrap();
    assert_eq!(managed.status(), Some(401));
    assert!(managed.is_rejection());
    assert_eq!(endpoint.requests(), 1);
    assert!(!error.to_string().contains("not-the-secret"), "{error}");
}

#[tokio::test]
async fn arc_answers_the_key_challenge() {
    let (endpoint, app, _) = endpoint().await;
    let vars = vec![
        ("IDENTITY_ENDPOINT", endpoint.arc_endpoint()),
        ("IMDS_ENDPOINT", "http://127.0.0.1:9".to_owned()),
    ];
    let arc = credential(vars.clone(), None, &endpoint).unwrap();
    assert_eq!(arc.source_name(), "Azure Arc");
    assert_eq!(user_of(&arc).await, app.name());
    let recorded = endpoint.recorded();
    assert_eq!(recorded.len(), 2, "a challenge, then the answer");
    assert!(recorded[0].authorization.is_none());
    assert!(
        recorded[1]
            .authorization
            .as_deref()
            .unwrap()
            .starts_with("Basic ")
    );
    assert_eq!(recorded[1].param("api-version"), Some("2019-11-01"));

    // A challenge naming a file outside the agent's key folder is not answered.
    let elsewhere = ManagedIdentityCredential::builder()
        .options(Environment::from_vars(vars.clone()))
        .arc_key_directory(std::env::temp_dir())
        .build()
        .unwrap();
    let error = elsewhere
        .get_token(&[Cloud::Public.scope()], None)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("not in the agent's key folder"),
        "{error}"
    );
    assert_eq!(endpoint.requests(), 3);

    // Arc has no user-assigned identities.
    let error = credential(
        vars,
        Some(ManagedIdentityId::ClientId("x".into())),
        &endpoint,
    )
    .unwrap_err();
    assert!(matches!(error, Error::Config(_)), "{error:?}");
}

#[tokio::test]
async fn cloud_shell_posts_a_form() {
    let (endpoint, app, _) = endpoint().await;
    let shell = credential(
        vec![("MSI_ENDPOINT", endpoint.cloud_shell_endpoint())],
        None,
        &endpoint,
    )
    .unwrap();
    assert_eq!(shell.source_name(), "Cloud Shell");
    assert_eq!(user_of(&shell).await, app.name());
    let request = &endpoint.recorded()[0];
    assert_eq!(request.method, "POST");
    assert!(request.metadata_header);
    assert_eq!(
        request.form,
        vec![(
            "resource".to_owned(),
            "https://ossrdbms-aad.database.windows.net".to_owned()
        )]
    );
}

#[tokio::test]
async fn legacy_app_service_and_its_date_format() {
    let (endpoint, _, uami) = endpoint().await;
    let vars = vec![
        ("MSI_ENDPOINT", endpoint.legacy_app_service_endpoint()),
        ("MSI_SECRET", endpoint.identity_header().to_owned()),
    ];
    let legacy = credential(
        vars,
        Some(ManagedIdentityId::ClientId(uami.client_id().into())),
        &endpoint,
    )
    .unwrap();
    assert_eq!(legacy.source_name(), "App Service (2017-09-01)");
    let token = legacy
        .get_token(&[Cloud::Public.scope()], None)
        .await
        .unwrap();
    assert_lives_about_an_hour(&token);
    assert_eq!(Token::from(token).username(), Some(uami.name()));
    assert_eq!(
        endpoint.recorded()[0].param("clientid"),
        Some(uami.client_id())
    );
}

#[tokio::test]
async fn detection_order_and_refusals() {
    let (endpoint, _, _) = endpoint().await;
    let source =
        |vars: Vec<(&str, String)>| credential(vars, None, &endpoint).map(|c| c.source_name());
    let url = endpoint.app_service_endpoint();
    assert_eq!(source(vec![]).unwrap(), "IMDS");
    // App Service wins over Arc and MSI_ENDPOINT.
    assert_eq!(
        source(vec![
            ("IDENTITY_ENDPOINT", url.clone()),
            ("IDENTITY_HEADER", "h".into()),
            ("IMDS_ENDPOINT", url.clone()),
            ("MSI_ENDPOINT", url.clone()),
        ])
        .unwrap(),
        "App Service"
    );
    assert_eq!(
        source(vec![
            ("IDENTITY_ENDPOINT", url.clone()),
            ("IMDS_ENDPOINT", url.clone()),
            ("MSI_ENDPOINT", url.clone()),
        ])
        .unwrap(),
        "Azure Arc"
    );
    // IDENTITY_ENDPOINT alone is not a source.
    assert_eq!(
        source(vec![("IDENTITY_ENDPOINT", url.clone())]).unwrap(),
        "IMDS"
    );
    assert!(matches!(
        source(vec![
            ("IDENTITY_ENDPOINT", url.clone()),
            ("IDENTITY_HEADER", "h".into()),
            ("IDENTITY_SERVER_THUMBPRINT", "t".into()),
        ]),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        source(vec![("MSI_ENDPOINT", "not a url".into())]),
        Err(Error::Config(_))
    ));
    // A user-assigned identity by object id is not possible on the legacy protocol.
    assert!(matches!(
        credential(
            vec![("MSI_ENDPOINT", url.clone()), ("MSI_SECRET", "s".into())],
            Some(ManagedIdentityId::ObjectId("o".into())),
            &endpoint
        ),
        Err(Error::Config(_))
    ));
}

#[tokio::test]
async fn legacy_app_service_dates_on_a_twelve_hour_clock() {
    let (endpoint, app, _) = endpoint().await;
    endpoint.set_expires_on_format(pg_entra::testing::ExpiresOnFormat::LegacyDate12Hour);
    let vars = vec![
        ("MSI_ENDPOINT", endpoint.legacy_app_service_endpoint()),
        ("MSI_SECRET", endpoint.identity_header().to_owned()),
    ];
    let legacy = credential(vars, None, &endpoint).unwrap();
    let token = legacy
        .get_token(&[Cloud::Public.scope()], None)
        .await
        .unwrap();
    assert_lives_about_an_hour(&token);
    assert_eq!(Token::from(token).username(), Some(app.name()));
}

#[tokio::test]
async fn a_deployment_slot_identity_is_named_app_slots_slot() {
    let slot = Principal::app_service_slot("shop", "staging");
    let endpoint = IdentityEndpoint::builder()
        .principal(slot.clone())
        .start()
        .await
        .unwrap();
    let app_service = credential(app_service_vars(&endpoint), None, &endpoint).unwrap();
    assert_eq!(user_of(&app_service).await, "shop/slots/staging");
    assert_eq!(slot.name(), "shop/slots/staging");
}

#[tokio::test]
async fn redirects_are_never_followed() {
    let (endpoint, _, _) = endpoint().await;
    // A second endpoint that records everything: the identity header must never reach it.
    let elsewhere = IdentityEndpoint::builder().start().await.unwrap();
    endpoint.script([Reply::redirect(elsewhere.app_service_endpoint())]);
    let error = credential(app_service_vars(&endpoint), None, &endpoint)
        .unwrap()
        .get_token(&[Cloud::Public.scope()], None)
        .await
        .unwrap_err();
    let managed = error.downcast_ref::<ManagedIdentityError>().unwrap();
    assert!(
        matches!(
            managed,
            ManagedIdentityError::UnexpectedAnswer { status: 307, .. }
        ),
        "{managed:?}"
    );
    assert!(error.to_string().contains("never followed"), "{error}");
    assert!(!managed.is_rejection());
    assert_eq!(elsewhere.requests(), 0);
    assert_eq!(endpoint.requests(), 1, "not retried");
}

#[tokio::test]
async fn an_app_service_endpoint_that_answers_html_is_misconfigured_not_a_refusal() {
    let (endpoint, _, _) = endpoint().await;
    // A proxy that echoes the request it refused, secret header included.
    endpoint.impersonate(Some(Reply::raw(
        403,
        "text/html",
        format!(
            "<html><body><h1>403 Forbidden</h1><p>nginx</p><pre>X-IDENTITY-HEADER: {}</pre>\
             </body></html>",
            endpoint.identity_header()
        ),
    )));
    let error = credential(app_service_vars(&endpoint), None, &endpoint)
        .unwrap()
        .get_token(&[Cloud::Public.scope()], None)
        .await
        .unwrap_err();
    let managed = error.downcast_ref::<ManagedIdentityError>().unwrap();
    assert!(!managed.is_rejection(), "{managed:?}");
    let text = error.to_string();
    assert!(text.contains("not a managed identity endpoint's"), "{text}");
    // The page quoted the secret header, so none of it is shown.
    assert!(text.contains("withheld"), "{text}");
    assert!(!text.contains(endpoint.identity_header()), "{text}");
    let header = endpoint.identity_header();
    for start in 0..=header.len().saturating_sub(8) {
        assert!(
            !text.contains(&header[start..(start + 8).min(header.len())]),
            "{text}"
        );
    }
    // Cut off in the middle of the header by the excerpt's twelve words: nothing of it shown.
    let header = endpoint.identity_header().to_owned();
    endpoint.impersonate(Some(Reply::raw(
        403,
        "text/plain",
        // The header starts at the 89th character of the 100 an excerpt keeps.
        format!("{} H: {header}", "a".repeat(84)),
    )));
    let cut = credential(app_service_vars(&endpoint), None, &endpoint)
        .unwrap()
        .get_token(&[Cloud::Public.scope()], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(cut.contains("withheld"), "{cut}");
    assert!(!cut.contains(&header[..8]), "{cut}");
    endpoint.impersonate(Some(Reply::raw(
        403,
        "text/html",
        format!("<html><pre>X-IDENTITY-HEADER: {header}</pre></html>"),
    )));
    // Through the connector's error type: unavailable, not rejected.
    let classified = pg_entra::TokenCache::builder(std::sync::Arc::new(
        credential(app_service_vars(&endpoint), None, &endpoint).unwrap(),
    ))
    .build()
    .unwrap()
    .token()
    .await
    .unwrap_err();
    assert!(
        matches!(classified, Error::TokenUnavailable { .. }),
        "{classified:?}"
    );
}

/// Legacy App Service answers its errors as `{"StatusCode":…,"Message":…}`: the message
/// reaches the error.
#[tokio::test]
async fn legacy_app_service_errors_are_read_from_their_own_shape() {
    let (endpoint, _, _) = endpoint().await;
    endpoint.script([Reply::raw(
        400,
        "application/json",
        r#"{"StatusCode":400,"Message":"No MSI found for specified ClientId/ResourceId.","CorrelationId":"c0ffee"}"#,
    )]);
    let vars = vec![
        ("MSI_ENDPOINT", endpoint.legacy_app_service_endpoint()),
        ("MSI_SECRET", endpoint.identity_header().to_owned()),
    ];
    let error = credential(vars, None, &endpoint)
        .unwrap()
        .get_token(&[Cloud::Public.scope()], None)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("No MSI found for specified ClientId/ResourceId."),
        "{error}"
    );
}
