//! A credential with no endpoint behind it, for unit tests of code that takes a credential or
//! a token cache.

use std::fmt;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::time::OffsetDateTime;

use super::identity::Principal;
use super::jwt::mint;
use crate::cache::{Clock, SystemClock};
use crate::lock::lock;

/// Mints a JWT-shaped token for a test [`Principal`] on every call, with the claims Entra
/// would put in it (so the connector derives the same user name), issued at its clock's
/// "now". It counts calls and can be told to fail, as an identity endpoint would.
///
/// ```
/// use std::sync::Arc;
/// use pg_entra::testing::{FakeCredential, Principal};
/// use pg_entra::TokenCache;
///
/// # async fn run() -> Result<(), pg_entra::Error> {
/// let credential = Arc::new(FakeCredential::new(Principal::user_assigned("orders-api")));
/// let cache = TokenCache::builder(credential.clone()).build()?;
/// assert_eq!(cache.token().await?.username(), Some("orders-api"));
/// cache.token().await?; // fresh: served from the cache
/// assert_eq!(credential.calls(), 1);
///
/// credential.fail_with_status(Some(400)); // "identity not assigned"
/// # Ok(()) }
/// ```
pub struct FakeCredential {
    principal: Principal,
    lifetime: Duration,
    clock: Arc<dyn Clock>,
    calls: AtomicUsize,
    /// The status every call fails with; 0 for none.
    failure: AtomicU16,
    /// Scopes asked for, in order.
    scopes: Mutex<Vec<String>>,
}

impl FakeCredential {
    /// Tokens for `principal` that live an hour, on the system clock.
    pub fn new(principal: Principal) -> Self {
        Self {
            principal,
            lifetime: Duration::from_secs(3600),
            clock: Arc::new(SystemClock),
            calls: AtomicUsize::new(0),
            failure: AtomicU16::new(0),
            scopes: Mutex::new(Vec::new()),
        }
    }

    /// How long each token lives (default an hour).
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The clock that stamps each token's issue time (default: the system clock); give the
    /// cache's [`ManualClock`](super::ManualClock) to move both together.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Calls so far, failed ones included.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The scopes asked for, one entry per call.
    pub fn scopes(&self) -> Vec<String> {
        lock(&self.scopes).clone()
    }

    /// From now on, fail every call as an endpoint answering `status` would (`Some(400)`: a
    /// refusal; `Some(503)`: an outage), or succeed again (`None`).
    pub fn fail_with_status(&self, status: Option<u16>) {
        self.failure.store(status.unwrap_or(0), Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl TokenCredential for FakeCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let scope = crate::credential::only_scope("FakeCredential", scopes)?;
        lock(&self.scopes).push(scope.scope());
        let status = self.failure.load(Ordering::SeqCst);
        if status != 0 {
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::HttpResponse {
                    status: status.into(),
                    error_code: None,
                    raw_response: None,
                },
                format!("FakeCredential was told to fail with HTTP {status}"),
            ));
        }
        let issued = OffsetDateTime::from(self.clock.now());
        let expires = issued + self.lifetime;
        let token = mint(&self.principal, scope.resource(), issued, expires, 0);
        Ok(AccessToken::new(token, expires))
    }
}

impl fmt::Debug for FakeCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeCredential")
            .field("principal", &self.principal.name())
            .field("lifetime", &self.lifetime)
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}
