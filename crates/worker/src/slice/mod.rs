//! One slice of one (tenant, table) task, by stage:
//!
//! - this file: the lease around a slice, its claim and its finish (commit, run log, outcome);
//! - `caches.rs`: what slices share in a process (clients, plans, the horizon);
//! - `pages.rs`: the slice itself: read pages (prefetching the next), check every row's tenant,
//!   send each page, list the batch, compute the progress to commit;
//! - `payload.rs`: a row as the sink takes it;
//! - `send.rs`: one page through a [`tenantsync_bigquery::Sink`]: chunks, retries, bisection,
//!   dead letters, rate-limit waits;
//! - `schema.rs`: the dataset, table and views a slice writes to.

mod caches;
mod pages;
mod payload;
mod schema;
mod send;
#[cfg(test)]
mod send_tests;
#[cfg(test)]
mod testing;

pub(crate) use payload::payload;
pub(crate) use schema::{force_schema, table_def};
pub(crate) use send::{wait_for_slot, SendCtx};

use crate::retry::task_backoff;
use crate::{Worker, WorkerError};
use chrono::{DateTime, Utc};
use std::time::{Duration, Instant};
use tenantsync_bigquery::{BqError, Retry};
use tenantsync_core::{Capture, Mode, TableSpec, Tenant, TenantStatus};
use tenantsync_lease::Lease;
use tenantsync_store::control::tasks::{
    Claim, Commit, FinishRequest, Progress, RunRecord, TaskId, Watermark,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

/// Points where a test can make the worker "crash": stop dead, commit nothing, release nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After insertAll acknowledged rows, before the watermark commit.
    BeforeCommit,
    /// After the first chunk of a slice of several: a half-written batch.
    AfterFirstChunk,
}

pub trait Hooks: Send + Sync {
    /// Return true to crash at this point.
    fn crash(&self, _task: TaskId, _at: CrashPoint) -> bool {
        false
    }
}

pub struct NoHooks;
impl Hooks for NoHooks {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SliceOutcome {
    /// Someone else holds the lease.
    Busy,
    /// The tenant or table is not schedulable right now (paused, disabled).
    Skipped,
    /// Rows were sent and committed; `more` when the slice stopped at its row or time bound.
    Synced { rows: usize, more: bool },
    /// Stopped at an error after committing what was acknowledged. `permanent`: the error
    /// says a retry cannot fix it (an incompatible schema change, a missing column); the
    /// scheduler still retries with its backoff, `run --once` gives up at once.
    Failed {
        rows: usize,
        error: String,
        permanent: bool,
    },
    /// The lease was lost or the fencing token superseded: nothing committed by this slice.
    Fenced,
    /// A test hook crashed the slice.
    Crashed,
}

#[derive(Debug, Clone)]
pub struct SliceReport {
    pub task: TaskId,
    pub outcome: SliceOutcome,
    /// What `synced_through` is after this slice (None if unknown).
    pub synced_through: Option<DateTime<Utc>>,
}

/// What `run_slice` ended with.
enum SliceRun {
    Done(Progress),
    Crashed,
}

/// A slice about to be committed: what goes into the run log and the task's state. The error
/// is text from here on: it is stored.
struct Ended {
    rows: i64,
    outcome: &'static str,
    error: Option<String>,
    permanent: bool,
    progress: Progress,
}

/// A slice as it ends: its claim, its run record, and what it did.
struct Finished {
    claim: Claim,
    run: RunRecord,
    ended: Ended,
}

/// Renews a lease in the background; cancels `lost` when renewal fails.
fn spawn_renewer(w: &Worker, lease: Lease, lost: CancellationToken) -> tokio::task::JoinHandle<()> {
    let leases = w.deps.leases.clone();
    let every = lease.ttl / 3;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = lost.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match leases.renew(&lease).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(lease = %lease.key, "lease lost");
                    crate::metrics::lease_lost();
                    lost.cancel();
                    return;
                }
                // Redis unreachable: we cannot prove we still hold it. Keep trying until the
                // TTL would have run out, then give up the task.
                Err(e) => warn!(lease = %lease.key, error = %e, "lease renewal failed"),
            }
        }
    })
}

