//! Service principals and workload identities: Entra's OAuth 2.0 client-credentials flow
//! (`POST {authority}/{tenant}/oauth2/v2.0/token`) with a client secret or a federated token.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use azure_core::http::StatusCode;

use super::http::{BodyError, Destination, HttpClient, RequestBuilder, SendError, read_body};
use super::local_file::read_capped;
use super::options::CredentialOptions;
use super::scope::only_scope;
use super::token_response::{ErrorBody, parse_token_response};
use super::unavailable::CredentialUnavailable;
use super::vars::{
    AUTHORITY_HOST_VAR, CLIENT_CERTIFICATE_PATH_VAR, CLIENT_ID_VAR, CLIENT_SECRET_VAR,
    FEDERATED_TOKEN_FILE_VAR, TENANT_ID_VAR,
};
use crate::cloud::Cloud;
use crate::environment::Environment;
use crate::error::{Error, Hinted};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The most a federated token file may hold: Kubernetes' projected tokens are 1-2 KiB.
const FEDERATED_TOKEN_MAX_BYTES: u64 = 64 * 1024;
/// Default limit on reaching Entra's token endpoint (DNS, TCP, TLS).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit on one token request to Entra, connection included.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How the client proves itself.
enum ClientAuth {
    Secret(String),
    #[cfg(feature = "client-certificate")]
    Certificate(super::client_certificate::ClientCertificate),
    /// Re-read on every request: the kubelet rotates the projected token.
    AssertionFile(PathBuf),
}

/// One client-credentials client: tenant, client id, authority and its HTTP client.
struct ClientCredentials {
    credential: &'static str,
    token_url: reqwest::Url,
    client_id: String,
    auth: ClientAuth,
    http: HttpClient,
    /// The limit on one exchange, answer body included.
    request_timeout: Duration,
}

impl ClientCredentials {
    fn new(
        credential: &'static str,
        environment: &Environment,
        cloud: Cloud,
        tenant: String,
        client_id: String,
        auth: ClientAuth,
        request_timeout: Duration,
    ) -> Result<Self, Error> {
        let authority = environment
            .var(AUTHORITY_HOST_VAR)
            .unwrap_or_else(|| cloud.authority_host().to_owned());
        let token_url = token_url(&authority, &tenant).map_err(|problem| {
            Error::invalid(
                AUTHORITY_HOST_VAR,
                format!("{AUTHORITY_HOST_VAR} {authority:?}: {problem}"),
            )
        })?;
        let http = HttpClient::new(Destination::Entra {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT.min(request_timeout),
            request_timeout,
        });
        Ok(Self {
            credential,
            token_url,
            client_id,
            auth,
            http,
            request_timeout,
        })
    }

