//! An access token, and the PostgreSQL user name its claims imply.

use std::fmt;
use std::sync::Arc;

use azure_core::credentials::{AccessToken, Secret};
use azure_core::time::OffsetDateTime;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::Error;

/// Claims that name the principal, in the order they are tried.
const USERNAME_CLAIMS: [&str; 4] = ["xms_mirid", "upn", "preferred_username", "unique_name"];

/// An Entra access token: the secret and its expiry.
///
/// Cheap to clone (reference counted). `Debug` shows the expiry and the derived user name,
/// never the secret; there is no `Display`.
#[derive(Clone)]
pub struct Token {
    pub(crate) inner: Arc<TokenInner>,
}

pub(crate) struct TokenInner {
    secret: Secret,
    expires_on: OffsetDateTime,
    claims: PrincipalClaims,
}

impl Token {
    /// A token from its secret and expiry. The claims are decoded once, here.
    pub fn new(secret: impl Into<String>, expires_on: OffsetDateTime) -> Self {
        let secret = secret.into();
        let claims = PrincipalClaims::decode(&secret);
        Self {
            inner: Arc::new(TokenInner {
                secret: Secret::new(secret),
                expires_on,
                claims,
            }),
        }
    }

    /// The token itself, to be sent as the PostgreSQL password. Keep it out of logs.
    pub fn secret(&self) -> &str {
        self.inner.secret.secret()
    }

    /// When the token stops being accepted.
    pub fn expires_on(&self) -> OffsetDateTime {
        self.inner.expires_on
    }

    /// The PostgreSQL user name the token's claims imply: the last path segment of
    /// `xms_mirid` (a managed identity's name, for system- and user-assigned identities alike),
    /// else `upn`, `preferred_username` or `unique_name`. `None` for service principals and
    /// for tokens that are not JWTs.
    pub fn username(&self) -> Option<&str> {
        self.inner.claims.username.as_deref()
    }

    /// The claim [`username`](Self::username) came from (`xms_mirid`, `upn`,
    /// `preferred_username` or `unique_name`), to explain a name to a person.
    pub fn username_claim(&self) -> Option<&'static str> {
        self.inner.claims.username_claim
    }

    /// The derived user name, or an error: a guest's, saying so and showing the name to try;
    /// else naming the claims that were present.
    pub(crate) fn require_username(&self) -> Result<&str, Error> {
        if let Some(home) = &self.inner.claims.guest_home {
            return Err(Error::GuestUser {
                home: home.clone(),
                suggestion: guest_user_name(home),
            });
        }
        self.username().ok_or_else(|| Error::UnknownUser {
            claims_present: self.inner.claims.present.clone(),
        })
    }

    /// Whether the token belongs to a guest (B2B) or Microsoft account in the token's
    /// tenant: its `idp` names another identity provider than its issuer, and it has no
    /// `upn`. Such a principal's role is named after its guest UPN in the server's tenant
    /// (`alice_contoso.com#EXT#@fabrikam.onmicrosoft.com`), which the token does not carry, so
    /// no user name is derived from it.
    pub fn is_guest(&self) -> bool {
        self.inner.claims.guest_home.is_some()
    }

    /// Whether `other` is this very token (a clone of it), not merely an equal one.
    pub(crate) fn is_same(&self, other: &Token) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The `aud` claim, when the token is a JWT that has one.
    pub(crate) fn audience(&self) -> Option<&str> {
        self.inner.claims.audience.as_deref()
    }
}

impl From<AccessToken> for Token {
    fn from(token: AccessToken) -> Self {
        let AccessToken { token, expires_on } = token;
        Token::new(token.secret().to_owned(), expires_on)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("expires_on", &self.inner.expires_on)
            .field("username", &self.inner.claims.username)
            .finish_non_exhaustive()
    }
}

