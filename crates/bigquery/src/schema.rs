//! Schema sync: create the table, add columns that appeared in Postgres, keep the views right.

use crate::client::BigQuery;
use crate::error::BqError;
use serde_json::Value;
use tenantsync_core::mapping::{metadata_fields, BqField, BqType, FieldMode};

/// The full BigQuery schema of a synced table: source columns, then metadata columns.
pub fn table_fields(source: &[BqField]) -> Vec<BqField> {
    let mut f = source.to_vec();
    f.extend(metadata_fields());
    f
}

/// The dataset's list of committed batches: a row's `_batch_id` must be listed here for the
/// views to show it, so a slice that wrote half its chunks and then died stays invisible.
/// The name is reserved in `tenantsync_core::names`, so no source table can take it.
pub const BATCHES_TABLE: &str = tenantsync_core::names::BATCHES_TABLE;

pub fn batches_fields() -> Vec<BqField> {
    let f = |name: &str, t, mode| BqField {
        name: name.to_string(),
        field_type: t,
        mode,
    };
    vec![
        f("batch_id", BqType::String, FieldMode::Required),
        f("table_name", BqType::String, FieldMode::Required),
        f("committed_at", BqType::Timestamp, FieldMode::Required),
        f("rows", BqType::Int64, FieldMode::Nullable),
    ]
}

/// The versions of committed batches, as a subquery: insertAll batches once listed in
/// `_sync_batches`, Storage Write batches (ids starting with
/// [`tenantsync_core::names::STORAGE_BATCH_PREFIX`]) as they are: their rows exist only once
/// their pending stream was committed.
fn committed(client: &BigQuery, table: &str) -> String {
    format!(
        "(SELECT * FROM {} WHERE _batch_id IN (SELECT batch_id FROM {}) OR _batch_id LIKE '{}%')",
        client.qualified(table),
        client.qualified(BATCHES_TABLE),
        tenantsync_core::names::STORAGE_BATCH_PREFIX
    )
}

/// `<table>_latest`: one row per key, the newest committed version, deletes removed. Ordering
/// ties on `_source_ts` (two versions with the same cursor value) are broken by sync time, then
/// id, so the choice is deterministic.
pub fn latest_view_sql(client: &BigQuery, table: &str, keys: &[String]) -> String {
    let keys = keys
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT * EXCEPT(_rn) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {keys} \
         ORDER BY _source_ts DESC, _synced_at DESC, _version_id DESC) AS _rn FROM {}) \
         WHERE _rn = 1 AND _op != 'delete'",
        committed(client, table)
    )
}

/// Compaction (latest mode): delete every version that is not its key's newest and was
/// synced more than `window_s` seconds ago. The window keeps DML away from rows that may still
/// sit in the streaming buffer (BigQuery refuses to modify those) and leaves recent history for
/// readers who look at versions. The order matches `latest_view_sql`, so the view's answer
/// never changes.
///
/// `_version_id` is not unique in the table: a slice re-sent after BigQuery's insertId window
/// (a worker killed after its rows landed) stores a second copy of the same versions. So what
/// is kept is named, not what is deleted: every row whose `_version_id` is some key's newest
/// committed version survives, all its copies included (the view shows one). Deleting "the
/// ids ranked below 1" instead deleted both copies of a doubled newest version, and the key
/// with them (issue 13).
pub fn compact_sql(client: &BigQuery, table: &str, keys: &[String], window_s: u64) -> String {
    let keys = keys
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let t = client.qualified(table);
    // Ranked among committed versions only, like the view. Versions of insertAll batches never
    // listed are deleted too once old: a later slice sent their rows again. Storage Write
    // batches are never listed and are committed by being there at all.
    format!(
        "DELETE FROM {t} \
         WHERE _synced_at < TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL {window_s} SECOND) \
         AND ((_batch_id NOT IN (SELECT batch_id FROM {b}) AND _batch_id NOT LIKE '{w}%') \
              OR _version_id NOT IN (SELECT _version_id FROM (SELECT _version_id, ROW_NUMBER() OVER \
                 (PARTITION BY {keys} ORDER BY _source_ts DESC, _synced_at DESC, _version_id DESC) \
                 AS _rn FROM {c}) WHERE _rn = 1))",
        b = client.qualified(BATCHES_TABLE),
        w = tenantsync_core::names::STORAGE_BATCH_PREFIX,
        c = committed(client, table),
    )
}

/// `<table>_final` (merge mode): one full row per key, the source columns plus the newest
/// merged version's `_source_ts` and when the MERGE last wrote it.
pub fn final_fields(source: &[BqField]) -> Vec<BqField> {
    let mut f = source.to_vec();
    for name in ["_source_ts", "_merged_at"] {
        f.push(BqField {
            name: name.to_string(),
            field_type: BqType::Timestamp,
            mode: FieldMode::Required,
        });
    }
    f
}

