//! Azure clouds: the token scope for PostgreSQL in each, and how to recognise a server's cloud.

/// Token scope for Azure Database for PostgreSQL in the public cloud.
pub(crate) const PUBLIC_SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";
/// Token scope in Azure US Government.
pub(crate) const US_GOVERNMENT_SCOPE: &str =
    "https://ossrdbms-aad.database.usgovcloudapi.net/.default";
/// Token scope in Azure China (21Vianet).
pub(crate) const CHINA_SCOPE: &str = "https://ossrdbms-aad.database.chinacloudapi.cn/.default";

const SCOPE_SUFFIX: &str = "/.default";

/// An Azure cloud, as far as PostgreSQL authentication cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
        if ends(".postgres.database.azure.com") || ends(".postgres.cosmos.azure.com") {
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
}
