//! Claim, commit and fail: every statement that moves a (tenant, table) task, top to bottom.
//!
//! The order of a slice is: [`ControlPlane::start_slice`] (after the Redis lease is held) issues
//! a new fencing token and returns the watermark; the worker reads and sends;
//! [`ControlPlane::finish_slice`] moves the watermark only if the token is still the current one.
//! A worker that was paused past its lease sees its commit refused ([`Commit::Fenced`]) because
//! the next holder's claim bumped the token.

use super::{spec_from_row_with_id, tenant_from_row, ControlPlane};
use crate::error::{Result, StoreError};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::time::Duration;
use tenantsync_core::{TableSpec, Tenant};

/// A (tenant, table) pair: the unit of scheduling and of mutual exclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId {
    pub tenant_id: i64,
    pub table_id: i64,
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.tenant_id, self.table_id)
    }
}

/// Keyset position of the last row BigQuery acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Watermark {
    pub cursor: Option<String>,
    pub key: Vec<String>,
}

/// What a claim hands the worker.
#[derive(Debug, Clone)]
pub struct Claim {
    pub task: TaskId,
    pub fencing_token: i64,
    pub watermark: Watermark,
    pub synced_through: Option<DateTime<Utc>>,
    /// Schema hash last ensured in BigQuery for this task.
    pub schema_hash: Option<String>,
    /// Batches (fencing tokens) of this task up to here are listed in `_sync_batches`.
    pub batches_visible_through: i64,
    /// Up to where the coordinator's change detection has seen changes of the task: the slice
    /// reads below a horizon at least this late when it can, or it would leave them for the
    /// next slice.
    pub changed_until: Option<DateTime<Utc>>,
}

/// Progress to record after a slice.
#[derive(Debug, Clone)]
pub struct Progress {
    /// New watermark, when at least one row was acknowledged.
    pub watermark: Option<Watermark>,
    /// Source time up to which everything is now confirmed (the horizon when the slice drained
    /// everything below it, otherwise the cursor of the last acknowledged row).
    pub synced_through: Option<DateTime<Utc>>,
    pub rows: i64,
    /// When the task should run again.
    pub next_run_in: Duration,
    /// For a caught-up task: run again this soon instead, if the coordinator has seen changes
    /// past the new `synced_through` (the worker's horizon can trail the coordinator's).
    pub rerun_if_changed_in: Option<Duration>,
    /// The error that stopped the slice early, if any.
    pub error: Option<String>,
    /// This slice listed its batch and the task's earlier ones up to this token.
    pub batches_visible_through: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    Committed,
    /// A newer claim exists: this worker lost the task and must not touch it again.
    Fenced,
}

/// What [`ControlPlane::start_slice`] hands the worker.
#[derive(Debug, Clone)]
pub struct SliceStart {
    pub tenant: Tenant,
    pub spec: TableSpec,
    /// The nonce of the tenant's sealed key (its version); None without credentials.
    pub credentials_nonce: Option<Vec<u8>>,
    /// None: the tenant is not active or the table is disabled; nothing was claimed.
    pub claim: Option<Claim>,
}

/// What [`ControlPlane::finish_slice`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    pub commit: Commit,
    /// The compaction turn was asked for, is due and is now taken: compact.
    pub compact: bool,
    /// The task's first turn was asked for: it only started the clock (nothing to compact
    /// yet), but the cheap periodic checks are due.
    pub first_turn: bool,
}

/// One task's end of slice, for [`ControlPlane::finish_slices`].
#[derive(Debug, Clone)]
pub struct FinishRequest {
    pub claim: Claim,
    pub progress: Progress,
    pub run: RunRecord,
    /// Ask for the compaction turn (see [`ControlPlane::finish_slice`]).
    pub compact_every: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct RunRecord {
    pub task: TaskId,
    pub worker: String,
    pub fencing_token: i64,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub rows: i64,
    pub outcome: &'static str,
    pub error: Option<String>,
}

impl ControlPlane {
    /// Tasks that are due: tenant active, table enabled for it, next run in the past. One query
    /// however many tenants exist.
    pub async fn due_tasks(&self, limit: i64) -> Result<Vec<TaskId>> {
        let rows = sqlx::query(
            "SELECT s.tenant_id, s.table_id
             FROM sync_state s
             JOIN tenants tn ON tn.id = s.tenant_id AND tn.status = 'active'
             JOIN table_specs ts ON ts.id = s.table_id AND ts.enabled
             WHERE s.enabled AND s.next_run_at <= now()
             ORDER BY s.next_run_at
             LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(task_from_row).collect()
    }

    /// Every task that should be synced (tenant active, table enabled), scheduled or not.
    pub async fn schedulable_tasks(&self) -> Result<Vec<TaskId>> {
        let rows = sqlx::query(
            "SELECT s.tenant_id, s.table_id
             FROM sync_state s
             JOIN tenants tn ON tn.id = s.tenant_id AND tn.status = 'active'
             JOIN table_specs ts ON ts.id = s.table_id AND ts.enabled
             WHERE s.enabled
             ORDER BY s.tenant_id, s.table_id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(task_from_row).collect()
    }

    /// Per table, the oldest `synced_through` of its schedulable tasks: where a new leader's
    /// change detection starts (None: some task never synced; it is due anyway).
    pub async fn change_detection_start(&self) -> Result<Vec<(i64, Option<DateTime<Utc>>)>> {
        let rows = sqlx::query(
            "SELECT ts.id AS table_id,
                    min(s.synced_through) FILTER (WHERE s.synced_through IS NOT NULL) AS since
             FROM table_specs ts
             LEFT JOIN sync_state s ON s.table_id = ts.id AND s.enabled
             WHERE ts.enabled
             GROUP BY ts.id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("table_id")?, r.try_get("since")?)))
            .collect()
    }

