//! One scope rule for every credential: server kind × scope form × credential → what each
//! endpoint or tool is sent. A managed identity endpoint gets the exact resource (no trailing
//! slash, no `/.default`); Entra and the CLIs get `<resource>/.default`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pg_entra::credential::{
    AzureCliCredential, AzureDeveloperCliCredential, EnvironmentCredential,
    ManagedIdentityCredential, WorkloadIdentityCredential,
};
use pg_entra::testing::{IdentityEndpoint, Principal};
use pg_entra::{Connector, Environment, TokenCredential};

const FLEXIBLE: (&str, &str) = (
    "orders.postgres.database.azure.com",
    "https://ossrdbms-aad.database.windows.net",
);
const COSMOS: (&str, &str) = (
    "c-orders.abc123.postgres.cosmos.azure.com",
    "https://token.postgres.cosmos.azure.com",
);

#[derive(Debug, Clone, Copy)]
enum Kind {
    Imds,
    AppService,
    ServicePrincipal,
    WorkloadIdentity,
    AzureCli,
    AzureDeveloperCli,
}

/// The credential of `kind`, aimed at `endpoint` (or at stand-in CLIs in `tools`).
fn credential(
    kind: Kind,
    endpoint: &IdentityEndpoint,
    app: &Principal,
    tools: &std::path::Path,
    token_file: &std::path::Path,
) -> Arc<dyn TokenCredential> {
    let env = |vars: Vec<(&str, String)>| Environment::from_vars(vars);
    match kind {
        Kind::Imds => Arc::new(
            ManagedIdentityCredential::builder()
                .options(env(vec![(
                    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
                    endpoint.authority_host(),
                )]))
                .build()
                .unwrap(),
        ),
        Kind::AppService => Arc::new(
            ManagedIdentityCredential::builder()
                .options(env(vec![
                    ("IDENTITY_ENDPOINT", endpoint.app_service_endpoint()),
                    ("IDENTITY_HEADER", endpoint.identity_header().to_owned()),
                ]))
                .build()
                .unwrap(),
        ),
        Kind::ServicePrincipal => Arc::new(
            EnvironmentCredential::builder()
                .options(env(vec![
                    ("AZURE_TENANT_ID", "contoso.onmicrosoft.com".into()),
                    ("AZURE_CLIENT_ID", app.client_id().into()),
                    ("AZURE_CLIENT_SECRET", endpoint.client_secret().into()),
                    ("AZURE_AUTHORITY_HOST", endpoint.authority_host()),
                ]))
                .build()
                .unwrap(),
        ),
        Kind::WorkloadIdentity => {
            std::fs::write(token_file, endpoint.federated_token()).unwrap();
            Arc::new(
                WorkloadIdentityCredential::builder()
                    .options(env(vec![
                        ("AZURE_TENANT_ID", "contoso.onmicrosoft.com".into()),
                        ("AZURE_CLIENT_ID", app.client_id().into()),
                        (
                            "AZURE_FEDERATED_TOKEN_FILE",
                            token_file.display().to_string(),
                        ),
                        ("AZURE_AUTHORITY_HOST", endpoint.authority_host()),
                    ]))
                    .build()
                    .unwrap(),
            )
        }
        Kind::AzureCli => Arc::new(
            AzureCliCredential::builder()
                .options(env(vec![("PATH", path(tools))]))
                .build()
                .unwrap(),
        ),
        Kind::AzureDeveloperCli => Arc::new(
            AzureDeveloperCliCredential::builder()
                .options(env(vec![("PATH", path(tools))]))
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        ),
    }
}

fn path(tools: &std::path::Path) -> String {
    format!("{}:/usr/bin:/bin", tools.display())
}

