//! Backfill progress and ETA per (tenant, table).
//!
//! Progress counts rows in the source for the tenant (tenant filter, capped at
//! [`COUNT_CAP`] so a huge table costs a bounded index scan) and the rows at or after what is
//! confirmed in BigQuery; the ETA divides what is left by the rate of the recent run log.

use crate::Result;
use serde::Serialize;
use std::collections::HashMap;
use tenantsync_store::control::StatusRow;
use tenantsync_store::{ControlPlane, SlicePlan, SourceReader};

/// Source counts stop here; beyond it the numbers are marked `estimated`.
pub const COUNT_CAP: i64 = 1_000_000;
/// The run log window the sync rate is measured over.
pub const RATE_WINDOW_S: f64 = 300.0;

#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Rows of this tenant in the source table (at most [`COUNT_CAP`]).
    pub source_rows: i64,
    /// Of those, rows still to send: at or past what is confirmed in BigQuery, and during a
    /// backfill at most those never sent.
    pub remaining_rows: i64,
    pub percent: f64,
    /// True when a count hit the cap: percent and ETA are lower bounds.
    pub estimated: bool,
    /// Rows per second over the recent run log.
    pub rows_per_s: Option<f64>,
    /// Seconds until caught up at that rate (None: no recent rate to go by).
    pub eta_seconds: Option<f64>,
}

/// One (tenant, table): the status row plus its switch and progress.
#[derive(Debug, Clone, Serialize)]
pub struct TaskStatus {
    #[serde(flatten)]
    pub row: StatusRow,
    /// The per-tenant switch (`tables enable|disable --tenant`).
    pub enabled: bool,
    /// None when the source is not reachable from here or the table cannot be read.
    pub progress: Option<Progress>,
}

pub async fn status(
    control: &ControlPlane,
    source: Option<&SourceReader>,
    tenant: Option<&str>,
) -> Result<Vec<TaskStatus>> {
    let rows: Vec<StatusRow> = control
        .status()
        .await?
        .into_iter()
        .filter(|r| tenant.is_none_or(|t| r.tenant == t))
        .collect();
    let tenant_id = match (tenant, rows.first()) {
        (Some(_), Some(r)) => Some(r.tenant_id),
        _ => None,
    };
    let rates: HashMap<(i64, i64), (bool, Option<f64>)> = control
        .task_rates(tenant_id, RATE_WINDOW_S)
        .await?
        .into_iter()
        .map(|r| {
            (
                (r.task.tenant_id, r.task.table_id),
                (r.enabled, r.rows_per_s),
            )
        })
        .collect();
    let counts = match source {
        Some(source) => counts(control, source, &rows).await,
        None => HashMap::new(),
    };
    Ok(rows
        .into_iter()
        .map(|row| {
            let key = (row.tenant_id, row.table_id);
            let (enabled, rate) = rates.get(&key).copied().unwrap_or((true, None));
            let progress = counts.get(&key).map(|&(total, since)| {
                // Rows at or after the confirmed point over-count while a backfill is under
                // way when many rows share one cursor value (a bulk load): bound it by the
                // rows not sent even once. Once every row was sent, updates make rows_synced
                // exceed the total and only the cursor count means anything.
                let remaining = if row.caught_up {
                    0
                } else if row.rows_synced < total {
                    since.min(total - row.rows_synced)
                } else {
                    since.min(total)
                };
                let percent = if total == 0 {
                    100.0
                } else {
                    ((total - remaining) as f64 * 100.0 / total as f64 * 10.0).round() / 10.0
                };
                Progress {
                    source_rows: total,
                    remaining_rows: remaining,
                    percent,
                    estimated: total >= COUNT_CAP,
                    rows_per_s: rate,
                    eta_seconds: if remaining == 0 {
                        Some(0.0)
                    } else {
                        rate.filter(|r| *r > 0.0).map(|r| remaining as f64 / r)
                    },
                }
            });
            TaskStatus {
                row,
                enabled,
                progress,
            }
        })
        .collect())
}

/// Per task: (rows of the tenant, rows at or past its confirmed point). Two counting queries
/// per table for all tenants at once. A table whose plan cannot be built is left out.
async fn counts(
    control: &ControlPlane,
    source: &SourceReader,
    rows: &[StatusRow],
) -> HashMap<(i64, i64), (i64, i64)> {
    let mut out = HashMap::new();
    let Ok(specs) = control.tables().await else {
        return out;
    };
    for spec in specs {
        let tasks: Vec<&StatusRow> = rows.iter().filter(|r| r.table_id == spec.id).collect();
        if tasks.is_empty() {
            continue;
        }
        let plan = match source
            .columns(&spec.source_schema, &spec.source_table)
            .await
            .map_err(|e| e.to_string())
            .and_then(|cols| SlicePlan::build(&spec, &cols).map_err(|e| e.to_string()))
        {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(table = %spec.source_table, error = %e, "no progress");
                continue;
            }
        };
        let all: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> = tasks
            .iter()
            .map(|r| (r.organization_id.clone(), None))
            .collect();
        let since: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> = tasks
            .iter()
            .filter(|r| r.synced_through.is_some())
            .map(|r| (r.organization_id.clone(), r.synced_through))
            .collect();
        let (Ok(total), Ok(left)) = (
            source.backlog(&plan, &all, COUNT_CAP).await,
            source.backlog(&plan, &since, COUNT_CAP).await,
        ) else {
            continue;
        };
        let total: HashMap<String, i64> = total.into_iter().collect();
        let left: HashMap<String, i64> = left.into_iter().collect();
        for r in tasks {
            let t = total.get(&r.organization_id).copied().unwrap_or(0);
            // Never synced: everything is left.
            let l = match r.synced_through {
                None => t,
                Some(_) => left.get(&r.organization_id).copied().unwrap_or(t),
            };
            out.insert((r.tenant_id, r.table_id), (t, l));
        }
    }
    out
}
