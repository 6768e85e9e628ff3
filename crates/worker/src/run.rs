//! The loop around `try_execute_task`: continuously, or once until caught up.

use crate::slice::SliceOutcome;
use crate::{Worker, WorkerError};
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tenantsync_store::control::tasks::TaskId;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Run tasks the coordinator queues, until shut down.
    Pool,
    /// Stop once everything committed before the start is confirmed in BigQuery, or a task
    /// fails in a way a retry cannot fix.
    Once,
}

#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub rows: u64,
    pub slices: u64,
    /// Tasks that ended the run failing, with their last error.
    pub failed: BTreeMap<TaskId, String>,
}

/// How long an idle loop waits before asking for due tasks again.
const POLL: Duration = Duration::from_millis(200);

pub async fn run(
    worker: Arc<Worker>,
    mode: RunMode,
    shutdown: CancellationToken,
) -> Result<RunSummary, WorkerError> {
    match mode {
        RunMode::Once => run_once(worker, shutdown).await,
        RunMode::Pool => run_pool(worker, shutdown).await,
    }
}

async fn run_once(
    worker: Arc<Worker>,
    shutdown: CancellationToken,
) -> Result<RunSummary, WorkerError> {
    let start = Utc::now();
    let tasks = worker.deps.control.schedulable_tasks().await?;
    info!(tasks = tasks.len(), "syncing until caught up");
    let results: Vec<(TaskId, Result<Drained, String>)> = stream::iter(tasks)
        .map(|task| {
            let w = worker.clone();
            let shutdown = shutdown.clone();
            async move { (task, drain_task(&w, task, start, &shutdown).await) }
        })
        .buffer_unordered(worker.cfg.concurrency.max(1))
        .collect()
        .await;
    let mut summary = RunSummary::default();
    for (task, r) in results {
        match r {
            Ok(d) => {
                summary.rows += d.rows;
                summary.slices += d.slices;
            }
            Err(e) => {
                summary.failed.insert(task, e);
            }
        }
    }
    Ok(summary)
}

/// Rows and slices one task needed to catch up.
struct Drained {
    rows: u64,
    slices: u64,
}