impl Worker {
    /// The single step: run one slice of `task` if its lease is free.
    pub async fn try_execute_task(
        &self,
        task: TaskId,
        shutdown: &CancellationToken,
    ) -> Result<SliceReport, WorkerError> {
        let holder = format!("{}:{}", self.cfg.worker_id, uuid::Uuid::new_v4().simple());
        let Some(lease) = self
            .deps
            .leases
            .acquire(task.tenant_id, task.table_id, &holder, self.cfg.lease_ttl)
            .await?
        else {
            return Ok(report(task, SliceOutcome::Busy, None));
        };
        crate::metrics::lease_acquired();
        let lost = CancellationToken::new();
        let renewer = spawn_renewer(self, lease.clone(), lost.clone());
        // Every log line of the slice carries the task, and once known its tenant, table and
        // run (the fencing token, also the `_batch_id` suffix and the run log's key).
        let span = tracing::info_span!(
            "slice",
            task = %task,
            tenant = tracing::field::Empty,
            table = tracing::field::Empty,
            run = tracing::field::Empty,
        );
        let result = self
            .with_lease(task, &lease, &lost, shutdown)
            .instrument(span)
            .await;
        lost.cancel();
        renewer.abort();
        let crashed = matches!(
            &result,
            Ok(SliceReport {
                outcome: SliceOutcome::Crashed,
                ..
            })
        );
        if !crashed {
            if let Err(e) = self.deps.leases.release(&lease).await {
                // The TTL frees it anyway.
                warn!(task = %task, error = %e, "lease release failed");
            }
        }
        result
    }

