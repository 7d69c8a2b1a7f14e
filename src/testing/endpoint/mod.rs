//! A real HTTP server on 127.0.0.1 that speaks the managed identity token protocols (IMDS,
//! App Service, Azure Arc with its key challenge, Cloud Shell, legacy App Service), mints JWT-shaped tokens, sets each one as its role's password (`VALID UNTIL` its expiry), and misbehaves on
//! request.

mod entra;
mod http;
mod managed_identity;
mod respond;
mod script;
mod state;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::TestBedError;
use super::identity::Principal;
use super::postgres::PasswordSetter;
use crate::credential::{CredentialOptions, ImdsCredential, RetryOptions};
use crate::environment::Environment;
use crate::lock::lock;

pub use script::{ExpiresOnFormat, RecordedRequest, Reply};

use self::http::handle;
use self::state::{
    APP_SERVICE_PATH, ARC_PATH, CLOUD_SHELL_PATH, ClientCertificate, DEFAULT_TOKEN_LIFETIME,
    EndpointState, LEGACY_APP_SERVICE_PATH, random_hex,
};

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
            groups: AtomicUsize::new(0),
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
            .options(CredentialOptions::default().environment(Environment::empty()))
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

    /// Tokens issued from now on name `groups` group object ids in a `groups` claim, as
    /// Entra's do for a member of that many groups (up to 200): each adds about 52 bytes, so
    /// 30 make a token longer than the 2,047 bytes PgBouncer 1.18 keeps of a password.
    pub fn set_group_claims(&self, groups: usize) {
        self.state.groups.store(groups, Ordering::Relaxed);
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
