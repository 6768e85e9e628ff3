//! Schema sync: create the table, add columns that appeared in Postgres, keep the views right.

use crate::client::BigQuery;
use crate::error::BqError;
use crate::listings::{committed_between, listed_before};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::time::Duration;
use tenantsync_core::mapping::{metadata_fields, BqField, BqType, FieldMode, META_SYNCED_AT};

/// The full BigQuery schema of a synced table: source columns, then metadata columns.
pub fn table_fields(source: &[BqField]) -> Vec<BqField> {
    let mut f = source.to_vec();
    f.extend(metadata_fields());
    f
}

/// How long after its rows were written (`_synced_at`, the slice's start) a batch may still
/// become visible: the slice's own length plus the settle window (listing, commit, retries;
/// `TENANTSYNC_SETTLE_S`).
/// A slice that takes longer is not committed and its rows are sent again (see
/// `tenantsync_worker`'s listing step), so no batch becomes visible later than this.
pub fn visible_within(settle: Duration, slice_max: Duration) -> Duration {
    settle + slice_max
}

/// The oldest `_synced_at` a view or the next merge must still read after a merge point:
/// `back` is [`visible_within`] plus an allowance for two workers' clocks disagreeing (one
/// stamps `_synced_at`, another takes the point). A version older than this was visible
/// (so merged into `<table>_current`) before the point, or is never going to be visible.
pub fn read_from(point: DateTime<Utc>, back: Duration) -> DateTime<Utc> {
    point - chrono::Duration::from_std(back).unwrap_or(chrono::Duration::MAX)
}