    async fn with_lease(
        &self,
        task: TaskId,
        lease: &Lease,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<SliceReport, WorkerError> {
        let started_at = Utc::now();
        let t0 = Instant::now();
        let start = self.statements().start(task).await?;
        let (tenant, spec) = (start.tenant, start.spec);
        // Not claimed: the tenant is not active or the table is disabled.
        let Some(claim) = start.claim else {
            return Ok(report(task, SliceOutcome::Skipped, None));
        };
        crate::metrics::task_seen(&tenant.slug, &spec.source_table);
        let span = tracing::Span::current();
        span.record("tenant", tenant.slug.as_str());
        span.record("table", spec.source_table.as_str());
        span.record("run", claim.fencing_token);
        let nonce = start.credentials_nonce.as_deref();
        let ended = match self
            .run_slice(&tenant, &spec, &claim, nonce, lost, shutdown)
            .await
        {
            Ok(SliceRun::Crashed) => return Ok(report(task, SliceOutcome::Crashed, None)),
            Ok(SliceRun::Done(progress)) => Ended {
                rows: progress.rows,
                outcome: if progress.error.is_some() {
                    "partial"
                } else {
                    "ok"
                },
                error: progress.error.clone(),
                permanent: false,
                progress,
            },
            Err(e) => self.failed(task, &tenant, e).await?,
        };
        let run = RunRecord {
            task,
            worker: self.cfg.worker_id.clone(),
            fencing_token: claim.fencing_token,
            started_at,
            duration: t0.elapsed(),
            rows: ended.rows,
            outcome: ended.outcome,
            error: ended.error.clone(),
        };
        let slice = Finished { claim, run, ended };
        self.finish(&tenant, &spec, slice, lease, t0).await
    }

    /// A slice that failed before it could commit anything: the task's backoff, nothing moved.
    async fn failed(
        &self,
        task: TaskId,
        tenant: &Tenant,
        e: WorkerError,
    ) -> Result<Ended, WorkerError> {
        self.pause_if_rejected(tenant, &e).await?;
        let failures = self
            .deps
            .control
            .consecutive_failures(task)
            .await
            .unwrap_or(0);
        let error = e.to_string();
        Ok(Ended {
            rows: 0,
            outcome: "failed",
            error: Some(error.clone()),
            permanent: !e.is_retriable(),
            progress: Progress {
                watermark: None,
                synced_through: None,
                rows: 0,
                rerun_if_changed_in: None,
                batches_visible_through: None,
                next_run_in: task_backoff(failures + 1),
                error: Some(error),
            },
        })
    }

    /// Commit the slice (only if its fencing token is still current), log its run, and use a
    /// caught-up slice's lease for the task's periodic turn.
    async fn finish(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
        slice: Finished,
        lease: &Lease,
        t0: Instant,
    ) -> Result<SliceReport, WorkerError> {
        let Finished { claim, run, ended } = slice;
        let (task, token) = (claim.task, claim.fencing_token);
        let progress = ended.progress;
        let periodic_every = self.periodic_every(spec, &progress);
        let synced_through = progress.synced_through.or(claim.synced_through);
        let more = progress.next_run_in.is_zero();
        let finish = self
            .statements()
            .finish(FinishRequest {
                claim: claim.clone(),
                progress: progress.clone(),
                run,
                compact_every: periodic_every,
            })
            .await?;
        if finish.commit == Commit::Committed {
            // The claim's watermark when the slice moved nothing: what an earlier failed
            // prune left would otherwise keep the task marked changed forever.
            let wm = progress.watermark.as_ref().unwrap_or(&claim.watermark);
            self.prune_changes(tenant, spec, Some(wm)).await;
        }
        let rows = ended.rows;
        let outcome = match (finish.commit, ended.error) {
            (Commit::Fenced, _) => {
                warn!(task = %task, token, "commit refused: fencing token superseded");
                crate::metrics::lease_expired();
                SliceOutcome::Fenced
            }
            (Commit::Committed, Some(error)) => {
                warn!(tenant = %tenant.slug, table = %spec.source_table, rows, error = %error, "slice stopped early");
                SliceOutcome::Failed {
                    rows: rows as usize,
                    error,
                    permanent: ended.permanent,
                }
            }
            (Commit::Committed, None) => SliceOutcome::Synced {
                rows: rows as usize,
                more,
            },
        };
        let outcome_str = match outcome {
            SliceOutcome::Fenced => "fenced",
            _ => ended.outcome,
        };
        crate::metrics::slice(outcome_str);
        if finish.commit == Commit::Committed && rows > 0 {
            crate::metrics::rows(&tenant.slug, &spec.source_table, rows as u64);
        }
        // One line per slice is too many at info with thousands of tasks; the span fields say
        // which task, tenant, table and run it was.
        debug!(
            rows,
            outcome = outcome_str,
            ms = t0.elapsed().as_millis() as u64,
            "slice finished"
        );
        // Caught up and still holding the lease: the moment to compact, if the turn came.
        if finish.compact {
            self.periodic_now(tenant, spec, lease).await;
        } else if finish.first_turn {
            self.report_unsyncable(tenant, spec).await;
        }
        Ok(report(task, outcome, synced_through))
    }

    /// A caught-up slice asks for the task's periodic turn in its commit: compaction of a
    /// latest-mode table, the MERGE of a merge-mode one, and for every mode the report of rows
    /// that cannot be synced.
    fn periodic_every(&self, spec: &TableSpec, progress: &Progress) -> Option<Duration> {
        let caught_up = progress.error.is_none() && !progress.next_run_in.is_zero();
        caught_up.then_some(match spec.mode {
            Mode::Latest | Mode::History | Mode::Cdc => self.cfg.compact_every,
            Mode::Merge => self.cfg.merge_every,
        })
    }

    /// Changelog capture: delete the changes the committed watermark has passed. A failure
    /// only leaves them for the next slice (which reads past them) to delete.
    async fn prune_changes(&self, tenant: &Tenant, spec: &TableSpec, wm: Option<&Watermark>) {
        let (
            Capture::Changelog,
            Some(Watermark {
                cursor: Some(txid),
                key,
            }),
        ) = (spec.capture, wm)
        else {
            return;
        };
        let Some(seq) = key.first() else { return };
        if let Err(e) = tenantsync_store::changelog::prune(
            self.deps.source.pool(),
            &spec.source_schema,
            &spec.source_table,
            &tenant.organization_id,
            txid,
            seq,
        )
        .await
        {
            warn!(error = %e, "cannot delete sent changes; the next slice will");
        }
    }

    /// Pause the tenant when `e` says BigQuery refused its credentials.
    async fn pause_if_rejected(&self, tenant: &Tenant, e: &WorkerError) -> Result<(), WorkerError> {
        match e {
            WorkerError::BigQuery(b) if b.retry() == Retry::PauseTenant => {
                self.pause_for_credentials(tenant, b).await
            }
            _ => Ok(()),
        }
    }

    async fn pause_for_credentials(&self, tenant: &Tenant, e: &BqError) -> Result<(), WorkerError> {
        // One line per state change, not per attempt: the tenant leaves the schedule here.
        warn!(tenant = %tenant.slug, error = %e, "credentials rejected; tenant paused until its key is rotated");
        self.deps
            .control
            .set_tenant_status(
                tenant.id,
                TenantStatus::CredentialsInvalid,
                Some(&e.to_string()),
            )
            .await?;
        self.forget_client(tenant.id).await;
        Ok(())
    }
}

fn report(
    task: TaskId,
    outcome: SliceOutcome,
    synced_through: Option<DateTime<Utc>>,
) -> SliceReport {
    SliceReport {
        task,
        outcome,
        synced_through,
    }
}
