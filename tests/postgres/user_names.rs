//! Which user name each kind of principal logs in as, on each server kind: principal kind ×
//! server kind → the `user` a PostgreSQL-protocol server receives (and the audience it
//! checks, as Azure does).

use std::sync::Arc;

use pg_entra::testing::{
    FakeCredential, LoginAnswer, Principal, ScriptedPostgres, TestCa, TlsOffer,
};
use pg_entra::{Connector, Environment, Error};

/// A server kind: its host name, whether it is Single Server, and the audience it takes.
struct ServerKind {
    host: &'static str,
    single_server: bool,
    audience: &'static str,
}

const FLEXIBLE: ServerKind = ServerKind {
    host: "orders.postgres.database.azure.com",
    single_server: false,
    audience: "https://ossrdbms-aad.database.windows.net",
};
const SINGLE: ServerKind = ServerKind {
    host: "mysrv.postgres.database.azure.com",
    single_server: true,
    audience: "https://ossrdbms-aad.database.windows.net",
};
const COSMOS: ServerKind = ServerKind {
    host: "c-orders.abc123.postgres.cosmos.azure.com",
    single_server: false,
    audience: "https://token.postgres.cosmos.azure.com",
};

/// What a login ends in: the user name the server saw, or the error.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    LoggedInAs(String),
    Guest,
    NoName,
}

async fn log_in(kind: &ServerKind, principal: &Principal, user: Option<&str>) -> Outcome {
    let ca = TestCa::generate("scripted CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.certificate_pem().unwrap()).unwrap();
    let server = ScriptedPostgres::start(
        TlsOffer::Certificate(ca.issue_certificate_for(kind.host).unwrap()),
        LoginAnswer::RequireAudience(kind.audience.into()),
    )
    .await
    .unwrap();
    let mut vars = vec![
        ("PGHOST", kind.host.to_owned()),
        ("PGHOSTADDR", "127.0.0.1".to_owned()),
        ("PGPORT", server.port().to_string()),
        ("PGSSLROOTCERT", ca_file.display().to_string()),
    ];
    if let Some(user) = user {
        vars.push(("PGUSER", user.to_owned()));
    }
    let connector = Connector::builder()
        .environment(Environment::from_vars(vars))
        .single_server(kind.single_server)
        .credential(Arc::new(FakeCredential::new(principal.clone())))
        .build()
        .unwrap();
    match connector.connect().await {
        Ok(_) => {
            // One login, with the server kind's audience (no refusal on the way).
            assert_eq!(server.passwords_received(), 1, "{}", kind.host);
            Outcome::LoggedInAs(server.users().pop().unwrap())
        }
        Err(Error::GuestUser { .. }) => Outcome::Guest,
        Err(Error::UnknownUser { .. }) => Outcome::NoName,
        Err(other) => panic!("{}: {other:?}", kind.host),
    }
}

fn as_user(name: &str) -> Outcome {
    Outcome::LoggedInAs(name.to_owned())
}

#[tokio::test]
async fn each_principal_on_each_server_kind() {
    let guest = Principal::guest("alice@contoso.com", "fabrikam.onmicrosoft.com");
    let guest_upn = "alice_contoso.com#EXT#@fabrikam.onmicrosoft.com";
    let msa = Principal::microsoft_account("bob@outlook.com", "fabrikam.onmicrosoft.com");
    let app = Principal::service_principal("reporting-app");
    // (principal, user given, Flexible, Single Server, Cosmos)
    let table: Vec<(Principal, Option<&str>, [Outcome; 3])> = vec![
        (
            Principal::system_assigned("orders-vm"),
            None,
            [
                as_user("orders-vm"),
                as_user("orders-vm@mysrv"),
                as_user("orders-vm"),
            ],
        ),
        (
            Principal::user_assigned("orders-api"),
            None,
            [
                as_user("orders-api"),
                as_user("orders-api@mysrv"),
                as_user("orders-api"),
            ],
        ),
        (
            Principal::app_service_slot("shop", "staging"),
            None,
            [
                as_user("shop/slots/staging"),
                as_user("shop/slots/staging@mysrv"),
                as_user("shop/slots/staging"),
            ],
        ),
        // The Single Server gateway strips only the last `@mysrv`: a UPN keeps its own.
        (
            Principal::user("alice@contoso.com"),
            None,
            [
                as_user("alice@contoso.com"),
                as_user("alice@contoso.com@mysrv"),
                as_user("alice@contoso.com"),
            ],
        ),
        (
            Principal::user("alice@contoso.com"),
            Some("alice@contoso.com@mysrv"),
            [
                as_user("alice@contoso.com@mysrv"),
                as_user("alice@contoso.com@mysrv"),
                as_user("alice@contoso.com@mysrv"),
            ],
        ),
        // A guest's home address is not its role: no name is derived...
        (
            guest.clone(),
            None,
            [Outcome::Guest, Outcome::Guest, Outcome::Guest],
        ),
        (
            msa.clone(),
            None,
            [Outcome::Guest, Outcome::Guest, Outcome::Guest],
        ),
        // ...and its guest UPN, given, is used as given.
        (
            guest.clone(),
            Some(guest_upn),
            [
                as_user(guest_upn),
                as_user(&format!("{guest_upn}@mysrv")),
                as_user(guest_upn),
            ],
        ),
        (
            app.clone(),
            None,
            [Outcome::NoName, Outcome::NoName, Outcome::NoName],
        ),
        (
            app.clone(),
            Some("reporting-app"),
            [
                as_user("reporting-app"),
                as_user("reporting-app@mysrv"),
                as_user("reporting-app"),
            ],
        ),
    ];
    for (principal, user, expected) in table {
        for (kind, expected) in [FLEXIBLE, SINGLE, COSMOS].iter().zip(expected) {
            let outcome = log_in(kind, &principal, user).await;
            assert_eq!(
                outcome,
                expected,
                "{} given {user:?} on {}",
                principal.name(),
                kind.host
            );
        }
    }
}

/// A guest's error says what to do; `#EXT#` in a URL (`%23EXT%23`) is read as given.
#[tokio::test]
async fn a_guest_is_told_its_name_form_and_may_give_it_in_a_url() {
    let guest = Principal::guest("alice@contoso.com", "fabrikam.onmicrosoft.com");
    let connector = Connector::builder()
        .environment(Environment::from_vars([(
            "PGHOST",
            "orders.postgres.database.azure.com",
        )]))
        .credential(Arc::new(FakeCredential::new(guest.clone())))
        .build()
        .unwrap();
    let token = connector.token_cache().token().await.unwrap();
    assert!(token.is_guest());
    assert_eq!(token.username(), None, "never the home address");
    let error = connector.user_for(&token).unwrap_err();
    let text = error.to_string();
    assert!(text.contains("guest account (alice@contoso.com)"), "{text}");
    assert!(
        text.contains("alice_contoso.com#EXT#@<tenant>.onmicrosoft.com"),
        "{text}"
    );
    assert!(error.hint().unwrap().contains("AZURE_TENANT_ID"));

    let from_url = Connector::builder()
        .environment(Environment::empty())
        .connection_string(
            "postgresql://alice_contoso.com%23EXT%23%40fabrikam.onmicrosoft.com@orders.postgres.database.azure.com/postgres",
        )
        .credential(Arc::new(FakeCredential::new(guest.clone())))
        .build()
        .unwrap();
    assert_eq!(from_url.user_for(&token).unwrap(), guest.name());
}
