//! A real HTTP server on 127.0.0.1 that speaks the managed identity token protocols (IMDS,
//! App Service, Azure Arc with its key challenge, Cloud Shell, legacy App Service), mints JWT-shaped tokens, sets each one as its role's password (`VALID UNTIL` its expiry), and misbehaves on
//! request.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::TestBedError;
use super::identity::Principal;
use super::jwt::mint;
use super::postgres::PasswordSetter;
use crate::credential::{ImdsCredential, RetryOptions};
use crate::environment::Environment;
use crate::lock::lock;

const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
/// Where the App Service protocol is served (`IDENTITY_ENDPOINT`).
const APP_SERVICE_PATH: &str = "/msi/token";
/// The api-version App Service's managed identity endpoint speaks.
const APP_SERVICE_API_VERSION: &str = "2019-08-01";
/// Where the Azure Arc protocol is served (`IDENTITY_ENDPOINT` with `IMDS_ENDPOINT`).
const ARC_PATH: &str = "/arc/token";
/// Where Cloud Shell's protocol is served (`MSI_ENDPOINT`).
const CLOUD_SHELL_PATH: &str = "/cloudshell/token";
/// Where the legacy App Service protocol is served (`MSI_ENDPOINT` with `MSI_SECRET`).
const LEGACY_APP_SERVICE_PATH: &str = "/msi/legacy";
/// Entra's token endpoint is `/{tenant}` followed by this.
const ENTRA_TOKEN_PATH_SUFFIX: &str = "/oauth2/v2.0/token";
/// Managed identity tokens live up to 24 h; an hour keeps test tokens realistic.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// How the endpoint writes `expires_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ExpiresOnFormat {
    /// `"expires_on": "1506484173"` (what IMDS sends).
    #[default]
    EpochString,
    /// `"expires_on": 1506484173`.
    EpochNumber,
    /// No `expires_on`; only `expires_in`.
    Absent,
    /// `"expires_on": "06/20/2019 02:57:58 +00:00"` (legacy App Service).
    LegacyDate,
    /// `"expires_on": "11/23/2026 4:05:09 PM +00:00"`: legacy App Service on a 12-hour clock.
    LegacyDate12Hour,
}

/// One scripted answer. Requests consume scripted replies in order; when the script is empty
/// the endpoint answers normally.
#[derive(Debug, Clone)]
pub struct Reply {
    kind: ReplyKind,
    delay: Duration,
    retry_after: Option<String>,
}

#[derive(Debug, Clone)]
enum ReplyKind {
    Token,
    Status(u16),
    MalformedJson,
    MissingToken,
    /// Any status, content type and body.
    Raw {
        status: u16,
        content_type: String,
        body: String,
    },
    /// A redirect to another URL.
    Redirect {
        status: u16,
        location: String,
    },
}

impl Reply {
    /// A normal token answer (useful after a delay).
    pub fn token() -> Self {
        Self::of(ReplyKind::Token)
    }

    /// An error status with an IMDS-style JSON error body.
    pub fn status(status: u16) -> Self {
        Self::of(ReplyKind::Status(status))
    }

    /// 200 with a body that is not JSON (but does hold a token-like string).
    pub fn malformed_json() -> Self {
        Self::of(ReplyKind::MalformedJson)
    }

    /// 200 with JSON that lacks `access_token`.
    pub fn missing_token() -> Self {
        Self::of(ReplyKind::MissingToken)
    }

    /// Any status with this content type and body, as something other than an identity
    /// endpoint might answer (an HTML page from a proxy, say).
    pub fn raw(status: u16, content_type: &str, body: impl Into<String>) -> Self {
        Self::of(ReplyKind::Raw {
            status,
            content_type: content_type.to_owned(),
            body: body.into(),
        })
    }

    /// `307 Temporary Redirect` to `location`.
    pub fn redirect(location: impl Into<String>) -> Self {
        Self::of(ReplyKind::Redirect {
            status: 307,
            location: location.into(),
        })
    }

