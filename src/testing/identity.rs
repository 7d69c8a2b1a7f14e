//! Test identities: what a managed identity looks like to Entra and to PostgreSQL.

use std::hash::{DefaultHasher, Hash, Hasher};

use crate::credential::ManagedIdentityId;

const TEST_SUBSCRIPTION: &str = "00000000-0000-4000-8000-0000000000aa";
const TEST_RESOURCE_GROUP: &str = "pg-entra-test";

/// A managed identity known to the mock identity endpoint. Its PostgreSQL role has its name,
/// as on Flexible Server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    name: String,
    kind: Kind,
    /// A guest's home address and identity provider.
    home: Option<(String, String)>,
    client_id: String,
    object_id: String,
    resource_id: String,
}

/// What sort of Entra principal a test identity is; it decides the token's claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    SystemAssigned,
    UserAssigned,
    /// An app registration: its tokens carry no name claim.
    ServicePrincipal,
    /// A person: tokens carry `upn`.
    User,
    /// A person from another tenant (B2B) or with a Microsoft account: tokens carry `idp`,
    /// `unique_name` and `email` with the home address, and no `upn`.
    Guest,
}

impl Principal {
    /// The system-assigned identity of a VM named `vm_name` (the role is the VM's name).
    pub fn system_assigned(vm_name: &str) -> Self {
        Self::new(
            vm_name,
            Kind::SystemAssigned,
            format!("providers/Microsoft.Compute/virtualMachines/{vm_name}"),
        )
    }

    /// The system-assigned identity of the App Service deployment slot `slot` of the app `app`:
    /// Microsoft names it `<app>/slots/<slot>`, and so is its role.
    pub fn app_service_slot(app: &str, slot: &str) -> Self {
        Self::new(
            &format!("{app}/slots/{slot}"),
            Kind::SystemAssigned,
            format!("providers/Microsoft.Web/sites/{app}/slots/{slot}"),
        )
    }

    /// A user-assigned identity named `name`.
    pub fn user_assigned(name: &str) -> Self {
        Self::new(
            name,
            Kind::UserAssigned,
            format!("providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"),
        )
    }

    /// An app registration (service principal) named `name`; its tokens carry no name claim,
    /// so PostgreSQL's user must be given explicitly.
    pub fn service_principal(name: &str) -> Self {
        Self::new(name, Kind::ServicePrincipal, String::new())
    }

    /// A person signed in as `upn` (as the Azure CLI would be); tokens carry `upn`.
    pub fn user(upn: &str) -> Self {
        Self::new(upn, Kind::User, String::new())
    }

    /// A B2B guest from another tenant, signed in as `home` (`alice@contoso.com`), in the
    /// tenant whose domain is `tenant_domain`: its role is named after its guest UPN there,
    /// `alice_contoso.com#EXT#@<tenant_domain>`.
    pub fn guest(home: &str, tenant_domain: &str) -> Self {
        let mut principal = Self::new(
            &format!("{}#EXT#@{tenant_domain}", home.replace('@', "_")),
            Kind::Guest,
            String::new(),
        );
        let home_tenant = uuid_from(home, "home-tenant");
        principal.home = Some((
            home.to_owned(),
            format!("https://sts.windows.net/{home_tenant}/"),
        ));
        principal
    }

    /// A personal Microsoft account (`alice@outlook.com`) invited into the tenant whose
    /// domain is `tenant_domain`: a guest whose identity provider is `live.com`.
    pub fn microsoft_account(address: &str, tenant_domain: &str) -> Self {
        let mut principal = Self::guest(address, tenant_domain);
        principal.home = Some((address.to_owned(), "live.com".to_owned()));
        principal
    }

    /// A guest's home address and identity provider.
    pub(crate) fn home(&self) -> Option<(&str, &str)> {
        self.home
            .as_ref()
            .map(|(home, idp)| (home.as_str(), idp.as_str()))
    }

    fn new(name: &str, kind: Kind, provider_path: String) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            home: None,
            client_id: uuid_from(name, "client"),
            object_id: uuid_from(name, "object"),
            resource_id: format!(
                "/subscriptions/{TEST_SUBSCRIPTION}/resourcegroups/{TEST_RESOURCE_GROUP}/{provider_path}"
            ),
        }
    }

    /// The name, which is also the PostgreSQL role.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is a resource's own identity.
    pub fn is_system_assigned(&self) -> bool {
        self.kind == Kind::SystemAssigned
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The client (application) id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The object (principal) id.
    pub fn object_id(&self) -> &str {
        &self.object_id
    }

    /// The Azure resource id (`xms_mirid` in its tokens).
    pub fn resource_id(&self) -> &str {
        &self.resource_id
    }

    /// How a credential selects this identity: system-assigned, or by client id.
    pub fn managed_identity_id(&self) -> ManagedIdentityId {
        if self.is_system_assigned() {
            ManagedIdentityId::SystemAssigned
        } else {
            ManagedIdentityId::ClientId(self.client_id.clone())
        }
    }
}

/// A stable UUID-shaped id derived from a name, so test output is reproducible.
pub(crate) fn uuid_from(name: &str, salt: &str) -> String {
    let half = |extra: u8| {
        let mut hasher = DefaultHasher::new();
        (name, salt, extra).hash(&mut hasher);
        hasher.finish()
    };
    let hex = format!("{:016x}{:016x}", half(0), half(1));
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}
