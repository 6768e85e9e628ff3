//! Gauges every coordinator serves, leader or not. Lag is computed from control-plane state at
//! each refresh (now − effective synced_through), so it keeps rising when no worker runs.

use crate::Deps;
use metrics::{describe_gauge, gauge, Unit};
use tenantsync_core::TenantStatus;

pub const LAG: &str = "tenantsync_sync_lag_seconds";
pub const LEADER: &str = "tenantsync_coordinator_is_leader";
pub const QUEUE_DEPTH: &str = "tenantsync_queue_depth";
pub const WORKERS_LIVE: &str = "tenantsync_workers_live";
pub const TENANTS: &str = "tenantsync_tenants";
pub const CREDENTIALS_INVALID: &str = "tenantsync_tenant_credentials_invalid";
pub const DLQ_ROWS: &str = "tenantsync_dlq_rows";

pub fn describe() {
    describe_gauge!(
        LAG,
        Unit::Seconds,
        "Now minus the source time up to which a tenant's table is confirmed in BigQuery"
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
    gauge!(LEADER).set(0.0);
}

pub(crate) fn leader(is: bool) {
    gauge!(LEADER).set(if is { 1.0 } else { 0.0 });
}

/// Refresh the control-plane and Redis gauges.
pub(crate) async fn refresh(deps: &Deps, shards: u32) -> Result<(), crate::TickError> {
    let rows = deps.control.status().await?;
    let mut by_status = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in &rows {
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
