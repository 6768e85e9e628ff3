//! Admin API tokens: random, shown once, stored as a BLAKE3 hash.

use crate::{Admin, AdminError, Result};
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use tenantsync_store::control::admin::ApiToken;

/// Prefix of every token, so a leaked one is recognizable (secret scanners, logs).
pub const TOKEN_PREFIX: &str = "tsk_";

/// The stored form of a token.
pub fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn generate() -> SecretString {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
    .into()
}

impl Admin {
    /// Create a token named `name`; the returned secret is the only copy.
    pub async fn create_token(&self, actor: &str, name: &str) -> Result<SecretString> {
        let token = generate();
        self.control
            .create_api_token(name, &hash(token.expose_secret()))
            .await?;
        self.audit(actor, "token.create", Some(name), serde_json::json!({}))
            .await?;
        Ok(token)
    }

    pub async fn tokens(&self) -> Result<Vec<ApiToken>> {
        Ok(self.control.api_tokens().await?)
    }

    pub async fn revoke_token(&self, actor: &str, name: &str) -> Result<()> {
        if !self.control.revoke_api_token(name).await? {
            return Err(AdminError::NotFound(format!(
                "no live token named {name:?}"
            )));
        }
        self.audit(actor, "token.revoke", Some(name), serde_json::json!({}))
            .await
    }

    /// The name of the live token `presented` is, or None.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<String>> {
        if !presented.starts_with(TOKEN_PREFIX) || presented.len() > 200 {
            return Ok(None);
        }
        Ok(self.control.api_token_by_hash(&hash(presented)).await?)
    }
}
