//! Batch visibility: the `_sync_batches` listing that makes a slice's rows visible in the views.

use crate::{Worker, WorkerError};
use chrono::{SecondsFormat, Utc};
use tenantsync_bigquery::schema::{batches_fields, BATCHES_TABLE};
use tenantsync_bigquery::{BigQuery, BqError};
use tenantsync_core::Tenant;
use tokio_util::sync::CancellationToken;

impl Worker {
    /// List `ids` (the last one is the current slice's, with its row count) as committed.
    /// Idempotent: the batch id is the insertId, and listing a batch twice changes nothing in
    /// the views.
    pub(crate) async fn list_batches(
        &self,
        client: &BigQuery,
        tenant: &Tenant,
        table: &str,
        ids: &[String],
        rows: i64,
    ) -> Result<(), WorkerError> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        let payloads: Vec<String> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                serde_json::json!({"insertId": id, "json": {
                    "batch_id": id, "table_name": table, "committed_at": now,
                    "rows": (i + 1 == ids.len()).then_some(rows)}})
                .to_string()
            })
            .collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        // A listing is an insertAll request like any other: it takes its slot from the
        // tenant's and the deployment's budgets.
        let never = CancellationToken::new();
        let mut recreated = false;
        loop {
            let r = self
                .retry_bq("list batch", tenant, || async {
                    self.wait_for_budget(tenant, refs.len(), &never, &never)
                        .await?;
                    Ok(client.insert_all(BATCHES_TABLE, &refs).await?)
                })
                .await;
            match r {
                Ok(out) => {
                    return match out.row_errors.first() {
                        None => Ok(()),
                        Some(e) => Err(WorkerError::BigQuery(BqError::Invalid(format!(
                            "listing batch {} in {BATCHES_TABLE}: {}: {}",
                            ids.last().map(String::as_str).unwrap_or_default(),
                            e.reason,
                            e.message
                        )))),
                    };
                }
                // The listing table (or the dataset) was deleted behind our back: recreate it
                // once; the table schema is ensured again by the next slice.
                Err(WorkerError::BigQuery(BqError::NotFound(_))) if !recreated => {
                    recreated = true;
                    client.ensure_dataset().await?;
                    client
                        .create_table(BATCHES_TABLE, &batches_fields())
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
