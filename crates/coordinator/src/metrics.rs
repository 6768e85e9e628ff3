//! Gauges every coordinator serves, leader or not. Lag is computed from control-plane state at
//! each refresh (now − effective synced_through), so it keeps rising when no worker runs.

use crate::Deps;
use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tenantsync_core::TenantStatus;
use tenantsync_store::source::SlicePlan;
use tracing::debug;

pub const LAG: &str = "tenantsync_sync_lag_seconds";
pub const BACKLOG: &str = "tenantsync_sync_backlog_rows";
pub const LEADER: &str = "tenantsync_coordinator_is_leader";
pub const QUEUE_DEPTH: &str = "tenantsync_queue_depth";
pub const WORKERS_LIVE: &str = "tenantsync_workers_live";
pub const TENANTS: &str = "tenantsync_tenants";
pub const CREDENTIALS_INVALID: &str = "tenantsync_tenant_credentials_invalid";
pub const DLQ_ROWS: &str = "tenantsync_dlq_rows";
pub const TICK_FAILURES: &str = "tenantsync_coordinator_tick_failures_total";
pub const SCAN_FAILURES: &str = "tenantsync_coordinator_scan_failures_total";

pub fn describe() {
    describe_gauge!(
        LAG,
        Unit::Seconds,
        "Now minus the source time up to which a tenant's table is confirmed in BigQuery"
    );
    describe_gauge!(
        BACKLOG,
        Unit::Count,
        "Estimated source rows of a tenant's table not yet confirmed in BigQuery"
    );
    describe_gauge!(
        LEADER,
        "1 on the coordinator that currently schedules, 0 on standbys"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Tasks waiting in a Redis queue shard"
    );
    describe_gauge!(WORKERS_LIVE, Unit::Count, "Workers with a recent heartbeat");
    describe_gauge!(TENANTS, Unit::Count, "Tenants by status");
    describe_gauge!(
        CREDENTIALS_INVALID,
        "1 when a tenant's credentials stopped working"
    );
    describe_gauge!(
        DLQ_ROWS,
        Unit::Count,
        "Open rows in the dead-letter table, per tenant and table"
    );
    describe_counter!(
        TICK_FAILURES,
        Unit::Count,
        "Coordinator ticks that failed as a whole (control plane, source or Redis unreachable)"
    );
    describe_counter!(
        SCAN_FAILURES,
        Unit::Count,
        "Change detections of one table that failed; the other tables were still scanned"
    );
    gauge!(LEADER).set(0.0);
    counter!(TICK_FAILURES).absolute(0);
}

pub(crate) fn tick_failed() {
    counter!(TICK_FAILURES).increment(1);
}

/// The table's failure counter at 0 (a no-op when it counted already), so dashboards and
/// alerts see a series per table before anything fails.
pub(crate) fn scan_registered(table: &str) {
    counter!(SCAN_FAILURES, "table" => table.to_string()).absolute(0);
}

pub(crate) fn scan_failed(table: &str) {
    counter!(SCAN_FAILURES, "table" => table.to_string()).increment(1);
}

pub(crate) fn leader(is: bool) {
    gauge!(LEADER).set(if is { 1.0 } else { 0.0 });
}

/// Counting stops here: the gauge says "at least this many", and a backfill of a huge table
/// costs a bounded index scan per refresh.
const BACKLOG_CAP: i64 = 10_000_000;

/// State the gauge refresher keeps between refreshes: the read plans of the tables, rebuilt
/// every minute (a column added in Postgres changes them), and the tenants and tables it
/// reported last time.
#[derive(Default)]
pub(crate) struct Refresher {
    plans: HashMap<i64, SlicePlan>,
    plans_at: Option<Instant>,
    shown: HashSet<(String, String)>,
    shown_tenants: HashSet<String>,
}

impl Refresher {
    async fn plans(&mut self, deps: &Deps) -> Result<&HashMap<i64, SlicePlan>, crate::TickError> {
        if self
            .plans_at
            .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            self.plans.clear();
            for spec in deps.control.tables().await? {
                let plan = match deps
                    .source
                    .columns(&spec.source_schema, &spec.source_table)
                    .await
                {
                    Ok(cols) => SlicePlan::build(&spec, &cols).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match plan {
                    Ok(p) => {
                        self.plans.insert(spec.id, p);
                    }
                    // The worker records this on the task; here it only means no backlog figure.
                    Err(e) => debug!(table = %spec.source_table, error = %e, "no backlog estimate"),
                }
            }
            self.plans_at = Some(Instant::now());
        }
        Ok(&self.plans)
    }

