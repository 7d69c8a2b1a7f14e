//! Where a managed identity's tokens come from on each kind of Azure host, and how each one
//! is asked.

use std::path::{Path, PathBuf};

use crate::credential::http::RequestBuilder;
use crate::credential::local_file::read_capped;

use super::id::ManagedIdentityId;
use crate::credential::vars::{
    IDENTITY_ENDPOINT_VAR, IDENTITY_HEADER_VAR, IDENTITY_SERVER_THUMBPRINT_VAR, IMDS_ENDPOINT_VAR,
    MSI_ENDPOINT_VAR, MSI_SECRET_VAR,
};
use crate::environment::Environment;
use crate::error::Error;

/// Where IMDS lives on every Azure VM.
pub(super) const IMDS_AUTHORITY_HOST: &str = "http://169.254.169.254";
/// The token path on IMDS (and on a replacement authority host).
const IMDS_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// Where the Azure Connected Machine agent writes its challenge keys.
#[cfg(windows)]
const ARC_KEY_DIRECTORY: &str = r"C:\ProgramData\AzureConnectedMachineAgent\Tokens";
#[cfg(not(windows))]
const ARC_KEY_DIRECTORY: &str = "/var/opt/azcmagent/tokens";
/// The Arc agent's keys are small; anything larger is not one.
const ARC_KEY_MAX_BYTES: u64 = 4096;

/// One managed identity endpoint and its protocol. `Debug` leaves the secrets out.
#[derive(Clone)]
pub(crate) enum Source {
    /// VM / VMSS Instance Metadata Service (api-version 2018-02-01).
    Imds { url: reqwest::Url },
    /// App Service, Functions, Container Apps (api-version 2019-08-01).
    AppService { url: reqwest::Url, secret: String },
    /// Azure Arc: a 401 challenge names a key file to prove local access.
    Arc {
        url: reqwest::Url,
        key_directory: PathBuf,
    },
    /// Cloud Shell: POST with a form body.
    CloudShell { url: reqwest::Url },
    /// The retiring App Service protocol (api-version 2017-09-01).
    LegacyAppService { url: reqwest::Url, secret: String },
}

