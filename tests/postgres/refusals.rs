//! What each refused login means, against a PostgreSQL-protocol server that refuses as Azure
//! does: refusal text × SQLSTATE → refreshes, retries, error kind and hint.

use std::sync::Arc;

use pg_entra::testing::{
    FakeCredential, LoginAnswer, Principal, ScriptedPostgres, TestCa, TlsOffer,
};
use pg_entra::{Connector, Environment, Error, LoginRefusal};

/// A scripted server with a certificate for `localhost`, and a connector with a fake
/// credential aimed at it (the host names no Azure server kind: the public cloud's scope).
struct Rig {
    server: ScriptedPostgres,
    credential: Arc<FakeCredential>,
    connector: Connector,
}

async fn rig(answer: LoginAnswer) -> Rig {
    let server = ScriptedPostgres::start_trusted(answer).await.unwrap();
    let credential = Arc::new(FakeCredential::new(Principal::user_assigned("orders-api")));
    let connector = server
        .connector_builder()
        .credential(credential.clone())
        .build()
        .unwrap();
    Rig {
        server,
        credential,
        connector,
    }
}

/// SQLSTATE, message, logins tried, tokens asked for, the refusal, words of the hint.
type Row = (
    &'static str,
    &'static str,
    usize,
    usize,
    Option<LoginRefusal>,
    &'static str,
);

#[tokio::test]
async fn each_refusal_gets_its_own_retry_rule_and_hint() {
    let table: Vec<Row> = vec![
        (
            "28P01",
            "The access token has expired",
            2,
            2,
            Some(LoginRefusal::TokenExpired),
            "clock",
        ),
        (
            "28000",
            "The access token has expired",
            2,
            2,
            Some(LoginRefusal::TokenExpired),
            "clock",
        ),
        (
            "28P01",
            "An error occurred while validating the access token. Please acquire a new token and retry.",
            2,
            2,
            Some(LoginRefusal::TokenInvalid),
            "another tenant",
        ),
        (
            "28000",
            "Service Principals cannot generate AAD_AUTH_TOKENTYPE_APP_USER tokens for role[orders-api]",
            1,
            1,
            Some(LoginRefusal::PrincipalTypeMismatch {
                role: Some("orders-api".into()),
            }),
            "another kind of principal",
        ),
        (
            "28P01",
            "password authentication failed for user \"orders-api\"",
            2,
            2,
            Some(LoginRefusal::PasswordFailed),
            "pgaadauth_create_principal",
        ),
        (
            "28000",
            "no pg_hba.conf entry for host \"10.1.2.3\", user \"orders-api\", database \"postgres\", SSL encryption",
            1,
            1,
            Some(LoginRefusal::OtherAuthorization),
            "firewall",
        ),
        (
            "08P01",
            "client sent partial pkt in startup phase",
            1,
            1,
            Some(LoginRefusal::PoolerRefusedLongPassword),
            "port 5432",
        ),
        (
            "08P01",
            "password too long",
            1,
            1,
            Some(LoginRefusal::PoolerRefusedLongPassword),
            "6432",
        ),
        (
            "28P01",
            "The access token does not have a valid audience claim.",
            1,
            1,
            Some(LoginRefusal::WrongAudience { resource: None }),
            "token.postgres.cosmos.azure.com",
        ),
        (
            "XX000",
            "internal error while checking the token",
            1,
            1,
            None,
            "",
        ),
    ];
    for (code, message, logins, tokens, refusal, hint) in table {
        let rig = rig(LoginAnswer::Refuse {
            code: code.into(),
            message: message.into(),
        })
        .await;
        let error = rig.connector.connect().await.unwrap_err();
        let row = format!("{code} {message}");
        assert_eq!(rig.server.passwords_received(), logins, "logins: {row}");
        assert_eq!(rig.credential.calls(), tokens, "tokens: {row}");
        assert_eq!(error.login_refusal(), refusal, "kind: {row}");
        // The server's words stay in the error chain.
        let chain = describe(&error);
        assert!(chain.contains(message), "{row}: {chain}");
        match error.hint() {
            Some(text) => assert!(text.contains(hint), "{row}: {text}"),
            None => assert!(hint.is_empty(), "{row}: no hint"),
        }
    }
}

#[tokio::test]
async fn a_server_naming_its_postgres_resource_gets_one_token_for_it() {
    let cosmos = "https://token.postgres.cosmos.azure.com";
    let rig = rig(LoginAnswer::RequireAudience(cosmos.into())).await;
    // Configured (by default) for ossrdbms: refused, then one token for the named resource.
    let client = rig.connector.connect().await.unwrap();
    drop(client);
    assert_eq!(rig.server.passwords_received(), 2);
    assert_eq!(
        rig.credential.scopes(),
        [
            "https://ossrdbms-aad.database.windows.net/.default".to_owned(),
            format!("{cosmos}/.default")
        ]
    );
    // From then on, straight to the named resource's token (cached: no new request).
    rig.connector.connect().await.unwrap();
    assert_eq!(rig.server.passwords_received(), 3);
    assert_eq!(rig.credential.calls(), 2);
}