    /// Refresh the control-plane and Redis gauges.
    pub(crate) async fn refresh(
        &mut self,
        deps: &Deps,
        shards: u32,
    ) -> Result<(), crate::TickError> {
        let rows = deps.control.status().await?;
        self.backlog(deps, &rows).await?;
        self.zero_removed(&rows);
        refresh_rest(deps, shards, &rows).await
    }

    /// A removed tenant (or a table taken off the sync) is no longer in the status rows, but
    /// its series would keep their last values in this process: a tenant removed while it
    /// lagged would hold `TenantLagHigh` firing for ever. The exporter cannot delete a series,
    /// so they read 0 from the next refresh on (and are gone at the next restart).
    fn zero_removed(&mut self, rows: &[tenantsync_store::control::StatusRow]) {
        let shown: HashSet<(String, String)> = rows
            .iter()
            .map(|r| (r.tenant.clone(), r.table.clone()))
            .collect();
        let tenants: HashSet<String> = rows.iter().map(|r| r.tenant.clone()).collect();
        for (tenant, table) in self.shown.difference(&shown) {
            for name in [LAG, BACKLOG, DLQ_ROWS] {
                gauge!(name, "tenant" => tenant.clone(), "table" => table.clone()).set(0.0);
            }
        }
        for tenant in self.shown_tenants.difference(&tenants) {
            gauge!(CREDENTIALS_INVALID, "tenant" => tenant.clone()).set(0.0);
        }
        self.shown = shown;
        self.shown_tenants = tenants;
    }

    /// `tenantsync_sync_backlog_rows`: one count query per table with lagging tenants.
    async fn backlog(
        &mut self,
        deps: &Deps,
        rows: &[tenantsync_store::control::StatusRow],
    ) -> Result<(), crate::TickError> {
        let mut behind: HashMap<i64, Vec<&tenantsync_store::control::StatusRow>> = HashMap::new();
        for r in rows {
            // Only tasks with changes detected past their confirmed point (or never synced)
            // are counted; at idle scale that is almost none, so this stays cheap.
            if !r.caught_up {
                behind.entry(r.table_id).or_default().push(r);
            } else {
                gauge!(BACKLOG, "tenant" => r.tenant.clone(), "table" => r.table.clone()).set(0.0);
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        let plans = self.plans(deps).await?;
        for (table_id, tasks) in behind {
            let Some(plan) = plans.get(&table_id) else {
                continue;
            };
            let args: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> = tasks
                .iter()
                .map(|r| (r.organization_id.clone(), r.synced_through))
                .collect();
            let counts: HashMap<String, i64> = deps
                .source
                .backlog(plan, &args, BACKLOG_CAP)
                .await?
                .into_iter()
                .collect();
            for r in tasks {
                let n = counts.get(&r.organization_id).copied().unwrap_or(0);
                gauge!(BACKLOG, "tenant" => r.tenant.clone(), "table" => r.table.clone())
                    .set(n as f64);
            }
        }
        Ok(())
    }
}

async fn refresh_rest(
    deps: &Deps,
    shards: u32,
    rows: &[tenantsync_store::control::StatusRow],
) -> Result<(), crate::TickError> {
    let mut by_status = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in rows {
        // A never-synced task has no lag value yet; it shows up once its first slice commits.
        if let Some(lag) = r.lag_seconds {
            gauge!(LAG, "tenant" => r.tenant.clone(), "table" => r.table.clone()).set(lag.max(0.0));
        }
        if seen.insert(r.tenant.clone()) {
            *by_status.entry(r.tenant_status.clone()).or_insert(0u32) += 1;
            let invalid = r.tenant_status == TenantStatus::CredentialsInvalid.as_str();
            gauge!(CREDENTIALS_INVALID, "tenant" => r.tenant.clone()).set(if invalid {
                1.0
            } else {
                0.0
            });
        }
    }
    for s in TenantStatus::ALL {
        gauge!(TENANTS, "status" => s.as_str())
            .set(f64::from(*by_status.get(s.as_str()).unwrap_or(&0)));
    }
    for (shard, depth) in deps
        .leases
        .queue_depths(shards)
        .await?
        .into_iter()
        .enumerate()
    {
        gauge!(QUEUE_DEPTH, "shard" => shard.to_string()).set(depth as f64);
    }
    gauge!(WORKERS_LIVE).set(deps.leases.live_workers().await?.len() as f64);
    for (tenant, table, n) in deps.control.open_dead_letters().await? {
        gauge!(DLQ_ROWS, "tenant" => tenant, "table" => table).set(n as f64);
    }
    Ok(())
}
