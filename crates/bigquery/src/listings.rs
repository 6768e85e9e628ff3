//! Batch listings: which insertAll batches of a table are committed, so that the views show
//! their rows (a slice that wrote half its chunks and died stays invisible).
//!
//! Each table has its own listing table, `_sync_batches_<table>`, written by the task that
//! holds the table's lease. That is what lets the listings be pruned: the local BigQuery lost
//! a concurrent listing when one dataset-wide table was pruned by a DELETE (issue 16's chaos
//! runs), and here the only writer the DELETE can meet is the pruning task itself.
//!
//! Pruning folds the old listings into one point per table, the label
//! [`LISTED_BEFORE_LABEL`] on the versions table: every version there synced before it is
//! committed. Before the label moves, the versions of never-committed batches below it are
//! deleted (latest mode's compaction already does it; history mode asks for it here), and
//! only then are the listings below it forgotten. Readers that know a merge point read only
//! listings from shortly before it, which pruning never reaches; readers of every version (a
//! table's first merge, `<table>_latest` before it) take the label as well as the listings.

use crate::client::BigQuery;
use crate::error::BqError;
use crate::schema::ts_literal;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tenantsync_core::mapping::{BqField, BqType, FieldMode};
use tenantsync_core::names::{batches_table, BATCHES_TABLE, STORAGE_BATCH_PREFIX};

/// The label of a versions table below which (`_synced_at`, microseconds since the epoch)
/// every version is committed and listings may be gone. Kept on the versions table itself: a
/// table deleted and created again has no such point.
pub const LISTED_BEFORE_LABEL: &str = "tenantsync_listed_before_us";
/// The label of a listing table whose listings in the dataset-wide `_sync_batches` (written
/// by releases before per-table listings) were copied in.
const IMPORTED_LABEL: &str = "tenantsync_imported";

/// `_sync_batches_<table>`.
pub fn listings_table(table: &str) -> String {
    batches_table(table)
}

pub fn listings_fields() -> Vec<BqField> {
    let f = |name: &str, t, mode| BqField {
        name: name.to_string(),
        field_type: t,
        mode,
    };
    vec![
        f("batch_id", BqType::String, FieldMode::Required),
        f("committed_at", BqType::Timestamp, FieldMode::Required),
        f("rows", BqType::Int64, FieldMode::Nullable),
    ]
}

/// By day of commit: views read the listings committed since shortly before their merge
/// point, and pruning deletes whole old days.
pub fn listings_layout() -> Value {
    serde_json::json!({"timePartitioning": {"type": "DAY", "field": "committed_at"}})
}

/// Create `table`'s listing table when missing, with the table's listings from the
/// dataset-wide `_sync_batches` copied in when that exists (once: a label records it, and a
/// copy repeated after a failure only lists batches twice, which changes nothing).
pub async fn ensure_listings(client: &BigQuery, table: &str) -> Result<(), BqError> {
    let name = listings_table(table);
    let labels = match client.table_labels(&name).await? {
        Some(labels) => labels,
        None => {
            client
                .create_table_with(&name, &listings_fields(), &listings_layout())
                .await?;
            Default::default()
        }
    };
    if labels.contains_key(IMPORTED_LABEL) {
        return Ok(());
    }
    if client.table_schema(BATCHES_TABLE).await?.is_some() {
        client.query(&import_sql(client, table)).await?;
    }
    client.set_label(&name, IMPORTED_LABEL, "1").await
}

fn import_sql(client: &BigQuery, table: &str) -> String {
    format!(
        "INSERT INTO {} (batch_id, committed_at, `rows`) \
         SELECT batch_id, committed_at, `rows` FROM {} WHERE table_name = '{}'",
        client.qualified(&listings_table(table)),
        client.qualified(BATCHES_TABLE),
        table.replace('\'', "\\'"),
    )
}

/// The versions table's listing point, if it was ever pruned.
pub async fn listed_before(
    client: &BigQuery,
    table: &str,
) -> Result<Option<DateTime<Utc>>, BqError> {
    client.time_label(table, LISTED_BEFORE_LABEL).await
}

/// The versions of committed batches, as a subquery: insertAll batches listed in the table's
/// listing table (or synced before `listed_before`, the pruned point), Storage Write batches
/// (ids starting with [`STORAGE_BATCH_PREFIX`]) as they are: their rows exist only once their
/// pending stream was committed. With `since`, only versions synced from then on, and only
/// listings committed from then on (a batch is listed after its rows are written): both
/// filters are on partitioning columns, so BigQuery reads only those days. With `until`, only
/// versions synced before then.
pub fn committed_between(
    client: &BigQuery,
    table: &str,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    listed_before: Option<DateTime<Utc>>,
) -> String {
    let (mut recent, listed) = match since {
        Some(t) => (
            format!("_synced_at >= {} AND ", ts_literal(t)),
            format!(" WHERE committed_at >= {}", ts_literal(t)),
        ),
        None => Default::default(),
    };
    if let Some(t) = until {
        recent.push_str(&format!("_synced_at < {} AND ", ts_literal(t)));
    }
    // Only a read reaching below the point needs it.
    let settled = match listed_before {
        Some(t) if since.is_none_or(|s| s < t) => format!("_synced_at < {} OR ", ts_literal(t)),
        _ => String::new(),
    };
    format!(
        "(SELECT * FROM {} WHERE {recent}({settled}_batch_id IN (SELECT batch_id FROM {}{listed}) \
         OR _batch_id LIKE '{STORAGE_BATCH_PREFIX}%'))",
        client.qualified(table),
        client.qualified(&listings_table(table)),
    )
}