/// Merge mode: rebuild `<table>_final` from the partial versions of committed batches. Per
/// key, each column takes its newest non-NULL value (FIRST_VALUE … IGNORE NULLS) among the
/// versions since the key's last insert or delete, so a re-inserted row does not inherit
/// values from before its delete; the newest version's `_op` decides whether the key exists.
/// Every key is recomputed from all its versions on each run, so the result does not depend
/// on which batches earlier runs saw (a batch listed late is merged correctly). A column set
/// to NULL in an update cannot be told from an unchanged one: it keeps its last value.
pub fn merge_sql(client: &BigQuery, table: &str, keys: &[String], source: &[BqField]) -> String {
    let q = |c: &str| format!("`{c}`");
    let key_list = keys.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ");
    let order = "_source_ts DESC, _synced_at DESC, _version_id DESC";
    let values: Vec<&BqField> = source.iter().filter(|f| !keys.contains(&f.name)).collect();
    let firsts: Vec<String> = values
        .iter()
        .map(|f| {
            format!(
                "FIRST_VALUE({c} IGNORE NULLS) OVER w AS {c}",
                c = q(&f.name)
            )
        })
        .collect();
    let on: Vec<String> = keys
        .iter()
        .map(|k| format!("F.{c} = S.{c}", c = q(k)))
        .collect();
    let set: Vec<String> = values
        .iter()
        .map(|f| format!("{c} = S.{c}", c = q(&f.name)))
        .chain([
            "_source_ts = S._source_ts".into(),
            "_merged_at = CURRENT_TIMESTAMP()".into(),
        ])
        .collect();
    let cols: Vec<String> = source.iter().map(|f| q(&f.name)).collect();
    let s_cols: Vec<String> = source.iter().map(|f| format!("S.{}", q(&f.name))).collect();
    let firsts = if firsts.is_empty() {
        String::new()
    } else {
        format!("{}, ", firsts.join(", "))
    };
    format!(
        "MERGE {final_t} F USING (\
           SELECT * EXCEPT(_rn) FROM (\
             SELECT {key_list}, {firsts}FIRST_VALUE(_op) OVER w AS _op, \
                    FIRST_VALUE(_source_ts) OVER w AS _source_ts, \
                    ROW_NUMBER() OVER (PARTITION BY {key_list} ORDER BY {order}) AS _rn \
             FROM (SELECT v.*, MAX(IF(_op IN ('insert', 'delete'), _source_ts, NULL)) \
                          OVER (PARTITION BY {key_list}) AS _reset FROM {committed} v) \
             WHERE _reset IS NULL OR _source_ts >= _reset \
             WINDOW w AS (PARTITION BY {key_list} ORDER BY {order} \
                          ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) \
           WHERE _rn = 1) S \
         ON {on} \
         WHEN MATCHED AND S._op = 'delete' THEN DELETE \
         WHEN MATCHED THEN UPDATE SET {set} \
         WHEN NOT MATCHED AND S._op != 'delete' THEN \
           INSERT ({cols}, _source_ts, _merged_at) VALUES ({s_cols}, S._source_ts, CURRENT_TIMESTAMP())",
        final_t = client.qualified(&format!("{table}_final")),
        committed = committed(client, table),
        on = on.join(" AND "),
        set = set.join(", "),
        cols = cols.join(", "),
        s_cols = s_cols.join(", "),
    )
}

/// What `sync_table` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaChange {
    Unchanged,
    Created,
    /// Columns added (and possibly others widened).
    Added(Vec<String>),
    /// Columns whose type was widened in place, none added.
    Widened(Vec<String>),
}

/// Whether BigQuery changes a column of type `from` to `to` in place, keeping its values
/// (`ALTER COLUMN … SET DATA TYPE`'s coercions): INT64 to NUMERIC, BIGNUMERIC or FLOAT64, and
/// NUMERIC to BIGNUMERIC or FLOAT64. What Postgres widens within one BigQuery type (int to
/// bigint, varchar(20) to text, numeric(10,2) to numeric(12,2), a NOT NULL dropped: every
/// source column is NULLABLE) needs no change at all.
pub fn widens(from: BqType, to: BqType) -> bool {
    use BqType::{BigNumeric, Float64, Int64, Numeric};
    matches!(
        (from, to),
        (Int64, Numeric | BigNumeric | Float64) | (Numeric, BigNumeric | Float64)
    )
}

fn field_type(v: &Value) -> Option<BqType> {
    v["type"].as_str().and_then(BqType::parse)
}

