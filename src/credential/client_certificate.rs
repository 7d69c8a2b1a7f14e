//! A service principal's certificate: loads it (PEM or PKCS#12) and signs the client
//! assertion Entra accepts in place of a secret (RS256, with the certificate's `x5t`).

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use openssl::hash::MessageDigest;
use openssl::pkcs12::Pkcs12;
use openssl::pkey::{Id, PKey, Private};
use openssl::sign::Signer;
use openssl::x509::X509;
use time::OffsetDateTime;

use super::local_file::read_capped_blocking;

/// The most a client certificate file (PEM or PKCS#12) may hold.
const MAX_CERTIFICATE_FILE_BYTES: u64 = 1024 * 1024;

/// How long a client assertion is valid; Entra only needs it for the one request.
const ASSERTION_LIFETIME: time::Duration = time::Duration::minutes(10);

/// The certificate's private key and thumbprint.
pub(crate) struct ClientCertificate {
    key: PKey<Private>,
    /// base64url of the certificate's SHA-1 digest, as Entra expects in `x5t`.
    x5t: String,
}

impl ClientCertificate {
    /// Reads a PEM file (certificate and private key) or a PKCS#12 (`.pfx`) file.
    pub(crate) fn load(path: &Path, password: Option<&str>) -> Result<Self, String> {
        let bytes = read_capped_blocking(path, MAX_CERTIFICATE_FILE_BYTES)
            .map_err(|e| format!("cannot read the client certificate {}: {e}", path.display()))?;
        let (certificate, key) =
            if bytes.starts_with(b"-----BEGIN") || bytes.windows(10).any(|w| w == b"-----BEGIN") {
                let certificate = X509::from_pem(&bytes)
                    .map_err(|_| format!("{} holds no PEM certificate", path.display()))?;
                let key = match password {
                    Some(password) => {
                        PKey::private_key_from_pem_passphrase(&bytes, password.as_bytes())
                    }
                    None => PKey::private_key_from_pem(&bytes),
                }
                .map_err(|_| {
                    format!(
                        "{} holds no private key that could be read{}",
                        path.display(),
                        if password.is_some() {
                            " with the given password"
                        } else {
                            ""
                        }
                    )
                })?;
                (certificate, key)
            } else {
                let parsed = Pkcs12::from_der(&bytes)
                .and_then(|pkcs12| pkcs12.parse2(password.unwrap_or_default()))
                .map_err(|_| {
                    format!(
                        "{} is neither PEM nor a PKCS#12 file that opens with the given password",
                        path.display()
                    )
                })?;
                match (parsed.cert, parsed.pkey) {
                    (Some(certificate), Some(key)) => (certificate, key),
                    _ => {
                        return Err(format!(
                            "{} lacks a certificate or a private key",
                            path.display()
                        ));
                    }
                }
            };
        if key.id() != Id::RSA {
            return Err(format!(
                "the key in {} is not an RSA key, which Entra requires",
                path.display()
            ));
        }
        let digest = certificate
            .digest(MessageDigest::sha1())
            .map_err(|e| format!("cannot hash the certificate: {e}"))?;
        Ok(Self {
            key,
            x5t: URL_SAFE_NO_PAD.encode(digest),
        })
    }

    /// A signed client assertion for `client_id` at the token endpoint `audience`.
    pub(crate) fn assertion(
        &self,
        audience: &str,
        client_id: &str,
        now: OffsetDateTime,
    ) -> Result<String, String> {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": self.x5t});
        let mut jti = [0u8; 16];
        openssl::rand::rand_bytes(&mut jti).map_err(|e| e.to_string())?;
        let payload = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": URL_SAFE_NO_PAD.encode(jti),
            "nbf": now.unix_timestamp(),
            "iat": now.unix_timestamp(),
            "exp": (now + ASSERTION_LIFETIME).unix_timestamp(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let signature = Signer::new(MessageDigest::sha256(), &self.key)
            .and_then(|mut signer| signer.sign_oneshot_to_vec(signing_input.as_bytes()))
            .map_err(|e| format!("cannot sign the client assertion: {e}"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t", &self.x5t)
            .finish_non_exhaustive()
    }
}