    /// Waits this long before answering.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sends `Retry-After: <seconds>` (any `u64`, as a hostile endpoint might).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.to_string());
        self
    }

    fn of(kind: ReplyKind) -> Self {
        Self {
            kind,
            delay: Duration::ZERO,
            retry_after: None,
        }
    }
}

/// What the endpoint saw of one request.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request method.
    pub method: String,
    /// The path.
    pub path: String,
    /// The query parameters, decoded.
    pub query: Vec<(String, String)>,
    /// Whether `Metadata: true` was present.
    pub metadata_header: bool,
    /// The `X-IDENTITY-HEADER` value, if any (App Service).
    pub identity_header: Option<String>,
    /// The `secret` header, if any (legacy App Service).
    pub secret_header: Option<String>,
    /// The `Authorization` header, if any (Arc's challenge answer).
    pub authorization: Option<String>,
    /// The form fields of a form-encoded body (Cloud Shell).
    pub form: Vec<(String, String)>,
    /// When the request arrived.
    pub received_at: std::time::Instant,
}

impl RecordedRequest {
    /// A query parameter's or form field's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .chain(&self.form)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct EndpointState {
    principals: Vec<Principal>,
    lifetime: Mutex<Duration>,
    expires_on_format: Mutex<ExpiresOnFormat>,
    script: Mutex<VecDeque<Reply>>,
    requests: AtomicUsize,
    tokens_issued: AtomicUsize,
    recorded: Mutex<Vec<RecordedRequest>>,
    held: watch::Sender<bool>,
    password_setter: Option<PasswordSetter>,
    /// Added before every answer.
    latency: Mutex<Duration>,
    /// When set, every request gets this answer: something else squatting on the address.
    impersonation: Mutex<Option<Reply>>,
    /// The App Service protocol's shared secret (`IDENTITY_HEADER`, also `MSI_SECRET`).
    identity_header: String,
    /// Holds the Arc agent's key file.
    arc_keys: tempfile::TempDir,
    arc_key_file: std::path::PathBuf,
    /// What service principals must send as `client_secret`.
    client_secret: String,
    /// What workload identities must send as `client_assertion`; rotates on request.
    federated_token: Mutex<String>,
    /// The certificate service principals may sign assertions with; made when first asked for
    /// (RSA key generation is not free).
    client_certificate: std::sync::OnceLock<ClientCertificate>,
}

/// A self-signed RSA certificate and its key.
struct ClientCertificate {
    certificate: openssl::x509::X509,
    key: openssl::pkey::PKey<openssl::pkey::Private>,
}

/// The mock managed identity endpoint. Stops when dropped.
pub struct IdentityEndpoint {
    address: SocketAddr,
    state: Arc<EndpointState>,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for IdentityEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityEndpoint")
            .field("address", &self.address)
            .field("principals", &self.state.principals)
            .finish_non_exhaustive()
    }
}

/// Builds an [`IdentityEndpoint`].
#[derive(Debug, Default)]
pub struct IdentityEndpointBuilder {
    principals: Vec<Principal>,
    lifetime: Option<Duration>,
    password_setter: Option<PasswordSetter>,
}

impl IdentityEndpointBuilder {
    /// An identity the endpoint issues tokens for. A request naming no identity gets the
    /// system-assigned one, if there is one.
    pub fn principal(mut self, principal: Principal) -> Self {
        self.principals.push(principal);
        self
    }

    /// The lifetime of issued tokens (default one hour).
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    /// Sets each issued token as the password of the principal's role, valid until the token
    /// expires, before the token is returned: PostgreSQL then accepts exactly the tokens that
    /// Azure would.
    pub fn password_setter(mut self, setter: PasswordSetter) -> Self {
        self.password_setter = Some(setter);
        self
    }

