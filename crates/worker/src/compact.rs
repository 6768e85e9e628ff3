//! Periodic work after a caught-up slice. Latest mode: compaction, superseded versions older
//! than the window are deleted, so a table that is updated often does not grow without bound.
//! Merge mode: the MERGE that rebuilds `<table>_final` from partial versions. History-mode
//! tables keep every version and need neither. Every mode: rows that can never be sent
//! (cursor NULL or infinite) are reported as dead letters.

use crate::{Worker, WorkerError};
use tenantsync_bigquery::schema::{compact_sql, merge_sql};
use tenantsync_core::{Mode, TableSpec, Tenant};
use tenantsync_store::control::dead_letters::NewDeadLetter;
use tenantsync_store::control::tasks::TaskId;
use tracing::{info, warn};

impl Worker {
    /// After a caught-up slice whose commit took the task's periodic turn: compaction (latest
    /// mode) or the MERGE into `<table>_final` (merge mode). Errors are logged, never fail the
    /// slice (the rows are in BigQuery either way).
    pub(crate) async fn periodic_now(&self, tenant: &Tenant, spec: &TableSpec) {
        self.report_unsyncable(tenant, spec).await;
        let done = match spec.mode {
            Mode::Merge => self.merge(tenant, spec).await,
            Mode::Latest => self.compact(tenant, spec).await,
            // History keeps every version; BigQuery applies a CDC table's changes itself.
            Mode::History | Mode::Cdc => return,
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

    /// Merge mode: rebuild `<table>_final` (one full row per key) from the committed partial
    /// versions. Every key is recomputed (see `merge_sql`): the cost grows with the table, which
    /// is why it runs every `merge_every`, not after every slice.
    pub async fn merge(&self, tenant: &Tenant, spec: &TableSpec) -> Result<(), WorkerError> {
        let plan = self.plan(spec).await?;
        let client = self.client(tenant).await?;
        let sql = merge_sql(&client, &plan.table, &spec.key_columns, &plan.fields);
        self.retry_bq("merge", tenant, || async { Ok(client.query(&sql).await?) })
            .await?;
        info!(tenant = %tenant.slug, table = %spec.source_table, "merged partial versions into _final");
        Ok(())
    }

    /// Delete the superseded versions of a tenant's table synced before the compaction window.
    pub async fn compact(&self, tenant: &Tenant, spec: &TableSpec) -> Result<(), WorkerError> {
        let client = self.client(tenant).await?;
        let sql = compact_sql(
            &client,
            &spec.bq_table(),
            &spec.key_columns,
            self.cfg.compact_window.as_secs(),
        );
        self.retry_bq("compact", tenant, || async {
            Ok(client.query(&sql).await?)
        })
        .await?;
        info!(tenant = %tenant.slug, table = %spec.source_table, window_s = self.cfg.compact_window.as_secs(), "compacted superseded versions");
        Ok(())
    }
}