    async fn token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let scope = only_scope(self.credential, scopes)?.scope();
        // Read before the form is built: the serializer is not `Send`.
        let (secret, assertion) = match &self.auth {
            ClientAuth::Secret(secret) => (Some(secret.as_str()), None),
            #[cfg(feature = "client-certificate")]
            ClientAuth::Certificate(certificate) => (
                None,
                Some(
                    certificate
                        .assertion(
                            self.token_url.as_str(),
                            &self.client_id,
                            time::OffsetDateTime::now_utc(),
                        )
                        .map_err(|problem| {
                            azure_core::Error::with_message(
                                ErrorKind::Credential,
                                format!("{}: {problem}", self.credential),
                            )
                        })?,
                ),
            ),
            ClientAuth::AssertionFile(path) => {
                let unreadable = |problem: String| {
                    CredentialUnavailable::new(
                        self.credential,
                        format!(
                            "cannot read {FEDERATED_TOKEN_FILE_VAR} {}: {problem}",
                            path.display()
                        ),
                    )
                    .into_azure()
                };
                let bytes = read_capped(path, FEDERATED_TOKEN_MAX_BYTES)
                    .await
                    .map_err(|e| unreadable(e.to_string()))?;
                let assertion = String::from_utf8(bytes)
                    .map_err(|_| unreadable("it is not text".to_owned()))?;
                (None, Some(assertion))
            }
        };
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("client_id", &self.client_id)
                .append_pair("grant_type", "client_credentials")
                .append_pair("scope", &scope);
            if let Some(secret) = secret {
                form.append_pair("client_secret", secret);
            }
            if let Some(assertion) = &assertion {
                form.append_pair("client_assertion_type", JWT_BEARER)
                    .append_pair("client_assertion", assertion.trim());
            }
            form.finish()
        };
        let no_answer = |cause: String| {
            azure_core::Error::with_message(
                ErrorKind::Connection,
                format!(
                    "{}: no answer from {}: {cause}",
                    self.credential, self.token_url
                ),
            )
        };
        let request = RequestBuilder::post(self.token_url.clone())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .build();
        // One deadline for the whole exchange: an endpoint that sends its headers and then
        // stalls in the body is cut off too.
        let exchange = async {
            let response = self.http.send(request).await;
            crate::observe::identity_request(
                "entra",
                response.as_ref().ok().map(|r| r.status().as_u16()),
            );
            let response = response.map_err(|e| no_answer(describe_transport_error(&e)))?;
            let status = response.status().as_u16();
            let body = read_body(response).await.map_err(|e| match e {
                BodyError::Transport(e) => no_answer(describe_transport_error(&SendError::from(e))),
                too_large => azure_core::Error::with_message(
                    ErrorKind::Credential,
                    format!(
                        "{}: {} sent an unusable answer: {too_large}",
                        self.credential, self.token_url
                    ),
                ),
            })?;
            Ok::<_, azure_core::Error>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.request_timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(no_answer(describe_transport_error(&SendError::TimedOut))))?;
        if status == 200 {
            return parse_token_response(&body, time::OffsetDateTime::now_utc()).map_err(
                |problem| {
                    azure_core::Error::with_message(
                        ErrorKind::Credential,
                        format!(
                            "{}: unusable token response from {}: {problem}",
                            self.credential, self.token_url
                        ),
                    )
                },
            );
        }
        // An authority that echoes the form must not carry the secret or the assertion into
        // the error, in whatever encoding it echoes them.
        let sent: Vec<&str> = secret.into_iter().chain(assertion.as_deref()).collect();
        let error = ErrorBody::parse(&body, &sent);
        let description = match (&error.description, status / 100) {
            (Some(description), _) => description.clone(),
            (None, 3) => "a redirect, which is never followed".to_owned(),
            (None, _) => error
                .excerpt
                .as_deref()
                .map(|words| format!("\"{words}\""))
                .unwrap_or_default(),
        };
        let message = format!(
            "{}: Entra refused the token request for client {} with HTTP {status}{}: {description}",
            self.credential,
            self.client_id,
            error
                .code
                .clone()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default(),
        );
        // Advice about this credential, by the AADSTS code Entra put first in its description.
        let hint = entra_hint(
            status,
            &description,
            matches!(self.auth, ClientAuth::AssertionFile(_)),
        );
        Err(azure_core::Error::new(
            ErrorKind::HttpResponse {
                status: StatusCode::from(status),
                error_code: error.code,
                raw_response: None,
            },
            Hinted::new(message, hint),
        ))
    }
}

/// What to do about Entra's refusal, by its AADSTS code (Microsoft's "Microsoft Entra
/// authentication and authorization error codes" list).
fn entra_hint(status: u16, description: &str, workload_identity: bool) -> &'static str {
    // An outage or throttling says nothing about the configuration.
    if status == 429 || status >= 500 {
        return "Entra is throttling or failing for now (HTTP 429 or 5xx): the cache retries \
                with backoff; nothing in the configuration needs to change";
    }
    let code = description.split_once("AADSTS").and_then(|(_, rest)| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    match code {
        Some(7_000_215 | 7_000_222) => {
            "the client secret (AZURE_CLIENT_SECRET) is wrong or has expired: create a new one \
             under the app registration's Certificates & secrets and set it (the secret's \
             value, not its id)"
        }
        Some(700_016) => {
            "AZURE_CLIENT_ID names no application in the tenant AZURE_TENANT_ID: check both (the \
             application must be registered in, or consented to, that tenant)"
        }
        Some(90_002 | 900_023) => {
            "AZURE_TENANT_ID names no tenant: use the directory (tenant) id, or its domain"
        }
        Some(70_021 | 700_211 | 700_212 | 700_213 | 700_024) => {
            "the identity's federated credential does not match the presented token: its issuer \
             (the cluster's OIDC issuer URL) and subject (system:serviceaccount:<namespace>:<name>) \
             must be exactly the service account's, and the token file must be current"
        }
        Some(700_027 | 700_023) => {
            "Entra does not accept the client certificate: upload its public part to the app \
             registration's Certificates & secrets (AZURE_CLIENT_CERTIFICATE_PATH)"
        }
        Some(1_002_012 | 70_011) => {
            "the scope is not one Entra accepts for this flow: it must be <resource>/.default"
        }
        _ if workload_identity => {
            "check the workload identity: AZURE_CLIENT_ID (the identity's client id), \
             AZURE_TENANT_ID, and its federated credential for this service account"
        }
        _ => {
            "check the service principal: AZURE_TENANT_ID, AZURE_CLIENT_ID, and its client secret \
             or certificate"
        }
    }
}