/// Delete the versions synced in `[from, before)` whose batch was never committed (a dead or
/// fenced slice's; a later slice sent their rows again). `before` must be past the streaming
/// buffer's reach (BigQuery refuses DML on rows insertAll wrote in the last ~30 minutes).
pub fn delete_unlisted_sql(
    client: &BigQuery,
    table: &str,
    from: Option<DateTime<Utc>>,
    before: DateTime<Utc>,
) -> String {
    let from = from
        .map(|t| format!(" AND _synced_at >= {}", ts_literal(t)))
        .unwrap_or_default();
    format!(
        "DELETE FROM {t} WHERE _synced_at < {before}{from} \
         AND _batch_id NOT LIKE '{STORAGE_BATCH_PREFIX}%' \
         AND _batch_id NOT IN (SELECT batch_id FROM {l})",
        t = client.qualified(table),
        l = client.qualified(&listings_table(table)),
        before = ts_literal(before),
    )
}

/// Forget the listings committed before `before`: their versions were synced earlier still,
/// and the label counts those as committed.
pub fn forget_listings_sql(client: &BigQuery, table: &str, before: DateTime<Utc>) -> String {
    format!(
        "DELETE FROM {} WHERE committed_at < {}",
        client.qualified(&listings_table(table)),
        ts_literal(before)
    )
}

/// Move `table`'s listing point up to `before` (no-op when it is there already): with
/// `unlisted_too`, first delete the uncommitted versions below it (latest mode's compaction
/// has done that already). Returns whether the point moved. `before` must be no later than
/// the last merge point's read-back (no batch synced before it can still be listed) and past
/// the streaming buffer. The listings below the point are forgotten by
/// [`forget_listings_sql`], which the caller runs only while it still holds the table's
/// lease.
pub async fn settle_listings(
    client: &BigQuery,
    table: &str,
    before: DateTime<Utc>,
    unlisted_too: bool,
) -> Result<bool, BqError> {
    let previous = listed_before(client, table).await?;
    if previous.is_some_and(|p| p >= before) {
        return Ok(false);
    }
    if unlisted_too {
        client
            .query(&delete_unlisted_sql(client, table, previous, before))
            .await?;
    }
    client
        .set_label(
            table,
            LISTED_BEFORE_LABEL,
            &before.timestamp_micros().to_string(),
        )
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Credentials, Endpoint};
    use std::time::Duration;

    async fn client() -> BigQuery {
        BigQuery::new(
            &Endpoint::emulator("127.0.0.1:1"),
            "p",
            "d",
            &Credentials::Emulator,
            Duration::from_secs(1),
        )
        .await
        .unwrap()
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[tokio::test]
    async fn the_point_counts_only_for_reads_reaching_below_it() {
        let bq = client().await;
        let all = committed_between(&bq, "t", None, None, Some(at(0)));
        assert!(all.contains("_synced_at < TIMESTAMP('2023-11-14T22:13:20.000000Z') OR _batch_id IN (SELECT batch_id FROM `p.d._sync_batches_t`)"), "{all}");
        let below = committed_between(&bq, "t", Some(at(-10)), None, Some(at(0)));
        assert!(
            below.contains("_synced_at < TIMESTAMP('2023-11-14T22:13:20"),
            "{below}"
        );
        // A read from the point on needs only the listings, and only those since then.
        let recent = committed_between(&bq, "t", Some(at(0)), Some(at(5)), Some(at(0)));
        assert!(!recent.contains("OR _batch_id IN"), "{recent}");
        assert!(recent.contains("FROM `p.d._sync_batches_t` WHERE committed_at >= "));
        assert!(recent.contains(" AND _synced_at < TIMESTAMP('2023-11-14T22:13:25"));
        let never = committed_between(&bq, "t", None, None, None);
        assert!(!never.contains("_synced_at"), "{never}");
    }

    #[tokio::test]
    async fn only_uncommitted_insert_all_versions_in_the_range_are_deleted() {
        let bq = client().await;
        let sql = delete_unlisted_sql(&bq, "t", Some(at(0)), at(60));
        assert_eq!(
            sql,
            "DELETE FROM `p.d.t` WHERE _synced_at < TIMESTAMP('2023-11-14T22:14:20.000000Z') \
             AND _synced_at >= TIMESTAMP('2023-11-14T22:13:20.000000Z') \
             AND _batch_id NOT LIKE 'w%' \
             AND _batch_id NOT IN (SELECT batch_id FROM `p.d._sync_batches_t`)"
        );
        assert!(!delete_unlisted_sql(&bq, "t", None, at(60)).contains(">="));
        assert_eq!(
            forget_listings_sql(&bq, "t", at(60)),
            "DELETE FROM `p.d._sync_batches_t` WHERE committed_at < TIMESTAMP('2023-11-14T22:14:20.000000Z')"
        );
        assert!(import_sql(&bq, "o'k").contains("WHERE table_name = 'o\\'k'"));
    }
}
