//! The one settings value every credential's builder takes.

use crate::cloud::Cloud;
use crate::environment::Environment;

/// Where a credential reads its configuration: the environment variables and the Azure cloud.
///
/// Every credential's builder takes one through `options(...)`, and
/// [`DefaultAzureCredential`](crate::DefaultAzureCredential) hands the same value to each of its
/// members, so that a chain and a credential built on its own see the same world. The default
/// is the process environment and the public cloud.
///
/// ```
/// use pg_entra::credential::{CredentialOptions, ManagedIdentityCredential};
/// use pg_entra::{Cloud, Environment};
///
/// let options = CredentialOptions::default()
///     .environment(Environment::from_vars([("AZURE_CLIENT_ID", "11111111-2222-3333-4444-555555555555")]))
///     .cloud(Cloud::UsGovernment);
/// let credential = ManagedIdentityCredential::builder().options(options).build()?;
/// # Ok::<(), pg_entra::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct CredentialOptions {
    pub(crate) environment: Environment,
    pub(crate) cloud: Cloud,
}

/// The options of an environment, in the public cloud: `builder().options(environment)`.
impl From<Environment> for CredentialOptions {
    fn from(environment: Environment) -> Self {
        Self::default().environment(environment)
    }
}

impl CredentialOptions {
    /// Where to read `AZURE_*`, `IDENTITY_*`, `MSI_*` and `PATH` (default: the process
    /// environment, read when a credential is built).
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = environment;
        self
    }

    /// The cloud whose Entra authority service principals and workload identities use, unless
    /// `AZURE_AUTHORITY_HOST` says otherwise (default: [`Cloud::Public`]).
    pub fn cloud(mut self, cloud: Cloud) -> Self {
        self.cloud = cloud;
        self
    }
}