#[tokio::test]
async fn a_server_naming_another_resource_gets_no_token_for_it() {
    for resource in [
        "https://graph.microsoft.com",
        "https://management.azure.com/",
    ] {
        let rig = rig(LoginAnswer::RequireAudience(resource.into())).await;
        let error = rig.connector.connect().await.unwrap_err();
        assert!(
            matches!(&error, Error::UnexpectedResource { resource: named, .. } if named == resource),
            "{error:?}"
        );
        assert!(error.to_string().contains(resource), "{error}");
        assert_eq!(rig.credential.calls(), 1, "no token for {resource}");
        assert_eq!(rig.server.passwords_received(), 1);
    }
}

fn describe(error: &Error) -> String {
    let mut text = format!("{error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(" | {cause}"));
        source = cause.source();
    }
    text
}

/// A server that keeps naming the resource (its role is missing, say) costs one token for it,
/// not one per connect: the followed resource's cache is kept whatever the login's outcome.
#[tokio::test]
async fn a_resource_named_again_and_again_costs_one_token() {
    let rig = rig(LoginAnswer::Refuse {
        code: "28000".into(),
        message: "The access token does not have a valid audience claim. Please acquire a new token for the resource \"https://token.postgres.cosmos.azure.com\".".into(),
    })
    .await;
    for _ in 0..5 {
        assert!(rig.connector.connect().await.is_err());
    }
    assert_eq!(rig.credential.calls(), 2, "{:?}", rig.credential.scopes());
}

/// A host whose name tells its kind (Flexible Server) is not sent a token for another kind
/// (Cosmos DB for PostgreSQL), whatever it asks for.
#[tokio::test]
async fn a_host_of_one_kind_gets_no_token_for_another_kind() {
    let ca = TestCa::generate("scripted CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.certificate_pem().unwrap()).unwrap();
    let host = "orders.postgres.database.azure.com";
    let server = ScriptedPostgres::start(
        TlsOffer::Certificate(ca.issue_certificate_for(host).unwrap()),
        LoginAnswer::RequireAudience("https://token.postgres.cosmos.azure.com".into()),
    )
    .await
    .unwrap();
    let credential = Arc::new(FakeCredential::new(Principal::user_assigned("orders-api")));
    let connector = Connector::builder()
        .environment(Environment::from_vars([
            ("PGHOST", host.to_owned()),
            ("PGHOSTADDR", "127.0.0.1".to_owned()),
            ("PGPORT", server.port().to_string()),
            ("PGSSLROOTCERT", ca_file.display().to_string()),
        ]))
        .credential(credential.clone())
        .build()
        .unwrap();
    let error = connector.connect().await.unwrap_err();
    assert!(
        matches!(error, Error::UnexpectedResource { .. }),
        "{error:?}"
    );
    assert_eq!(credential.calls(), 1);
}

/// Two hosts: the first refuses the login, the second offers no TLS (so the connect is tried
/// there and fails). The error is the refused login (what a new token can cure, and what the
/// retry reads), not the later host's; the same from the blocking `postgres` stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_outranks_a_later_hosts_error() {
    let refusing = ScriptedPostgres::start_trusted(LoginAnswer::Refuse {
        code: "28000".into(),
        message: "The access token has expired".into(),
    })
    .await
    .unwrap();
    let later = ScriptedPostgres::start(TlsOffer::None, LoginAnswer::Accept)
        .await
        .unwrap();
    let vars = refusing
        .libpq_vars()
        .into_iter()
        .map(|(name, value)| match name.as_str() {
            "PGHOST" => (name, format!("{value},{value}")),
            "PGPORT" => (name, format!("{},{}", refusing.port(), later.port())),
            _ => (name, value),
        })
        .collect::<Vec<_>>();
    let builder = || {
        Connector::builder()
            .environment(Environment::from_vars(vars.clone()))
            .credential(Arc::new(FakeCredential::new(Principal::user_assigned(
                "orders-api",
            ))))
    };
    let error = builder().build().unwrap().connect().await.unwrap_err();
    assert_eq!(
        error.login_refusal(),
        Some(LoginRefusal::TokenExpired),
        "{error:?}"
    );
    // Tried in the connect and in its retry after the one forced refresh.
    assert_eq!(later.connections(), 2, "the later host was tried");
    #[cfg(feature = "postgres-sync")]
    {
        let blocking = pg_entra::blocking::BlockingConnector::new(builder()).unwrap();
        let error = tokio::task::spawn_blocking(move || blocking.postgres_client().err())
            .await
            .unwrap()
            .expect("refused");
        assert_eq!(
            error.login_refusal(),
            Some(LoginRefusal::TokenExpired),
            "{error:?}"
        );
        assert_eq!(later.connections(), 4, "the later host was tried");
    }
}
