//! Periodic work after a caught-up slice. Latest and history mode: the merge of recently
//! visible versions into `<table>_current`, which keeps what `<table>_latest` reads bounded
//! by the live rows; latest mode then compacts (superseded versions older than the window
//! are deleted, so a table that is updated often does not grow without bound); both then
//! forget the listings in `_sync_batches_<table>` that no reader needs any more
//! (`tenantsync_bigquery::listings`). Merge mode: the merge of partial versions into
//! `<table>_current` and `<table>_final` (its refolds read every version, so its listings
//! stay). Every mode: rows that can never be sent (cursor NULL or infinite) are reported as
//! dead letters.

use crate::{Worker, WorkerError};
use chrono::{DateTime, Utc};
use tenantsync_bigquery::final_merge::{merge_final_at, FinalMerged};
use tenantsync_bigquery::listings::{forget_listings_sql, settle_listings};
use tenantsync_bigquery::schema::{compact_sql, merge_current, read_from, visible_within, Merged};
use tenantsync_core::{Mode, TableSpec, Tenant};
use tenantsync_lease::Lease;
use tenantsync_store::control::dead_letters::NewDeadLetter;
use tenantsync_store::control::tasks::TaskId;
use tracing::{info, warn};

impl Worker {
    /// After a caught-up slice whose commit took the task's periodic turn (`lease` still
    /// held): compaction (latest mode) or the MERGE into `<table>_final` (merge mode), then
    /// the pruning of old listings. Errors are logged, never fail the slice (the rows are in
    /// BigQuery either way).
    pub(crate) async fn periodic_now(&self, tenant: &Tenant, spec: &TableSpec, lease: &Lease) {
        self.report_unsyncable(tenant, spec).await;
        let done = match spec.mode {
            Mode::Merge => self.merge(tenant, spec).await.map(|_| ()),
            Mode::Latest => match self.compact(tenant, spec).await {
                Ok(settled) => {
                    self.prune_listings(tenant, spec, settled, false, lease)
                        .await
                }
                Err(e) => Err(e),
            },
            // History keeps every version, but its view reads `<table>_current` too.
            Mode::History => match self.merge_current(tenant, spec).await {
                Ok(m) => {
                    let settled = self.settled(m.point, Utc::now());
                    self.prune_listings(tenant, spec, settled, true, lease)
                        .await
                }
                Err(e) => Err(e),
            },
            // BigQuery applies a CDC table's changes itself.
            Mode::Cdc => return,
        };
        if let Err(e) = done {
            warn!(tenant = %tenant.slug, table = %spec.source_table, mode = %spec.mode, error = %e, "periodic compaction/merge failed; it waits for the next turn");
        }
    }

    /// Record the tenant's rows of this table whose cursor is NULL, `infinity` or `-infinity`
    /// as dead letters naming key and value. They have no place in the keyset order and no
    /// version time, so the slice reads pass over them; without this they were silently never
    /// synced while progress said 100 % (or, at `-infinity`, stopped the table for good).
    /// Errors are logged: the next turn tries again.
    pub(crate) async fn report_unsyncable(&self, tenant: &Tenant, spec: &TableSpec) {
        if let Err(e) = self.try_report_unsyncable(tenant, spec).await {
            warn!(tenant = %tenant.slug, table = %spec.source_table, error = %e, "check for unsyncable rows failed; it waits for the next turn");
        }
    }

    async fn try_report_unsyncable(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
    ) -> Result<(), WorkerError> {
        let task = TaskId {
            tenant_id: tenant.id,
            table_id: spec.id,
        };
        // A bound on one check's work; the rest are found at the next turns.
        const LIMIT: i64 = 1000;
        let plan = self.plan(spec).await?;
        let rows = self
            .deps
            .source
            .unsyncable_rows(&plan, &tenant.organization_id, LIMIT)
            .await?;
        let complete = rows.len() < LIMIT as usize;
        let letters: Vec<NewDeadLetter> = rows
            .into_iter()
            .map(|(key, cursor)| {
                let value = cursor.as_deref().unwrap_or("NULL").to_string();
                NewDeadLetter {
                    reason: format!(
                        "cursor column {:?} is {value}, not a point in time: the row cannot be \
                         ordered among versions and is not sent; give it a real time and it syncs",
                        spec.cursor_column
                    ),
                    key,
                    cursor: value,
                    payload: String::new(),
                }
            })
            .collect();
        let added = self
            .deps
            .control
            .report_unsyncable(task, &letters, complete)
            .await?;
        if added > 0 {
            warn!(tenant = %tenant.slug, table = %spec.source_table, rows = added, "rows with a NULL or infinite cursor are not synced; dead-lettered");
            crate::metrics::dead_lettered(&tenant.slug, &spec.source_table, added);
        }
        Ok(())
    }

    /// Merge mode: fold the versions synced since the last cutoff into `<table>_current` and
    /// bring `<table>_final` to now (see [`tenantsync_bigquery::final_merge`]): the versions
    /// read are those synced since the last cutoff, not the table's history.
    pub async fn merge(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
    ) -> Result<FinalMerged, WorkerError> {
        let client = self.client(tenant).await?;
        let table = spec.bq_table();
        let back = self.read_back();
        let merged = self
            .retry_bq("merge", tenant, || async {
                let now = chrono::Utc::now();
                Ok(merge_final_at(&client, &table, &spec.key_columns, back, now).await?)
            })
            .await?;
        info!(tenant = %tenant.slug, table = %spec.source_table, cutoff = %merged.cutoff, read_since = ?merged.read_since, refolded = merged.refolded, "merged partial versions into _final");
        Ok(merged)
    }