/// A managed identity's name from its Azure resource id (`xms_mirid`): the last segment, except
/// for an App Service deployment slot's system-assigned identity, which Microsoft names
/// `<app-name>/slots/<slot-name>` after its resource `…/Microsoft.Web/sites/<app>/slots/<slot>`.
fn identity_name_from_resource_id(id: &str) -> Option<String> {
    let segments: Vec<&str> = id.trim_end_matches('/').split('/').collect();
    match segments.as_slice() {
        [.., provider, sites, app, slots, slot]
            if provider.eq_ignore_ascii_case("Microsoft.Web")
                && sites.eq_ignore_ascii_case("sites")
                && slots.eq_ignore_ascii_case("slots")
                && !app.is_empty()
                && !slot.is_empty() =>
        {
            Some(format!("{app}/slots/{slot}"))
        }
        [.., last] if !last.is_empty() => Some((*last).to_owned()),
        _ => None,
    }
}

/// The tenant of an Entra authority URL (`https://sts.windows.net/<tenant>/`,
/// `https://login.microsoftonline.com/<tenant>/v2.0`, the sovereign clouds' alike); `None` for
/// any other identity provider.
fn entra_tenant(idp: &str) -> Option<&str> {
    const AUTHORITIES: [&str; 6] = [
        "https://sts.windows.net/",
        "https://login.microsoftonline.com/",
        "https://login.microsoftonline.us/",
        "https://login.chinacloudapi.cn/",
        "https://sts.chinacloudapi.cn/",
        "https://login.partner.microsoftonline.cn/",
    ];
    let rest = AUTHORITIES
        .iter()
        .find_map(|authority| idp.strip_prefix(authority))?;
    rest.split('/').next().filter(|tenant| !tenant.is_empty())
}

/// The guest UPN Entra gives `home` in a host tenant, up to the tenant's domain, which the
/// token does not carry: `alice@contoso.com` → `alice_contoso.com#EXT#@<tenant>.onmicrosoft.com`.
fn guest_user_name(home: &str) -> String {
    format!("{}#EXT#@<tenant>.onmicrosoft.com", home.replace('@', "_"))
}

/// What the token says about who it belongs to. Only non-secret claims are kept.
#[derive(Debug, Default)]
struct PrincipalClaims {
    /// For a guest: the home address (`unique_name`, `email` or `preferred_username`).
    guest_home: Option<String>,
    username: Option<String>,
    username_claim: Option<&'static str>,
    audience: Option<String>,
    /// Names of all claims, for error messages.
    present: Vec<String>,
}

impl PrincipalClaims {
    /// Reads the payload of a JWT without checking its signature: the server checks the token;
    /// here it only names the principal.
    fn decode(token: &str) -> Self {
        let mut parts = token.split('.');
        let (Some(_header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Self::default();
        };
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
            return Self::default();
        };
        let Ok(serde_json::Value::Object(claims)) = serde_json::from_slice(&bytes) else {
            return Self::default();
        };
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        // A guest's `unique_name` / `email` is its home address, not its role: Entra names
        // the guest `alice_contoso.com#EXT#@<tenant>` in the server's tenant.
        // A guest's `idp` is another tenant's Entra authority, or another provider
        // (`live.com`, …). Members' tokens carry none, or their own tenant's (v2 tokens of
        // service principals name `sts.windows.net/<tid>/` while `iss` is the v2 issuer).
        let foreign_idp = text("idp").is_some_and(|idp| match entra_tenant(idp) {
            Some(tenant) => text("tid").is_none_or(|tid| !tenant.eq_ignore_ascii_case(tid)),
            None => true,
        });
        let is_guest = foreign_idp
            && text("upn").is_none()
            && text("xms_mirid").is_none()
            && text("idtyp") != Some("app");
        if is_guest {
            let home = ["unique_name", "email", "preferred_username"]
                .iter()
                .find_map(|name| text(name))
                .map(|home| home.strip_prefix("live.com#").unwrap_or(home).to_owned());
            let mut present: Vec<String> = claims.keys().cloned().collect();
            present.sort();
            return Self {
                guest_home: Some(home.unwrap_or_else(|| "<home address>".to_owned())),
                audience: text("aud").map(str::to_owned),
                present,
                ..Self::default()
            };
        }
        let (username_claim, username) = USERNAME_CLAIMS
            .iter()
            .find_map(|&name| {
                let value = text(name)?;
                let username = if name == "xms_mirid" {
                    identity_name_from_resource_id(value)?
                } else {
                    value.to_owned()
                };
                Some((name, username))
            })
            .unzip();
        let mut present: Vec<String> = claims.keys().cloned().collect();
        present.sort();
        Self {
            guest_home: None,
            username,
            username_claim,
            audience: text("aud").map(str::to_owned),
            present,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256"}"#);
        let body = URL_SAFE_NO_PAD.encode(payload.to_string());
        format!("{header}.{body}.c2lnbmF0dXJl")
    }

    fn expiry() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH
    }

