//! The developer CLIs through fake `az` / `azd` executables, service principals and workload
//! identities against a local Entra token endpoint, and the `DefaultAzureCredential` chain.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pg_entra::credential::{
    AzureCliCredential, AzureDeveloperCliCredential, CredentialUnavailable, EnvironmentCredential,
    WorkloadIdentityCredential,
};
use pg_entra::testing::{IdentityEndpoint, Principal};
use pg_entra::{
    Cloud, Connector, DefaultAzureCredential, Environment, Error, Token, TokenCredential,
};

const LOGIN_ERROR: &str = "ERROR: Please run 'az login' to setup account.";

/// A user token as the CLIs return it (JWT-shaped, with `upn`).
fn user_token(upn: &str, expires: i64) -> String {
    let part = |json: serde_json::Value| URL_SAFE_NO_PAD.encode(json.to_string());
    format!(
        "{}.{}.{}",
        part(serde_json::json!({"typ": "JWT", "alg": "RS256"})),
        part(serde_json::json!({
            "aud": "https://ossrdbms-aad.database.windows.net",
            "exp": expires, "upn": upn, "idtyp": "user"
        })),
        URL_SAFE_NO_PAD.encode([7u8; 64])
    )
}

fn in_an_hour() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp() + 3600
}

/// A folder to put on `PATH` with fake CLIs in it; each records its arguments in
/// `<name>.args`.
struct FakeTools {
    dir: tempfile::TempDir,
}

impl FakeTools {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The fake tools first, then the system's (the scripts need `cat` and `sleep`).
    fn path(&self) -> String {
        format!("{}:/usr/bin:/bin", self.dir.path().display())
    }