    /// Make the tasks of `table_id` for these tenants due, no sooner than the table's interval
    /// after their last success, and remember up to where changes were seen for them.
    /// `scanned_through` is the end of the scan that saw the changes.
    pub async fn mark_changed(
        &self,
        table_id: i64,
        organization_ids: &[String],
        scanned_through: DateTime<Utc>,
    ) -> Result<u64> {
        if organization_ids.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(
            // Rows are locked in key order, like the workers' batched statements do.
            "WITH locked AS (
                 SELECT s.tenant_id, s.table_id
                 FROM sync_state s JOIN tenants tn ON tn.id = s.tenant_id
                 WHERE s.table_id = $1 AND tn.organization_id = ANY($2)
                 ORDER BY s.tenant_id, s.table_id
                 FOR UPDATE OF s
             )
             UPDATE sync_state s
             SET next_run_at = LEAST(s.next_run_at,
                                     GREATEST(now(), coalesce(s.last_success_at, now())
                                              + make_interval(secs => ts.sync_interval_ms / 1000.0))),
                 changed_until = GREATEST(s.changed_until, $3)
             FROM locked, table_specs ts
             WHERE s.tenant_id = locked.tenant_id AND s.table_id = locked.table_id
               AND ts.id = s.table_id",
        )
        .bind(table_id)
        .bind(organization_ids)
        .bind(scanned_through)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Record that change detection covered `[from, through)` of a table without a gap since
    /// `from` (`restart`: a new scan run begins at `from`; otherwise it extends the current one).
    /// Call after [`Self::mark_changed`] for the same scan.
    pub async fn record_scan(
        &self,
        table_id: i64,
        from: DateTime<Utc>,
        through: DateTime<Utc>,
        restart: bool,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO change_scans (table_id, scanned_from, scanned_through) VALUES ($1, $2, $3)
             ON CONFLICT (table_id) DO UPDATE SET
                 scanned_from = CASE WHEN $4 THEN excluded.scanned_from ELSE change_scans.scanned_from END,
                 scanned_through = excluded.scanned_through,
                 updated_at = now()",
        )
        .bind(table_id)
        .bind(from)
        .bind(through)
        .bind(restart)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Issue a new fencing token for the task and return its watermark. Call only while holding
    /// the task's Redis lease; the token invalidates every earlier holder's pending commit.
    /// A task switched off for its tenant (`tables disable --tenant`) cannot be claimed, so a
    /// copy still queued when it was switched off sends nothing.
    pub async fn claim(&self, task: TaskId) -> Result<Claim> {
        let row = sqlx::query(
            "UPDATE sync_state SET fencing_token = fencing_token + 1
             WHERE tenant_id = $1 AND table_id = $2 AND enabled
             RETURNING fencing_token, watermark_cursor, watermark_key, synced_through, schema_hash,
                       batches_visible_through, changed_until",
        )
        .bind(task.tenant_id)
        .bind(task.table_id)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| {
            StoreError::NotFound(format!(
                "task {task} is disabled for its tenant or has no sync state"
            ))
        })?;
        claim_from_row(task, &row)
    }

    /// The start of a slice in one statement: tenant, table spec, credentials nonce and the
    /// claim (see [`Self::claim`]), taken only when the tenant is active and the table enabled.
    /// Call only while holding the task's Redis lease.
    pub async fn start_slice(&self, task: TaskId) -> Result<SliceStart> {
        self.start_slices(&[task])
            .await?
            .pop()
            .expect("one result per task")
    }