    /// Binds 127.0.0.1 on a free port and starts serving on the current Tokio runtime.
    pub async fn start(self) -> Result<IdentityEndpoint, TestBedError> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let address = listener.local_addr()?;
        let arc_keys = tempfile::Builder::new().prefix("pg-entra-arc-").tempdir()?;
        let arc_key_file = arc_keys.path().join("challenge.key");
        std::fs::write(&arc_key_file, random_hex())?;
        let state = Arc::new(EndpointState {
            principals: self.principals,
            lifetime: Mutex::new(self.lifetime.unwrap_or(DEFAULT_TOKEN_LIFETIME)),
            expires_on_format: Mutex::new(ExpiresOnFormat::default()),
            script: Mutex::new(VecDeque::new()),
            requests: AtomicUsize::new(0),
            tokens_issued: AtomicUsize::new(0),
            recorded: Mutex::new(Vec::new()),
            held: watch::Sender::new(false),
            password_setter: self.password_setter,
            latency: Mutex::new(Duration::ZERO),
            impersonation: Mutex::new(None),
            identity_header: random_hex(),
            client_secret: random_hex(),
            federated_token: Mutex::new(random_hex()),
            client_certificate: std::sync::OnceLock::new(),
            arc_keys,
            arc_key_file,
        });
        let serving = Arc::clone(&state);
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&serving);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    // A client that hangs up mid-request is not the endpoint's problem.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(IdentityEndpoint {
            address,
            state,
            server,
        })
    }
}

impl IdentityEndpoint {
    /// A builder.
    pub fn builder() -> IdentityEndpointBuilder {
        IdentityEndpointBuilder::default()
    }

