//! A row as the sink takes it, with the metadata columns: `{"insertId":…,"json":{…}}`, or
//! the row's protobuf message (Storage Write API tables, see [`tenantsync_core::proto`]).

use std::sync::Arc;
use tenantsync_core::cdc::{self, ChangeType};
use tenantsync_core::hashing::ColumnHasher;
use tenantsync_core::insert_id::insert_id;
use tenantsync_core::proto::{self, ProtoSchema};
use tenantsync_core::Payload;
use tenantsync_store::SourceRow;

/// CDC mode's pseudo-columns of a row: `_CHANGE_TYPE` from its op (a changelog delete, a
/// soft-deleted row or the old key of a key change is `DELETE`, anything else `UPSERT`), and
/// `_CHANGE_SEQUENCE_NUMBER` from its version (see [`cdc::version_sections`]).
pub(crate) fn cdc_columns(r: &SourceRow) -> (ChangeType, String) {
    let op = ChangeType::from_op(&r.op);
    let seq = r.seq.as_deref().and_then(|s| s.parse::<i64>().ok());
    let sections = cdc::version_sections(r.cursor_ts.timestamp_micros(), seq);
    (op, cdc::sequence_number(&sections))
}

/// What the rows of one slice share in their metadata columns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowMeta<'a> {
    pub(crate) tenant_id: i64,
    pub(crate) table: &'a str,
    pub(crate) batch_id: &'a str,
    /// `_synced_at`, as text (JSON) and in microseconds (messages).
    pub(crate) synced_at: &'a str,
    pub(crate) synced_at_us: i64,
    pub(crate) cdc: bool,
    /// Hashed columns (`--hash-column`): their values are replaced before anything is built
    /// from the row (its version id included), so no plain value leaves the worker.
    pub(crate) hasher: Option<&'a ColumnHasher>,
}

/// The row as its sink takes it: its message with the metadata fields appended when the
/// reader encoded one, its JSON otherwise. The row's JSON or message is moved out of it.
pub(crate) fn row_payload(
    m: &RowMeta<'_>,
    r: &mut SourceRow,
    schema: Option<&Arc<ProtoSchema>>,
) -> Payload {
    match (r.proto.take(), schema) {
        (Some(bytes), Some(schema)) => message_payload(m, r, bytes, schema),
        _ => {
            let mut json = std::mem::take(&mut r.json);
            if let Some(h) = m.hasher {
                json = h.apply(&json);
            }
            Payload::Json(payload_from(
                m.tenant_id,
                m.table,
                r,
                json,
                m.batch_id,
                m.synced_at,
                m.cdc,
            ))
        }
    }
}

/// The metadata fields appended to the row's message (protobuf fields may come in any order).
/// The version id hashes the message as the JSON path hashes the JSON.
fn message_payload(
    m: &RowMeta<'_>,
    r: &SourceRow,
    mut bytes: Vec<u8>,
    schema: &Arc<ProtoSchema>,
) -> Payload {
    let id = insert_id(m.tenant_id, m.table, &r.key, &r.cursor, &bytes);
    let tags = schema.meta_tags();
    bytes.reserve(64 + m.batch_id.len());
    proto::encode_micros(tags.synced_at, m.synced_at_us, &mut bytes);
    proto::encode_str(tags.batch_id, m.batch_id, &mut bytes);
    proto::encode_str(tags.version_id, &id, &mut bytes);
    if let (Some(change_type), Some(seq_tag)) = (tags.change_type, tags.change_sequence_number) {
        let (op, seq) = cdc_columns(r);
        proto::encode_str(change_type, op.as_str(), &mut bytes);
        proto::encode_str(seq_tag, &seq, &mut bytes);
    }
    Payload::Proto {
        bytes,
        schema: schema.clone(),
    }
}