/// A failed exchange in words: a timeout says which limit ran out.
fn describe_transport_error(error: &SendError) -> String {
    if error.is_timeout() {
        "no answer within the request timeout (DefaultAzureCredentialBuilder::entra_timeout)".into()
    } else {
        error.to_string()
    }
}

/// `{authority}/{tenant}/oauth2/v2.0/token`; https only, except on the loopback interface
/// (local test endpoints).
fn token_url(authority: &str, tenant: &str) -> Result<reqwest::Url, String> {
    let mut url = reqwest::Url::parse(authority.trim_end_matches('/'))
        .map_err(|e| format!("not a URL ({e})"))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(host)) => host == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("it has no host".into()),
    };
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err(
            "an authority must use https (plain http only on the loopback interface)".into(),
        );
    }
    if tenant.is_empty()
        || !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    {
        return Err(format!(
            "{TENANT_ID_VAR} {tenant:?} is not a tenant id or domain"
        ));
    }
    let path = format!(
        "{}/{tenant}/oauth2/v2.0/token",
        url.path().trim_end_matches('/')
    );
    url.set_path(&path);
    Ok(url)
}

fn required(
    environment: &Environment,
    credential: &'static str,
    names: &[&str],
) -> Result<Vec<String>, CredentialUnavailable> {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| environment.var(name).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(CredentialUnavailable::new(
            credential,
            format!("{} not set", missing.join(", ")),
        ));
    }
    Ok(names
        .iter()
        .filter_map(|name| environment.var(name))
        .collect())
}

/// What building a credential from the environment ends with: the credential, a reason it
/// does not apply here, or a configuration error.
enum FromEnvironment<T> {
    Ready(T),
    Unavailable(CredentialUnavailable),
}

