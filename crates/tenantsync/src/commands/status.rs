//! `tenantsync status`: per tenant and table, then the worker pool as Redis sees it.

use super::output::{clip, print_tasks};
use super::{admin_full, print_list};
use crate::cli::{ListArgs, StatusArgs};
use crate::config;
use anyhow::Result;
use std::process::ExitCode;
use tenantsync_lease::Leases;
use tenantsync_store::ControlPlane;

pub(crate) async fn run(s: StatusArgs) -> Result<ExitCode> {
    let tasks = admin_full().await?.status(s.tenant.as_deref()).await?;
    let pool = pool_status().await?;
    if s.json {
        // One document, so `status --json | jq` and JSON parsers read all of it.
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"tasks": tasks, "pool": pool}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    print_tasks(false, &tasks)?;
    if let Some(p) = pool {
        println!(
            "\nworkers live: {} {:?}\nleader: {}\nqueue depth per shard: {:?}",
            p.workers.len(),
            p.workers,
            p.leader.as_deref().unwrap_or("none"),
            p.queue_depth
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Live workers, leader and queue depth per shard.
#[derive(serde::Serialize)]
struct PoolStatus {
    workers: Vec<String>,
    leader: Option<String>,
    queue_depth: Vec<u64>,
}

/// The worker pool as Redis sees it, when Redis is configured.
async fn pool_status() -> Result<Option<PoolStatus>> {
    let Ok(url) = config::redis_url() else {
        return Ok(None);
    };
    let leases = Leases::connect(&url, &config::redis_prefix()).await?;
    Ok(Some(PoolStatus {
        workers: leases.live_workers().await?,
        leader: leases.leader().await?,
        queue_depth: leases.queue_depths(config::shards()?).await?,
    }))
}

/// The demo's short table (no progress: the demo prints it every few seconds).
pub(crate) async fn status(control: &ControlPlane, l: &ListArgs) -> Result<()> {
    let rows = control.status().await?;
    print_list(
        l,
        &rows,
        &[
            "TENANT",
            "STATUS",
            "TABLE",
            "ROWS",
            "LAG",
            "SYNCED THROUGH",
            "LAST ERROR",
        ],
        |r| {
            vec![
                r.tenant.clone(),
                r.tenant_status.clone(),
                r.table.clone(),
                r.rows_synced.to_string(),
                r.lag_seconds
                    .map_or("never synced".into(), |l| format!("{l:.1}s")),
                r.synced_through.map_or("-".into(), |t| {
                    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
                }),
                clip(r.last_error.as_deref(), 80),
            ]
        },
    )
}
