//! What the endpoint knows: where each protocol is served, its identities, secrets, script
//! and counters, shared by the handle and every request.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::watch;

use super::super::identity::Principal;
use super::super::postgres::PasswordSetter;
use super::script::{ExpiresOnFormat, RecordedRequest, Reply};

pub(super) const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
/// Where the App Service protocol is served (`IDENTITY_ENDPOINT`).
pub(super) const APP_SERVICE_PATH: &str = "/msi/token";
/// The api-version App Service's managed identity endpoint speaks.
pub(super) const APP_SERVICE_API_VERSION: &str = "2019-08-01";
/// Where the Azure Arc protocol is served (`IDENTITY_ENDPOINT` with `IMDS_ENDPOINT`).
pub(super) const ARC_PATH: &str = "/arc/token";
/// Where Cloud Shell's protocol is served (`MSI_ENDPOINT`).
pub(super) const CLOUD_SHELL_PATH: &str = "/cloudshell/token";
/// Where the legacy App Service protocol is served (`MSI_ENDPOINT` with `MSI_SECRET`).
pub(super) const LEGACY_APP_SERVICE_PATH: &str = "/msi/legacy";
/// Entra's token endpoint is `/{tenant}` followed by this.
pub(super) const ENTRA_TOKEN_PATH_SUFFIX: &str = "/oauth2/v2.0/token";
/// Managed identity tokens live up to 24 h; an hour keeps test tokens realistic.
pub(super) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

pub(super) struct EndpointState {
    pub(super) principals: Vec<Principal>,
    pub(super) lifetime: Mutex<Duration>,
    /// How many group ids each token names (its `groups` claim).
    pub(super) groups: AtomicUsize,
    pub(super) expires_on_format: Mutex<ExpiresOnFormat>,
    pub(super) script: Mutex<VecDeque<Reply>>,
    pub(super) requests: AtomicUsize,
    pub(super) tokens_issued: AtomicUsize,
    pub(super) recorded: Mutex<Vec<RecordedRequest>>,
    pub(super) held: watch::Sender<bool>,
    pub(super) password_setter: Option<PasswordSetter>,
    /// Added before every answer.
    pub(super) latency: Mutex<Duration>,
    /// When set, every request gets this answer: something else squatting on the address.
    pub(super) impersonation: Mutex<Option<Reply>>,
    /// The App Service protocol's shared secret (`IDENTITY_HEADER`, also `MSI_SECRET`).
    pub(super) identity_header: String,
    /// Holds the Arc agent's key file.
    pub(super) arc_keys: tempfile::TempDir,
    pub(super) arc_key_file: std::path::PathBuf,
    /// What service principals must send as `client_secret`.
    pub(super) client_secret: String,
    /// What workload identities must send as `client_assertion`; rotates on request.
    pub(super) federated_token: Mutex<String>,
    /// The certificate service principals may sign assertions with; made when first asked for
    /// (RSA key generation is not free).
    pub(super) client_certificate: std::sync::OnceLock<ClientCertificate>,
}

/// A self-signed RSA certificate and its key.
pub(super) struct ClientCertificate {
    pub(super) certificate: openssl::x509::X509,
    pub(super) key: openssl::pkey::PKey<openssl::pkey::Private>,
}

/// A per-endpoint value, so that a request without it fails; not a real secret.
pub(super) fn random_hex() -> String {
    format!("{:016x}", crate::jitter::random_u64())
}