    #[test]
    fn system_assigned_identity_is_named_after_its_resource() {
        let token = Token::new(
            jwt(serde_json::json!({
                "oid": "1111",
                "xms_mirid": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/my-vm"
            })),
            expiry(),
        );
        assert_eq!(token.username(), Some("my-vm"));
        assert_eq!(token.username_claim(), Some("xms_mirid"));
    }

    #[test]
    fn deployment_slots_are_named_app_slots_slot() {
        let name = |mirid: &str| identity_name_from_resource_id(mirid);
        assert_eq!(
            name("/subscriptions/s/resourcegroups/rg/providers/Microsoft.Web/sites/shop/slots/staging")
                .as_deref(),
            Some("shop/slots/staging")
        );
        assert_eq!(
            name(
                "/subscriptions/s/resourceGroups/rg/providers/microsoft.web/SITES/shop/Slots/blue/"
            )
            .as_deref(),
            Some("shop/slots/blue")
        );
        // The app itself, and things that merely look similar, keep the last segment.
        assert_eq!(
            name("/subscriptions/s/resourcegroups/rg/providers/Microsoft.Web/sites/shop")
                .as_deref(),
            Some("shop")
        );
        assert_eq!(
            name("/providers/Microsoft.Compute/sites/shop/slots/x").as_deref(),
            Some("x")
        );
        assert_eq!(name("/"), None);
    }

    #[test]
    fn user_assigned_identity_is_named_after_itself() {
        let token = Token::new(
            jwt(serde_json::json!({
                "xms_mirid": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders-api/",
                "upn": "ignored@example.com"
            })),
            expiry(),
        );
        assert_eq!(token.username(), Some("orders-api"));
    }

    #[test]
    fn user_claims_in_order() {
        let upn = Token::new(
            jwt(serde_json::json!({"upn": "Ada@Contoso.com", "preferred_username": "x"})),
            expiry(),
        );
        assert_eq!(upn.username(), Some("Ada@Contoso.com"));
        assert_eq!(upn.username_claim(), Some("upn"));
        let preferred = Token::new(
            jwt(serde_json::json!({"preferred_username": "bob@contoso.com", "unique_name": "x"})),
            expiry(),
        );
        assert_eq!(preferred.username(), Some("bob@contoso.com"));
        assert_eq!(preferred.username_claim(), Some("preferred_username"));
        let unique = Token::new(
            jwt(serde_json::json!({"unique_name": "live.com#eve@contoso.com"})),
            expiry(),
        );
        assert_eq!(unique.username(), Some("live.com#eve@contoso.com"));
    }