impl Source {
    /// Picks the source the environment describes, in the Azure SDKs' order; IMDS (at
    /// `imds_url`) when nothing else is configured.
    pub(crate) fn detect(
        environment: &Environment,
        imds_url: reqwest::Url,
        arc_key_directory: Option<PathBuf>,
    ) -> Result<Self, Error> {
        let url = |name: &'static str, value: String| {
            reqwest::Url::parse(&value).map_err(|e| {
                Error::invalid(
                    name,
                    format!("{name} is not a URL ({e}); it must look like http://host:port/path"),
                )
            })
        };
        let endpoint = environment.var(IDENTITY_ENDPOINT_VAR);
        if let (Some(endpoint), Some(secret)) = (&endpoint, environment.var(IDENTITY_HEADER_VAR)) {
            if environment.var(IDENTITY_SERVER_THUMBPRINT_VAR).is_some() {
                return Err(Error::unsupported(
                    IDENTITY_SERVER_THUMBPRINT_VAR,
                    "Service Fabric managed identity (IDENTITY_SERVER_THUMBPRINT is set) is not \
                     supported; use another credential",
                ));
            }
            return Ok(Source::AppService {
                url: url(IDENTITY_ENDPOINT_VAR, endpoint.clone())?,
                secret,
            });
        }
        if let (Some(endpoint), Some(_)) = (endpoint, environment.var(IMDS_ENDPOINT_VAR)) {
            return Ok(Source::Arc {
                url: url(IDENTITY_ENDPOINT_VAR, endpoint)?,
                key_directory: arc_key_directory.unwrap_or_else(|| ARC_KEY_DIRECTORY.into()),
            });
        }
        if let Some(endpoint) = environment.var(MSI_ENDPOINT_VAR) {
            let url = url(MSI_ENDPOINT_VAR, endpoint)?;
            return Ok(match environment.var(MSI_SECRET_VAR) {
                Some(secret) => Source::LegacyAppService { url, secret },
                None => Source::CloudShell { url },
            });
        }
        Ok(Source::Imds { url: imds_url })
    }

    /// A name for logs and errors.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Source::Imds { .. } => "IMDS",
            Source::AppService { .. } => "App Service",
            Source::Arc { .. } => "Azure Arc",
            Source::CloudShell { .. } => "Cloud Shell",
            Source::LegacyAppService { .. } => "App Service (2017-09-01)",
        }
    }

    /// The source's label in metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Source::Imds { .. } => "imds",
            Source::AppService { .. } => "app_service",
            Source::Arc { .. } => "azure_arc",
            Source::CloudShell { .. } => "cloud_shell",
            Source::LegacyAppService { .. } => "app_service_2017",
        }
    }

    /// The secret the requests carry (App Service), for scrubbing it from answers.
    pub(crate) fn secret(&self) -> Option<&str> {
        match self {
            Source::AppService { secret, .. } | Source::LegacyAppService { secret, .. } => {
                Some(secret)
            }
            _ => None,
        }
    }

    /// The endpoint, for errors (no query, no secret).
    pub(crate) fn endpoint(&self) -> &reqwest::Url {
        match self {
            Source::Imds { url }
            | Source::AppService { url, .. }
            | Source::Arc { url, .. }
            | Source::CloudShell { url }
            | Source::LegacyAppService { url, .. } => url,
        }
    }

    /// Refuses identities the source cannot select.
    pub(crate) fn check_identity(&self, identity: &ManagedIdentityId) -> Result<(), Error> {
        let unsupported = match (self, identity) {
            (_, ManagedIdentityId::SystemAssigned) => None,
            (Source::Arc { .. } | Source::CloudShell { .. }, _) => Some("only system-assigned"),
            (Source::LegacyAppService { .. }, ManagedIdentityId::ClientId(_)) => None,
            (Source::LegacyAppService { .. }, _) => {
                Some("a user-assigned identity only by client id")
            }
            _ => None,
        };
        match unsupported {
            Some(what) => Err(Error::unsupported(
                "identity",
                format!(
                    "the {} managed identity endpoint supports {what}; {identity:?} cannot be used there",
                    self.name()
                ),
            )),
            None => Ok(()),
        }
    }

    /// The request for a token for `resource`. `arc_key` is the Arc challenge's answer.
    pub(crate) fn request(
        &self,
        resource: &str,
        identity: &ManagedIdentityId,
        arc_key: Option<&str>,
    ) -> reqwest::Request {
        let request = match self {
            Source::Imds { url } => {
                RequestBuilder::get(imds_query(url, resource, identity)).header("Metadata", "true")
            }
            Source::AppService { url, secret } => {
                let id = match identity {
                    ManagedIdentityId::SystemAssigned => None,
                    ManagedIdentityId::ClientId(id) => Some(("client_id", id)),
                    ManagedIdentityId::ObjectId(id) => Some(("principal_id", id)),
                    ManagedIdentityId::ResourceId(id) => Some(("mi_res_id", id)),
                };
                RequestBuilder::get(with_query(url, "2019-08-01", resource, id))
                    .header("X-IDENTITY-HEADER", secret)
            }
            Source::Arc { url, .. } => {
                let request = RequestBuilder::get(with_query(url, "2019-11-01", resource, None))
                    .header("Metadata", "true");
                match arc_key {
                    Some(key) => request.header("Authorization", format!("Basic {key}")),
                    None => request,
                }
            }
            Source::CloudShell { url } => {
                let mut form = form_urlencoded::Serializer::new(String::new());
                form.append_pair("resource", resource);
                RequestBuilder::post(url.clone())
                    .header("Metadata", "true")
                    .header("Content-Type", "application/x-www-form-urlencoded")
                    .body(form.finish())
            }
            Source::LegacyAppService { url, secret } => {
                let id = match identity {
                    ManagedIdentityId::ClientId(id) => Some(("clientid", id)),
                    _ => None,
                };
                RequestBuilder::get(with_query(url, "2017-09-01", resource, id))
                    .header("secret", secret)
            }
        };
        request.build()
    }

    /// The IMDS token request without its `Metadata` header: the chain's probe. IMDS refuses it
    /// at once, which proves IMDS is there without waiting for a token to be minted.
    pub(crate) fn imds_probe(
        &self,
        resource: &str,
        identity: &ManagedIdentityId,
    ) -> reqwest::Request {
        RequestBuilder::get(imds_query(self.endpoint(), resource, identity)).build()
    }

    /// Answers the Arc agent's 401 challenge: reads the key file named by
    /// `WWW-Authenticate: Basic realm=<path>` after checking that it is one of the agent's keys.
    pub(crate) async fn arc_key(&self, challenge: Option<&str>) -> Result<String, ArcKeyProblem> {
        let Source::Arc { key_directory, .. } = self else {
            return Err(ArcKeyProblem::Other(
                "only Azure Arc sends a key challenge".into(),
            ));
        };
        let path = arc_challenge_path(challenge, key_directory).map_err(ArcKeyProblem::Other)?;
        let key = read_capped(&path, ARC_KEY_MAX_BYTES)
            .await
            .map_err(|problem| ArcKeyProblem::reading(&path, &problem))?;
        String::from_utf8(key).map_err(|_| {
            ArcKeyProblem::Other(format!("the Arc key file {} is not text", path.display()))
        })
    }
}

/// Why the Arc key challenge could not be answered.
#[derive(Debug)]
pub(crate) enum ArcKeyProblem {
    /// This account may not read the key file (the agent's folder is for privileged users and
    /// the `himds` group).
    Denied(PathBuf),
    Other(String),
}

