//! A row as the sink takes it: `{"insertId":…,"json":{…}}`, with the metadata columns.

use tenantsync_core::insert_id::insert_id;
use tenantsync_store::SourceRow;

/// `{"insertId":…,"json":{<row>,"_synced_at":…,"_batch_id":…,"_version_id":…}}`, spliced
/// from the row's JSON object without parsing it.
pub(crate) fn payload(
    tenant_id: i64,
    table: &str,
    r: &SourceRow,
    batch_id: &str,
    synced_at: &str,
) -> String {
    payload_from(tenant_id, table, r, r.json.clone(), batch_id, synced_at)
}

/// [`payload`] built in the buffer of `json` (the row's JSON, `r.json` taken out of the row):
/// the reader leaves room for the metadata, so a row costs no second allocation (the
/// `insertId` prefix is inserted in place, which moves the row's bytes once).
pub(super) fn payload_from(
    tenant_id: i64,
    table: &str,
    r: &SourceRow,
    mut json: String,
    batch_id: &str,
    synced_at: &str,
) -> String {
    let id = insert_id(tenant_id, table, &r.key, &r.cursor, &json);
    json.truncate(json.trim_end().len());
    if json.ends_with('}') {
        json.pop();
    }
    json.reserve(100 + 2 * id.len() + synced_at.len() + batch_id.len());
    json.insert_str(0, &["{\"insertId\":\"", &id, "\",\"json\":"].concat());
    json.push_str(",\"_synced_at\":\"");
    json.push_str(synced_at);
    json.push_str("\",\"_batch_id\":\"");
    json.push_str(batch_id);
    json.push_str("\",\"_version_id\":\"");
    json.push_str(&id);
    json.push_str("\"}}");
    json
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn payload_is_valid_json_with_metadata() {
        let r = SourceRow {
            key: vec!["7".into()],
            cursor: "2024-01-01 00:00:00+00".into(),
            cursor_ts: Utc::now(),
            tenant: Some("1".into()),
            json: r#"{"id":"7","name":"a}b","_op":"insert","_source_ts":"2024-01-01T00:00:00.000000Z"}"#.into(),
            seq: None,
        };
        let p = payload(1, "contacts", &r, "1-2-3", "2024-01-01T00:00:01.000000Z");
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["json"]["name"], "a}b");
        assert_eq!(v["json"]["_batch_id"], "1-2-3");
        assert_eq!(v["insertId"], v["json"]["_version_id"]);
        assert_eq!(v["insertId"].as_str().unwrap().len(), 32);
    }
}
