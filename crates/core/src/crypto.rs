//! Envelope for tenant credentials at rest: AES-256-GCM under a master key.
//!
//! The tenant id is bound as associated data, so a ciphertext copied onto another tenant's row
//! fails to decrypt instead of handing that tenant someone else's key. Each ciphertext records
//! the id of the master key that sealed it, which is what makes master-key rotation possible.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use std::fmt;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CryptoError {
    #[error("master key is not valid base64 (expected 32 random bytes, base64-encoded)")]
    KeyNotBase64,
    #[error("master key must be 32 bytes after base64 decoding, got {0}")]
    KeyLength(usize),
    #[error("credential was sealed with master key {found}, which is not configured (configured: {have}); add it to TENANTSYNC_MASTER_KEYS_OLD")]
    UnknownKeyId { found: String, have: String },
    #[error("credential could not be decrypted (wrong master key or tampered ciphertext)")]
    Decrypt,
}

/// The master key, plus the previous master keys still accepted for opening during a rotation.
/// New seals always use the current key. `Debug` shows only key ids.
pub struct MasterKey {
    id: String,
    key: SecretBox<[u8; 32]>,
    /// Keys being rotated away from: they open old ciphertexts, they never seal.
    previous: Vec<MasterKey>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A sealed credential as stored in the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl MasterKey {
    /// Parse a base64 key. The id is derived from the key itself (a BLAKE3 fingerprint), so the
    /// operator never has to keep an id and a key in step.
    pub fn from_base64(b64: &SecretString) -> Result<Self, CryptoError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.expose_secret().trim())
            .map_err(|_| CryptoError::KeyNotBase64)?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::KeyLength(bytes.len()))?;
        let id = format!("k-{}", &blake3::hash(&key).to_hex()[..12]);
        Ok(Self {
            id,
            key: SecretBox::new(Box::new(key)),
            previous: Vec::new(),
        })
    }

    /// Also accept `previous` keys for opening (a master-key rotation in progress). A previous
    /// key equal to the current one is dropped; nesting is flattened.
    pub fn with_previous(mut self, previous: Vec<MasterKey>) -> Self {
        for mut k in previous {
            let nested = std::mem::take(&mut k.previous);
            if k.id != self.id && !self.previous.iter().any(|p| p.id == k.id) {
                self.previous.push(k);
            }
            self = self.with_previous(nested);
        }
        self
    }

    /// Whether a ciphertext sealed under `key_id` can be opened with this key set.
    pub fn can_open(&self, key_id: &str) -> bool {
        self.id == key_id || self.previous.iter().any(|k| k.id == key_id)
    }

    /// Ids of the previous keys accepted for opening.
    pub fn previous_ids(&self) -> Vec<&str> {
        self.previous.iter().map(|k| k.id.as_str()).collect()
    }

    /// A fresh random key, base64-encoded (for `tenantsync keys generate` and tests).
    pub fn generate_base64() -> SecretString {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        base64::engine::general_purpose::STANDARD.encode(k).into()
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.key.expose_secret().into())
    }

    pub fn seal(&self, plaintext: &[u8], tenant_id: i64) -> Sealed {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = tenant_id.to_be_bytes();
        let ciphertext = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        Sealed {
            key_id: self.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Open with whichever configured key (current or previous) sealed it.
    pub fn open(&self, sealed: &Sealed, tenant_id: i64) -> Result<SecretString, CryptoError> {
        if sealed.key_id == self.id {
            return self.open_own(sealed, tenant_id);
        }
        match self.previous.iter().find(|k| k.id == sealed.key_id) {
            Some(k) => k.open_own(sealed, tenant_id),
            None => Err(CryptoError::UnknownKeyId {
                found: sealed.key_id.clone(),
                have: std::iter::once(self.id.as_str())
                    .chain(self.previous_ids())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Open a ciphertext again under the current key (master-key rotation). Returns None when
    /// it is sealed under the current key already.
    pub fn reseal(&self, sealed: &Sealed, tenant_id: i64) -> Result<Option<Sealed>, CryptoError> {
        if sealed.key_id == self.id {
            return Ok(None);
        }
        let plain = self.open(sealed, tenant_id)?;
        Ok(Some(self.seal(plain.expose_secret().as_bytes(), tenant_id)))
    }

    fn open_own(&self, sealed: &Sealed, tenant_id: i64) -> Result<SecretString, CryptoError> {
        if sealed.nonce.len() != 12 {
            return Err(CryptoError::Decrypt);
        }
        let aad = tenant_id.to_be_bytes();
        let plain = self
            .cipher()
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| CryptoError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tenant_binding() {
        let k = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        let s = k.seal(b"{\"private_key\":\"sekrit\"}", 7);
        assert!(!s.ciphertext.windows(6).any(|w| w == b"sekrit"));
        assert_eq!(
            k.open(&s, 7).unwrap().expose_secret(),
            "{\"private_key\":\"sekrit\"}"
        );
        assert!(matches!(k.open(&s, 8), Err(CryptoError::Decrypt)));
        let other = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        assert!(matches!(
            other.open(&s, 7),
            Err(CryptoError::UnknownKeyId { .. })
        ));
    }

    #[test]
    fn previous_keys_open_old_ciphertexts_and_reseal_moves_them_to_the_current_key() {
        let old = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        let s = old.seal(b"the key", 3);
        let old_id = old.id().to_string();
        let new = MasterKey::from_base64(&MasterKey::generate_base64())
            .unwrap()
            .with_previous(vec![old]);
        assert!(new.can_open(&old_id) && new.can_open(new.id()));
        assert_eq!(new.open(&s, 3).unwrap().expose_secret(), "the key");
        let moved = new.reseal(&s, 3).unwrap().expect("resealed");
        assert_eq!(moved.key_id, new.id());
        assert_eq!(new.open(&moved, 3).unwrap().expose_secret(), "the key");
        assert!(new.reseal(&moved, 3).unwrap().is_none());
        // Without the old key, the old ciphertext is refused by key id, naming the ids only.
        let alone = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        let e = alone.open(&s, 3).unwrap_err().to_string();
        assert!(e.contains(&old_id) && e.contains(alone.id()), "{e}");
        assert!(!format!("{new:?}").contains("key:"));
    }

    #[test]
    fn bad_keys_are_named_and_debug_hides_the_key() {
        assert!(matches!(
            MasterKey::from_base64(&"not base64!".to_string().into()),
            Err(CryptoError::KeyNotBase64)
        ));
        assert!(matches!(
            MasterKey::from_base64(&"AAAA".to_string().into()),
            Err(CryptoError::KeyLength(3))
        ));
        let b64 = MasterKey::generate_base64();
        let k = MasterKey::from_base64(&b64).unwrap();
        let dbg = format!("{k:?}");
        assert!(dbg.contains(k.id()));
        assert!(!dbg.contains(b64.expose_secret()));
    }
}