    /// The base URL to use as `AZURE_POD_IDENTITY_AUTHORITY_HOST`, e.g. `http://127.0.0.1:41234`.
    pub fn authority_host(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The URL to use as `IDENTITY_ENDPOINT` for the App Service protocol (api-version
    /// 2019-08-01, `X-IDENTITY-HEADER`), e.g. `http://127.0.0.1:41234/msi/token`.
    pub fn app_service_endpoint(&self) -> String {
        format!("http://{}{APP_SERVICE_PATH}", self.address)
    }

    /// The secret to use as `IDENTITY_HEADER`; App Service requests without it are refused.
    pub fn identity_header(&self) -> &str {
        &self.state.identity_header
    }

    /// The URL to use as `IDENTITY_ENDPOINT` (with `IMDS_ENDPOINT` set) for Azure Arc's
    /// protocol: a first request gets a 401 naming a key file in
    /// [`arc_key_directory`](Self::arc_key_directory).
    pub fn arc_endpoint(&self) -> String {
        format!("http://{}{ARC_PATH}", self.address)
    }

    /// The folder holding the Arc key file the challenge names.
    pub fn arc_key_directory(&self) -> &std::path::Path {
        self.state.arc_keys.path()
    }

    /// The URL to use as `MSI_ENDPOINT` for Cloud Shell's protocol (POST, form body).
    pub fn cloud_shell_endpoint(&self) -> String {
        format!("http://{}{CLOUD_SHELL_PATH}", self.address)
    }

    /// The URL to use as `MSI_ENDPOINT` (with `MSI_SECRET` =
    /// [`identity_header`](Self::identity_header)) for the legacy App Service protocol, which
    /// writes `expires_on` as a date such as `06/20/2019 02:57:58 +00:00`.
    pub fn legacy_app_service_endpoint(&self) -> String {
        format!("http://{}{LEGACY_APP_SERVICE_PATH}", self.address)
    }

    /// The secret service principals authenticate with at the Entra token endpoint
    /// (`{authority_host}/{tenant}/oauth2/v2.0/token`, as `AZURE_CLIENT_SECRET`).
    pub fn client_secret(&self) -> &str {
        &self.state.client_secret
    }

    /// The federated token a workload identity must present now (the contents of
    /// `AZURE_FEDERATED_TOKEN_FILE`).
    pub fn federated_token(&self) -> String {
        lock(&self.state.federated_token).clone()
    }

    /// A PEM file's contents (certificate, then unencrypted RSA key) for a service principal to
    /// authenticate with (`AZURE_CLIENT_CERTIFICATE_PATH`); the endpoint verifies assertions
    /// signed with it.
    pub fn client_certificate_pem(&self) -> Result<String, TestBedError> {
        let pair = self.client_certificate()?;
        let certificate = pair.certificate.to_pem()?;
        let key = pair.key.private_key_to_pem_pkcs8()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&certificate),
            String::from_utf8_lossy(&key)
        ))
    }

    /// The same certificate and key as a PKCS#12 (`.pfx`) file protected by `password`.
    pub fn client_certificate_pkcs12(&self, password: &str) -> Result<Vec<u8>, TestBedError> {
        let pair = self.client_certificate()?;
        let pkcs12 = openssl::pkcs12::Pkcs12::builder()
            .name("pg-entra test client")
            .pkey(&pair.key)
            .cert(&pair.certificate)
            .build2(password)?;
        Ok(pkcs12.to_der()?)
    }

    fn client_certificate(&self) -> Result<&ClientCertificate, TestBedError> {
        if let Some(pair) = self.state.client_certificate.get() {
            return Ok(pair);
        }
        let (certificate, key) = super::certs::self_signed_rsa("pg-entra test client")?;
        Ok(self
            .state
            .client_certificate
            .get_or_init(|| ClientCertificate { certificate, key }))
    }

    /// Replaces the accepted federated token, as the kubelet rotates the projected file.
    pub fn rotate_federated_token(&self) -> String {
        let next = random_hex();
        *lock(&self.state.federated_token) = next.clone();
        next
    }

    /// From now on answers every request, whatever its path or headers, with `reply`: the
    /// endpoint plays a proxy or Docker Desktop answering the address instead of the real
    /// service. `None` goes back to normal.
    pub fn impersonate(&self, reply: Option<Reply>) {
        *lock(&self.state.impersonation) = reply;
    }

    /// Adds this much latency to every answer from now on (scripted delays come on top).
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.state.latency) = latency;
    }

    /// An [`ImdsCredential`] for `principal` pointed at this endpoint, with test-speed backoff
    /// (10 ms doubling) and no environment.
    pub fn credential_for(&self, principal: &Principal) -> ImdsCredential {
        ImdsCredential::builder()
            .environment(Environment::empty())
            .authority_host(self.authority_host())
            .identity(principal.managed_identity_id())
            .retry(RetryOptions {
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(100),
                ..RetryOptions::default()
            })
            .build()
            .expect("the endpoint's own URL is valid")
    }

    /// Queues scripted replies.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.state.script).extend(replies);
    }

    /// Requests received so far (any path, any outcome).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.state.tokens_issued.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        lock(&self.state.recorded).clone()
    }

    /// Changes the lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        *lock(&self.state.lifetime) = lifetime;
    }

    /// Changes how `expires_on` is written.
    pub fn set_expires_on_format(&self, format: ExpiresOnFormat) {
        *lock(&self.state.expires_on_format) = format;
    }

    /// Holds every request (already received or not) until the guard is dropped: a
    /// deterministic "slow endpoint".
    pub fn hold(&self) -> HoldGuard {
        self.state.held.send_replace(true);
        HoldGuard {
            state: Arc::clone(&self.state),
        }
    }
}

impl Drop for IdentityEndpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Releases held requests when dropped.
#[must_use = "requests are released when the guard is dropped"]
pub struct HoldGuard {
    state: Arc<EndpointState>,
}

impl std::fmt::Debug for HoldGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HoldGuard")
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.state.held.send_replace(false);
    }
}