impl ArcKeyProblem {
    /// Why reading the key file at `path` failed.
    fn reading(path: &Path, problem: &std::io::Error) -> Self {
        if problem.kind() == std::io::ErrorKind::PermissionDenied {
            ArcKeyProblem::Denied(path.to_owned())
        } else {
            ArcKeyProblem::Other(format!(
                "cannot read the Arc key file {}: {problem}",
                path.display()
            ))
        }
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("kind", &self.name())
            .field("endpoint", &self.endpoint().as_str())
            .finish_non_exhaustive()
    }
}

/// The key file an Arc challenge (`WWW-Authenticate: Basic realm=<path>`) names, if it is a
/// `.key` file directly in the agent's key folder.
pub(crate) fn arc_challenge_path(
    challenge: Option<&str>,
    key_directory: &Path,
) -> Result<PathBuf, String> {
    let path = challenge
        .and_then(|value| value.trim().strip_prefix("Basic realm="))
        .map(|path| PathBuf::from(path.trim().trim_matches('"')))
        .ok_or_else(|| {
            "the 401 answer has no `WWW-Authenticate: Basic realm=<key file>` header".to_owned()
        })?;
    check_arc_key_path(&path, key_directory)?;
    Ok(path)
}

/// The key must be a `.key` file directly in the agent's key folder (no other file on the
/// machine may be sent to the endpoint).
fn check_arc_key_path(path: &Path, directory: &Path) -> Result<(), String> {
    if path.extension().and_then(|e| e.to_str()) != Some("key") {
        return Err(format!(
            "the Arc challenge names {}, which is not a .key file",
            path.display()
        ));
    }
    let parent = path.parent().and_then(|p| p.canonicalize().ok());
    let expected = directory.canonicalize().ok();
    if parent.is_none() || parent != expected {
        return Err(format!(
            "the Arc challenge names {}, which is not in the agent's key folder {}",
            path.display(),
            directory.display()
        ));
    }
    Ok(())
}

/// The IMDS token URL with its query (api-version 2018-02-01).
fn imds_query(url: &reqwest::Url, resource: &str, identity: &ManagedIdentityId) -> reqwest::Url {
    let id = match identity {
        ManagedIdentityId::SystemAssigned => None,
        ManagedIdentityId::ClientId(id) => Some(("client_id", id)),
        ManagedIdentityId::ObjectId(id) => Some(("object_id", id)),
        ManagedIdentityId::ResourceId(id) => Some(("msi_res_id", id)),
    };
    with_query(url, "2018-02-01", resource, id)
}

fn with_query(
    url: &reqwest::Url,
    api_version: &str,
    resource: &str,
    identity: Option<(&str, &String)>,
) -> reqwest::Url {
    let mut url = url.clone();
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("api-version", api_version);
        query.append_pair("resource", resource);
        if let Some((name, value)) = identity {
            query.append_pair(name, value);
        }
    }
    url
}

/// The IMDS token URL under `authority` (a base URL such as `http://169.254.169.254`).
pub(crate) fn imds_token_url(authority: &str) -> Result<reqwest::Url, String> {
    let base = reqwest::Url::parse(authority.trim_end_matches('/')).map_err(|e| e.to_string())?;
    if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
        return Err("it needs an http:// or https:// scheme and a host".into());
    }
    if base.query().is_some() {
        return Err("it must not have a query".into());
    }
    let mut url = base;
    let path = format!("{}{IMDS_TOKEN_PATH}", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_secrets_out() {
        let url = reqwest::Url::parse("http://127.0.0.1:1/msi/token").unwrap();
        for source in [
            Source::AppService {
                url: url.clone(),
                secret: "app-service-secret".into(),
            },
            Source::LegacyAppService {
                url,
                secret: "app-service-secret".into(),
            },
        ] {
            let debug = format!("{source:?}");
            assert!(!debug.contains("app-service-secret"), "{debug}");
            assert!(debug.contains("127.0.0.1"), "{debug}");
        }
    }

    #[test]
    fn arc_keys_must_be_key_files_in_the_agent_folder() {
        let dir = tempfile_dir();
        let key = dir.join("abc.key");
        assert!(check_arc_key_path(&key, &dir).is_ok());
        assert!(
            check_arc_key_path(&dir.join("abc.txt"), &dir)
                .unwrap_err()
                .contains(".key")
        );
        assert!(check_arc_key_path(&std::env::temp_dir().join("x.key"), &dir).is_err());
        assert!(check_arc_key_path(&dir.join("..").join("x.key"), &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pg-entra-arc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

#[cfg(test)]
mod arc_key_tests {
    use super::*;

    #[test]
    fn a_key_this_account_may_not_read_is_told_apart() {
        let path = Path::new("/var/opt/azcmagent/tokens/x.key");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(
            matches!(ArcKeyProblem::reading(path, &denied), ArcKeyProblem::Denied(p) if p == path)
        );
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(matches!(
            ArcKeyProblem::reading(path, &gone),
            ArcKeyProblem::Other(_)
        ));
    }
}