    fn add(&self, name: &str, body: &str) {
        let file = self.dir.path().join(name);
        let args = self.args_file(name);
        std::fs::write(
            &file,
            format!("#!/bin/sh\necho \"$@\" >> '{}'\n{body}\n", args.display()),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn args_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.args"))
    }

    /// How often `name` ran.
    fn runs(&self, name: &str) -> usize {
        std::fs::read_to_string(self.args_file(name))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn az_logged_in(&self, upn: &str) {
        let json = serde_json::json!({
            "accessToken": user_token(upn, in_an_hour()),
            "expiresOn": "2030-01-01 00:00:00.000000",
            "expires_on": in_an_hour(),
            "subscription": "00000000-0000-0000-0000-000000000000",
            "tenant": "72f988bf-0000-4000-8000-00000000c0de",
            "tokenType": "Bearer",
        });
        self.add("az", &format!("cat <<'JSON'\n{json}\nJSON"));
    }

    fn az_logged_out(&self) {
        self.add("az", &format!("echo \"{LOGIN_ERROR}\" >&2\nexit 1"));
    }

    fn azd_logged_in(&self, upn: &str) {
        let expires = time::OffsetDateTime::from_unix_timestamp(in_an_hour())
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let json =
            serde_json::json!({"token": user_token(upn, in_an_hour()), "expiresOn": expires});
        self.add("azd", &format!("cat <<'JSON'\n{json}\nJSON"));
    }
}

fn is_unavailable(error: &azure_core::Error) -> bool {
    CredentialUnavailable::is_in(error)
}

async fn token_from(credential: &dyn TokenCredential) -> azure_core::Result<Token> {
    credential
        .get_token(&[Cloud::Public.scope()], None)
        .await
        .map(Token::from)
}

#[tokio::test]
async fn azure_cli_token_scope_and_user_name() {
    let tools = FakeTools::new();
    tools.az_logged_in("alice@contoso.com");
    let env = Environment::from_vars([("PATH", tools.path())]);
    let az = AzureCliCredential::builder()
        .options(env.clone())
        .build()
        .unwrap();
    let token = token_from(&az).await.unwrap();
    assert_eq!(token.username(), Some("alice@contoso.com"));
    let args = std::fs::read_to_string(tools.args_file("az")).unwrap();
    assert!(
        args.contains("account get-access-token --output json --scope https://ossrdbms-aad.database.windows.net/.default"),
        "{args}"
    );
}

#[tokio::test]
async fn azure_developer_cli_token() {
    let tools = FakeTools::new();
    tools.azd_logged_in("bob@contoso.com");
    let env = Environment::from_vars([("PATH", tools.path())]);
    let azd = AzureDeveloperCliCredential::builder()
        .options(env.clone())
        .tenant("contoso.onmicrosoft.com")
        .build()
        .unwrap();
    assert_eq!(
        token_from(&azd).await.unwrap().username(),
        Some("bob@contoso.com")
    );
    let args = std::fs::read_to_string(tools.args_file("azd")).unwrap();
    assert!(args.contains("--no-prompt"), "{args}");
    assert!(
        args.contains("--tenant-id contoso.onmicrosoft.com"),
        "{args}"
    );
}

#[tokio::test]
async fn cli_failures_are_unavailable_and_say_what_the_cli_said() {
    let tools = FakeTools::new();
    tools.az_logged_out();
    tools.add("azd", "sleep 30");
    let env = Environment::from_vars([("PATH", tools.path())]);

    let error = token_from(
        &AzureCliCredential::builder()
            .options(env.clone())
            .build()
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert!(is_unavailable(&error));
    assert!(error.to_string().contains(LOGIN_ERROR), "{error}");

    let hung = AzureDeveloperCliCredential::builder()
        .options(env.clone())
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let error = token_from(&hung).await.unwrap_err();
    assert!(is_unavailable(&error));
    assert!(
        error.to_string().contains("did not answer within"),
        "{error}"
    );

    let missing = Environment::from_vars([("PATH", "/nonexistent")]);
    let error = token_from(
        &AzureCliCredential::builder()
            .options(missing.clone())
            .build()
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert!(is_unavailable(&error));
    assert!(error.to_string().contains("not installed"), "{error}");
}

/// An endpoint issuing tokens for a service principal and a user-assigned identity.
async fn entra() -> (IdentityEndpoint, Principal, Principal) {
    let app = Principal::service_principal("reporting-app");
    let uami = Principal::user_assigned("aks-workload");
    let endpoint = IdentityEndpoint::builder()
        .principal(app.clone())
        .principal(uami.clone())
        .start()
        .await
        .unwrap();
    (endpoint, app, uami)
}

fn service_principal_vars(
    endpoint: &IdentityEndpoint,
    app: &Principal,
    secret: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_TENANT_ID", "contoso.onmicrosoft.com".into()),
        ("AZURE_CLIENT_ID", app.client_id().into()),
        ("AZURE_CLIENT_SECRET", secret.into()),
        ("AZURE_AUTHORITY_HOST", endpoint.authority_host()),
    ]
}

#[tokio::test]
async fn service_principal_with_a_secret() {
    let (endpoint, app, _) = entra().await;
    let env = Environment::from_vars(service_principal_vars(
        &endpoint,
        &app,
        endpoint.client_secret(),
    ));
    let credential = EnvironmentCredential::builder()
        .options(env.clone())
        .build()
        .unwrap();
    assert!(!format!("{credential:?}").contains(endpoint.client_secret()));
    let token = token_from(&credential).await.unwrap();
    // Service principal tokens name nobody: PostgreSQL's user must be given.
    assert_eq!(token.username(), None);
    let request = &endpoint.recorded()[0];
    assert_eq!(request.path, "/contoso.onmicrosoft.com/oauth2/v2.0/token");
    assert_eq!(request.param("scope"), Some(Cloud::Public.scope()));

    let wrong = Environment::from_vars(service_principal_vars(&endpoint, &app, "wrong-secret"));
    let error = token_from(
        &EnvironmentCredential::builder()
            .options(wrong.clone())
            .build()
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        !is_unavailable(&error),
        "a refused secret is not 'unavailable'"
    );
    assert!(error.to_string().contains("AADSTS7000215"), "{error}");
    assert!(!error.to_string().contains("wrong-secret"), "{error}");

    let unconfigured = EnvironmentCredential::builder()
        .options(Environment::empty().clone())
        .build()
        .unwrap();
    assert!(!unconfigured.is_configured());
    let error = token_from(&unconfigured).await.unwrap_err();
    assert!(is_unavailable(&error));
    assert!(error.to_string().contains("AZURE_TENANT_ID"), "{error}");
}

#[tokio::test]
async fn workload_identity_rereads_the_rotating_token_file() {
    let (endpoint, _, uami) = entra().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, endpoint.federated_token()).unwrap();
    let env = Environment::from_vars([
        ("AZURE_TENANT_ID", "contoso.onmicrosoft.com".to_owned()),
        ("AZURE_CLIENT_ID", uami.client_id().to_owned()),
        ("AZURE_FEDERATED_TOKEN_FILE", file.display().to_string()),
        ("AZURE_AUTHORITY_HOST", endpoint.authority_host()),
    ]);
    let credential = WorkloadIdentityCredential::builder()
        .options(env.clone())
        .build()
        .unwrap();
    assert_eq!(
        token_from(&credential).await.unwrap().username(),
        Some(uami.name())
    );
    assert_eq!(
        endpoint.recorded()[0].param("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );

    // The kubelet rotates the token: the old one is refused, the new file is read.
    let rotated = endpoint.rotate_federated_token();
    assert!(token_from(&credential).await.is_err());
    std::fs::write(&file, rotated).unwrap();
    assert_eq!(
        token_from(&credential).await.unwrap().username(),
        Some(uami.name())
    );
}

/// A token file that is a FIFO with no writer, `/dev/zero`, a directory or too large: each a
/// prompt "unavailable" naming why, never a hang or an exhausted memory.
#[tokio::test]
async fn workload_identity_reads_only_a_small_regular_token_file() {
    let (endpoint, _, uami) = entra().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let large = dir.path().join("large");
    std::fs::write(&large, vec![b'a'; 65 * 1024]).unwrap();
    for (file, says) in [
        (fifo, "it is a FIFO, not a regular file"),
        (PathBuf::from("/dev/zero"), "it is a character device"),
        (dir.path().to_owned(), "it is a directory"),
        (large, "it is larger than 65536 bytes"),
    ] {
        let env = Environment::from_vars([
            ("AZURE_TENANT_ID", "contoso.onmicrosoft.com".to_owned()),
            ("AZURE_CLIENT_ID", uami.client_id().to_owned()),
            ("AZURE_FEDERATED_TOKEN_FILE", file.display().to_string()),
            ("AZURE_AUTHORITY_HOST", endpoint.authority_host()),
        ]);
        let credential = WorkloadIdentityCredential::builder()
            .options(env)
            .build()
            .unwrap();
        let error = tokio::time::timeout(Duration::from_secs(30), token_from(&credential))
            .await
            .expect("no wait on the file")
            .unwrap_err();
        assert!(is_unavailable(&error), "{error}");
        assert!(error.to_string().contains(says), "{error}");
    }
    assert!(endpoint.recorded().is_empty(), "nothing was sent");
}

/// An address where nothing listens: IMDS as on a laptop.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}")
}

fn chain(vars: Vec<(&'static str, String)>) -> Result<DefaultAzureCredential, Error> {
    DefaultAzureCredential::builder()
        .options(Environment::from_vars(vars))
        .imds_probe_timeout(Duration::from_millis(300))
        .cli_timeout(Duration::from_secs(5))
        .build()
}

async fn chain_token(chain: &DefaultAzureCredential) -> azure_core::Result<Token> {
    // A hang guard only: the fall-through itself is bounded by the probe timeout.
    tokio::time::timeout(Duration::from_secs(20), token_from(chain))
        .await
        .expect("the chain answers")
}

#[tokio::test]
async fn off_azure_the_chain_reaches_the_cli_after_one_short_imds_probe() {
    let tools = FakeTools::new();
    tools.az_logged_in("alice@contoso.com");
    // IMDS that accepts connections and never answers (the slow case), then a closed port.
    let silent = IdentityEndpoint::builder().start().await.unwrap();
    let _hold = silent.hold();
    for imds in [silent.authority_host(), closed_port()] {
        let chain = chain(vec![
            ("PATH", tools.path()),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds),
        ])
        .unwrap();
        let started = std::time::Instant::now();
        let token = chain_token(&chain).await.unwrap();
        eprintln!("fell through to the CLI in {:?}", started.elapsed());
        assert_eq!(token.username(), Some("alice@contoso.com"));
        assert_eq!(chain.selected_credential(), Some("AzureCliCredential"));
    }
    // One probe, no retries.
    assert_eq!(silent.requests(), 1);
}

#[tokio::test]
async fn the_chain_remembers_the_winner() {
    let tools = FakeTools::new();
    tools.az_logged_in("alice@contoso.com");
    // IMDS answers, but does not know this machine's identity: unavailable, not fatal.
    let imds = IdentityEndpoint::builder().start().await.unwrap();
    let chain = chain(vec![
        ("PATH", tools.path()),
        ("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.authority_host()),
    ])
    .unwrap();
    assert!(chain.skipped_credentials().is_empty(), "nothing tried yet");
    chain_token(&chain).await.unwrap();
    assert_eq!(chain.selected_credential(), Some("AzureCliCredential"));
    // Each member passed over, in order, with its own reason.
    let skipped = chain.skipped_credentials();
    assert_eq!(
        skipped.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
        [
            "EnvironmentCredential",
            "WorkloadIdentityCredential",
            "ManagedIdentityCredential"
        ]
    );
    assert!(skipped[0].1.contains("AZURE_TENANT_ID"), "{skipped:?}");
    assert!(
        skipped[2].1.contains("does not know this identity"),
        "{skipped:?}"
    );
    // The probe (no `Metadata` header, refused at once), then the token request (400).
    let seen = imds.recorded();
    assert_eq!(
        seen.iter().map(|r| r.metadata_header).collect::<Vec<_>>(),
        [false, true]
    );
    chain_token(&chain).await.unwrap();
    chain_token(&chain).await.unwrap();
    assert_eq!(imds.requests(), 2, "later calls go straight to the winner");
    assert_eq!(tools.runs("az"), 3);
}

#[tokio::test]
async fn order_and_a_refused_credential_stops_the_chain() {
    let (endpoint, app, _) = entra().await;
    let tools = FakeTools::new();
    tools.az_logged_in("alice@contoso.com");
    let mut vars = service_principal_vars(&endpoint, &app, endpoint.client_secret());
    vars.push(("PATH", tools.path()));
    vars.push(("AZURE_POD_IDENTITY_AUTHORITY_HOST", closed_port()));
    let first = chain(vars.clone()).unwrap();
    assert_eq!(
        first.credential_names(),
        [
            "EnvironmentCredential",
            "WorkloadIdentityCredential",
            "ManagedIdentityCredential",
            "AzureCliCredential",
            "AzureDeveloperCliCredential"
        ]
    );
    chain_token(&first).await.unwrap();
    assert_eq!(first.selected_credential(), Some("EnvironmentCredential"));
    assert!(
        first.skipped_credentials().is_empty(),
        "the first member won"
    );
    assert_eq!(tools.runs("az"), 0);

    // The service principal's secret is wrong: that is a refusal, not "unavailable".
    let mut wrong = vars;
    wrong.retain(|(name, _)| *name != "AZURE_CLIENT_SECRET");
    wrong.push(("AZURE_CLIENT_SECRET", "wrong".into()));
    let error = chain_token(&chain(wrong).unwrap()).await.unwrap_err();
    assert!(!is_unavailable(&error));
    assert!(
        error
            .to_string()
            .contains("EnvironmentCredential was tried and failed"),
        "{error}"
    );
    assert_eq!(tools.runs("az"), 0, "the chain stopped before the CLI");
}

#[tokio::test]
async fn token_credentials_selects_members() {
    let tools = FakeTools::new();
    tools.az_logged_in("alice@contoso.com");
    tools.azd_logged_in("bob@contoso.com");
    let imds = IdentityEndpoint::builder()
        .principal(Principal::system_assigned("vm"))
        .start()
        .await
        .unwrap();
    let with = |selection: &str| {
        chain(vec![
            ("PATH", tools.path()),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.authority_host()),
            ("AZURE_TOKEN_CREDENTIALS", selection.into()),
        ])
    };

    let dev = with("dev").unwrap();
    assert_eq!(
        chain_token(&dev).await.unwrap().username(),
        Some("alice@contoso.com")
    );
    assert_eq!(imds.requests(), 0, "dev skips the managed identity");

    let prod = with("prod").unwrap();
    assert_eq!(chain_token(&prod).await.unwrap().username(), Some("vm"));
    assert_eq!(prod.credential_names().len(), 3);

    let azd = with("azuredeveloperclicredential").unwrap();
    assert_eq!(azd.credential_names(), ["AzureDeveloperCliCredential"]);
    assert_eq!(
        chain_token(&azd).await.unwrap().username(),
        Some("bob@contoso.com")
    );

    assert!(matches!(
        with("VisualStudioCodeCredential"),
        Err(Error::Config(_))
    ));
    // The connector refuses it when it is built, too.
    let error = Connector::builder()
        .environment(Environment::from_vars([
            ("PGHOST", "srv.postgres.database.azure.com"),
            ("AZURE_TOKEN_CREDENTIALS", "sometimes"),
        ]))
        .build()
        .unwrap_err();
    assert!(
        error.to_string().contains("AZURE_TOKEN_CREDENTIALS"),
        "{error}"
    );
}

#[tokio::test]
async fn when_nothing_is_available_the_error_lists_every_credential_in_order() {
    let tools = FakeTools::new();
    tools.az_logged_out();
    let chain = chain(vec![
        ("PATH", tools.path()),
        ("AZURE_POD_IDENTITY_AUTHORITY_HOST", closed_port()),
    ])
    .unwrap();
    let error = chain_token(&chain).await.unwrap_err();
    let text = error.to_string();
    let positions: Vec<usize> = [
        "EnvironmentCredential is unavailable: AZURE_TENANT_ID, AZURE_CLIENT_ID not set",
        "WorkloadIdentityCredential is unavailable",
        "ManagedIdentityCredential is unavailable: no IMDS endpoint answered",
        LOGIN_ERROR,
        "AzureDeveloperCliCredential is unavailable: `azd` is not installed",
    ]
    .iter()
    .map(|part| {
        text.find(part)
            .unwrap_or_else(|| panic!("{part:?} missing from:\n{text}"))
    })
    .collect();
    assert!(positions.is_sorted(), "{text}");
    // The advice comes once, as the hint, not also in the text.
    assert!(!text.contains("elsewhere run `az login`"), "{text}");
    // Through the connector, it is a typed "unavailable" error.
    let connector = Connector::builder()
        .environment(Environment::from_vars([
            ("PGHOST", "srv.postgres.database.azure.com".to_owned()),
            ("PATH", tools.path()),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", closed_port()),
        ]))
        .build()
        .unwrap();
    let error = tokio::time::timeout(Duration::from_secs(20), connector.config())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(error, Error::TokenUnavailable { .. }), "{error:?}");
    let hint = error.hint().unwrap();
    assert!(hint.contains("elsewhere run `az login`"), "{hint}");
    let mut shown = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        shown.push_str(&cause.to_string());
        source = cause.source();
    }
    assert!(
        !shown.contains("elsewhere run `az login`"),
        "said twice: {shown}"
    );
}

#[tokio::test]
async fn user_names_come_from_the_right_claims() {
    let tools = FakeTools::new();
    tools.az_logged_in("alice@contoso.com");
    let connector = Connector::builder()
        .environment(Environment::from_vars([
            ("PGHOST", "srv.postgres.database.azure.com".to_owned()),
            ("PATH", tools.path()),
            ("AZURE_TOKEN_CREDENTIALS", "dev".to_owned()),
        ]))
        .build()
        .unwrap();
    let config = connector.config().await.unwrap();
    assert_eq!(config.get_user(), Some("alice@contoso.com"));

    // A service principal's token names nobody; an explicit user is required and then used.
    let (endpoint, app, _) = entra().await;
    let vars = service_principal_vars(&endpoint, &app, endpoint.client_secret());
    let build = |user: Option<&str>| {
        let mut builder = Connector::builder()
            .environment(Environment::from_vars(vars.clone()))
            .host("srv.postgres.database.azure.com");
        if let Some(user) = user {
            builder = builder.user(user);
        }
        builder.build().unwrap()
    };
    assert!(matches!(
        build(None).config().await,
        Err(Error::UnknownUser { .. })
    ));
    assert_eq!(
        build(Some("reporting-app"))
            .config()
            .await
            .unwrap()
            .get_user(),
        Some("reporting-app")
    );
}

#[cfg(feature = "client-certificate")]
#[tokio::test]
async fn service_principal_with_a_certificate_pem_or_pkcs12() {
    let (endpoint, app, _) = entra().await;
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("client.pem");
    std::fs::write(&pem, endpoint.client_certificate_pem().unwrap()).unwrap();
    let pfx = dir.path().join("client.pfx");
    std::fs::write(
        &pfx,
        endpoint.client_certificate_pkcs12("pfx-password").unwrap(),
    )
    .unwrap();
    let vars = |path: &std::path::Path, password: Option<&str>| {
        let mut vars = vec![
            ("AZURE_TENANT_ID", "contoso.onmicrosoft.com".to_owned()),
            ("AZURE_CLIENT_ID", app.client_id().to_owned()),
            ("AZURE_CLIENT_CERTIFICATE_PATH", path.display().to_string()),
            ("AZURE_AUTHORITY_HOST", endpoint.authority_host()),
        ];
        if let Some(password) = password {
            vars.push(("AZURE_CLIENT_CERTIFICATE_PASSWORD", password.to_owned()));
        }
        Environment::from_vars(vars)
    };
    let build = |env: &Environment| {
        EnvironmentCredential::builder()
            .options(env.clone())
            .build()
    };

    for env in [vars(&pem, None), vars(&pfx, Some("pfx-password"))] {
        let credential = build(&env).unwrap();
        token_from(&credential).await.unwrap();
        let request = endpoint.recorded().pop().unwrap();
        assert!(request.param("client_secret").is_none());
        assert_eq!(
            request
                .param("client_assertion")
                .unwrap()
                .split('.')
                .count(),
            3
        );
    }
    // A wrong password is a configuration error when the credential is built.
    let error = build(&vars(&pfx, Some("wrong"))).unwrap_err();
    assert!(matches!(error, Error::Config(_)), "{error:?}");
    assert!(!error.to_string().contains("wrong"), "{error}");

    // A certificate Entra does not know for this app is refused.
    let stranger = IdentityEndpoint::builder().start().await.unwrap();
    let other = dir.path().join("other.pem");
    std::fs::write(&other, stranger.client_certificate_pem().unwrap()).unwrap();
    let error = token_from(&build(&vars(&other, None)).unwrap())
        .await
        .unwrap_err();
    assert!(!is_unavailable(&error));
    assert!(error.to_string().contains("AADSTS7000215"), "{error}");
}

#[tokio::test]
async fn a_refusal_inside_the_chain_stays_a_rejection_through_the_connector() {
    // App Service refuses a wrong secret (401): the chain stops, and the connector must
    // report it as rejected, not as "unavailable", although the chain wraps the error.
    let endpoint = IdentityEndpoint::builder()
        .principal(Principal::system_assigned("web-app"))
        .start()
        .await
        .unwrap();
    let connector = Connector::builder()
        .environment(Environment::from_vars([
            ("PGHOST", "srv.postgres.database.azure.com".to_owned()),
            ("IDENTITY_ENDPOINT", endpoint.app_service_endpoint()),
            ("IDENTITY_HEADER", "not-the-secret".to_owned()),
        ]))
        .build()
        .unwrap();
    let error = connector.config().await.unwrap_err();
    assert!(matches!(error, Error::TokenRefused { .. }), "{error:?}");
    assert!(!format!("{error:?}").contains("not-the-secret"));
}

/// The chain as on an Azure VM: IMDS at `imds`, nothing else configured, test-speed retries.
fn chain_on_a_vm(imds: &IdentityEndpoint, tools: &FakeTools) -> DefaultAzureCredential {
    DefaultAzureCredential::builder()
        .options(Environment::from_vars([
            ("PATH", tools.path()),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.authority_host()),
        ]))
        // The real default: the probe must not be what decides these cases.
        .imds_probe_timeout(Duration::from_secs(1))
        .managed_identity_retry(pg_entra::credential::RetryOptions {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            ..pg_entra::credential::RetryOptions::default()
        })
        .cli_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_restarting_imds_is_waited_for_not_skipped() {
    let tools = FakeTools::new();
    let imds = IdentityEndpoint::builder()
        .principal(Principal::system_assigned("restarting-vm"))
        .start()
        .await
        .unwrap();
    // IMDS answers 410 while it restarts, then issues the token.
    imds.script([
        pg_entra::testing::Reply::status(410),
        pg_entra::testing::Reply::status(410),
    ]);
    let chain = chain_on_a_vm(&imds, &tools);
    let token = chain_token(&chain).await.unwrap();
    assert_eq!(token.username(), Some("restarting-vm"));
    assert_eq!(
        chain.selected_credential(),
        Some("ManagedIdentityCredential")
    );
    assert_eq!(imds.tokens_issued(), 1);
}

#[tokio::test]
async fn a_cold_identity_that_takes_seconds_to_mint_is_waited_for() {
    let tools = FakeTools::new();
    tools.az_logged_in("alice@contoso.com");
    let imds = IdentityEndpoint::builder()
        .principal(Principal::system_assigned("cold-vm"))
        .start()
        .await
        .unwrap();
    imds.script([pg_entra::testing::Reply::token().delay(Duration::from_millis(1600))]);
    let chain = chain_on_a_vm(&imds, &tools);
    let token = chain_token(&chain).await.unwrap();
    assert_eq!(token.username(), Some("cold-vm"));
    assert_eq!(
        chain.selected_credential(),
        Some("ManagedIdentityCredential")
    );
    assert_eq!(
        tools.runs("az"),
        0,
        "IMDS answered, so the chain never reached the CLI"
    );
}

#[tokio::test]
async fn proxies_and_docker_desktop_answering_for_imds_are_not_imds() {
    use pg_entra::testing::Reply;
    let docker_desktop = "connecting to 169.254.169.254:80: connecting to 169.254.169.254:80: \
        dial tcp 169.254.169.254:80: connectex: A socket operation was attempted to an \
        unreachable network.";
    for (answer, words) in [
        (Reply::raw(403, "text/plain", docker_desktop), "unreachable"),
        (
            Reply::raw(
                403,
                "text/html; charset=utf-8",
                "<html><head><title>Access Denied</title></head><body><h1>Blocked by the \
                 corporate proxy</h1></body></html>",
            ),
            "\"Access Denied Blocked by the corporate proxy\"",
        ),
        (
            Reply::raw(403, "text/plain", "Forbidden by policy"),
            "\"Forbidden by policy\"",
        ),
        // A captive portal answers 200 with a page.
        (
            Reply::raw(200, "text/html", "<html>Sign in to the guest Wi-Fi</html>"),
            "\"Sign in to the guest Wi-Fi\"",
        ),
        // JSON, but not IMDS's.
        (
            Reply::raw(403, "application/json", r#"{"message":"denied"}"#),
            "application/json",
        ),
    ] {
        let tools = FakeTools::new();
        tools.az_logged_in("alice@contoso.com");
        let imds = IdentityEndpoint::builder().start().await.unwrap();
        imds.impersonate(Some(answer.clone()));
        let chain = chain_on_a_vm(&imds, &tools);
        let started = std::time::Instant::now();
        let token = chain_token(&chain).await.unwrap();
        eprintln!(
            "{answer:?}: fell through to the CLI in {:?}",
            started.elapsed()
        );
        assert_eq!(token.username(), Some("alice@contoso.com"));
        assert_eq!(chain.selected_credential(), Some("AzureCliCredential"));
        assert_eq!(imds.requests(), 1, "only the probe: {answer:?}");

        // What the chain says about it, when nothing else works either.
        tools.az_logged_out();
        let imds_down = chain_on_a_vm(&imds, &tools);
        let error = chain_token(&imds_down).await.unwrap_err().to_string();
        assert!(
            error.contains("ManagedIdentityCredential is unavailable"),
            "{error}"
        );
        assert!(error.contains(words), "{words} in {error}");
        assert!(error.contains("HTTP "), "{error}");
    }
}

#[tokio::test]
async fn a_json_refusal_from_imds_still_stops_the_chain() {
    let tools = FakeTools::new();
    tools.az_logged_in("alice@contoso.com");
    let imds = IdentityEndpoint::builder().start().await.unwrap();
    imds.impersonate(Some(pg_entra::testing::Reply::raw(
        403,
        "application/json",
        r#"{"error":"forbidden","error_description":"The identity is not allowed here"}"#,
    )));
    let chain = chain_on_a_vm(&imds, &tools);
    let error = chain_token(&chain).await.unwrap_err();
    assert!(!is_unavailable(&error), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("ManagedIdentityCredential was tried and failed"),
        "{text}"
    );
    assert!(text.contains("HTTP 403"), "{text}");
    assert_eq!(tools.runs("az"), 0, "the chain stopped before the CLI");
}

#[tokio::test]
async fn a_managed_identity_chosen_by_name_is_not_probed() {
    let imds = IdentityEndpoint::builder()
        .principal(Principal::system_assigned("named-vm"))
        .start()
        .await
        .unwrap();
    // Restarting: with a probe in the way this would read as "no IMDS here".
    imds.script([pg_entra::testing::Reply::status(410)]);
    let chain = DefaultAzureCredential::builder()
        .options(Environment::from_vars([
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.authority_host()),
            (
                "AZURE_TOKEN_CREDENTIALS",
                "ManagedIdentityCredential".into(),
            ),
        ]))
        .imds_probe_timeout(Duration::from_millis(300))
        .managed_identity_retry(pg_entra::credential::RetryOptions {
            initial_backoff: Duration::from_millis(20),
            ..pg_entra::credential::RetryOptions::default()
        })
        .build()
        .unwrap();
    let token = chain_token(&chain).await.unwrap();
    assert_eq!(token.username(), Some("named-vm"));
    let seen = imds.recorded();
    assert_eq!(seen.len(), 2, "the 410, then the token: no probe");
    assert!(seen.iter().all(|r| r.metadata_header));
}

#[tokio::test]
async fn a_silent_entra_endpoint_times_out() {
    let (endpoint, app, _) = entra().await;
    let _hold = endpoint.hold();
    let mut vars = service_principal_vars(&endpoint, &app, endpoint.client_secret());
    vars.push(("AZURE_TOKEN_CREDENTIALS", "EnvironmentCredential".into()));
    let chain = DefaultAzureCredential::builder()
        .options(Environment::from_vars(vars))
        .entra_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let error = chain_token(&chain).await.unwrap_err().to_string();
    assert!(error.contains("request timeout"), "{error}");
    assert_eq!(endpoint.requests(), 1);
}

#[tokio::test]
async fn entra_redirects_are_not_followed() {
    let (endpoint, app, _) = entra().await;
    let elsewhere = IdentityEndpoint::builder().start().await.unwrap();
    endpoint.script([pg_entra::testing::Reply::redirect(format!(
        "{}/contoso.onmicrosoft.com/oauth2/v2.0/token",
        elsewhere.authority_host()
    ))]);
    let vars = service_principal_vars(&endpoint, &app, endpoint.client_secret());
    let credential = EnvironmentCredential::builder()
        .options(Environment::from_vars(vars).clone())
        .build()
        .unwrap();
    let error = token_from(&credential).await.unwrap_err().to_string();
    assert!(error.contains("HTTP 307"), "{error}");
    assert!(error.contains("never followed"), "{error}");
    assert_eq!(elsewhere.requests(), 0, "the secret went nowhere else");
    assert!(!error.contains(endpoint.client_secret()));
}

#[tokio::test]
async fn cli_output_is_read_with_a_cap() {
    let tools = FakeTools::new();
    // 200 KiB of output: more than any token answer.
    tools.add("az", "head -c 204800 /dev/zero | tr '\\0' 'a'");
    let env = Environment::from_vars([("PATH", tools.path())]);
    let az = AzureCliCredential::builder()
        .options(env.clone())
        .build()
        .unwrap();
    let error = token_from(&az).await.unwrap_err();
    assert!(is_unavailable(&error));
    assert!(error.to_string().contains("more than 64 KiB"), "{error}");
}

#[tokio::test]
async fn an_authority_that_echoes_the_secret_does_not_put_it_in_the_error() {
    let (endpoint, app, _) = entra().await;
    // Characters that forms and URLs encode.
    let secret = "Zq8~Lm3pXv_7Rt2.Wn5~Kd9s+Yb4/Hc6=";
    let form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let percent: String = secret.bytes().map(|b| format!("%{b:02X}")).collect();
    let echoes = [
        ("text/plain", format!("bad request: client_secret={secret}")),
        (
            "text/plain",
            format!("bad request: client_id=x&client_secret={form}"),
        ),
        (
            "text/plain",
            format!("bad request: client_secret={percent}"),
        ),
        (
            "application/json",
            serde_json::json!({
                "error": "invalid_request",
                "error_description": format!("AADSTS900144: bad body client_secret={form}&scope=x"),
            })
            .to_string(),
        ),
        (
            "application/json",
            format!(
                r#"{{"error":"invalid_client","error_description":"echo {}"}}"#,
                secret
                    .chars()
                    .map(|c| format!("\\u{:04x}", c as u32))
                    .collect::<String>()
            ),
        ),
        // Cut by the excerpt's twelve words in the middle of the secret.
        (
            "text/html",
            format!(
                "<p>{} client_secret={}</p>",
                "word ".repeat(11),
                &secret[..14]
            ),
        ),
    ];
    for (content_type, body) in echoes {
        endpoint.script([pg_entra::testing::Reply::raw(
            400,
            content_type,
            body.clone(),
        )]);
        let vars = service_principal_vars(&endpoint, &app, secret);
        let credential = EnvironmentCredential::builder()
            .options(Environment::from_vars(vars).clone())
            .build()
            .unwrap();
        let error = token_from(&credential).await.unwrap_err();
        let text = format!("{error} {error:?}");
        assert!(text.contains("HTTP 400"), "{text}");
        assert!(text.contains("withheld"), "{body}: {text}");
        for start in 0..=secret.len() - 8 {
            let piece = &secret[start..start + 8];
            let encoded: String = form_urlencoded::byte_serialize(piece.as_bytes()).collect();
            assert!(
                !text.contains(piece) && !text.contains(&encoded),
                "{body}: {text}"
            );
        }
    }
}

/// The chain's developer tools get a token in the tenant asked for: `AZURE_TENANT_ID`, or the
/// builder's tenant (a guest signs in to the server's tenant); anything a tool could read as
/// an option is refused at build.
#[tokio::test]
async fn the_chains_tools_get_tokens_in_the_tenant_asked_for() {
    let tools = FakeTools::new();
    tools.az_logged_in("alice@contoso.com");
    tools.azd_logged_in("alice@contoso.com");
    let fabrikam = "fabrikam.onmicrosoft.com";
    for (tool, selector, flag) in [
        ("az", "AzureCliCredential", "--tenant"),
        ("azd", "AzureDeveloperCliCredential", "--tenant-id"),
    ] {
        let by_variable = DefaultAzureCredential::builder()
            .options(Environment::from_vars([
                ("PATH", tools.path()),
                ("AZURE_TOKEN_CREDENTIALS", selector.to_owned()),
                ("AZURE_TENANT_ID", fabrikam.to_owned()),
            ]))
            .build()
            .unwrap();
        token_from(&by_variable).await.unwrap();
        let by_builder = DefaultAzureCredential::builder()
            .options(Environment::from_vars([
                ("PATH", tools.path()),
                ("AZURE_TOKEN_CREDENTIALS", selector.to_owned()),
            ]))
            .tenant("72f988bf-0000-4000-8000-00000000c0de")
            .build()
            .unwrap();
        token_from(&by_builder).await.unwrap();
        let args = std::fs::read_to_string(tools.args_file(tool)).unwrap();
        assert!(args.contains(&format!("{flag} {fabrikam}")), "{args}");
        assert!(
            args.contains(&format!("{flag} 72f988bf-0000-4000-8000-00000000c0de")),
            "{args}"
        );
        let refused = DefaultAzureCredential::builder()
            .options(Environment::from_vars([
                ("PATH", tools.path()),
                ("AZURE_TOKEN_CREDENTIALS", selector.to_owned()),
            ]))
            .tenant("--allow-no-subscriptions")
            .build()
            .unwrap_err();
        assert!(refused.to_string().contains("is not a tenant"), "{refused}");
    }
}

/// Each refusal's hint is about the credential that failed: a wrong secret is not told to
/// enable a managed identity.
#[tokio::test]
async fn a_refused_service_principal_gets_advice_about_itself() {
    let (endpoint, app, _) = entra().await;
    let vars = service_principal_vars(&endpoint, &app, "not-the-secret");
    let connector = Connector::builder()
        .environment(Environment::from_vars(
            vars.into_iter()
                .chain([("PGHOST", "srv.postgres.database.azure.com".to_owned())]),
        ))
        .build()
        .unwrap();
    let error = connector.config().await.unwrap_err();
    assert!(matches!(error, Error::TokenRefused { .. }), "{error:?}");
    let hint = error.hint().unwrap();
    assert!(hint.contains("AZURE_CLIENT_SECRET"), "{hint}");
    assert!(!hint.contains("managed identity"), "{hint}");
}

/// A connector whose service principal was refused (a wrong secret) does not leave its cache
/// to the next connector: that one builds its own and asks Entra again, so a fixed secret,
/// or a rotated one, takes effect without a restart.
#[tokio::test]
async fn a_refused_identity_is_not_shared_with_the_next_connector() {
    let (endpoint, app, _) = entra().await;
    let vars: Vec<(&str, String)> = service_principal_vars(&endpoint, &app, "not-the-secret")
        .into_iter()
        .chain([("PGHOST", "srv.postgres.database.azure.com".to_owned())])
        .collect();
    for _ in 0..2 {
        let connector = Connector::builder()
            .environment(Environment::from_vars(vars.clone()))
            .build()
            .unwrap();
        assert!(connector.config().await.is_err());
    }
    assert_eq!(endpoint.requests(), 2);
    // The right secret is another configuration: it gets its token.
    let fixed: Vec<(&str, String)> =
        service_principal_vars(&endpoint, &app, endpoint.client_secret())
            .into_iter()
            .chain([("PGHOST", "srv.postgres.database.azure.com".to_owned())])
            .collect();
    let connector = Connector::builder()
        .environment(Environment::from_vars(fixed))
        .user("reporting-app")
        .build()
        .unwrap();
    connector.config().await.unwrap();
}

/// The CLIs count as identity requests, by exit code (feature `metrics`).
#[cfg(feature = "metrics")]
#[test]
fn cli_runs_are_counted_as_identity_requests() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let tools = FakeTools::new();
            let env = Environment::from_vars([("PATH", tools.path())]);
            let az = AzureCliCredential::builder().options(env).build().unwrap();
            tools.az_logged_in("alice@contoso.com");
            token_from(&az).await.unwrap();
            tools.az_logged_out();
            assert!(token_from(&az).await.is_err());
        });
    });
    let counts: Vec<(String, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "pg_entra.identity.requests")
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(count) => {
                let labels: Vec<String> = key
                    .key()
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                Some((labels.join(","), count))
            }
            _ => None,
        })
        .collect();
    assert!(
        counts.contains(&("source=azure_cli,status=0".to_owned(), 1)),
        "{counts:?}"
    );
    assert!(
        counts.contains(&("source=azure_cli,status=1".to_owned(), 1)),
        "{counts:?}"
    );
}