async fn handle(state: &EndpointState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    state.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let form = match body.collect().await {
        Ok(body)
            if header("content-type")
                .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded")) =>
        {
            form_urlencoded::parse(&body.to_bytes())
                .into_owned()
                .collect()
        }
        _ => Vec::new(),
    };
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| {
            reqwest::Url::parse(&format!("http://x/?{q}"))
                .map(|u| u.query_pairs().into_owned().collect())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query,
        metadata_header: parts
            .headers
            .get("metadata")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true")),
        identity_header: header("x-identity-header"),
        secret_header: header("secret"),
        authorization: header("authorization"),
        form,
        received_at: std::time::Instant::now(),
    };
    lock(&state.recorded).push(recorded.clone());

    let mut held = state.held.subscribe();
    // Ends at once when not held; an error means the endpoint is gone, so answer anyway.
    let _ = held.wait_for(|held| !*held).await;

    let impersonation = lock(&state.impersonation).clone();
    // IMDS validates a request before it does any work: one without `Metadata: true` (the
    // DefaultAzureCredential probe) is refused at once, without a scripted delay or fault.
    if impersonation.is_none() && recorded.path == TOKEN_PATH && !recorded.metadata_header {
        return error_response(400, "Required metadata header not specified");
    }
    let reply = impersonation
        .or_else(|| lock(&state.script).pop_front())
        .unwrap_or_else(Reply::token);
    let delay = reply.delay + *lock(&state.latency);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = match reply.kind {
        ReplyKind::Status(status) => error_response(status, "scripted fault"),
        ReplyKind::MalformedJson => json_response(
            StatusCode::OK,
            r#"{"access_token":"eyJmalformed.eyJbody.c2ln","expires_in":"#.to_owned(),
        ),
        ReplyKind::MissingToken => json_response(
            StatusCode::OK,
            r#"{"expires_in":"3599","token_type":"Bearer"}"#.to_owned(),
        ),
        ReplyKind::Raw {
            status,
            content_type,
            body,
        } => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if let Ok(value) = content_type.parse() {
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, value);
            }
            response
        }
        ReplyKind::Redirect { status, location } => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::TEMPORARY_REDIRECT);
            if let Ok(value) = location.parse() {
                response
                    .headers_mut()
                    .insert(hyper::header::LOCATION, value);
            }
            response
        }
        ReplyKind::Token => issue(state, &recorded).await,
    };
    if let Some(after) = reply.retry_after
        && let Ok(value) = after.parse()
    {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

/// Validates the request as the protocol's real endpoint does, then mints a token.
async fn issue(state: &EndpointState, request: &RecordedRequest) -> Response<Full<Bytes>> {
    if request.path.ends_with(ENTRA_TOKEN_PATH_SUFFIX) {
        return issue_client_credentials(state, request).await;
    }
    let expected_method = if request.path == CLOUD_SHELL_PATH {
        "POST"
    } else {
        "GET"
    };
    if request.method != expected_method {
        return error_response(405, "method not allowed");
    }
    // The user-assigned parameter names differ between the protocols.
    let (object_param, resource_param) = match request.path.as_str() {
        TOKEN_PATH => {
            if !request.metadata_header {
                return error_response(400, "Required metadata header not specified");
            }
            if request.param("api-version").is_none() {
                return error_response(400, "Required query variable 'api-version' is missing");
            }
            ("object_id", "msi_res_id")
        }
        APP_SERVICE_PATH => {
            if request.identity_header.as_deref() != Some(state.identity_header.as_str()) {
                return error_response(401, "X-IDENTITY-HEADER is missing or wrong");
            }
            if request.param("api-version") != Some(APP_SERVICE_API_VERSION) {
                return error_response(400, "api-version must be 2019-08-01");
            }
            ("principal_id", "mi_res_id")
        }
        ARC_PATH => {
            let key = std::fs::read_to_string(&state.arc_key_file).unwrap_or_default();
            if request.authorization.as_deref() != Some(format!("Basic {key}").as_str()) {
                let mut challenge = error_response(401, "answer the challenge with the key file");
                let realm = format!("Basic realm={}", state.arc_key_file.display());
                if let Ok(value) = realm.parse() {
                    challenge.headers_mut().insert("www-authenticate", value);
                }
                return challenge;
            }
            if !request.metadata_header {
                return error_response(400, "Required metadata header not specified");
            }
            ("-", "-")
        }
        CLOUD_SHELL_PATH => {
            if !request.metadata_header {
                return error_response(400, "Required metadata header not specified");
            }
            ("-", "-")
        }
        LEGACY_APP_SERVICE_PATH => {
            if request.secret_header.as_deref() != Some(state.identity_header.as_str()) {
                return error_response(401, "secret is missing or wrong");
            }
            if request.param("api-version") != Some("2017-09-01") {
                return error_response(400, "api-version must be 2017-09-01");
            }
            ("-", "-")
        }
        _ => return error_response(404, "unknown path"),
    };
    let client_param = if request.path == LEGACY_APP_SERVICE_PATH {
        "clientid"
    } else {
        "client_id"
    };
    let Some(resource) = request.param("resource") else {
        return error_response(400, "Required query variable 'resource' is missing");
    };
    let principal = state.principals.iter().find(|p| {
        match (
            request.param(client_param),
            request.param(object_param),
            request.param(resource_param),
        ) {
            (Some(id), _, _) => p.client_id() == id,
            (_, Some(id), _) => p.object_id() == id,
            (_, _, Some(id)) => p.resource_id().eq_ignore_ascii_case(id),
            (None, None, None) => p.is_system_assigned(),
        }
    });
    let Some(principal) = principal else {
        return error_response(400, "Identity not found");
    };

    let format = match (request.path.as_str(), *lock(&state.expires_on_format)) {
        (LEGACY_APP_SERVICE_PATH, ExpiresOnFormat::LegacyDate12Hour) => {
            ExpiresOnFormat::LegacyDate12Hour
        }
        (LEGACY_APP_SERVICE_PATH, _) => ExpiresOnFormat::LegacyDate,
        (_, format) => format,
    };
    let principal = principal.clone();
    token_response(state, &principal, resource, format).await
}

/// Mints a token, sets it as the role's password if asked to, and answers with it.
/// `ExpiresOnFormat::Absent` answers as Entra's v2 endpoint does (`expires_in` as a number).
async fn token_response(
    state: &EndpointState,
    principal: &Principal,
    resource: &str,
    format: ExpiresOnFormat,
) -> Response<Full<Bytes>> {
    let lifetime = *lock(&state.lifetime);
    // Whole seconds, as Entra issues them: the expiry the response states is exactly the one
    // PostgreSQL enforces.
    let issued = OffsetDateTime::now_utc().truncate_to_second();
    let expires = issued + lifetime;
    let token = mint(principal, resource, issued, expires);
    if let Some(setter) = &state.password_setter
        && let Err(error) = setter.set_password(principal.name(), &token, expires).await
    {
        tracing::error!(%error, role = principal.name(), "test bed could not set the role password");
        return error_response(500, "the test bed could not set the role's password");
    }
    state.tokens_issued.fetch_add(1, Ordering::SeqCst);

    let expires_in = lifetime.as_secs();
    let epoch = expires.unix_timestamp();
    let mut body = if format == ExpiresOnFormat::Absent {
        serde_json::json!({
            "access_token": token,
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "token_type": "Bearer",
        })
    } else {
        serde_json::json!({
            "access_token": token,
            "client_id": principal.client_id(),
            "expires_in": expires_in.to_string(),
            "ext_expires_in": expires_in.to_string(),
            "not_before": issued.unix_timestamp().to_string(),
            "resource": resource,
            "token_type": "Bearer",
        })
    };
    let expires_on = match format {
        ExpiresOnFormat::EpochString => Some(serde_json::json!(epoch.to_string())),
        ExpiresOnFormat::EpochNumber => Some(serde_json::json!(epoch)),
        ExpiresOnFormat::Absent => None,
        ExpiresOnFormat::LegacyDate => {
            let format = time::macros::format_description!(
                "[month]/[day]/[year] [hour]:[minute]:[second] +00:00"
            );
            expires.format(format).ok().map(serde_json::Value::from)
        }
        ExpiresOnFormat::LegacyDate12Hour => {
            let format = time::macros::format_description!(
                "[month padding:none]/[day padding:none]/[year] [hour repr:12 padding:none]:\
                 [minute]:[second] [period] +00:00"
            );
            expires.format(format).ok().map(serde_json::Value::from)
        }
    };
    if let Some(expires_on) = expires_on {
        body["expires_on"] = expires_on;
    }
    // The 2017-09-01 protocol sends only the date: its expiry must be read from `expires_on`.
    if matches!(
        format,
        ExpiresOnFormat::LegacyDate | ExpiresOnFormat::LegacyDate12Hour
    ) && let Some(fields) = body.as_object_mut()
    {
        for field in ["expires_in", "ext_expires_in", "not_before", "client_id"] {
            fields.remove(field);
        }
    }
    json_response(StatusCode::OK, body.to_string())
}

/// Entra's OAuth 2.0 client-credentials flow, as service principals and workload identities
/// use it: `POST /{tenant}/oauth2/v2.0/token`.
async fn issue_client_credentials(
    state: &EndpointState,
    request: &RecordedRequest,
) -> Response<Full<Bytes>> {
    if request.method != "POST" {
        return error_response(405, "method not allowed");
    }
    if request.param("grant_type") != Some("client_credentials") {
        return error_response(400, "AADSTS900144: grant_type must be client_credentials");
    }
    let Some(resource) = request
        .param("scope")
        .and_then(|scope| scope.strip_suffix("/.default"))
    else {
        return error_response(400, "AADSTS70011: the scope must end with /.default");
    };
    let Some(principal) = request
        .param("client_id")
        .and_then(|id| state.principals.iter().find(|p| p.client_id() == id))
    else {
        return error_response(400, "AADSTS700016: Application not found in the directory");
    };
    let federated = lock(&state.federated_token).clone();
    let authenticated = match (
        request.param("client_secret"),
        request.param("client_assertion"),
    ) {
        (Some(secret), None) => secret == state.client_secret,
        (None, Some(assertion)) => {
            request.param("client_assertion_type")
                == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                && (assertion == federated
                    || state.client_certificate.get().is_some_and(|pair| {
                        certificate_assertion_is_valid(
                            pair,
                            assertion,
                            principal.client_id(),
                            request,
                        )
                    }))
        }
        _ => false,
    };
    if !authenticated {
        return json_response(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret or assertion provided.",
            })
            .to_string(),
        );
    }
    let principal = principal.clone();
    token_response(state, &principal, resource, ExpiresOnFormat::Absent).await
}

