//! Keyed hashes of columns (`tables add|update --hash-column C`): the value of `C` is sent as
//! `C_hmac`, the hex HMAC-SHA-256 of its text under the tenant's own secret. Equal values give
//! equal hashes across one tenant's tables (they still join), different ones across tenants
//! (two datasets cannot be joined on them), and without the secret a hash cannot be checked
//! against a guessed value (a plain SHA-256 of an email or phone number can).

use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretBox};
use serde_json::{Map, Value};
use sha2::Sha256;
use std::fmt;

/// Appended to a hashed column's name in BigQuery: the column says what it holds, and a
/// plain column of the same name (synced before the policy) is dropped, not mixed with hashes.
pub const HASH_SUFFIX: &str = "_hmac";

/// The BigQuery column holding `column`'s hash.
pub fn hashed_name(column: &str) -> String {
    format!("{column}{HASH_SUFFIX}")
}

/// A tenant's hashing secret: 32 random bytes. `Debug` shows nothing of it.
pub struct HashKey(SecretBox<[u8; 32]>);

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(..)")
    }
}

impl HashKey {
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        Self(SecretBox::new(Box::new(k)))
    }

    /// From the stored form (the bytes sealed with the master key).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let k: [u8; 32] = b.try_into().ok()?;
        Some(Self(SecretBox::new(Box::new(k))))
    }

    /// The bytes to seal. Only the control plane's store calls this.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }

    /// Hex HMAC-SHA-256 of `text`.
    pub fn hmac_hex(&self, text: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret())
            .expect("HMAC takes keys of any length");
        mac.update(text.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// One table's hashed columns under one tenant's key: applied to each row's JSON object.
#[derive(Debug)]
pub struct ColumnHasher {
    key: std::sync::Arc<HashKey>,
    columns: Vec<String>,
}

impl ColumnHasher {
    pub fn new(key: std::sync::Arc<HashKey>, columns: Vec<String>) -> Self {
        Self { key, columns }
    }

    /// The row's JSON with each hashed column `C` replaced by `C_hmac`: the HMAC of its text
    /// (a string's characters; any other JSON value's JSON text, as a number prints). NULL
    /// stays NULL; a column the row does not carry (a partial changelog update) stays absent.
    /// A row that is not a JSON object (never produced by the readers) becomes `{}`, which
    /// BigQuery refuses and the slice dead-letters by key: its values are never sent plain.
    pub fn apply(&self, json: &str) -> String {
        let Ok(Value::Object(mut row)) = serde_json::from_str::<Value>(json) else {
            return "{}".to_string();
        };
        self.hash_fields(&mut row);
        Value::Object(row).to_string()
    }

    fn hash_fields(&self, row: &mut Map<String, Value>) {
        for c in &self.columns {
            let Some(v) = row.remove(c) else { continue };
            let hashed = match v {
                Value::Null => Value::Null,
                Value::String(s) => Value::String(self.key.hmac_hex(&s)),
                other => Value::String(self.key.hmac_hex(&other.to_string())),
            };
            row.insert(hashed_name(c), hashed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        // RFC 4231 test case 2 uses a 4-byte key; ours are 32 bytes, so check the primitive
        // through the same call path with a key padded the way HMAC pads it (zeros).
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(b"Jefe");
        let key = HashKey::from_bytes(&k).unwrap();
        assert_eq!(
            key.hmac_hex("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hashed_columns_are_renamed_and_keyed_per_tenant() {
        let cols = vec!["email".to_string(), "n".to_string(), "gone".to_string()];
        let a = ColumnHasher::new(Arc::new(HashKey::generate()), cols.clone());
        let b = ColumnHasher::new(Arc::new(HashKey::generate()), cols);
        let row = r#"{"id":"1","email":"x@ngo.example","n":42,"gone":null}"#;
        let ha: Value = serde_json::from_str(&a.apply(row)).unwrap();
        let hb: Value = serde_json::from_str(&b.apply(row)).unwrap();
        assert!(ha.get("email").is_none() && ha.get("n").is_none());
        assert_eq!(ha["email_hmac"], a.key.hmac_hex("x@ngo.example"));
        assert_eq!(ha["n_hmac"], a.key.hmac_hex("42"));
        assert_eq!(ha["gone_hmac"], Value::Null);
        assert_eq!(ha["id"], "1");
        assert_ne!(ha["email_hmac"], hb["email_hmac"], "another tenant's key");
        assert_eq!(a.apply(row), a.apply(row), "deterministic");
        assert!(!a.apply(row).contains("x@ngo.example"));
        // A partial row without the column stays without it; a broken one sends nothing.
        assert_eq!(a.apply(r#"{"id":"2"}"#), r#"{"id":"2"}"#);
        assert_eq!(a.apply("not json x@ngo.example"), "{}");
    }

    #[test]
    fn debug_shows_no_key_material() {
        let k = HashKey::generate();
        assert_eq!(format!("{k:?}"), "HashKey(..)");
    }
}