    #[test]
    fn service_principal_error_names_claims_not_values() {
        let token = Token::new(
            jwt(serde_json::json!({"oid": "secret-oid-value", "appid": "app-value", "aud": "a"})),
            expiry(),
        );
        let err = token.require_username().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("appid, aud, oid"), "{text}");
        assert!(!text.contains("secret-oid-value"), "{text}");
        assert!(!text.contains(token.secret()));
    }

    #[test]
    fn opaque_token_has_no_claims() {
        let token = Token::new("not-a-jwt", expiry());
        assert_eq!(token.username(), None);
        assert!(
            token
                .require_username()
                .unwrap_err()
                .to_string()
                .contains("claims present: none")
        );
    }

    #[test]
    fn padded_payload_is_accepted() {
        let mut token = jwt(serde_json::json!({"upn": "a@b.c"}));
        let dot = token.rfind('.').unwrap();
        token.insert_str(dot, "==");
        assert_eq!(Token::new(token, expiry()).username(), Some("a@b.c"));
    }

    #[test]
    fn debug_hides_the_secret() {
        let secret = jwt(serde_json::json!({"upn": "a@b.c"}));
        let token = Token::new(secret.clone(), expiry());
        let shown = format!("{token:?}");
        assert!(!shown.contains(&secret));
        assert!(shown.contains("a@b.c"));
    }

    #[test]
    fn guests_are_told_apart_from_members_and_applications() {
        let tid = "72f988bf-0000-4000-8000-00000000c0de";
        let other = "11111111-0000-4000-8000-000000000000";
        let token = |claims: serde_json::Value| Token::new(jwt(claims), expiry());
        // A B2B guest: another tenant's authority, no upn.
        let guest = token(serde_json::json!({
            "tid": tid, "iss": format!("https://sts.windows.net/{tid}/"),
            "idp": format!("https://sts.windows.net/{other}/"),
            "unique_name": "alice@contoso.com", "idtyp": "user"
        }));
        assert!(guest.is_guest());
        assert_eq!(guest.username(), None);
        // A Microsoft account.
        let msa = token(serde_json::json!({
            "tid": tid, "idp": "live.com", "unique_name": "live.com#bob@outlook.com"
        }));
        assert!(msa.is_guest());
        // A v2 token of a service principal: its own tenant's authority in idp, v2 issuer.
        let app_v2 = token(serde_json::json!({
            "tid": tid, "iss": format!("https://login.microsoftonline.com/{tid}/v2.0"),
            "idp": format!("https://sts.windows.net/{tid}/"), "azp": "app"
        }));
        assert!(!app_v2.is_guest());
        // A managed identity (idp is its own tenant), and a member with a upn.
        let mi = token(serde_json::json!({
            "tid": tid, "idp": format!("https://sts.windows.net/{tid}/"),
            "xms_mirid": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm"
        }));
        assert!(!mi.is_guest());
        assert_eq!(mi.username(), Some("vm"));
        let member = token(serde_json::json!({"tid": tid, "upn": "ada@contoso.com"}));
        assert!(!member.is_guest());
        assert_eq!(member.username(), Some("ada@contoso.com"));
    }
}

#[cfg(test)]
mod properties {
    use base64::Engine as _;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_text_is_a_token_with_or_without_a_name(text in ".{0,200}") {
            let token = Token::new(text, OffsetDateTime::UNIX_EPOCH);
            let _ = token.username();
            let _ = token.audience();
        }

        #[test]
        fn any_payload_is_decoded_or_ignored(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let part = URL_SAFE_NO_PAD.encode(&payload);
            let _ = Token::new(format!("eyJ.{part}.c2ln"), OffsetDateTime::UNIX_EPOCH).username();
        }

        #[test]
        fn any_resource_id_names_an_identity_or_nothing(
            segments in proptest::collection::vec("[a-zA-Z./]{0,12}", 0..10),
        ) {
            let id = segments.join("/");
            let token = Token::new(
                format!(
                    "eyJ.{}.c2ln",
                    URL_SAFE_NO_PAD.encode(serde_json::json!({"xms_mirid": id}).to_string())
                ),
                OffsetDateTime::UNIX_EPOCH,
            );
            if let Some(name) = token.username() {
                prop_assert!(!name.is_empty());
            }
        }
    }
}
