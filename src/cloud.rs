//! Azure clouds: the token scope for PostgreSQL in each, and how to recognise a server's cloud.

/// Token scope for Azure Database for PostgreSQL in the public cloud.
pub(crate) const PUBLIC_SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";
/// Token scope in Azure US Government.
pub(crate) const US_GOVERNMENT_SCOPE: &str =
    "https://ossrdbms-aad.database.usgovcloudapi.net/.default";
/// Token scope in Azure China (21Vianet).
pub(crate) const CHINA_SCOPE: &str = "https://ossrdbms-aad.database.chinacloudapi.cn/.default";
/// Token scope of Azure Cosmos DB for PostgreSQL, which validates tokens for its own resource
/// (Microsoft's Cosmos DB for PostgreSQL authentication page, corrected in
/// MicrosoftDocs/azure-docs PR #123333 after issue #123030).
pub(crate) const COSMOS_SCOPE: &str = "https://token.postgres.cosmos.azure.com/.default";
/// Host name suffix of Azure Cosmos DB for PostgreSQL clusters and their nodes.
const COSMOS_SUFFIX: &str = ".postgres.cosmos.azure.com";

const SCOPE_SUFFIX: &str = "/.default";

/// An Azure cloud, as far as PostgreSQL authentication cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Cloud {
    /// Azure public cloud.
    #[default]
    Public,
    /// Azure US Government.
    UsGovernment,
    /// Azure China (21Vianet).
    China,
}

impl Cloud {
    /// The Entra authority host that service principals and workload identities get tokens
    /// from (`AZURE_AUTHORITY_HOST` overrides it).
    pub fn authority_host(self) -> &'static str {
        match self {
            Cloud::Public => "https://login.microsoftonline.com",
            Cloud::UsGovernment => "https://login.microsoftonline.us",
            Cloud::China => "https://login.chinacloudapi.cn",
        }
    }

    /// The scope to request a PostgreSQL token for.
    pub fn scope(self) -> &'static str {
        match self {
            Cloud::Public => PUBLIC_SCOPE,
            Cloud::UsGovernment => US_GOVERNMENT_SCOPE,
            Cloud::China => CHINA_SCOPE,
        }
    }

    /// The scope a server with this host name takes tokens for, from its suffix: Cosmos DB for
    /// PostgreSQL's own for `*.postgres.cosmos.azure.com`, else the PostgreSQL scope of the
    /// host's cloud. `None` for names that are not Azure's (a custom DNS name, an address).
    ///
    /// | host name ends with | scope |
    /// |---|---|
    /// | `.postgres.database.azure.com` | `https://ossrdbms-aad.database.windows.net/.default` |
    /// | `.postgres.database.usgovcloudapi.net` | `https://ossrdbms-aad.database.usgovcloudapi.net/.default` |
    /// | `.postgres.database.chinacloudapi.cn` | `https://ossrdbms-aad.database.chinacloudapi.cn/.default` |
    /// | `.postgres.cosmos.azure.com` | `https://token.postgres.cosmos.azure.com/.default` |
    ///
    /// ```
    /// use pg_entra::Cloud;
    ///
    /// assert_eq!(
    ///     Cloud::server_scope("c-x.y.postgres.cosmos.azure.com"),
    ///     Some("https://token.postgres.cosmos.azure.com/.default")
    /// );
    /// assert_eq!(Cloud::server_scope("10.0.0.4"), None);
    /// ```
    pub fn server_scope(host: &str) -> Option<&'static str> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.ends_with(COSMOS_SUFFIX) {
            return Some(COSMOS_SCOPE);
        }
        Cloud::from_host(&host).map(Cloud::scope)
    }

    /// Whether `resource` is the audience of an Azure Database for PostgreSQL server kind:
    /// `ossrdbms-aad` in any cloud, or Cosmos DB for PostgreSQL's (exactly: no trailing `/`).
    /// Only for these does the connector follow a server that names the resource it wants.
    ///
    /// ```
    /// use pg_entra::Cloud;
    ///
    /// assert!(Cloud::is_postgres_resource("https://ossrdbms-aad.database.windows.net"));
    /// assert!(!Cloud::is_postgres_resource("https://ossrdbms-aad.database.windows.net/"));
    /// assert!(!Cloud::is_postgres_resource("https://graph.microsoft.com"));
    /// ```
    pub fn is_postgres_resource(resource: &str) -> bool {
        Cloud::of_postgres_resource(resource).is_some()
    }

    /// The cloud of an Azure Database for PostgreSQL audience (Cosmos DB for PostgreSQL's is
    /// the public cloud's).
    pub(crate) fn of_postgres_resource(resource: &str) -> Option<Cloud> {
        [
            (PUBLIC_SCOPE, Cloud::Public),
            (US_GOVERNMENT_SCOPE, Cloud::UsGovernment),
            (CHINA_SCOPE, Cloud::China),
            (COSMOS_SCOPE, Cloud::Public),
        ]
        .into_iter()
        .find(|(scope, _)| resource_for_scope(scope) == resource)
        .map(|(_, cloud)| cloud)
    }

    /// The cloud a server host name belongs to, from its suffix; `None` for hosts that are not
    /// Azure Database for PostgreSQL names (a custom DNS name, an IP address, localhost).
    ///
    /// ```
    /// use pg_entra::Cloud;
    ///
    /// assert_eq!(Cloud::from_host("db.postgres.database.usgovcloudapi.net"), Some(Cloud::UsGovernment));
    /// assert_eq!(Cloud::from_host("c-x.y.postgres.cosmos.azure.com"), Some(Cloud::Public));
    /// assert_eq!(Cloud::from_host("127.0.0.1"), None);
    /// ```
    pub fn from_host(host: &str) -> Option<Cloud> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let ends = |suffix: &str| host.ends_with(suffix);
        if ends(".postgres.database.azure.com") || ends(COSMOS_SUFFIX) {
            Some(Cloud::Public)
        } else if ends(".postgres.database.usgovcloudapi.net") {
            Some(Cloud::UsGovernment)
        } else if ends(".postgres.database.chinacloudapi.cn") {
            Some(Cloud::China)
        } else {
            None
        }
    }
}

