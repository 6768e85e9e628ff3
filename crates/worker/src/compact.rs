//! Periodic work after a caught-up slice. Latest mode: compaction, superseded versions older
//! than the window are deleted, so a table that is updated often does not grow without bound.
//! Merge mode: the MERGE that rebuilds `<table>_final` from partial versions. History-mode
//! tables keep every version and need neither.

use crate::{Worker, WorkerError};
use tenantsync_bigquery::schema::{compact_sql, merge_sql};
use tenantsync_core::{Mode, TableSpec, Tenant};
use tracing::{info, warn};

impl Worker {
    /// After a caught-up slice whose commit took the task's periodic turn: compaction (latest
    /// mode) or the MERGE into `<table>_final` (merge mode). Errors are logged, never fail the
    /// slice (the rows are in BigQuery either way).
    pub(crate) async fn periodic_now(&self, tenant: &Tenant, spec: &TableSpec) {
        let done = match spec.mode {
            Mode::Merge => self.merge(tenant, spec).await,
            Mode::Latest => self.compact(tenant, spec).await,
            Mode::History => return,
        };
        if let Err(e) = done {
            warn!(tenant = %tenant.slug, table = %spec.source_table, mode = %spec.mode, error = %e, "periodic compaction/merge failed; it waits for the next turn");
        }
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