    /// How long after `_synced_at` a batch may still become visible (see
    /// [`tenantsync_bigquery::schema::visible_within`]); the listing step holds slices to it.
    pub(crate) fn visible_within(&self) -> std::time::Duration {
        visible_within(self.cfg.settle_window, self.cfg.slice_max_duration)
    }

    /// Err when rows written (`_synced_at`) at `written_us` became visible only now, later than
    /// [`Self::visible_within`]: merges may already have passed them. `what` names the rows,
    /// `then` what happens to them.
    pub(crate) fn visible_in_time(
        &self,
        written_us: i64,
        what: &str,
        then: &str,
    ) -> Result<(), WorkerError> {
        let took_us = chrono::Utc::now().timestamp_micros() - written_us;
        let limit = self.visible_within();
        if took_us <= limit.as_micros() as i64 {
            return Ok(());
        }
        Err(WorkerError::BigQuery(
            tenantsync_bigquery::BqError::Transient(format!(
            "{what} became visible {:.0} s after they were written, more than the {} s a merge \
             reads back (settle window plus slice length); {then}",
            took_us as f64 / 1e6,
            limit.as_secs()
        )),
        ))
    }

    /// How far before a merge point versions are still read: [`Self::visible_within`] plus
    /// the allowance for workers' clocks.
    pub fn read_back(&self) -> std::time::Duration {
        self.visible_within() + self.cfg.clock_skew
    }

    /// Merge the versions visible since the last merge point into `<table>_current` and
    /// narrow `<table>_latest` to the new point, so the view reads the current state plus
    /// recent versions, not the table's history.
    pub async fn merge_current(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
    ) -> Result<Merged, WorkerError> {
        let client = self.client(tenant).await?;
        let table = spec.bq_table();
        let back = self.read_back();
        let merged = self
            .retry_bq("merge current", tenant, || async {
                Ok(merge_current(&client, &table, &spec.key_columns, back).await?)
            })
            .await?;
        info!(tenant = %tenant.slug, table = %spec.source_table, point = %merged.point, read_since = ?merged.read_since, "merged visible versions into _current");
        Ok(merged)
    }

    /// Latest mode, after a merge into `<table>_current`: delete the versions that are neither
    /// current nor recent (older than the compaction window and the merge's read horizon).
    /// Returns the bound below which every version left is current (so committed): where the
    /// listings may be pruned.
    pub async fn compact(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
    ) -> Result<DateTime<Utc>, WorkerError> {
        let merged = self.merge_current(tenant, spec).await?;
        let client = self.client(tenant).await?;
        let table = spec.bq_table();
        // Before the DELETE: the SQL's own window bound is later still.
        let settled = self.settled(merged.point, Utc::now());
        let window_s = self.cfg.compact_window.as_secs();
        let compact = compact_sql(
            &client,
            &table,
            window_s,
            read_from(merged.point, self.read_back()),
        );
        self.retry_bq("compact", tenant, || async {
            Ok(client.query(&compact).await?)
        })
        .await?;
        info!(tenant = %tenant.slug, table = %spec.source_table, window_s, %settled, "compacted superseded versions");
        Ok(settled)
    }

    /// The listing point a merge at `point` allows at `now`: no batch synced before it can
    /// still become visible (the merge's read-back), and it is past the compaction window
    /// (BigQuery refuses DML on rows in insertAll's streaming buffer).
    fn settled(&self, point: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
        let window =
            chrono::Duration::from_std(self.cfg.compact_window).unwrap_or(chrono::Duration::MAX);
        read_from(point, self.read_back()).min(now - window)
    }

    /// Move the table's listing point up to `settled` and forget the listings below it, so
    /// `_sync_batches_<table>` holds only the last read-back and window's worth of slices.
    /// The forgetting DELETE runs only right after the lease was renewed: on the local
    /// BigQuery a DELETE made a listing inserted at the same moment vanish (issue 16), and
    /// with the lease ours no other worker lists batches of this table meanwhile.
    async fn prune_listings(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
        settled: DateTime<Utc>,
        unlisted_too: bool,
        lease: &Lease,
    ) -> Result<(), WorkerError> {
        let client = self.client(tenant).await?;
        let table = spec.bq_table();
        self.retry_bq("settle listings", tenant, || async {
            Ok(settle_listings(&client, &table, settled, unlisted_too).await?)
        })
        .await?;
        if !self.deps.leases.renew(lease).await? {
            warn!(tenant = %tenant.slug, table = %spec.source_table, "lease lost before pruning listings; they wait for the next turn");
            return Ok(());
        }
        let forget = forget_listings_sql(&client, &table, settled);
        client.query(&forget).await?;
        info!(tenant = %tenant.slug, table = %spec.source_table, %settled, "forgot listings before the listing point");
        Ok(())
    }
}
