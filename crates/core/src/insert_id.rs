//! Deterministic insertIds.
//!
//! A retry of the same row version must carry the same insertId so BigQuery's best-effort dedup
//! drops it, and `_latest` can still tell versions apart. The id hashes tenant, table, key,
//! cursor value *and* the rendered row (its JSON, or its protobuf message for the Storage Write
//! API): two different contents never share an id, even when an application writes the same
//! `updated_at` twice.

/// 32 hex characters (128 bits of BLAKE3): far below insertId's 128-character limit.
pub fn insert_id(
    tenant_id: i64,
    table: &str,
    key: &[String],
    cursor: &str,
    row: impl AsRef<[u8]>,
) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&tenant_id.to_le_bytes());
    // Length-prefix every variable part so ("ab","c") and ("a","bc") hash differently.
    for part in [table.as_bytes()]
        .into_iter()
        .chain(key.iter().map(String::as_bytes))
        .chain([cursor.as_bytes(), row.as_ref()])
    {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let mut hex = [0u8; 32];
    hex::encode_to_slice(&digest.as_bytes()[..16], &mut hex).expect("32 bytes hold 16 in hex");
    // `hex::encode` collects chars one by one: a visible share of a worker's CPU per row.
    std::str::from_utf8(&hex)
        .expect("hex digits are ASCII")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_sensitive_to_every_part() {
        let k = vec!["1".to_string()];
        let a = insert_id(1, "contacts", &k, "2024-01-01", "{}");
        assert_eq!(a, insert_id(1, "contacts", &k, "2024-01-01", "{}"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, insert_id(2, "contacts", &k, "2024-01-01", "{}"));
        assert_ne!(a, insert_id(1, "messages", &k, "2024-01-01", "{}"));
        assert_ne!(
            a,
            insert_id(1, "contacts", &["2".into()], "2024-01-01", "{}")
        );
        assert_ne!(a, insert_id(1, "contacts", &k, "2024-01-02", "{}"));
        assert_ne!(a, insert_id(1, "contacts", &k, "2024-01-01", "{\"a\":1}"));
        assert_ne!(
            insert_id(1, "t", &["ab".into(), "c".into()], "x", "{}"),
            insert_id(1, "t", &["a".into(), "bc".into()], "x", "{}")
        );
    }
}