/// Stand-in `az` and `azd` that record their arguments and print a token.
fn stand_in_tools(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let token = "eyJhbGciOiJub25lIn0.eyJ1cG4iOiJhbGljZUBjb250b3NvLmNvbSJ9.c2ln";
    for (name, answer) in [
        (
            "az",
            format!(r#"{{"accessToken":"{token}","expires_on":4102444800,"tokenType":"Bearer"}}"#),
        ),
        (
            "azd",
            format!(r#"{{"token":"{token}","expiresOn":"2100-01-01T00:00:00Z"}}"#),
        ),
    ] {
        let file = dir.join(name);
        let args = dir.join(format!("{name}.args"));
        std::fs::write(
            &file,
            format!(
                "#!/bin/sh\necho \"$@\" > '{}'\necho '{answer}'\n",
                args.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// What the credential of `kind` sent for its last token: the `resource`, the `scope` or the
/// tool's `--scope`.
fn sent(kind: Kind, endpoint: &IdentityEndpoint, tools: &std::path::Path) -> String {
    let tool_scope = |name: &str| {
        let args = std::fs::read_to_string(tools.join(format!("{name}.args"))).unwrap();
        let mut words = args.split_whitespace();
        words.find(|word| *word == "--scope");
        words.next().unwrap().to_owned()
    };
    match kind {
        Kind::Imds | Kind::AppService => endpoint
            .recorded()
            .last()
            .and_then(|r| r.param("resource").map(str::to_owned))
            .unwrap(),
        Kind::ServicePrincipal | Kind::WorkloadIdentity => endpoint
            .recorded()
            .last()
            .and_then(|r| r.param("scope").map(str::to_owned))
            .unwrap(),
        Kind::AzureCli => tool_scope("az"),
        Kind::AzureDeveloperCli => tool_scope("azd"),
    }
}

#[tokio::test]
async fn every_credential_sends_each_scope_form_in_its_one_right_form() {
    let app = Principal::service_principal("reporting-app");
    let vm = Principal::system_assigned("orders-vm");
    let endpoint = IdentityEndpoint::builder()
        .principal(vm)
        .principal(app.clone())
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    stand_in_tools(dir.path());
    let token_file: PathBuf = dir.path().join("federated-token");
    for (host, resource) in [FLEXIBLE, COSMOS] {
        let forms = [
            None,
            Some(resource.to_owned()),
            Some(format!("{resource}/")),
            Some(format!("{resource}/.default")),
        ];
        for form in forms {
            for kind in [
                Kind::Imds,
                Kind::AppService,
                Kind::ServicePrincipal,
                Kind::WorkloadIdentity,
                Kind::AzureCli,
                Kind::AzureDeveloperCli,
            ] {
                let mut builder = Connector::builder()
                    .environment(Environment::from_vars([("PGHOST", host)]))
                    .user("someone")
                    .credential(credential(kind, &endpoint, &app, dir.path(), &token_file));
                if let Some(form) = &form {
                    builder = builder.scope(form);
                }
                let connector = builder.build().unwrap();
                let case = format!("{host} {form:?} {kind:?}");
                connector
                    .token_cache()
                    .token()
                    .await
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
                let expected = match kind {
                    Kind::Imds | Kind::AppService => resource.to_owned(),
                    _ => format!("{resource}/.default"),
                };
                assert_eq!(sent(kind, &endpoint, dir.path()), expected, "{case}");
            }
        }
    }
}

/// A scope asked of a credential directly (not through the cache) follows the same rule.
#[tokio::test]
async fn credentials_asked_directly_follow_the_same_rule() {
    let vm = Principal::system_assigned("orders-vm");
    let endpoint = IdentityEndpoint::builder()
        .principal(vm)
        .start()
        .await
        .unwrap();
    let imds = ManagedIdentityCredential::builder()
        .options(Environment::from_vars([(
            "AZURE_POD_IDENTITY_AUTHORITY_HOST",
            endpoint.authority_host(),
        )]))
        .build()
        .unwrap();
    let (_, resource) = FLEXIBLE;
    for form in [format!("{resource}/"), format!("{resource}//.default")] {
        imds.get_token(&[&form], None).await.unwrap();
        assert_eq!(
            endpoint.recorded().last().unwrap().param("resource"),
            Some(resource)
        );
    }
    let refused = imds.get_token(&["ossrdbms-aad"], None).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("https://ossrdbms-aad.database.windows.net/.default"),
        "{refused}"
    );
}

/// A token whose audience differs from the requested resource, even by a trailing `/`: the
/// cache warns, naming both strings exactly.
#[tokio::test]
async fn an_audience_that_differs_by_a_slash_is_named_in_a_warning() {
    use std::io::Write;
    use std::sync::Mutex;

    use base64::Engine as _;
    use pg_entra::credential::{AccessToken, TokenRequestOptions};

    #[derive(Debug)]
    struct SlashAudience;

    #[async_trait::async_trait]
    impl TokenCredential for SlashAudience {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let part = |json: serde_json::Value| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
            };
            let token = format!(
                "{}.{}.c2ln",
                part(serde_json::json!({"alg": "RS256"})),
                part(serde_json::json!({"aud": "https://ossrdbms-aad.database.windows.net/"}))
            );
            Ok(AccessToken::new(
                token,
                time::OffsetDateTime::now_utc() + time::Duration::hours(1),
            ))
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = crate::log_to::log_to(&tracing::Dispatch::new(subscriber));
    let cache = pg_entra::TokenCache::builder(Arc::new(SlashAudience))
        .build()
        .unwrap();
    cache.token().await.unwrap();
    let logged = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains(r#"audience="https://ossrdbms-aad.database.windows.net/""#)
            && logged.contains(r#"expected="https://ossrdbms-aad.database.windows.net""#),
        "{logged}"
    );
}