macro_rules! client_credential {
    ($(#[$doc:meta])* $name:ident, $builder:ident, $label:literal) => {
        $(#[$doc])*
        pub struct $name {
            state: Result<ClientCredentials, CredentialUnavailable>,
        }

        impl $name {
            /// The credential the process environment describes, for the public cloud (or
            /// `AZURE_AUTHORITY_HOST`). If the variables are missing it still builds, and every
            /// token request reports it unavailable.
            pub fn from_env() -> Result<Self, Error> {
                Self::builder().build()
            }

            /// A builder; it reads the process environment unless told otherwise.
            pub fn builder() -> $builder {
                $builder {
                    options: CredentialOptions::default(),
                    request_timeout: DEFAULT_REQUEST_TIMEOUT,
                }
            }

            /// Whether the environment had what this credential needs.
            pub fn is_configured(&self) -> bool {
                self.state.is_ok()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut debug = f.debug_struct(stringify!($name));
                match &self.state {
                    Ok(client) => debug
                        .field("token_url", &client.token_url.as_str())
                        .field("client_id", &client.client_id),
                    Err(reason) => debug.field("unavailable", &reason.reason()),
                };
                debug.finish_non_exhaustive()
            }
        }

        #[async_trait::async_trait]
        impl TokenCredential for $name {
            async fn get_token(
                &self,
                scopes: &[&str],
                _options: Option<TokenRequestOptions<'_>>,
            ) -> azure_core::Result<AccessToken> {
                match &self.state {
                    Ok(client) => client.token(scopes).await,
                    Err(reason) => Err(CredentialUnavailable::new($label, reason.reason()).into_azure()),
                }
            }
        }

        #[doc = concat!("Builds a [`", stringify!($name), "`].")]
        #[derive(Debug, Clone)]
        pub struct $builder {
            options: CredentialOptions,
            request_timeout: Duration,
        }

        impl $builder {
            /// Where to read the `AZURE_*` variables and which cloud's Entra authority to use
            /// (default: the process environment, the public cloud).
            pub fn options(mut self, options: impl Into<CredentialOptions>) -> Self {
                self.options = options.into();
                self
            }

            /// How long one token request to Entra may take, connection included (default
            /// 30 s; connecting alone at most 10 s).
            pub fn request_timeout(mut self, timeout: Duration) -> Self {
                self.request_timeout = timeout;
                self
            }

            /// Reads the variables and builds the credential. Missing variables are not an
            /// error: the credential then reports itself unavailable on every request.
            ///
            /// # Errors
            /// [`Error::Config`] when a variable is set but unusable (an authority that is not
            /// https, a tenant that is not a tenant id, a certificate that cannot be read).
            pub fn build(self) -> Result<$name, Error> {
                Ok($name {
                    state: match $name::configure(
                        &self.options.environment,
                        self.options.cloud,
                        self.request_timeout,
                    )? {
                        FromEnvironment::Ready(client) => Ok(client),
                        FromEnvironment::Unavailable(reason) => Err(reason),
                    },
                })
            }
        }
    };
}

client_credential!(
    /// A service principal from `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and either
    /// `AZURE_CLIENT_SECRET` or (feature `client-certificate`) `AZURE_CLIENT_CERTIFICATE_PATH`
    /// (PEM with certificate and RSA key, or PKCS#12) with `AZURE_CLIENT_CERTIFICATE_PASSWORD`,
    /// honouring `AZURE_AUTHORITY_HOST`. A certificate that cannot be read is a configuration
    /// error when the credential is built; without the feature, a certificate-only
    /// configuration reports the credential unavailable and says why.
    /// Service principal tokens carry no name claim: give PostgreSQL's user explicitly.
    EnvironmentCredential,
    EnvironmentCredentialBuilder,
    "EnvironmentCredential"
);

client_credential!(
    /// An AKS workload identity from `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE` (re-read on every request, as the kubelet rotates it),
    /// honouring `AZURE_AUTHORITY_HOST`.
    WorkloadIdentityCredential,
    WorkloadIdentityCredentialBuilder,
    "WorkloadIdentityCredential"
);

impl EnvironmentCredential {
    fn configure(
        environment: &Environment,
        cloud: Cloud,
        request_timeout: Duration,
    ) -> Result<FromEnvironment<ClientCredentials>, Error> {
        const NAME: &str = "EnvironmentCredential";
        let ids = match required(environment, NAME, &[TENANT_ID_VAR, CLIENT_ID_VAR]) {
            Ok(ids) => ids,
            Err(reason) => return Ok(FromEnvironment::Unavailable(reason)),
        };
        let auth = match (
            environment.var(CLIENT_SECRET_VAR),
            environment.var(CLIENT_CERTIFICATE_PATH_VAR),
        ) {
            (Some(secret), _) => ClientAuth::Secret(secret),
            #[cfg(feature = "client-certificate")]
            (None, Some(path)) => {
                let password = environment.var(super::vars::CLIENT_CERTIFICATE_PASSWORD_VAR);
                let certificate = super::client_certificate::ClientCertificate::load(
                    std::path::Path::new(&path),
                    password.as_deref(),
                )
                .map_err(|problem| {
                    Error::invalid(
                        CLIENT_CERTIFICATE_PATH_VAR,
                        format!("{CLIENT_CERTIFICATE_PATH_VAR}: {problem}"),
                    )
                })?;
                ClientAuth::Certificate(certificate)
            }
            #[cfg(not(feature = "client-certificate"))]
            (None, Some(_)) => {
                return Ok(FromEnvironment::Unavailable(CredentialUnavailable::new(
                    NAME,
                    format!(
                        "{CLIENT_CERTIFICATE_PATH_VAR} is set, but pg-entra was built without its \
                         `client-certificate` feature; enable it, or set {CLIENT_SECRET_VAR}"
                    ),
                )));
            }
            (None, None) => {
                return Ok(FromEnvironment::Unavailable(CredentialUnavailable::new(
                    NAME,
                    format!("{CLIENT_SECRET_VAR} not set"),
                )));
            }
        };
        let [tenant, client_id] =
            <[String; 2]>::try_from(ids).expect("two variables were required");
        ClientCredentials::new(
            NAME,
            environment,
            cloud,
            tenant,
            client_id,
            auth,
            request_timeout,
        )
        .map(FromEnvironment::Ready)
    }
}

impl WorkloadIdentityCredential {
    fn configure(
        environment: &Environment,
        cloud: Cloud,
        request_timeout: Duration,
    ) -> Result<FromEnvironment<ClientCredentials>, Error> {
        const NAME: &str = "WorkloadIdentityCredential";
        let vars = match required(
            environment,
            NAME,
            &[TENANT_ID_VAR, CLIENT_ID_VAR, FEDERATED_TOKEN_FILE_VAR],
        ) {
            Ok(vars) => vars,
            Err(reason) => return Ok(FromEnvironment::Unavailable(reason)),
        };
        let [tenant, client_id, file] =
            <[String; 3]>::try_from(vars).expect("three variables were required");
        ClientCredentials::new(
            NAME,
            environment,
            cloud,
            tenant,
            client_id,
            ClientAuth::AssertionFile(file.into()),
            request_timeout,
        )
        .map(FromEnvironment::Ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_urls_need_https_except_on_loopback() {
        assert_eq!(
            token_url(
                "https://login.microsoftonline.com/",
                "contoso.onmicrosoft.com"
            )
            .unwrap()
            .as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert!(token_url("http://127.0.0.1:8080", "t").is_ok());
        assert!(token_url("http://[::1]:8080", "t").is_ok());
        assert!(token_url("http://login.example.com", "t").is_err());
        assert!(token_url("https://login.microsoftonline.com", "a/b").is_err());
    }

    #[test]
    fn the_authority_follows_the_cloud_unless_overridden() {
        let vars = |extra: Option<(&'static str, &'static str)>| {
            let mut vars = vec![
                (TENANT_ID_VAR, "t"),
                (CLIENT_ID_VAR, "c"),
                (CLIENT_SECRET_VAR, "s"),
            ];
            vars.extend(extra);
            Environment::from_vars(vars)
        };
        let url_of = |credential: EnvironmentCredential| {
            credential
                .state
                .map(|client| client.token_url.to_string())
                .unwrap()
        };
        for (cloud, host) in [
            (Cloud::Public, "login.microsoftonline.com"),
            (Cloud::UsGovernment, "login.microsoftonline.us"),
            (Cloud::China, "login.chinacloudapi.cn"),
        ] {
            let url = url_of(
                EnvironmentCredential::builder()
                    .options(CredentialOptions::from(vars(None)).cloud(cloud))
                    .build()
                    .unwrap(),
            );
            assert_eq!(url, format!("https://{host}/t/oauth2/v2.0/token"));
        }
        let overridden = EnvironmentCredential::builder()
            .options(
                CredentialOptions::from(vars(Some((
                    AUTHORITY_HOST_VAR,
                    "https://login.example.test",
                ))))
                .cloud(Cloud::China),
            )
            .build()
            .unwrap();
        assert_eq!(
            url_of(overridden),
            "https://login.example.test/t/oauth2/v2.0/token"
        );
        // The secret is nowhere in Debug.
        let debug = format!(
            "{:?}",
            EnvironmentCredential::builder()
                .options(vars(None))
                .build()
                .unwrap()
        );
        assert!(!debug.contains("\"s\""), "{debug}");
    }
}

#[cfg(test)]
mod hint_tests {
    use super::entra_hint;

    #[test]
    fn each_refusal_gets_advice_about_itself_and_an_outage_none_about_configuration() {
        assert!(
            entra_hint(401, "AADSTS7000215: Invalid client secret", false)
                .contains("AZURE_CLIENT_SECRET")
        );
        assert!(
            entra_hint(400, "AADSTS700016: Application not found", false)
                .contains("AZURE_CLIENT_ID")
        );
        assert!(
            entra_hint(
                400,
                "AADSTS70021: No matching federated identity record",
                true
            )
            .contains("federated credential")
        );
        for status in [429, 500, 503] {
            let hint = entra_hint(status, "AADSTS90033: service unavailable", false);
            assert!(
                hint.contains("nothing in the configuration"),
                "{status}: {hint}"
            );
        }
    }
}

#[cfg(test)]
mod timeout_tests {
    use std::time::Duration;

    use azure_core::credentials::TokenCredential as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::EnvironmentCredential;
    use crate::credential::CredentialOptions;
    use crate::environment::Environment;

    /// An endpoint that sends its headers and then stalls in the body: the request timeout
    /// cuts the whole exchange, body included.
    #[tokio::test]
    async fn the_request_timeout_covers_the_answer_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = format!("http://{}", listener.local_addr().unwrap());
        let _stalling = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 4096];
            let _ = stream.read(&mut request).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
                .await;
            std::future::pending::<()>().await;
        });
        let environment = Environment::from_vars([
            ("AZURE_TENANT_ID", "72f988bf-0000-4000-8000-00000000c0de"),
            ("AZURE_CLIENT_ID", "00000000-0000-4000-8000-000000000001"),
            ("AZURE_CLIENT_SECRET", "not-a-real-secret"),
            ("AZURE_AUTHORITY_HOST", authority.as_str()),
        ]);
        let credential = EnvironmentCredential::builder()
            .options(CredentialOptions::default().environment(environment))
            .request_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            credential.get_token(
                &["https://ossrdbms-aad.database.windows.net/.default"],
                None,
            ),
        )
        .await
        .expect("the credential's own limit ends the exchange");
        let error = answer.unwrap_err();
        assert!(error.to_string().contains("request timeout"), "{error}");
    }
}