/// `{"insertId":…,"json":{<row>,"_synced_at":…,"_batch_id":…,"_version_id":…}}`, spliced
/// from the row's JSON object without parsing it (hashed columns replaced first).
pub(crate) fn payload(
    tenant_id: i64,
    table: &str,
    r: &SourceRow,
    batch_id: &str,
    synced_at: &str,
    hasher: Option<&ColumnHasher>,
) -> String {
    payload_from(
        tenant_id,
        table,
        r,
        hasher.map_or_else(|| r.json.clone(), |h| h.apply(&r.json)),
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
    let change = cdc.then(|| cdc_columns(r));
    json.truncate(json.trim_end().len());
    if json.ends_with('}') {
        json.pop();
    }
    json.reserve(100 + 2 * id.len() + synced_at.len() + batch_id.len());
    // The insertId names the batch too: BigQuery drops a repeated request of this slice, but
    // not the next slice's resend of a row a dead slice already wrote. That resend must land:
    // the dead slice's batch is never listed, so its copy never shows.
    json.insert_str(
        0,
        &["{\"insertId\":\"", &id, "-", batch_id, "\",\"json\":"].concat(),
    );
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
            proto: None,
            op: "insert".into(),
            seq: None,
        };
        let p = payload(
            1,
            "contacts",
            &r,
            "1-2-3",
            "2024-01-01T00:00:01.000000Z",
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["json"]["name"], "a}b");
        assert_eq!(v["json"]["_batch_id"], "1-2-3");
        assert_eq!(
            v["insertId"].as_str().unwrap(),
            format!(
                "{}-{}",
                v["json"]["_version_id"].as_str().unwrap(),
                v["json"]["_batch_id"].as_str().unwrap()
            )
        );
        assert_eq!(v["json"]["_version_id"].as_str().unwrap().len(), 32);
        assert!(v["json"].get("_CHANGE_TYPE").is_none());
    }

    fn row(op: &str, ts: &str, seq: Option<&str>) -> SourceRow {
        SourceRow {
            key: vec!["7".into()],
            cursor: "c".into(),
            cursor_ts: ts.parse().unwrap(),
            tenant: Some("1".into()),
            json: format!(r#"{{"id":"7","note":"_op:delete","_op":"{op}"}}"#),
            proto: None,
            op: op.into(),
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
        let a = cdc_columns(&row("update", at, None)).1;
        let later = "2024-01-01T00:00:00.000001Z";
        let b = cdc_columns(&row("update", later, None)).1;
        assert_eq!(
            tenantsync_core::cdc::compare_sequence_numbers(&a, &b),
            Some(std::cmp::Ordering::Less)
        );
        // Changelog: at one change time, seq decides.
        let c1 = cdc_columns(&row("update", at, Some("9"))).1;
        let c2 = cdc_columns(&row("delete", at, Some("10"))).1;
        assert_eq!(
            tenantsync_core::cdc::compare_sequence_numbers(&c1, &c2),
            Some(std::cmp::Ordering::Less)
        );
    }

    /// A message row gets the metadata the JSON path gives it, read back field for field.
    #[test]
    fn message_rows_carry_the_metadata_of_json_rows() {
        use tenantsync_core::mapping::{BqField, BqType, FieldMode};
        let fields = [BqField {
            name: "id".into(),
            field_type: BqType::Int64,
            mode: FieldMode::Nullable,
        }];
        for cdc in [false, true] {
            let schema = Arc::new(ProtoSchema::new(&fields, cdc));
            let mut msg = Vec::new();
            proto::encode_micros(schema.source_tag(0), 7, &mut msg); // an INT64 is a varint too
            let tags = schema.meta_tags();
            proto::encode_str(tags.op, "delete", &mut msg);
            let mut r = row("delete", "2024-01-01T00:00:00Z", Some("42"));
            r.proto = Some(msg);
            let m = RowMeta {
                tenant_id: 1,
                table: "t",
                batch_id: "w1-2-3",
                synced_at: "2024-01-01T00:00:01.000000Z",
                synced_at_us: 1_704_067_201_000_000,
                cdc,
                hasher: None,
            };
            let p = row_payload(&m, &mut r, Some(&schema));
            assert!(r.proto.is_none(), "the message moves into the payload");
            let v: serde_json::Value = serde_json::from_str(&p.json().unwrap()).unwrap();
            let want = payload_from(1, "t", &r, r.json.clone(), m.batch_id, m.synced_at, cdc);
            let want: serde_json::Value = serde_json::from_str(&want).unwrap();
            for k in [
                "_op",
                "_batch_id",
                "_synced_at",
                "_CHANGE_TYPE",
                "_CHANGE_SEQUENCE_NUMBER",
            ] {
                assert_eq!(v["json"][k], want["json"][k], "{k} (cdc {cdc})");
            }
            assert_eq!(v["json"]["id"], "7");
            // A message read back as JSON (for insertAll) uses its version id as insertId.
            assert_eq!(v["insertId"], v["json"]["_version_id"]);
            assert_eq!(v["json"]["_version_id"].as_str().unwrap().len(), 32);
        }
        // Without a layout (the plan had none) the row goes as JSON.
        let mut r = row("insert", "2024-01-01T00:00:00Z", None);
        let m = RowMeta {
            tenant_id: 1,
            table: "t",
            batch_id: "b",
            synced_at: "2024-01-01T00:00:00Z",
            synced_at_us: 0,
            cdc: false,
            hasher: None,
        };
        assert!(matches!(row_payload(&m, &mut r, None), Payload::Json(_)));
    }
}
