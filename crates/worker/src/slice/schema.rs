//! The dataset, table and views a slice writes to.

use crate::{Worker, WorkerError};
use tenantsync_bigquery::{BqError, Sink, TableDef};
use tenantsync_core::{TableSpec, Tenant};
use tenantsync_store::control::tasks::Claim;
use tenantsync_store::SlicePlan;
use tracing::{debug, info};

/// The sink's view of a table: its plan's columns, the spec's keys and mode.
pub(crate) fn table_def<'a>(
    spec: &'a TableSpec,
    plan: &'a SlicePlan,
    read_back: std::time::Duration,
) -> TableDef<'a> {
    TableDef {
        table: &plan.table,
        fields: &plan.fields,
        keys: &spec.key_columns,
        mode: spec.mode,
        max_staleness_s: spec.max_staleness_s,
        excluded: &spec.exclude_columns,
        hashed: &spec.hash_columns,
        read_back,
    }
}

/// Dataset, table (with added columns), batch listing, and the view or merged table.
pub(crate) async fn force_schema<S: Sink>(sink: &S, def: &TableDef<'_>) -> Result<(), BqError> {
    if sink.ensure_dataset().await? {
        info!(dataset = sink.dataset(), "created dataset");
    }
    let change = sink.ensure_table(def).await?;
    debug!(table = def.table, ?change, "schema synced");
    Ok(())
}

/// Version of the view SQL (`tenantsync_bigquery::schema`): 2 shows Storage Write batches
/// without a listing; 3 reads committed listings of its own table (merges then point it at
/// `<table>_current`); 4 reads them from the table's own `_sync_batches_<table>`, which the
/// schema sync creates with the table's listings from `_sync_batches` copied in.
const VIEWS_VERSION: &str = "views4";

impl Worker {
    /// [`force_schema`], skipped when the task's stored schema hash matches the plan (no API
    /// calls at all), and the hash stored once it is done.
    pub(super) async fn ensure_schema<S: Sink>(
        &self,
        sink: &S,
        tenant: &Tenant,
        spec: &TableSpec,
        plan: &SlicePlan,
        claim: &Claim,
    ) -> Result<(), WorkerError> {
        // The stored hash also names the views' definition, so a release that changes it
        // brings every table's views along at its next slice.
        let hash = format!("{}/{VIEWS_VERSION}", plan.schema_hash);
        if claim.schema_hash.as_deref() == Some(hash.as_str()) {
            return Ok(());
        }
        let def = table_def(spec, plan, self.read_back());
        self.retry_bq("sync schema", tenant, || async {
            Ok(force_schema(sink, &def).await?)
        })
        .await?;
        self.deps.control.set_schema_hash(claim.task, &hash).await?;
        Ok(())
    }
}
