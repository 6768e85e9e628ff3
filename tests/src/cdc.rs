//! BigQuery's CDC rules applied to the rows a worker sent: a stand-in for what BigQuery does
//! with a CDC table's default-stream rows, which the local BigQuery does not implement (it
//! rejects `_CHANGE_TYPE` as an unknown field). This is the one mocked part of the CDC tests;
//! the rows it applies are the exact protobuf rows the worker appended, decoded by the
//! recording proxy (`grpc_faults.rs`).
//!
//! The documented rules (Storage Write API, "Stream table updates with change data capture"):
//! per primary key, the row with the greatest `_CHANGE_SEQUENCE_NUMBER` (sections compared as
//! hex numbers, one by one) wins; a winning `DELETE` removes the key, a winning `UPSERT` is
//! the row. Rows of equal sequence number for one key are the same version sent twice (a
//! repeated append); if two such rows differed, the result would be undefined in BigQuery, so
//! they are reported as conflicts.

use crate::grpc_faults::RecordedAppend;
use serde_json::{Map, Value};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use tenantsync_core::cdc::{
    compare_sequence_numbers, ChangeType, CHANGE_SEQUENCE_NUMBER, CHANGE_TYPE,
};

/// Columns that differ between two sends of one version (the batch and time of the send).
const PER_SEND: [&str; 2] = ["_synced_at", "_batch_id"];

pub type Row = Map<String, Value>;

/// The table state BigQuery would hold per dataset (from the stream path), by key (the key
/// columns' values as text).
#[derive(Debug, Default)]
pub struct Applied {
    pub tables: BTreeMap<String, BTreeMap<Vec<String>, Row>>,
    /// Rows applied, and rows that repeated a version already seen.
    pub rows: usize,
    pub repeats: usize,
    pub deletes: usize,
    /// Same key and sequence number, different content or change type.
    pub conflicts: Vec<String>,
}

/// `projects/P/datasets/D/tables/T/streams/S` → `D`.
pub fn dataset_of(stream: &str) -> String {
    let parts: Vec<&str> = stream.split('/').collect();
    parts
        .iter()
        .position(|p| *p == "datasets")
        .and_then(|i| parts.get(i + 1))
        .expect("a stream path names its dataset")
        .to_string()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn content(r: &Row) -> Row {
    r.iter()
        .filter(|(k, _)| !PER_SEND.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Apply `appends` (in any order: the result does not depend on it) with BigQuery's rules.
/// Panics on a row that lacks a change type or sequence number in BigQuery's format: the
/// worker must always send both.
pub fn apply(appends: &[RecordedAppend], keys: &[&str]) -> Applied {
    let mut out = Applied::default();
    // Per dataset and key: the winning row so far, with its sequence number.
    let mut best: BTreeMap<String, BTreeMap<Vec<String>, (String, Row)>> = BTreeMap::new();
    for a in appends {
        let ds = dataset_of(&a.stream);
        for r in &a.rows {
            out.rows += 1;
            let change = r
                .get(CHANGE_TYPE)
                .and_then(Value::as_str)
                .and_then(ChangeType::parse)
                .unwrap_or_else(|| panic!("row without a valid {CHANGE_TYPE}: {r:?}"));
            if change == ChangeType::Delete {
                out.deletes += 1;
            }
            let seq = r
                .get(CHANGE_SEQUENCE_NUMBER)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("row without {CHANGE_SEQUENCE_NUMBER}: {r:?}"))
                .to_string();
            let key: Vec<String> = keys
                .iter()
                .map(|k| text(r.get(*k).unwrap_or(&Value::Null)))
                .collect();
            let slot = best.entry(ds.clone()).or_default();
            match slot.get(&key) {
                None => {
                    slot.insert(key, (seq, r.clone()));
                }
                Some((old, old_row)) => {
                    match compare_sequence_numbers(&seq, old)
                        .unwrap_or_else(|| panic!("bad sequence number {seq:?} or {old:?}"))
                    {
                        Ordering::Greater => {
                            slot.insert(key, (seq, r.clone()));
                        }
                        Ordering::Less => {}
                        Ordering::Equal => {
                            out.repeats += 1;
                            if content(old_row) != content(r) {
                                out.conflicts.push(format!(
                                    "{ds} key {key:?} seq {seq}: {old_row:?} vs {r:?}"
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    for (ds, rows) in best {
        let table = out.tables.entry(ds).or_default();
        for (key, (_, row)) in rows {
            if row.get(CHANGE_TYPE).and_then(Value::as_str) == Some("UPSERT") {
                table.insert(key, row);
            }
        }
    }
    out
}

/// `(id, v)` of every row of one dataset's applied table, as `pg_pairs` has Postgres'.
pub fn pairs(applied: &Applied, dataset: &str) -> BTreeMap<i64, i64> {
    let num = |v: Option<&Value>| -> i64 {
        let v = v.unwrap_or(&Value::Null);
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(i64::MIN)
    };
    applied
        .tables
        .get(dataset)
        .map(|t| {
            t.values()
                .map(|r| (num(r.get("id")), num(r.get("v"))))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn append(rows: Value) -> RecordedAppend {
        RecordedAppend {
            stream: "projects/p/datasets/d1/tables/items/streams/_default".into(),
            rows: rows
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_object().unwrap().clone())
                .collect(),
        }
    }

    #[test]
    fn greatest_sequence_number_wins_and_delete_removes() {
        let a = append(json!([
            {"id": "1", "v": "3", "_CHANGE_TYPE": "UPSERT", "_CHANGE_SEQUENCE_NUMBER": "10/0"},
            {"id": "1", "v": "2", "_CHANGE_TYPE": "UPSERT", "_CHANGE_SEQUENCE_NUMBER": "A/5"},
            {"id": "2", "v": "1", "_CHANGE_TYPE": "UPSERT", "_CHANGE_SEQUENCE_NUMBER": "1/0"},
            {"id": "2", "_CHANGE_TYPE": "DELETE", "_CHANGE_SEQUENCE_NUMBER": "1/1"},
            {"id": "3", "_CHANGE_TYPE": "DELETE", "_CHANGE_SEQUENCE_NUMBER": "1/0"},
            {"id": "3", "v": "7", "_CHANGE_TYPE": "UPSERT", "_CHANGE_SEQUENCE_NUMBER": "1/1"},
            {"id": "3", "v": "7", "_CHANGE_TYPE": "UPSERT", "_CHANGE_SEQUENCE_NUMBER": "1/1",
             "_batch_id": "again"},
        ]));
        let applied = apply(&[a], &["id"]);
        assert_eq!(
            pairs(&applied, "d1"),
            BTreeMap::from([(1, 3), (3, 7)]),
            "0x10 > 0xA; the delete of 2 is newer; 3 came back"
        );
        assert_eq!((applied.repeats, applied.conflicts.len()), (1, 0));
    }
}
