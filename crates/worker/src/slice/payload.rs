//! A row as the sink takes it: `{"insertId":…,"json":{…}}`, with the metadata columns.

use tenantsync_core::cdc::{self, ChangeType};
use tenantsync_core::insert_id::insert_id;
use tenantsync_store::SourceRow;

/// The row's `_op` metadata column, read from its JSON (every other field skipped).
#[derive(serde::Deserialize)]
struct Op<'a> {
    #[serde(rename = "_op", borrow, default)]
    op: Option<std::borrow::Cow<'a, str>>,
}

/// CDC mode's pseudo-columns of a row: `_CHANGE_TYPE` from its `_op` (a changelog delete, a
/// soft-deleted row or the old key of a key change is `DELETE`, anything else `UPSERT`), and
/// `_CHANGE_SEQUENCE_NUMBER` from its version (see [`cdc::version_sections`]).
pub(crate) fn cdc_columns(r: &SourceRow, json: &str) -> (ChangeType, String) {
    let op = serde_json::from_str::<Op<'_>>(json)
        .ok()
        .and_then(|o| o.op)
        .map_or(ChangeType::Upsert, |o| ChangeType::from_op(&o));
    let seq = r.seq.as_deref().and_then(|s| s.parse::<i64>().ok());
    let sections = cdc::version_sections(r.cursor_ts.timestamp_micros(), seq);
    (op, cdc::sequence_number(&sections))
}

/// `{"insertId":…,"json":{<row>,"_synced_at":…,"_batch_id":…,"_version_id":…}}`, spliced
/// from the row's JSON object without parsing it.
pub(crate) fn payload(
    tenant_id: i64,
    table: &str,
    r: &SourceRow,
    batch_id: &str,
    synced_at: &str,
) -> String {
    payload_from(
        tenant_id,
        table,
        r,
        r.json.clone(),
        batch_id,
        synced_at,
        false,
    )
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
    cdc: bool,
) -> String {
    let id = insert_id(tenant_id, table, &r.key, &r.cursor, &json);
    let change = cdc.then(|| cdc_columns(r, &json));
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
    if let Some((change_type, seq)) = change {
        json.push_str("\",\"");
        json.push_str(cdc::CHANGE_TYPE);
        json.push_str("\":\"");
        json.push_str(change_type.as_str());
        json.push_str("\",\"");
        json.push_str(cdc::CHANGE_SEQUENCE_NUMBER);
        json.push_str("\":\"");
        json.push_str(&seq);
    }
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
        assert!(v["json"].get("_CHANGE_TYPE").is_none());
    }

    fn row(op: &str, ts: &str, seq: Option<&str>) -> SourceRow {
        SourceRow {
            key: vec!["7".into()],
            cursor: "c".into(),
            cursor_ts: ts.parse().unwrap(),
            tenant: Some("1".into()),
            json: format!(r#"{{"id":"7","note":"_op:delete","_op":"{op}"}}"#),
            seq: seq.map(str::to_string),
        }
    }

    #[test]
    fn cdc_rows_carry_change_type_and_sequence_number() {
        let at = "2024-01-01T00:00:00Z";
        for (op, want) in [
            ("insert", "UPSERT"),
            ("update", "UPSERT"),
            ("delete", "DELETE"),
        ] {
            let r = row(op, at, Some("42"));
            let p = payload_from(1, "t", &r, r.json.clone(), "b", at, true);
            let v: serde_json::Value = serde_json::from_str(&p).unwrap();
            assert_eq!(v["json"]["_CHANGE_TYPE"], want, "{op}");
            let micros = 1_704_067_200_000_000i64;
            assert_eq!(
                v["json"]["_CHANGE_SEQUENCE_NUMBER"],
                format!("{:X}/{:X}", (micros as u64) ^ (1 << 63), 42u64 ^ (1 << 63))
            );
        }
        // Cursor capture: no seq; a later cursor time is a later version.
        let a = cdc_columns(&row("update", at, None), &row("update", at, None).json).1;
        let later = "2024-01-01T00:00:00.000001Z";
        let b = cdc_columns(
            &row("update", later, None),
            &row("update", later, None).json,
        )
        .1;
        assert_eq!(
            tenantsync_core::cdc::compare_sequence_numbers(&a, &b),
            Some(std::cmp::Ordering::Less)
        );
        // Changelog: at one change time, seq decides.
        let c1 = cdc_columns(&row("update", at, Some("9")), &row("update", at, None).json).1;
        let c2 = cdc_columns(
            &row("delete", at, Some("10")),
            &row("delete", at, None).json,
        )
        .1;
        assert_eq!(
            tenantsync_core::cdc::compare_sequence_numbers(&c1, &c2),
            Some(std::cmp::Ordering::Less)
        );
    }
}