/// Make the BigQuery table match the source: create it, or add missing columns. A column whose
/// type changed incompatibly is an error naming it; nothing is changed in that case.
pub async fn sync_table(
    client: &BigQuery,
    table: &str,
    source: &[BqField],
) -> Result<SchemaChange, BqError> {
    sync_fields(client, table, table_fields(source)).await
}

/// [`sync_table`] for any wanted schema (`<table>_final` too).
pub async fn sync_fields(
    client: &BigQuery,
    table: &str,
    wanted: Vec<BqField>,
) -> Result<SchemaChange, BqError> {
    sync_fields_with(client, table, wanted, &serde_json::Value::Null).await
}

/// [`sync_fields`], creating the table with `extra` members of its resource (a CDC table's
/// primary key and `maxStaleness`; an existing table keeps what it has).
pub async fn sync_fields_with(
    client: &BigQuery,
    table: &str,
    wanted: Vec<BqField>,
    extra: &serde_json::Value,
) -> Result<SchemaChange, BqError> {
    // Create first: for a new table that is one call instead of two.
    if client.create_table_with(table, &wanted, extra).await? {
        return Ok(SchemaChange::Created);
    }
    let Some(existing) = client.table_schema(table).await? else {
        return Err(BqError::Transient(format!(
            "table {table} exists but cannot be read"
        )));
    };
    let mut fields = existing.clone();
    let mut added = Vec::new();
    let mut widened = Vec::new();
    for w in &wanted {
        match existing
            .iter()
            .position(|e| e["name"].as_str() == Some(w.name.as_str()))
        {
            Some(i) => {
                let e = &existing[i];
                let repeated = e["mode"].as_str() == Some("REPEATED");
                let have = field_type(e);
                if !repeated
                    && w.mode != FieldMode::Repeated
                    && have.is_some_and(|h| widens(h, w.field_type))
                {
                    fields[i]["type"] = serde_json::json!(w.field_type.as_str());
                    widened.push(w);
                } else if have != Some(w.field_type) || repeated != (w.mode == FieldMode::Repeated)
                {
                    return Err(BqError::SchemaIncompatible(format!(
                        "column {:?} is {}{} in BigQuery table {table} but the source now maps it to {}{}",
                        w.name,
                        if repeated { "REPEATED " } else { "" },
                        e["type"].as_str().unwrap_or("?"),
                        if w.mode == FieldMode::Repeated { "REPEATED " } else { "" },
                        w.field_type.as_str()
                    )));
                }
            }
            None => {
                // New columns are always NULLABLE (or REPEATED): old rows have no value.
                let mut f = w.clone();
                if f.mode == FieldMode::Required {
                    f.mode = FieldMode::Nullable;
                }
                fields.push(serde_json::to_value(&f).expect("field serializes"));
                added.push(w.name.clone());
            }
        }
    }
    // Widened first: the patch below sends the new types, which only matches once they are.
    for w in &widened {
        let ddl = format!(
            "ALTER TABLE {} ALTER COLUMN `{}` SET DATA TYPE {}",
            client.qualified(table),
            w.name,
            w.field_type.as_str()
        );
        // A refusal stops the table like any incompatible change (the local BigQuery refuses
        // NUMERIC to BIGNUMERIC, which BigQuery allows); anything else is retried as it is.
        client.query(&ddl).await.map_err(|e| match e {
            BqError::Invalid(m) => BqError::SchemaIncompatible(format!(
                "column {:?} of BigQuery table {table} could not be widened to {}: {m}",
                w.name,
                w.field_type.as_str()
            )),
            other => other,
        })?;
    }
    let widened: Vec<String> = widened.into_iter().map(|w| w.name.clone()).collect();
    if added.is_empty() {
        return Ok(match widened.is_empty() {
            true => SchemaChange::Unchanged,
            false => SchemaChange::Widened(widened),
        });
    }
    client.patch_schema(table, &fields).await?;
    Ok(SchemaChange::Added(added))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bigquerys_coercions_widen() {
        use BqType::*;
        for (from, to) in [
            (Int64, Numeric),
            (Int64, BigNumeric),
            (Int64, Float64),
            (Numeric, BigNumeric),
            (Numeric, Float64),
        ] {
            assert!(widens(from, to), "{from:?} -> {to:?}");
        }
        for (from, to) in [
            (Numeric, Int64),
            (Float64, Numeric),
            (BigNumeric, Numeric),
            (String, Int64),
            (Int64, String),
            (Date, Timestamp),
            (DateTime, Timestamp),
            (Int64, Int64),
        ] {
            assert!(!widens(from, to), "{from:?} -> {to:?}");
        }
    }
}