/// Checks a certificate-signed client assertion as Entra does: RS256 signature by the
/// registered certificate, its `x5t`, issuer and subject the client, audience this token URL,
/// not expired.
fn certificate_assertion_is_valid(
    pair: &ClientCertificate,
    assertion: &str,
    client_id: &str,
    request: &RecordedRequest,
) -> bool {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else {
        return false;
    };
    let json = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
    };
    let (Some(header_json), Some(claims), Ok(signature)) = (
        json(header),
        json(payload),
        URL_SAFE_NO_PAD.decode(signature),
    ) else {
        return false;
    };
    let thumbprint = pair
        .certificate
        .digest(openssl::hash::MessageDigest::sha1())
        .map(|d| URL_SAFE_NO_PAD.encode(d))
        .unwrap_or_default();
    let verified = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &pair.key)
        .and_then(|mut verifier| {
            verifier.verify_oneshot(&signature, format!("{header}.{payload}").as_bytes())
        })
        .unwrap_or(false);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    verified
        && header_json["alg"] == "RS256"
        && header_json["x5t"] == thumbprint.as_str()
        && claims["iss"] == client_id
        && claims["sub"] == client_id
        && claims["aud"]
            .as_str()
            .is_some_and(|aud| aud.ends_with(&request.path))
        && claims["exp"].as_i64().is_some_and(|exp| exp > now)
}

/// A per-endpoint value, so that a request without it fails; not a real secret.
fn random_hex() -> String {
    format!("{:016x}", crate::jitter::random_u64())
}

fn error_response(status: u16, description: &str) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = match status.as_u16() {
        400 => "invalid_request",
        401 | 403 => "unauthorized_client",
        _ => "server_error",
    };
    let body = serde_json::json!({"error": code, "error_description": description});
    json_response(status, body.to_string())
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}
