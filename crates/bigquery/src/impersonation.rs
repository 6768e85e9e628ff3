//! Keyless tenants (`tenant add --impersonate SA_EMAIL`): the deployment's own service account
//! asks Google's IAM Credentials API for a short-lived token of the tenant's service account
//! (`generateAccessToken`), which the tenant allowed by granting the deployment's account
//! `roles/iam.serviceAccountTokenCreator` on theirs. No key leaves the tenant.
//!
//! The deployment's own token comes from yup-oauth2's service-account flow, like a tenant's.
//! The impersonation call is ours: yup-oauth2's `ServiceAccountImpersonationAuthenticator`
//! (12.1) takes only an authorized *user's* secret as its source (`AuthorizedUserSecret`; a
//! deployment runs as a service account) and posts to a constant
//! (`IAM_CREDENTIALS_ENDPOINT = "https://iamcredentials.googleapis.com"`,
//! `service_account_impersonator.rs` line 18) that no setting changes, so neither a
//! deployment's key nor the local IAM endpoint the tests run could be used with it.

use crate::auth::{classify_token_error, parse_service_account, TokenUriPolicy};
use crate::error::BqError;
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::time::{Duration, SystemTime};
use tokio::sync::OnceCell;

/// Google's IAM Credentials API.
pub const GOOGLE_IAM_CREDENTIALS_URL: &str = "https://iamcredentials.googleapis.com";

/// The scope of the deployment's own token: what `generateAccessToken` requires.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The deployment's service account, which impersonates tenants' accounts. One per process:
/// its own token is fetched once and shared by every impersonating tenant.
pub struct Impersonator {
    key: SecretString,
    token_uri: String,
    iam_url: String,
    auth: OnceCell<yup_oauth2::authenticator::DefaultAuthenticator>,
    http: reqwest::Client,
}

impl fmt::Debug for Impersonator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Impersonator")
            .field("iam_url", &self.iam_url)
            .finish_non_exhaustive()
    }
}

/// The same account and API (endpoints compare equal when they would act the same).
impl PartialEq for Impersonator {
    fn eq(&self, other: &Self) -> bool {
        self.iam_url == other.iam_url
            && self.token_uri == other.token_uri
            && self.key.expose_secret() == other.key.expose_secret()
    }
}

impl Eq for Impersonator {}

impl Impersonator {
    /// From the deployment's key (JSON) and the IAM Credentials API's base URL. The key's
    /// token endpoint is held to `policy` like a tenant's.
    pub fn new(key: SecretString, iam_url: &str, policy: &TokenUriPolicy) -> Result<Self, BqError> {
        let sa = parse_service_account(&key)?;
        let token_uri = policy.check(&sa.token_uri)?.to_string();
        crate::client::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| BqError::Invalid(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            key,
            token_uri,
            iam_url: iam_url.trim_end_matches('/').to_string(),
            auth: OnceCell::new(),
            http,
        })
    }

    async fn own_token(&self) -> Result<String, BqError> {
        let auth = self
            .auth
            .get_or_try_init(|| async {
                let mut key =
                    yup_oauth2::parse_service_account_key(self.key.expose_secret().as_bytes())
                        .map_err(|_| {
                            BqError::BadCredentials(
                                "the deployment's service-account key could not be parsed".into(),
                            )
                        })?;
                key.token_uri = self.token_uri.clone();
                yup_oauth2::ServiceAccountAuthenticator::builder(key)
                    .build()
                    .await
                    .map_err(|e| {
                        BqError::BadCredentials(format!(
                            "the deployment's private key is unusable: {}",
                            e.kind()
                        ))
                    })
            })
            .await?;
        let tok = auth
            .token(&[CLOUD_PLATFORM])
            .await
            .map_err(classify_token_error)?;
        tok.token()
            .map(str::to_string)
            .ok_or_else(|| BqError::CredentialsRejected("token endpoint returned no token".into()))
    }

    /// A token of `email` for `scope`, and when it expires. A refusal (the deployment may not
    /// impersonate that account, or it does not exist) is `CredentialsRejected`, which pauses
    /// the tenant like a revoked key; trouble reaching the API is transient.
    pub(crate) async fn token_for(
        &self,
        email: &str,
        scope: &str,
    ) -> Result<(String, Option<SystemTime>), BqError> {
        let own = self.own_token().await?;
        let url = format!(
            "{}/v1/projects/-/serviceAccounts/{email}:generateAccessToken",
            self.iam_url
        );
        let body = serde_json::json!({"scope": [scope], "lifetime": "3600s"});
        let resp = self
            .http
            .post(&url)
            .bearer_auth(own)
            .json(&body)
            .send()
            .await
            .map_err(|e| BqError::Transient(format!("IAM Credentials API unreachable: {e}")))?;
        let status = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        match status {
            200 => {
                let token = v["accessToken"].as_str().ok_or_else(|| {
                    BqError::CredentialsRejected("generateAccessToken returned no token".into())
                })?;
                let expires = v["expireTime"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(SystemTime::from);
                Ok((token.to_string(), expires))
            }
            429 | 500..=599 => Err(BqError::Transient(format!(
                "IAM Credentials API answered {status} for {email}"
            ))),
            _ => Err(BqError::CredentialsRejected(format!(
                "the deployment may not impersonate {email} (IAM Credentials API {status}: {}); \
                 grant it roles/iam.serviceAccountTokenCreator on that account",
                v["error"]["message"].as_str().unwrap_or("no message")
            ))),
        }
    }
}

/// Whether `email` has the form of a service account's address. Checked at onboarding, and
/// it keeps the address safe to put in the request's path.
pub fn check_email(email: &str) -> Result<(), String> {
    let ok = email.split_once('@').is_some_and(|(name, domain)| {
        !name.is_empty()
            && domain.ends_with(".gserviceaccount.com")
            && email
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._@".contains(c))
    });
    match ok {
        true => Ok(()),
        false => Err(format!(
            "--impersonate {email:?} is not a service account's address \
             (name@project.iam.gserviceaccount.com)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_account_addresses_are_accepted() {
        assert!(check_email("sync@ngo-a.iam.gserviceaccount.com").is_ok());
        for bad in [
            "sync@example.com",
            "@ngo.iam.gserviceaccount.com",
            "a/b@ngo.iam.gserviceaccount.com",
            "a b@ngo.iam.gserviceaccount.com",
            "sync@ngo.iam.gserviceaccount.com/../x",
            "",
        ] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
    }
}
