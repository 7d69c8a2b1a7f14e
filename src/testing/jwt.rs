//! JWT-shaped tokens like the ones Entra issues to managed identities. The signature is
//! random bytes: nothing in the test bed checks it, just as this crate never does.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use time::OffsetDateTime;

use super::identity::{Kind, Principal};
use crate::jitter::unit_random;

/// The tenant every test token claims to come from.
pub(crate) const TEST_TENANT_ID: &str = "72f988bf-0000-4000-8000-00000000c0de";

/// Makes every token distinct even within one second.
static SERIAL: AtomicU64 = AtomicU64::new(0);

/// A token for `principal` and `audience`, issued at `issued`, expiring at `expires`, naming
/// `groups` group object ids in a `groups` claim (Entra lists up to 200 in a JWT; each adds
/// about 52 bytes to the token).
pub(crate) fn mint(
    principal: &Principal,
    audience: &str,
    issued: OffsetDateTime,
    expires: OffsetDateTime,
    groups: usize,
) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": "pg-entra-test-key"});
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let mut payload = serde_json::json!({
        "aud": audience,
        "iss": format!("https://sts.windows.net/{TEST_TENANT_ID}/"),
        "iat": issued.unix_timestamp(),
        "nbf": issued.unix_timestamp(),
        "exp": expires.unix_timestamp(),
        "aio": format!("pg-entra-test-{serial}"),
        "appid": principal.client_id(),
        "appidacr": "2",
        "idp": format!("https://sts.windows.net/{TEST_TENANT_ID}/"),
        "idtyp": "app",
        "oid": principal.object_id(),
        "rh": "0.pg-entra-test.",
        "sub": principal.object_id(),
        "tid": TEST_TENANT_ID,
        "uti": format!("{serial:x}{:x}", (unit_random() * 1e12) as u64),
        "ver": "1.0",
    });
    match principal.kind() {
        Kind::SystemAssigned | Kind::UserAssigned => {
            payload["xms_mirid"] = principal.resource_id().into();
        }
        Kind::ServicePrincipal => {}
        Kind::User => {
            payload["idtyp"] = "user".into();
            payload["upn"] = principal.name().into();
            payload["unique_name"] = principal.name().into();
        }
        Kind::Guest => {
            let (home, idp) = principal.home().unwrap_or_default();
            payload["idtyp"] = "user".into();
            payload["idp"] = idp.into();
            payload["email"] = home.into();
            payload["unique_name"] = if idp == "live.com" {
                format!("live.com#{home}").into()
            } else {
                home.into()
            };
        }
    }
    if groups > 0 {
        payload["groups"] = (0..groups)
            .map(|i| super::identity::uuid_from(&i.to_string(), "group"))
            .collect::<Vec<_>>()
            .into();
    }
    // Entra signs with RSA-2048: 256 bytes of signature, like the real thing in size.
    let signature: Vec<u8> = (0..256).map(|_| (unit_random() * 256.0) as u8).collect();
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}
