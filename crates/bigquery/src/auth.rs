//! Access tokens: a tenant's service-account key (real BigQuery, or any endpoint honouring its
//! `token_uri`), or a fixed token for the local emulator.

use crate::error::BqError;
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::sync::Arc;

const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

/// How a tenant authenticates.
#[derive(Clone)]
pub enum Credentials {
    /// The emulator accepts any bearer token; this one is fixed and not secret.
    Emulator,
    /// A service-account key JSON, kept secret.
    ServiceAccount(SecretString),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Emulator => f.write_str("Credentials::Emulator"),
            Self::ServiceAccount(_) => f.write_str("Credentials::ServiceAccount([REDACTED])"),
        }
    }
}

/// Non-secret facts of a parsed key, for display and validation messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub client_email: String,
    pub project_id: Option<String>,
    pub token_uri: String,
}

/// Parse a service-account key, naming what is wrong without echoing any of it.
pub fn parse_service_account(json: &SecretString) -> Result<ServiceAccount, BqError> {
    let bad = |why: String| BqError::BadCredentials(why);
    let v: serde_json::Value = serde_json::from_str(json.expose_secret()).map_err(|e| {
        bad(format!(
            "service-account key is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("service-account key must be a JSON object".into()))?;
    match obj.get("type").and_then(|t| t.as_str()) {
        Some("service_account") => {}
        Some(other) => {
            return Err(bad(format!(
            "key has type {other:?}; a service-account key (type \"service_account\") is required"
        )))
        }
        None => {
            return Err(bad(
                "key has no \"type\" field; is it a service-account key?".into(),
            ))
        }
    }
    let missing: Vec<&str> = ["client_email", "private_key", "token_uri"]
        .into_iter()
        .filter(|f| {
            obj.get(*f)
                .and_then(|v| v.as_str())
                .is_none_or(str::is_empty)
        })
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "service-account key is missing field(s): {}",
            missing.join(", ")
        )));
    }
    let pk = obj["private_key"].as_str().unwrap_or_default();
    if !pk.contains("-----BEGIN PRIVATE KEY-----") {
        return Err(bad("private_key is not a PEM-encoded PKCS#8 RSA key".into()));
    }
    Ok(ServiceAccount {
        client_email: obj["client_email"].as_str().unwrap_or_default().to_string(),
        project_id: obj
            .get("project_id")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        token_uri: obj["token_uri"].as_str().unwrap_or_default().to_string(),
    })
}

#[derive(Clone)]
pub(crate) enum TokenSource {
    Fixed(&'static str),
    ServiceAccount(Arc<yup_oauth2::authenticator::DefaultAuthenticator>),
}

impl TokenSource {
    pub(crate) async fn new(creds: &Credentials) -> Result<Self, BqError> {
        match creds {
            Credentials::Emulator => Ok(Self::Fixed("emulator-token")),
            Credentials::ServiceAccount(json) => {
                parse_service_account(json)?;
                let key = yup_oauth2::parse_service_account_key(json.expose_secret().as_bytes())
                    .map_err(|_| {
                        BqError::BadCredentials("service-account key could not be parsed".into())
                    })?;
                let auth = yup_oauth2::ServiceAccountAuthenticator::builder(key)
                    .build()
                    .await
                    .map_err(|e| {
                        BqError::BadCredentials(format!(
                            "service-account private key is unusable: {}",
                            e.kind()
                        ))
                    })?;
                Ok(Self::ServiceAccount(Arc::new(auth)))
            }
        }
    }

    pub(crate) async fn token(&self) -> Result<String, BqError> {
        match self {
            Self::Fixed(t) => Ok((*t).to_string()),
            Self::ServiceAccount(a) => {
                let tok = a.token(&[SCOPE]).await.map_err(classify_token_error)?;
                tok.token().map(str::to_string).ok_or_else(|| {
                    BqError::CredentialsRejected("token endpoint returned no access token".into())
                })
            }
        }
    }
}

/// Connection trouble reaching the token endpoint is transient; an answer refusing the key
/// (`invalid_grant`, a deleted key, …) means the credentials no longer work.
fn classify_token_error(e: yup_oauth2::Error) -> BqError {
    use yup_oauth2::Error as E;
    match e {
        E::HttpError(_) | E::HttpClientError(_) | E::LowLevelError(_) => {
            BqError::Transient(format!("token endpoint unreachable: {e}"))
        }
        E::AuthError(a) => {
            BqError::CredentialsRejected(format!("token endpoint refused the key: {:?}", a.error))
        }
        other => BqError::CredentialsRejected(format!("token request failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ServiceAccount, BqError> {
        parse_service_account(&SecretString::from(s.to_string()))
    }

    #[test]
    fn names_what_is_wrong_without_echoing() {
        let e = p("{not json").unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = p(r#"{"type":"authorized_user","client_secret":"zzsecretzz"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("authorized_user") && !e.contains("zzsecretzz"),
            "{e}"
        );
        let e = p(r#"{"type":"service_account","client_email":"a@b"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("private_key, token_uri"), "{e}");
        let e = p(r#"{"type":"service_account","client_email":"a@b","token_uri":"x","private_key":"zzsecretzz"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("PEM") && !e.contains("zzsecretzz"), "{e}");
    }

    #[test]
    fn debug_is_redacted() {
        let c = Credentials::ServiceAccount(SecretString::from("zzsecretzz".to_string()));
        assert!(!format!("{c:?}").contains("zzsecretzz"));
    }
}
