//! Merge mode: `<table>_final` kept by merges whose cost follows what changed.
//!
//! A merge-mode table holds partial versions (NULL: the column did not change). A key's full
//! row is its *fold*: each column's newest non-NULL value among the versions since the key's
//! last insert or delete, the newest version deciding whether the key exists. A fold can be
//! extended by versions newer than all it holds without reading the older ones again, so:
//! - `<table>_current` keeps the fold of every version synced before a cutoff, deletes kept as
//!   rows (a version that arrives late must still meet them), with the cutoff as a label. The
//!   cutoff is a merge point's [`read_from`]: every version synced before it that will ever be
//!   visible is visible at the point (the listing step holds slices to that), so a version is
//!   folded in exactly once, by the merge whose range holds its `_synced_at`.
//! - Each merge folds in the versions synced between the previous cutoff and the new one. A
//!   key whose new versions are not all newer than its stored fold (a version that arrived out
//!   of order: a dead letter retried, a resync) is folded again from all its versions; that
//!   and the first merge are the only reads of history.
//! - `<table>_final` then gets, for every key with versions since the previous cutoff, its
//!   stored fold extended by the versions synced since the new cutoff: current to the merge,
//!   as before, and reading only the versions since the last cutoff.

use crate::client::BigQuery;
use crate::error::BqError;
use crate::listings::committed_between;
use crate::schema::{
    current_table, newer, newest_per_key, quoted, read_from, sync_current, NEWEST_FIRST,
};
use chrono::{DateTime, Utc};
use std::time::Duration;
use tenantsync_core::mapping::{BqField, BqType, FieldMode};
use tenantsync_core::names::METADATA_COLUMNS;

/// The label of `<table>_current` (merge mode) holding its cutoff in microseconds since the
/// epoch: it holds the fold of every version synced before then.
pub const FOLD_CUTOFF_LABEL: &str = "tenantsync_folded_before_us";

/// What one merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinalMerged {
    /// `<table>_current` holds the fold of every version synced before this.
    pub cutoff: DateTime<Utc>,
    /// The previous cutoff: the merge read the versions synced since then (None: all).
    pub read_since: Option<DateTime<Utc>>,
    /// Keys folded again from all their versions (out-of-order versions).
    pub refolded: i64,
}

/// The fold of the versions in `from` (a subquery with the versions table's columns), one
/// row per key: each value column's newest non-NULL value since the key's last insert or
/// delete among them, `_reset` that delete's or insert's `_source_ts` (NULL: none in `from`),
/// and the newest version's metadata columns.
pub fn fold_sql(keys: &[String], values: &[String], from: &str) -> String {
    let k = quoted(keys);
    let firsts: String = values
        .iter()
        .map(|c| format!("FIRST_VALUE(`{c}` IGNORE NULLS) OVER w AS `{c}`, "))
        .collect();
    let metas: String = METADATA_COLUMNS
        .iter()
        .map(|m| format!("FIRST_VALUE({m}) OVER w AS {m}, "))
        .collect();
    format!(
        "SELECT * EXCEPT(_rn) FROM (\
           SELECT {k}, {firsts}{metas}_reset, \
                  ROW_NUMBER() OVER (PARTITION BY {k} ORDER BY {NEWEST_FIRST}) AS _rn \
           FROM (SELECT v.*, MAX(IF(_op IN ('insert', 'delete'), _source_ts, NULL)) \
                        OVER (PARTITION BY {k}) AS _reset FROM {from} v) \
           WHERE _reset IS NULL OR _source_ts >= _reset \
           WINDOW w AS (PARTITION BY {k} ORDER BY {NEWEST_FIRST} \
                        ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) \
         WHERE _rn = 1"
    )
}

/// The columns of `fold` extended by `newer_fold` (both aliases; `newer_fold` folds only
/// versions newer than all of `fold`'s, and either may be missing): a value column is the
/// newer fold's when it saw an insert or delete (or there is no older fold), else its
/// newest non-NULL value, else the older fold's. Metadata is the newest version's.
fn extend(fold: &str, newer_fold: &str, values: &[String]) -> Vec<String> {
    let (f, n) = (fold, newer_fold);
    let mut out: Vec<String> = values
        .iter()
        .map(|c| {
            format!(
                "CASE WHEN {n}._op IS NULL THEN {f}.`{c}` \
                 WHEN {n}._reset IS NOT NULL OR {f}._op IS NULL THEN {n}.`{c}` \
                 ELSE COALESCE({n}.`{c}`, {f}.`{c}`) END AS `{c}`"
            )
        })
        .collect();
    out.extend(
        METADATA_COLUMNS
            .iter()
            .chain(["_reset"].iter())
            .map(|m| format!("COALESCE({n}.{m}, {f}.{m}) AS {m}")),
    );
    out
}