pub(crate) fn ts_literal(t: DateTime<Utc>) -> String {
    format!(
        "TIMESTAMP('{}')",
        t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

/// [`committed_between`] from `since` on, with no listing point (readers from a merge point).
fn committed(client: &BigQuery, table: &str, since: Option<DateTime<Utc>>) -> String {
    committed_between(client, table, since, None, None)
}

/// `<table>_current`'s name.
pub fn current_table(table: &str) -> String {
    format!("{table}{}", tenantsync_core::names::CURRENT_SUFFIX)
}

pub(crate) fn quoted(cols: &[String]) -> String {
    cols.iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The order of a key's versions, newest first: `_source_ts`, ties (two versions with one
/// cursor value) broken by sync time, then id, so the choice is deterministic.
pub(crate) const NEWEST_FIRST: &str = "_source_ts DESC, _synced_at DESC, _version_id DESC";

/// SQL for "row `a` is newer than row `b`" in [`NEWEST_FIRST`] order (table aliases).
pub(crate) fn newer(a: &str, b: &str) -> String {
    format!(
        "({a}._source_ts > {b}._source_ts OR ({a}._source_ts = {b}._source_ts AND \
         ({a}._synced_at > {b}._synced_at OR ({a}._synced_at = {b}._synced_at AND \
          {a}._version_id > {b}._version_id))))"
    )
}

/// The newest row per key of `from` (a table or subquery), in [`NEWEST_FIRST`] order.
pub(crate) fn newest_per_key(keys: &[String], from: &str) -> String {
    format!(
        "SELECT * EXCEPT(_rn) FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {keys} \
         ORDER BY {NEWEST_FIRST}) AS _rn FROM {from}) WHERE _rn = 1",
        keys = quoted(keys),
    )
}

/// `<table>_latest`: one row per key, the newest committed version, deletes removed. It reads
/// `<table>_current` (each key's newest version as of the last merge point) and the committed
/// versions synced since `since` (the point's [`read_from`]); without a point, every version.
/// `cols` is the versions table's column list (`<table>_current` has the same columns; named,
/// because the two may hold them in different orders).
pub fn latest_view_sql(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    cols: &[String],
    since: Option<DateTime<Utc>>,
) -> String {
    let list = quoted(cols);
    let both = format!(
        "(SELECT {list} FROM {current} UNION ALL SELECT {list} FROM {recent})",
        current = client.qualified(&current_table(table)),
        recent = committed(client, table, since),
    );
    format!("{} AND _op != 'delete'", newest_per_key(keys, &both))
}

/// `<table>_latest` before a table's first merge (or with `<table>_current` lost): the newest
/// committed version per key among all versions. Always correct, since compaction keeps every
/// key's current version and versions below the listing point `listed_before` count as
/// committed, but it reads the whole table; the first merge creates `<table>_current` and
/// narrows the view. Keeping `<table>_current` out of table creation keeps a new tenant's
/// first slices as cheap as before (one table creation, not two).
pub fn full_view_sql(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    listed_before: Option<DateTime<Utc>>,
) -> String {
    let all = committed_between(client, table, None, None, listed_before);
    format!("{} AND _op != 'delete'", newest_per_key(keys, &all))
}

/// Bring `<table>_current` up to a merge point: per key, the newest committed version synced
/// since `since` (the previous point's [`read_from`]; every version the first time) replaces
/// the stored row if it is newer in the views' order (`listed_before`: the listing point, for a
/// first merge reading every version). Deletes stay as rows (`_op = 'delete'`):
/// a version of the key that becomes visible later must still lose to them. Re-reading
/// versions merged before changes nothing, so overlapping runs (a stale worker's) are
/// harmless. Only `<table>_current` is written: versions in insertAll's streaming buffer are
/// read, never changed.
pub fn current_merge_sql(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    cols: &[String],
    since: Option<DateTime<Utc>>,
    listed_before: Option<DateTime<Utc>>,
) -> String {
    let on: Vec<String> = keys.iter().map(|k| format!("C.`{k}` = S.`{k}`")).collect();
    let set: Vec<String> = cols.iter().map(|c| format!("`{c}` = S.`{c}`")).collect();
    let values: Vec<String> = cols.iter().map(|c| format!("S.`{c}`")).collect();
    format!(
        "MERGE {current} C USING ({newest}) S \
         ON {on} \
         WHEN MATCHED AND {newer} THEN UPDATE SET {set} \
         WHEN NOT MATCHED THEN INSERT ({list}) VALUES ({values})",
        current = client.qualified(&current_table(table)),
        newest = newest_per_key(
            keys,
            &committed_between(client, table, since, None, listed_before)
        ),
        newer = newer("S", "C"),
        list = quoted(cols),
        on = on.join(" AND "),
        set = set.join(", "),
        values = values.join(", "),
    )
}

/// Compaction (latest mode): delete every version synced before `settled` (a merge point's
/// [`read_from`]: merged into `<table>_current` by then, or never to be visible) that is not
/// a key's current version, and that was synced more than `window_s` seconds ago. The window
/// keeps DML away from rows that may still sit in insertAll's streaming buffer (BigQuery
/// refuses to modify those) and leaves recent history for readers who look at versions.
///
/// What is kept is named, not what is deleted: `_version_id` is not unique in the table (a
/// slice re-sent after BigQuery's insertId window stores a second copy of the same
/// versions), and every copy of a current version survives. Deleting "the ids ranked below 1"
/// instead deleted both copies of a doubled newest version, and the key with them (issue 13).
/// Versions of batches never made visible go too: a later slice sent their rows again.
pub fn compact_sql(
    client: &BigQuery,
    table: &str,
    window_s: u64,
    settled: DateTime<Utc>,
) -> String {
    format!(
        "DELETE FROM {t} \
         WHERE _synced_at < TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL {window_s} SECOND) \
         AND _synced_at < {settled} \
         AND _version_id NOT IN (SELECT _version_id FROM {c})",
        t = client.qualified(table),
        c = client.qualified(&current_table(table)),
        settled = ts_literal(settled),
    )
}

/// Types BigQuery clusters by.
fn clusterable(t: BqType) -> bool {
    !matches!(
        t,
        BqType::Float64 | BqType::Bytes | BqType::Json | BqType::Time
    )
}

/// The key columns a table can be clustered by, at most `max` (BigQuery takes four).
fn cluster_keys(fields: &[BqField], keys: &[String], max: usize) -> Vec<String> {
    keys.iter()
        .filter(|k| {
            fields.iter().any(|f| {
                &f.name == *k && f.mode != FieldMode::Repeated && clusterable(f.field_type)
            })
        })
        .take(max)
        .cloned()
        .collect()
}

/// A versions table's layout: partitioned by day of `_synced_at` and clustered by it first,
/// so the views' and merges' "synced since" reads only recent blocks; then by key. Only a
/// new table gets it (BigQuery cannot partition an existing one).
pub fn versions_layout(fields: &[BqField], keys: &[String]) -> Value {
    let mut cluster = vec![META_SYNCED_AT.to_string()];
    cluster.extend(cluster_keys(fields, keys, 3));
    serde_json::json!({
        "timePartitioning": {"type": "DAY", "field": META_SYNCED_AT},
        "clustering": {"fields": cluster},
    })
}

/// `<table>_current`'s layout: clustered by key, which the merge joins on.
pub fn current_layout(fields: &[BqField], keys: &[String]) -> Value {
    let cluster = cluster_keys(fields, keys, 4);
    if cluster.is_empty() {
        return Value::Null;
    }
    serde_json::json!({"clustering": {"fields": cluster}})
}

/// Make `<table>_current` hold the versions table's columns (created, added or widened like
/// the versions table itself) and return their names in the versions table's order, and
/// whether it was created just now (then it holds nothing, whatever merge point was kept).
/// `extra` columns follow (merge mode's `_reset`).
pub async fn sync_current(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    extra: &[BqField],
) -> Result<(Vec<String>, bool), BqError> {
    let Some(existing) = client.table_schema(table).await? else {
        return Err(BqError::NotFound(format!("table {table}")));
    };
    let fields: Vec<BqField> = existing
        .iter()
        .map(|f| {
            let name = f["name"].as_str().unwrap_or_default().to_string();
            let field_type = field_type(f).ok_or_else(|| {
                BqError::SchemaIncompatible(format!(
                    "column {name:?} of BigQuery table {table} has a type tenantsync does not write"
                ))
            })?;
            let mode = match f["mode"].as_str() {
                Some("REPEATED") => FieldMode::Repeated,
                Some("REQUIRED") => FieldMode::Required,
                _ => FieldMode::Nullable,
            };
            Ok(BqField {
                name,
                field_type,
                mode,
            })
        })
        .collect::<Result<_, BqError>>()?;
    let layout = current_layout(&fields, keys);
    let names = fields.iter().map(|f| f.name.clone()).collect();
    let wanted = fields.into_iter().chain(extra.iter().cloned()).collect();
    let change = sync_fields_with(client, &current_table(table), wanted, &layout).await?;
    Ok((names, change == SchemaChange::Created))
}

/// The label of `<table>_current` that holds its merge point, in microseconds since the
/// epoch. Kept on the table itself: a `<table>_current` deleted and created again has no
/// point, so its first merge reads every version.
pub const MERGE_POINT_LABEL: &str = "tenantsync_merged_through_us";

/// `<table>_current`'s merge point, if it has one.
pub async fn merge_point(client: &BigQuery, table: &str) -> Result<Option<DateTime<Utc>>, BqError> {
    client
        .time_label(&current_table(table), MERGE_POINT_LABEL)
        .await
}

/// What one merge into `<table>_current` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    /// The new merge point: every version visible before it is in `<table>_current`.
    pub point: DateTime<Utc>,
    /// From which `_synced_at` the merge read versions (None: all of them).
    pub read_since: Option<DateTime<Utc>>,
}

/// Latest and history mode: merge the versions that became visible since the last point into
/// `<table>_current`, then record the new point and narrow `<table>_latest` to it. Each step
/// leaves things correct if the next one fails: a point or view left behind only reads more.
pub async fn merge_current(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    read_back: Duration,
) -> Result<Merged, BqError> {
    // Taken before the MERGE starts, so its snapshot holds everything visible at the point.
    merge_current_at(client, table, keys, read_back, Utc::now()).await
}

/// [`merge_current`] with the point given: the read-cost benchmark replays days of slices
/// with their times in the past.
pub async fn merge_current_at(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    read_back: Duration,
    point: DateTime<Utc>,
) -> Result<Merged, BqError> {
    let (cols, created) = sync_current(client, table, keys, &[]).await?;
    let previous = match created {
        true => None,
        false => merge_point(client, table).await?,
    };
    let read_since = previous.map(|p| read_from(p, read_back));
    // Every version is read: those below a listing point have no listings any more.
    let listed = match read_since {
        None => listed_before(client, table).await?,
        Some(_) => None,
    };
    client
        .query(&current_merge_sql(
            client, table, keys, &cols, read_since, listed,
        ))
        .await?;
    client
        .set_label(
            &current_table(table),
            MERGE_POINT_LABEL,
            &point.timestamp_micros().to_string(),
        )
        .await?;
    let since = Some(read_from(point, read_back));
    client
        .put_view(
            &format!("{table}{}", tenantsync_core::names::LATEST_SUFFIX),
            &latest_view_sql(client, table, keys, &cols, since),
        )
        .await?;
    Ok(Merged { point, read_since })
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

/// Drop the `excluded` columns `table` has, if it exists: a column an operator excluded
/// after it was synced leaves the table, `<table>_current` and `<table>_final` (BigQuery
/// keeps dropped data for its time-travel window, 7 days by default, then it is gone).
pub async fn drop_excluded(
    client: &BigQuery,
    table: &str,
    excluded: &[String],
) -> Result<(), BqError> {
    if excluded.is_empty() {
        return Ok(());
    }
    let Some(existing) = client.table_schema(table).await? else {
        return Ok(());
    };
    for f in &existing {
        let Some(name) = f["name"].as_str() else {
            continue;
        };
        if excluded.iter().any(|e| e == name) {
            let ddl = format!(
                "ALTER TABLE {} DROP COLUMN IF EXISTS `{name}`",
                client.qualified(table)
            );
            client.query(&ddl).await?;
        }
    }
    Ok(())
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

    fn f(name: &str, field_type: BqType) -> BqField {
        BqField {
            name: name.into(),
            field_type,
            mode: FieldMode::Nullable,
        }
    }

    #[test]
    fn versions_are_clustered_by_sync_time_then_clusterable_keys() {
        let fields = [
            f("a", BqType::Float64),
            f("b", BqType::Int64),
            f("c", BqType::String),
            f("d", BqType::Date),
            f("e", BqType::Timestamp),
        ];
        let keys: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let v = versions_layout(&fields, &keys);
        assert_eq!(v["timePartitioning"]["field"], "_synced_at");
        // FLOAT64 cannot cluster; BigQuery takes four columns.
        assert_eq!(
            v["clustering"]["fields"],
            serde_json::json!(["_synced_at", "b", "c", "d"])
        );
        let c = current_layout(&fields, &keys);
        assert_eq!(
            c["clustering"]["fields"],
            serde_json::json!(["b", "c", "d", "e"])
        );
        assert!(current_layout(&fields[..1], &keys[..1]).is_null());
    }

    #[test]
    fn merge_points_read_back_the_settle_window_and_slice_and_clock() {
        let point = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let back = visible_within(Duration::from_secs(300), Duration::from_secs(20))
            + Duration::from_secs(60);
        assert_eq!(
            read_from(point, back),
            DateTime::from_timestamp(1_000_000 - 300 - 80, 0).unwrap()
        );
    }
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
