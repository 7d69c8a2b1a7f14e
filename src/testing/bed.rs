//! The local PostgreSQL and the identity endpoint, wired together.

use std::sync::Arc;

use super::TestBedError;
use super::endpoint::IdentityEndpoint;
use super::identity::Principal;
use super::postgres::LocalPostgres;
use crate::connector::ConnectorBuilder;
use crate::credential::ImdsCredential;
use crate::environment::Environment;

/// The VM whose system-assigned identity the bed starts with.
const DEFAULT_VM_NAME: &str = "pg-entra-test-vm";

/// A local Flexible-Server-like PostgreSQL and a mock IMDS endpoint that sets each token it
/// issues as the password of the identity's role.
#[derive(Debug)]
pub struct TestBed {
    // Dropped first: the endpoint writes to the server.
    identity: IdentityEndpoint,
    postgres: LocalPostgres,
    principal: Principal,
}

impl TestBed {
    /// Starts both with a system-assigned identity for a VM named `pg-entra-test-vm`, whose role
    /// exists.
    pub async fn start() -> Result<Self, TestBedError> {
        Self::start_with(Principal::system_assigned(DEFAULT_VM_NAME)).await
    }

    /// Starts both with `principal` (and its role).
    pub async fn start_with(principal: Principal) -> Result<Self, TestBedError> {
        let postgres = LocalPostgres::start().await?;
        postgres.create_role(principal.name()).await?;
        let identity = IdentityEndpoint::builder()
            .principal(principal.clone())
            .password_setter(postgres.password_setter())
            .start()
            .await?;
        Ok(Self {
            identity,
            postgres,
            principal,
        })
    }

    /// The server.
    pub fn postgres(&self) -> &LocalPostgres {
        &self.postgres
    }

    /// The identity endpoint.
    pub fn identity(&self) -> &IdentityEndpoint {
        &self.identity
    }

    /// The identity the bed was started with.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// An IMDS credential for the bed's identity.
    pub fn credential(&self) -> ImdsCredential {
        self.identity.credential_for(&self.principal)
    }

    /// The environment a service on an Azure VM would see, pointed at the bed: `PGHOST`,
    /// `PGPORT`, `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT` and
    /// `AZURE_POD_IDENTITY_AUTHORITY_HOST` (plus `AZURE_CLIENT_ID` for a user-assigned identity).
    pub fn environment(&self) -> Environment {
        Environment::from_vars(self.vars())
    }

    /// The variables of [`environment`](Self::environment), to hand to another process (none
    /// is a secret).
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut vars = self.postgres.libpq_vars();
        vars.push((
            crate::credential::vars::POD_IDENTITY_AUTHORITY_HOST_VAR.into(),
            self.identity.authority_host(),
        ));
        if !self.principal.is_system_assigned() {
            vars.push(("AZURE_CLIENT_ID".into(), self.principal.client_id().into()));
        }
        vars
    }

    /// A connector builder aimed at the server with the bed's credential.
    pub fn connector_builder(&self) -> ConnectorBuilder {
        self.postgres
            .connector_builder()
            .credential(Arc::new(self.credential()))
    }
}