    /// [`Self::start_slice`] for several tasks in one statement and transaction: one result per
    /// task, in order. A worker's slices that start together share it (one statement and one
    /// commit instead of one each).
    pub async fn start_slices(&self, tasks: &[TaskId]) -> Result<Vec<Result<SliceStart>>> {
        let (tenants, tables): (Vec<i64>, Vec<i64>) =
            tasks.iter().map(|t| (t.tenant_id, t.table_id)).unzip();
        let rows = sqlx::query(include_str!("../queries/start_slice.sql"))
            .bind(tenants)
            .bind(tables)
            .fetch_all(self.pool())
            .await?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            found.insert(task_from_row(row)?, row);
        }
        Ok(tasks
            .iter()
            .map(|task| match found.get(task) {
                Some(row) => slice_start_from_row(*task, row),
                None => Err(StoreError::NotFound(format!(
                    "tenant or table spec of task {task} does not exist"
                ))),
            })
            .collect())
    }

    /// Remember that the task's BigQuery table and views match `schema_hash`.
    pub async fn set_schema_hash(&self, task: TaskId, schema_hash: &str) -> Result<()> {
        sqlx::query(
            "UPDATE sync_state SET schema_hash = $3 WHERE tenant_id = $1 AND table_id = $2",
        )
        .bind(task.tenant_id)
        .bind(task.table_id)
        .bind(schema_hash)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Delete run-log entries of slices that started more than `keep` ago, looking at the
    /// `batch` oldest entries only (a range of the primary key: cheap however long the log
    /// is). Returns how many went; a full `batch` means there may be more. Entries are
    /// written when a slice ends, so ids follow start times to within a slice's length.
    pub async fn prune_runs(&self, keep: Duration, batch: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM sync_runs
             WHERE id < (SELECT min(id) FROM sync_runs) + $2
               AND started_at < now() - make_interval(secs => $1)",
        )
        .bind(keep.as_secs_f64())
        .bind(batch)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Consecutive failures of a task so far (for backoff).
    pub async fn consecutive_failures(&self, task: TaskId) -> Result<i32> {
        Ok(sqlx::query_scalar(
            "SELECT consecutive_failures FROM sync_state WHERE tenant_id = $1 AND table_id = $2",
        )
        .bind(task.tenant_id)
        .bind(task.table_id)
        .fetch_one(self.pool())
        .await?)
    }

    /// Run now, whatever the schedule said (used by `--once` and after onboarding).
    pub async fn make_all_due(&self) -> Result<()> {
        sqlx::query("UPDATE sync_state SET next_run_at = now() WHERE next_run_at > now()")
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The oldest `synced_through` among schedulable tasks (None when some task has never
    /// synced): `run --once` is done when this passes the moment it started.
    pub async fn oldest_synced_through(&self) -> Result<Option<DateTime<Utc>>> {
        let row = sqlx::query(
            "SELECT bool_or(s.synced_through IS NULL) AS never,
                    min(effective_synced_through(s, cs)) AS oldest
             FROM sync_state s
             LEFT JOIN change_scans cs ON cs.table_id = s.table_id
             JOIN tenants tn ON tn.id = s.tenant_id AND tn.status = 'active'
             JOIN table_specs ts ON ts.id = s.table_id AND ts.enabled
             WHERE s.enabled",
        )
        .fetch_one(self.pool())
        .await?;
        let never: Option<bool> = row.try_get("never")?;
        if never == Some(true) {
            return Ok(None);
        }
        Ok(row.try_get("oldest")?)
    }
}

/// The task a row of a batched statement answers (its `tenant_id` and `table_id`).
pub(super) fn task_from_row(row: &sqlx::postgres::PgRow) -> Result<TaskId> {
    Ok(TaskId {
        tenant_id: row.try_get("tenant_id")?,
        table_id: row.try_get("table_id")?,
    })
}

fn slice_start_from_row(task: TaskId, row: &sqlx::postgres::PgRow) -> Result<SliceStart> {
    let tenant = tenant_from_row(row)?;
    let spec = spec_from_row_with_id(row, "table_spec_id")?;
    let token: Option<i64> = row.try_get("fencing_token")?;
    let claim = match token {
        Some(_) => Some(claim_from_row(task, row)?),
        None if tenant.status == tenantsync_core::TenantStatus::Active && spec.enabled => {
            return Err(StoreError::NotFound(format!(
                "task {task} is disabled for its tenant or has no sync state"
            )))
        }
        None => None,
    };
    Ok(SliceStart {
        credentials_nonce: row.try_get("credentials_nonce")?,
        tenant,
        spec,
        claim,
    })
}

fn claim_from_row(task: TaskId, row: &sqlx::postgres::PgRow) -> Result<Claim> {
    let key: Option<Vec<String>> = row.try_get("watermark_key")?;
    Ok(Claim {
        task,
        fencing_token: row.try_get("fencing_token")?,
        watermark: Watermark {
            cursor: row.try_get("watermark_cursor")?,
            key: key.unwrap_or_default(),
        },
        synced_through: row.try_get("synced_through")?,
        schema_hash: row.try_get("schema_hash")?,
        batches_visible_through: row.try_get("batches_visible_through")?,
        changed_until: row.try_get("changed_until")?,
    })
}
