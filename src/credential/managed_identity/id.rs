//! Which managed identity a credential asks for.

/// Which managed identity to get a token for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ManagedIdentityId {
    /// The resource's own (system-assigned) identity.
    #[default]
    SystemAssigned,
    /// A user-assigned identity by its client (application) id.
    ClientId(String),
    /// A user-assigned identity by its object (principal) id.
    ObjectId(String),
    /// A user-assigned identity by its Azure resource id.
    ResourceId(String),
}
