//! Every column name the generated SQL introduces (`… AS _name`) is reserved in
//! `tenantsync_core::names`, so `tables add` refuses a source column that would meet it
//! (a source `_rn` once vanished from `<table>_latest` through `SELECT * EXCEPT(_rn)`).

use std::time::Duration;
use tenantsync_bigquery::final_merge::{final_merge_sql, fold_in_sql, refold_sql};
use tenantsync_bigquery::schema::{compact_sql, current_merge_sql, final_fields, latest_view_sql};
use tenantsync_bigquery::{BigQuery, Credentials, Endpoint};
use tenantsync_core::mapping::{BqField, BqType, FieldMode};
use tenantsync_core::names::{HELPER_COLUMNS, METADATA_COLUMNS};

/// The names after `AS` that start with `_` (aliases of columns; table aliases here are
/// single letters).
fn introduced(sql: &str) -> Vec<String> {
    let words: Vec<&str> = sql
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|w| w[0].eq_ignore_ascii_case("AS") && w[1].starts_with('_'))
        .map(|w| w[1].trim_matches('`').to_string())
        .collect()
}

#[tokio::test]
async fn every_column_the_sql_introduces_is_reserved() {
    let client = BigQuery::new(
        &Endpoint::emulator("127.0.0.1:9"),
        "p",
        "d",
        &Credentials::Emulator,
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let keys = vec!["id".to_string()];
    let source = vec![BqField {
        name: "v".into(),
        field_type: BqType::String,
        mode: FieldMode::Nullable,
    }];
    let cols: Vec<String> = ["id", "v", "_op", "_source_ts", "_synced_at", "_batch_id"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    let now = chrono::Utc::now();
    let sql = [
        latest_view_sql(&client, "t", &keys, &cols, Some(now)),
        current_merge_sql(&client, "t", &keys, &cols, Some(now), None),
        compact_sql(&client, "t", 60, now),
        fold_in_sql(&client, "t", &keys, &cols, Some(now), now),
        refold_sql(&client, "t", &keys, &cols, None, now),
        final_merge_sql(&client, "t", &keys, &["v".to_string()], Some(now), now),
    ]
    .join("\n");
    let found = introduced(&sql);
    assert!(
        found.contains(&"_rn".to_string()),
        "the scan sees aliases: {found:?}"
    );
    for name in found {
        assert!(
            METADATA_COLUMNS.contains(&name.as_str()) || HELPER_COLUMNS.contains(&name.as_str()),
            "the SQL introduces column {name}, which tenantsync_core::names does not reserve"
        );
    }
    // `_final` adds columns of its own.
    for f in final_fields(&source).iter().skip(source.len()) {
        assert!(
            METADATA_COLUMNS.contains(&f.name.as_str())
                || HELPER_COLUMNS.contains(&f.name.as_str()),
            "_final adds column {}, which is not reserved",
            f.name
        );
    }
}