/// Run slices of one task until its `synced_through` passes `start`.
async fn drain_task(
    w: &Worker,
    task: TaskId,
    start: DateTime<Utc>,
    shutdown: &CancellationToken,
) -> Result<Drained, String> {
    let (mut rows, mut slices, mut failures) = (0u64, 0u64, 0u32);
    while !shutdown.is_cancelled() {
        let report = match w.try_execute_task(task, shutdown).await {
            Ok(r) => r,
            Err(e) if e.is_retriable() => {
                failures += 1;
                let Some(wait) = once_backoff(w, failures) else {
                    return Err(e.to_string());
                };
                warn!(task = %task, error = %e, "slice failed; retrying");
                tokio::time::sleep(wait).await;
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        slices += 1;
        match report.outcome {
            SliceOutcome::Synced { rows: n, more } => {
                rows += n as u64;
                failures = 0;
                if !more && report.synced_through.is_some_and(|t| t >= start) {
                    break;
                }
                if !more {
                    // Caught up to the horizon, which trails `start` by the skew allowance.
                    tokio::time::sleep(POLL).await;
                }
            }
            SliceOutcome::Busy | SliceOutcome::Fenced => tokio::time::sleep(POLL).await,
            SliceOutcome::Skipped => break,
            SliceOutcome::Crashed => return Err("crashed by a test hook".into()),
            SliceOutcome::Failed {
                rows: n,
                error,
                permanent,
            } => {
                rows += n as u64;
                failures += 1;
                let wait = match once_backoff(w, failures) {
                    Some(wait) if !permanent => wait,
                    _ => return Err(error),
                };
                warn!(task = %task, %error, failures, "slice failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(Drained { rows, slices })
}

/// The wait before retrying a failed slice in `--once` mode, `None` once `max_attempts` slices
/// failed: the worker's retry policy with a 1 s base, capped by `max_backoff`. Uncapped, the
/// waits would add up to hours (the scheduler's task backoff grows to minutes), and a run
/// meant to finish would look hung.
fn once_backoff(w: &Worker, failures: u32) -> Option<Duration> {
    crate::retry::backoff(&w.cfg.retry_policy(), failures)
}

/// Keep this worker in the pool's membership every 2 s until `stop`; an outage is logged once.
fn spawn_heartbeat(
    leases: tenantsync_lease::Leases,
    id: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut down = false;
        while !stop.is_cancelled() {
            match leases.heartbeat(&id).await {
                Ok(()) if down => {
                    info!("redis reachable again");
                    down = false;
                }
                Ok(()) => {}
                Err(e) if !down => {
                    warn!(error = %e, "heartbeat failed; retrying");
                    down = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.cancelled() => {}
            }
        }
    })
}

/// Pull tasks from the Redis shards and run them, at most `concurrency` at once, until
/// `shutdown`; then finish the slices in flight (each stops after its current chunk, commits
/// what was acknowledged and releases its lease) and leave the membership.
async fn run_pool(
    worker: Arc<Worker>,
    shutdown: CancellationToken,
) -> Result<RunSummary, WorkerError> {
    let leases = worker.deps.leases.clone();
    let id = worker.cfg.worker_id.clone();
    let heartbeat = spawn_heartbeat(leases.clone(), id.clone(), shutdown.clone());
    info!(worker = %id, concurrency = worker.cfg.concurrency, "worker joined the pool");
    let mut summary = RunSummary::default();
    let mut set: JoinSet<(TaskId, Result<crate::SliceReport, WorkerError>)> = JoinSet::new();
    let mut in_flight: HashSet<TaskId> = HashSet::new();
    let mut start = rand::random::<u32>();
    let mut down = false;
    // At most one pop at a time, and only while a slot is free: at full concurrency no pooled
    // connection sits blocked. A pop returns as soon as a task is pushed, so one popper keeps
    // up with the slices (each costs a claim, reads and an insert; a pop is a round trip).
    let mut pops: JoinSet<Result<Option<(i64, i64)>, tenantsync_lease::LeaseError>> =
        JoinSet::new();
    loop {
        if pops.is_empty() && !shutdown.is_cancelled() && in_flight.len() < worker.cfg.concurrency {
            start = start.wrapping_add(1);
            let (leases, sd, shards) = (leases.clone(), shutdown.clone(), worker.cfg.shards);
            let pause = down.then_some(Duration::from_secs(1));
            pops.spawn(async move {
                if let Some(pause) = pause {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = sd.cancelled() => return Ok(None),
                    }
                }
                leases
                    .pop(shards, start, tenantsync_lease::pool::POP_BLOCK, &sd)
                    .await
            });
        }
        if shutdown.is_cancelled() && set.is_empty() && pops.is_empty() {
            break;
        }
        tokio::select! {
            Some(popped) = pops.join_next(), if !pops.is_empty() => {
                match popped? {
                    Ok(Some((tenant_id, table_id))) => {
                        down = false;
                        let task = TaskId {
                            tenant_id,
                            table_id,
                        };
                        if in_flight.insert(task) {
                            let (w, sd) = (worker.clone(), shutdown.clone());
                            set.spawn(async move { (task, w.try_execute_task(task, &sd).await) });
                        }
                    }
                    Ok(None) => down = false,
                    Err(e) => {
                        // Logged once per outage, not once per pop.
                        if !down {
                            warn!(error = %e, "cannot pull tasks; retrying");
                            down = true;
                        }
                    }
                }
            }
            Some(done) = set.join_next(), if !set.is_empty() => {
                let (task, result) = done?;
                in_flight.remove(&task);
                summary.slices += 1;
                match result {
                    Ok(r) => {
                        if let SliceOutcome::Synced { rows, .. } | SliceOutcome::Failed { rows, .. } = r.outcome {
                            summary.rows += rows as u64;
                        }
                    }
                    Err(e) => warn!(task = %task, error = %e, "slice failed"),
                }
            }
            _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
        }
    }
    heartbeat.abort();
    if let Err(e) = leases.leave(&id).await {
        warn!(error = %e, "could not leave the pool membership");
    }
    info!(worker = %id, "worker left the pool");
    Ok(summary)
}
