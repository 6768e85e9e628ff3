//! Batch visibility: the `_sync_batches_<table>` listing that makes a slice's rows visible in
//! the views.

use crate::slice::wait_for_slot;
use crate::{Worker, WorkerError};
use tenantsync_bigquery::listings::listings_table;
use tenantsync_bigquery::{BqError, Sink, TableDef};
use tenantsync_core::Tenant;
use tokio_util::sync::CancellationToken;

impl Worker {
    /// List `ids` (the last one is the current slice's, with its row count) as committed
    /// batches of `def`'s table. Idempotent: the batch id is the insertId, and listing a batch
    /// twice changes nothing in the views.
    pub(crate) async fn list_batches<S: Sink>(
        &self,
        sink: &S,
        tenant: &Tenant,
        def: &TableDef<'_>,
        ids: &[String],
        rows: i64,
    ) -> Result<(), WorkerError> {
        // A listing is an insertAll request like any other: it takes its slot from the
        // tenant's and the deployment's budgets.
        let never = CancellationToken::new();
        let mut recreated = false;
        loop {
            let r = self
                .retry_bq("list batch", tenant, || async {
                    wait_for_slot(self, tenant, ids.len(), &never, &never).await?;
                    Ok(sink.list_batches(def.table, ids, rows).await?)
                })
                .await;
            match r {
                Ok(out) => {
                    return match out.row_errors.first() {
                        None => Ok(()),
                        Some(e) => Err(WorkerError::BigQuery(BqError::Invalid(format!(
                            "listing batch {} in {}: {}: {}",
                            ids.last().map(String::as_str).unwrap_or_default(),
                            listings_table(def.table),
                            e.reason,
                            e.message
                        )))),
                    };
                }
                // The listing table (or the dataset) was deleted behind our back: recreate
                // them once.
                Err(WorkerError::BigQuery(BqError::NotFound(_))) if !recreated => {
                    recreated = true;
                    sink.ensure_dataset().await?;
                    sink.ensure_table(def).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
