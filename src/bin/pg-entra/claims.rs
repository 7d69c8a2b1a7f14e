//! The claims of an access token that say who it belongs to, for a person to read. The
//! signature is never checked (the server does that) nor shown, and neither is the token.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

/// Claims shown to a person: they identify the principal and the token's target, and none is
/// a secret. Opaque per-token values (`aio`, `uti`, `rh`) and the signature are left out.
const SHOWN: [&str; 11] = [
    "aud",
    "iss",
    "tid",
    "oid",
    "appid",
    "azp",
    "idtyp",
    "xms_mirid",
    "upn",
    "preferred_username",
    "unique_name",
];

/// What kind of Entra principal a token was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrincipalKind {
    SystemAssignedIdentity,
    UserAssignedIdentity,
    ServicePrincipal,
    User,
    /// Not a JWT, or one that says too little.
    Unknown,
}

impl PrincipalKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            PrincipalKind::SystemAssignedIdentity => "system-assigned managed identity",
            PrincipalKind::UserAssignedIdentity => "user-assigned managed identity",
            PrincipalKind::ServicePrincipal => "service principal (app registration)",
            PrincipalKind::User => "user",
            PrincipalKind::Unknown => "unknown principal",
        }
    }

    pub(crate) fn is_managed_identity(self) -> bool {
        matches!(
            self,
            PrincipalKind::SystemAssignedIdentity | PrincipalKind::UserAssignedIdentity
        )
    }
}

/// The decoded payload of a JWT access token.
#[derive(Debug, Default)]
pub(crate) struct Claims(Map<String, Value>);

impl Claims {
    /// The payload of `token`; empty when it is not a JWT.
    pub(crate) fn of(token: &str) -> Self {
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Self::default();
        };
        URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .map(Self)
            .unwrap_or_default()
    }

    /// Whether anything was decoded.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A claim as text (numbers too).
    pub(crate) fn text(&self, name: &str) -> Option<String> {
        match self.0.get(name)? {
            Value::String(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        }
    }

    /// The claims that name the principal and the token's target, in a fixed order.
    pub(crate) fn shown(&self) -> Vec<(&'static str, String)> {
        SHOWN
            .iter()
            .filter_map(|&name| Some((name, self.text(name)?)))
            .collect()
    }

    /// The principal's object id.
    pub(crate) fn object_id(&self) -> Option<String> {
        self.text("oid")
    }

    /// The application (client) id.
    pub(crate) fn app_id(&self) -> Option<String> {
        self.text("appid").or_else(|| self.text("azp"))
    }

    pub(crate) fn kind(&self) -> PrincipalKind {
        if let Some(resource) = self.text("xms_mirid") {
            return if resource
                .to_ascii_lowercase()
                .contains("/microsoft.managedidentity/userassignedidentities/")
            {
                PrincipalKind::UserAssignedIdentity
            } else {
                PrincipalKind::SystemAssignedIdentity
            };
        }
        let user_claim = ["upn", "preferred_username", "unique_name"]
            .iter()
            .any(|name| self.text(name).is_some());
        match self.text("idtyp").as_deref() {
            Some("user") => PrincipalKind::User,
            _ if user_claim => PrincipalKind::User,
            Some("app") => PrincipalKind::ServicePrincipal,
            _ if self.app_id().is_some() => PrincipalKind::ServicePrincipal,
            _ => PrincipalKind::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: serde_json::Value) -> String {
        format!(
            "e30.{}.c2ln",
            URL_SAFE_NO_PAD.encode(payload.to_string().as_bytes())
        )
    }

    #[test]
    fn kinds_from_claims() {
        let kind = |payload| Claims::of(&jwt(payload)).kind();
        assert_eq!(
            kind(
                serde_json::json!({"xms_mirid": "/subscriptions/s/resourcegroups/r/providers/Microsoft.Compute/virtualMachines/vm"})
            ),
            PrincipalKind::SystemAssignedIdentity
        );
        assert_eq!(
            kind(
                serde_json::json!({"xms_mirid": "/subscriptions/s/resourcegroups/r/providers/Microsoft.ManagedIdentity/userAssignedIdentities/api"})
            ),
            PrincipalKind::UserAssignedIdentity
        );
        assert_eq!(
            kind(serde_json::json!({"idtyp": "app", "appid": "a"})),
            PrincipalKind::ServicePrincipal
        );
        assert_eq!(
            kind(serde_json::json!({"upn": "ada@contoso.com"})),
            PrincipalKind::User
        );
        assert_eq!(Claims::of("not a jwt").kind(), PrincipalKind::Unknown);
        assert!(Claims::of("a.b.c.d").is_empty());
    }

    #[test]
    fn opaque_claims_are_not_shown() {
        let claims = Claims::of(&jwt(serde_json::json!({
            "aud": "https://ossrdbms-aad.database.windows.net",
            "aio": "opaque",
            "uti": "opaque",
            "exp": 1
        })));
        let shown = claims.shown();
        assert_eq!(
            shown,
            [(
                "aud",
                "https://ossrdbms-aad.database.windows.net".to_owned()
            )]
        );
    }
}