fn join_on(a: &str, b: &str, keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("{a}.`{k}` = {b}.`{k}`"))
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn prefixed(alias: &str, cols: &[String]) -> String {
    cols.iter()
        .map(|c| format!("{alias}.`{c}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `<table>_current`'s columns: the versions table's and `_reset`.
fn state_columns(cols: &[String]) -> Vec<String> {
    cols.iter().cloned().chain(["_reset".to_string()]).collect()
}

/// MERGE `source` (rows with [`state_columns`]) into `<table>_current`, replacing by key.
fn upsert_state(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    cols: &[String],
    source: &str,
) -> String {
    let all = state_columns(cols);
    let set: Vec<String> = all.iter().map(|c| format!("`{c}` = S.`{c}`")).collect();
    format!(
        "MERGE {state} C USING ({source}) S ON {on} \
         WHEN MATCHED THEN UPDATE SET {set} \
         WHEN NOT MATCHED THEN INSERT ({list}) VALUES ({values})",
        state = client.qualified(&current_table(table)),
        on = join_on("C", "S", keys),
        set = set.join(", "),
        list = quoted(&all),
        values = prefixed("S", &all),
    )
}

/// Fold the versions synced in `[since, until)` into `<table>_current`, for every key whose
/// versions there are all newer than its stored fold. The others (out of order) are left for
/// [`refold_sql`]; deciding that in the same statement keeps a second, overlapping merge
/// (a worker that lost its lease) from extending a fold with versions it already holds.
pub fn fold_in_sql(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    cols: &[String],
    since: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
) -> String {
    let range = committed_between(client, table, since, Some(until), None);
    let state = client.qualified(&current_table(table));
    let values = value_columns(cols, keys);
    let source = format!(
        "SELECT {nk}, {ext} FROM ({fold}) N \
         LEFT JOIN {state} F ON {nf} \
         LEFT JOIN (SELECT DISTINCT {vk} FROM {range} v JOIN {state} F2 ON {vf2} \
                    WHERE NOT {newer}) L ON {nl} \
         WHERE L.`{k0}` IS NULL",
        nk = prefixed("N", keys),
        ext = extend("F", "N", &values).join(", "),
        fold = fold_sql(keys, &values, &range),
        nf = join_on("N", "F", keys),
        vk = prefixed("v", keys),
        vf2 = join_on("v", "F2", keys),
        newer = newer("v", "F2"),
        nl = join_on("N", "L", keys),
        k0 = keys[0],
    );
    upsert_state(client, table, keys, cols, &source)
}

/// The keys with versions synced in `[since, until)` whose stored fold does not end with
/// their newest such version: the ones [`fold_in_sql`] left (a second merge over the same
/// range finds none).
fn stale_keys(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    since: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
) -> String {
    let range = committed_between(client, table, since, Some(until), None);
    format!(
        "SELECT {nk} FROM ({newest}) N LEFT JOIN {state} F ON {nf} \
         WHERE F._op IS NULL OR NOT (F._source_ts = N._source_ts AND \
               F._synced_at = N._synced_at AND F._version_id = N._version_id)",
        nk = prefixed("N", keys),
        newest = newest_per_key(keys, &range),
        state = client.qualified(&current_table(table)),
        nf = join_on("N", "F", keys),
    )
}

/// How many keys [`refold_sql`] would fold again.
pub fn stale_count_sql(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    since: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
) -> String {
    format!(
        "SELECT COUNT(*) FROM ({})",
        stale_keys(client, table, keys, since, until)
    )
}

/// Fold the stale keys (see [`stale_keys`]) again from all their versions synced before
/// `until`. This reads the table's history: it runs only when such keys exist.
pub fn refold_sql(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    cols: &[String],
    since: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
) -> String {
    let all = committed_between(client, table, None, Some(until), None);
    let from = format!(
        "(SELECT v.* FROM {all} v JOIN ({stale}) K ON {vk})",
        stale = stale_keys(client, table, keys, since, until),
        vk = join_on("v", "K", keys),
    );
    let values = value_columns(cols, keys);
    upsert_state(client, table, keys, cols, &fold_sql(keys, &values, &from))
}

/// Bring `<table>_final` to the merge: for every key with versions synced since `since` (the
/// previous cutoff; every key without one), the stored fold extended by the versions synced
/// since `cutoff` that are newer than it. Out-of-order ones among those reach `<table>_final`
/// with the next cutoff, through [`refold_sql`].
pub fn final_merge_sql(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    values: &[String],
    since: Option<DateTime<Utc>>,
    cutoff: DateTime<Utc>,
) -> String {
    let state = client.qualified(&current_table(table));
    let recent = committed_between(client, table, Some(cutoff), None, None);
    let newer_only = format!(
        "(SELECT v.* FROM {recent} v LEFT JOIN {state} C2 ON {vc} \
          WHERE C2._op IS NULL OR {newer})",
        vc = join_on("v", "C2", keys),
        newer = newer("v", "C2"),
    );
    let ext = extend("C", "N", values);
    let source = format!(
        "SELECT {kk}, {vals}, COALESCE(N._op, C._op) AS _op, \
                COALESCE(N._source_ts, C._source_ts) AS _source_ts \
         FROM (SELECT DISTINCT {keys} FROM {touched}) K \
         LEFT JOIN {state} C ON {kc} \
         LEFT JOIN ({fold}) N ON {kn} \
         WHERE COALESCE(N._op, C._op) IS NOT NULL",
        kk = prefixed("K", keys),
        vals = ext[..values.len()].join(", "),
        keys = quoted(keys),
        touched = committed_between(client, table, since, None, None),
        kc = join_on("K", "C", keys),
        fold = fold_sql(keys, values, &newer_only),
        kn = join_on("K", "N", keys),
    );
    let cols: Vec<String> = keys.iter().chain(values).cloned().collect();
    let set: Vec<String> = values
        .iter()
        .map(|c| format!("`{c}` = S.`{c}`"))
        .chain([
            "_source_ts = S._source_ts".into(),
            "_merged_at = CURRENT_TIMESTAMP()".into(),
        ])
        .collect();
    format!(
        "MERGE {final_t} T USING ({source}) S ON {on} \
         WHEN MATCHED AND S._op = 'delete' THEN DELETE \
         WHEN MATCHED THEN UPDATE SET {set} \
         WHEN NOT MATCHED AND S._op != 'delete' THEN \
           INSERT ({list}, _source_ts, _merged_at) VALUES ({values}, S._source_ts, CURRENT_TIMESTAMP())",
        final_t = client.qualified(&format!("{table}{}", tenantsync_core::names::FINAL_SUFFIX)),
        on = join_on("T", "S", keys),
        set = set.join(", "),
        list = quoted(&cols),
        values = prefixed("S", &cols),
    )
}

/// The value columns among a versions table's columns: neither key nor metadata.
pub fn value_columns(cols: &[String], keys: &[String]) -> Vec<String> {
    cols.iter()
        .filter(|c| !keys.contains(c) && !METADATA_COLUMNS.contains(&c.as_str()))
        .cloned()
        .collect()
}

/// `_reset` as a column of `<table>_current` (merge mode).
fn reset_field() -> BqField {
    BqField {
        name: "_reset".into(),
        field_type: BqType::Timestamp,
        mode: FieldMode::Nullable,
    }
}

/// `<table>_current`'s cutoff, if it has one.
pub async fn fold_cutoff(client: &BigQuery, table: &str) -> Result<Option<DateTime<Utc>>, BqError> {
    client
        .time_label(&current_table(table), FOLD_CUTOFF_LABEL)
        .await
}

/// Merge mode's merge at `point` (see the module documentation). Each step leaves things
/// correct if the next fails: a fold done without its label is found done again (every key
/// is then newer-or-equal, so nothing changes), and `<table>_final` is rebuilt from the
/// state at every merge.
pub async fn merge_final_at(
    client: &BigQuery,
    table: &str,
    keys: &[String],
    read_back: Duration,
    point: DateTime<Utc>,
) -> Result<FinalMerged, BqError> {
    let (cols, created) = sync_current(client, table, keys, &[reset_field()]).await?;
    let previous = match created {
        true => None,
        false => fold_cutoff(client, table).await?,
    };
    // Never backwards (a worker with a slower clock): the range would overlap folded versions.
    let cutoff = previous.map_or(read_from(point, read_back), |p| {
        p.max(read_from(point, read_back))
    });
    let mut refolded = 0;
    if previous != Some(cutoff) {
        client
            .query(&fold_in_sql(client, table, keys, &cols, previous, cutoff))
            .await?;
        let count = client
            .query(&stale_count_sql(client, table, keys, previous, cutoff))
            .await?;
        refolded = first_i64(&count)?;
        if refolded > 0 {
            client
                .query(&refold_sql(client, table, keys, &cols, previous, cutoff))
                .await?;
        }
        client
            .set_label(
                &current_table(table),
                FOLD_CUTOFF_LABEL,
                &cutoff.timestamp_micros().to_string(),
            )
            .await?;
    }
    let values = value_columns(&cols, keys);
    client
        .query(&final_merge_sql(
            client, table, keys, &values, previous, cutoff,
        ))
        .await?;
    Ok(FinalMerged {
        cutoff,
        read_since: previous,
        refolded,
    })
}

/// A COUNT's value. Unreadable is an error, not 0: 0 would skip the refold and lose versions.
fn first_i64(rows: &[Vec<serde_json::Value>]) -> Result<i64, BqError> {
    let cell = rows.first().and_then(|r| r.first());
    cell.and_then(|v| v.as_i64().or_else(|| v.as_str()?.parse().ok()))
        .ok_or_else(|| BqError::Transient(format!("a COUNT(*) returned {rows:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Credentials, Endpoint};

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn value_columns_are_neither_keys_nor_metadata() {
        let cols = s(&["id", "name", "_op", "_source_ts", "score", "_batch_id"]);
        assert_eq!(value_columns(&cols, &s(&["id"])), s(&["name", "score"]));
    }

    #[test]
    fn a_newer_fold_replaces_columns_only_after_an_insert_or_delete() {
        let e = extend("F", "N", &s(&["name"]));
        assert!(
            e[0].starts_with("CASE WHEN N._op IS NULL THEN F.`name`"),
            "{}",
            e[0]
        );
        assert!(e[0].contains("WHEN N._reset IS NOT NULL OR F._op IS NULL THEN N.`name`"));
        assert!(e[0].contains("ELSE COALESCE(N.`name`, F.`name`)"));
        assert!(e
            .iter()
            .any(|c| c == "COALESCE(N._reset, F._reset) AS _reset"));
    }

    #[tokio::test]
    async fn each_merge_reads_only_its_range_and_leaves_out_of_order_keys() {
        let client = BigQuery::new(
            &Endpoint::emulator("127.0.0.1:9"),
            "p",
            "d",
            &Credentials::Emulator,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let (since, until) = (
            DateTime::from_timestamp(1_000, 0).unwrap(),
            DateTime::from_timestamp(2_000, 0).unwrap(),
        );
        let cols = s(&["id", "v", "_op", "_source_ts", "_synced_at", "_version_id"]);
        let sql = fold_in_sql(&client, "t", &s(&["id"]), &cols, Some(since), until);
        // The range is bounded on both sides, on the partitioning column.
        assert!(sql.contains("_synced_at >= TIMESTAMP('1970-01-01T00:16:40.000000Z')"));
        assert!(sql.contains("_synced_at < TIMESTAMP('1970-01-01T00:33:20.000000Z')"));
        // Keys with a version not newer than their fold are left for the refold.
        assert!(
            sql.contains("WHERE NOT (v._source_ts > F2._source_ts"),
            "{sql}"
        );
        assert!(sql.contains("WHERE L.`id` IS NULL"));
        // The refold is the one statement without a lower bound.
        let refold = refold_sql(&client, "t", &s(&["id"]), &cols, Some(since), until);
        assert!(refold.contains("(SELECT * FROM `p.d.t` WHERE _synced_at < TIMESTAMP("));
    }
}