/// The resource (audience) that managed identity endpoints take: the scope without `/.default`.
pub(crate) fn resource_for_scope(scope: &str) -> &str {
    scope.strip_suffix(SCOPE_SUFFIX).unwrap_or(scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_strips_default_suffix() {
        assert_eq!(
            resource_for_scope(PUBLIC_SCOPE),
            "https://ossrdbms-aad.database.windows.net"
        );
        assert_eq!(resource_for_scope("api://custom"), "api://custom");
    }

    #[test]
    fn cloud_from_host_suffixes() {
        assert_eq!(
            Cloud::from_host("srv.postgres.database.azure.com"),
            Some(Cloud::Public)
        );
        assert_eq!(
            Cloud::from_host("SRV.POSTGRES.DATABASE.CHINACLOUDAPI.CN."),
            Some(Cloud::China)
        );
        assert_eq!(Cloud::from_host("postgres.example.com"), None);
    }

    #[test]
    fn each_server_kind_has_its_scope() {
        for (host, scope) in [
            ("srv.postgres.database.azure.com", Some(PUBLIC_SCOPE)),
            (
                "srv.privatelink.postgres.database.azure.com",
                Some(PUBLIC_SCOPE),
            ),
            (
                "srv.postgres.database.usgovcloudapi.net",
                Some(US_GOVERNMENT_SCOPE),
            ),
            ("SRV.POSTGRES.DATABASE.CHINACLOUDAPI.CN.", Some(CHINA_SCOPE)),
            ("c-grp.abc123.postgres.cosmos.azure.com", Some(COSMOS_SCOPE)),
            (
                "w1-grp.abc123.postgres.cosmos.azure.com",
                Some(COSMOS_SCOPE),
            ),
            ("db.example.com", None),
            ("127.0.0.1", None),
        ] {
            assert_eq!(Cloud::server_scope(host), scope, "{host}");
        }
        assert!(Cloud::is_postgres_resource(
            "https://token.postgres.cosmos.azure.com"
        ));
        assert!(Cloud::is_postgres_resource(
            "https://ossrdbms-aad.database.usgovcloudapi.net"
        ));
        assert!(!Cloud::is_postgres_resource("https://graph.microsoft.com"));
        assert!(!Cloud::is_postgres_resource("https://management.azure.com"));
    }
}
