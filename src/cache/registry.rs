//! One token per identity per process: the caches that connectors build for themselves are
//! shared, keyed by what makes a token different.
//!
//! An application that builds a `Connector` per connection (`Connector::from_env()?.connect()`
//! in a handler) would otherwise ask its identity endpoint once per connection; IMDS limits
//! requests per VM and answers 429 beyond that (azure-sdk-for-java#39393 did exactly this).
//! Connectors for a primary, its read replicas and a PgBouncer in front share a scope, and so
//! a token. The key holds no secret: two configurations that differ only in a secret belong
//! to the same identity. A credential given explicitly is never shared here; share it
//! yourself.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use super::{Inner, TokenCache};
use crate::cloud::Cloud;
use crate::environment::Environment;
use crate::error::Error;
use crate::lock::lock;

/// The variables that choose an identity (and where its token comes from), never a secret.
/// Secrets (`AZURE_CLIENT_SECRET`, `IDENTITY_HEADER`, `MSI_SECRET`, a certificate's password)
/// count by a hash with a key drawn for this process (not reversible, not comparable across
/// processes): a rotated secret is a new configuration, whose credential is built anew. A
/// client certificate file counts by its identity and modification time, for the same reason.
const IDENTITY_VARS: [&str; 15] = [
    "AZURE_TOKEN_CREDENTIALS",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_AUTHORITY_HOST",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "IDENTITY_ENDPOINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "IDENTITY_SERVER_THUMBPRINT",
    // Where `az` and `azd` are found, and where they keep their logins.
    "PATH",
    "HOME",
    "AZURE_CONFIG_DIR",
    "AZD_CONFIG_DIR",
];
const SECRET_VARS: [&str; 5] = [
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "IDENTITY_HEADER",
    "MSI_SECRET",
    "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN",
];

/// What makes a token different: the credential configuration and the scope. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CredentialKey {
    scope: String,
    cloud: Cloud,
    settings: Vec<(&'static str, Option<String>)>,
    secrets: Vec<(&'static str, Option<u64>)>,
    certificate: Option<(u64, u64, i64, u64)>,
}

impl CredentialKey {
    /// The key of the default credential chain that `environment` describes.
    pub(crate) fn for_default_chain(environment: &Environment, cloud: Cloud, scope: &str) -> Self {
        Self {
            scope: scope.to_owned(),
            cloud,
            settings: IDENTITY_VARS
                .iter()
                .map(|&name| (name, environment.var(name)))
                .collect(),
            secrets: SECRET_VARS
                .iter()
                .map(|&name| (name, environment.var(name).map(|value| keyed_hash(&value))))
                .collect(),
            certificate: environment
                .var("AZURE_CLIENT_CERTIFICATE_PATH")
                .and_then(|path| file_identity(&path)),
        }
    }
}

/// A hash of `value` under a key drawn once per process.
fn keyed_hash(value: &str) -> u64 {
    use std::hash::BuildHasher as _;
    static KEY: LazyLock<std::hash::RandomState> = LazyLock::new(std::hash::RandomState::new);
    KEY.hash_one(value)
}

/// A file's device, inode, modification time and size: a file replaced or rewritten in place
/// (a rotated certificate) is another file here.
#[cfg(unix)]
fn file_identity(path: &str) -> Option<(u64, u64, i64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).ok()?;
    Some((
        metadata.dev(),
        metadata.ino(),
        metadata.mtime(),
        metadata.len(),
    ))
}

#[cfg(not(unix))]
fn file_identity(path: &str) -> Option<(u64, u64, i64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    let modified = metadata
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some((0, 0, modified.as_secs() as i64, metadata.len()))
}

/// How many identities' caches the process keeps. A process has a handful; the bound only
/// keeps a program that invents configurations from growing without end.
const MAX_CACHES: usize = 64;

/// The shared caches by key, each with when it was last handed out. They are kept for the
/// life of the process (not only while a connector holds one): connectors built one after
/// another, each dropped after its connection, must still find the token.
static CACHES: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(Registry::default()));

#[derive(Default)]
struct Registry {
    caches: HashMap<CredentialKey, (Arc<Inner>, u64)>,
    uses: u64,
}

/// The cache for `key`: the one this process already has, else the one `build` makes.
pub(crate) fn shared(
    key: CredentialKey,
    build: impl FnOnce() -> Result<TokenCache, Error>,
) -> Result<TokenCache, Error> {
    let mut registry = lock(&CACHES);
    registry.uses += 1;
    let now = registry.uses;
    if let Some((inner, last_used)) = registry.caches.get_mut(&key) {
        // A cache whose credential was refused (a wrong secret, an identity not assigned) and
        // has no usable token is not handed out again: the next connector builds its own.
        if !inner.refused_without_token() {
            *last_used = now;
            return Ok(TokenCache {
                inner: Arc::clone(inner),
            });
        }
    }
    let cache = build()?;
    if registry.caches.len() >= MAX_CACHES
        && let Some(oldest) = registry
            .caches
            .iter()
            .min_by_key(|(_, (_, last_used))| *last_used)
            .map(|(key, _)| key.clone())
    {
        registry.caches.remove(&oldest);
    }
    registry.caches.insert(key, (Arc::clone(&cache.inner), now));
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(vars: &[(&str, &str)], scope: &str) -> CredentialKey {
        CredentialKey::for_default_chain(
            &Environment::from_vars(vars.iter().copied()),
            Cloud::Public,
            scope,
        )
    }

    #[test]
    fn keys_tell_identities_apart_and_hold_no_secret() {
        let scope = crate::cloud::PUBLIC_SCOPE;
        let a = key(&[("AZURE_CLIENT_ID", "a")], scope);
        assert_eq!(a, key(&[("AZURE_CLIENT_ID", "a")], scope));
        assert_ne!(a, key(&[("AZURE_CLIENT_ID", "b")], scope));
        assert_ne!(a, key(&[("AZURE_CLIENT_ID", "a")], "https://x/.default"));
        // A rotated secret is another configuration (its credential is built anew); the key
        // holds a keyed hash of it, never the secret.
        let secret = |value: &str| {
            key(
                &[("AZURE_CLIENT_ID", "a"), ("AZURE_CLIENT_SECRET", value)],
                scope,
            )
        };
        assert_eq!(secret("s3cr3t-1"), secret("s3cr3t-1"));
        assert_ne!(secret("s3cr3t-1"), secret("s3cr3t-2"));
        assert_ne!(secret("s3cr3t-1"), a);
        assert!(!format!("{:?}", secret("s3cr3t-1")).contains("s3cr3t"));
    }
}
