//! Compaction of latest-mode tables: superseded versions older than the window are deleted,
//! so a table that is updated often does not grow without bound. History-mode tables keep
//! every version; merge mode is not built yet (see the README).

use crate::{Worker, WorkerError};
use tenantsync_bigquery::schema::compact_sql;
use tenantsync_core::{TableSpec, Tenant};
use tracing::{info, warn};

impl Worker {
    /// After a caught-up slice whose commit took the task's compaction turn. Errors are logged,
    /// never fail the slice (the rows are in BigQuery either way).
    pub(crate) async fn compact_now(&self, tenant: &Tenant, spec: &TableSpec) {
        if let Err(e) = self.compact(tenant, spec).await {
            warn!(tenant = %tenant.slug, table = %spec.source_table, error = %e, "compaction failed; next turn in {:?}", self.cfg.compact_every);
        }
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
