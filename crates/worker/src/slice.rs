//! One slice of one (tenant, table) task.

use crate::{CachedPlan, Worker, WorkerError};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tenantsync_bigquery::schema::{
    batches_fields, final_fields, latest_view_sql, sync_fields, sync_table, BATCHES_TABLE,
};
use tenantsync_bigquery::{BigQuery, BqError, Credentials, Retry};
use tenantsync_core::chunk;
use tenantsync_core::insert_id::insert_id;
use tenantsync_core::names::{self, TableNames};
use tenantsync_core::{Capture, Mode, TableSpec, Tenant, TenantStatus};
use tenantsync_lease::Lease;
use tenantsync_store::control::dead_letters::NewDeadLetter;
use tenantsync_store::control::tasks::{
    Claim, Commit, FinishRequest, Progress, RunRecord, TaskId, Watermark,
};
use tenantsync_store::{SlicePlan, SourceReader, SourceRow, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

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

fn backoff(base: Duration, attempt: u32, cap: Duration) -> Duration {
    let exp = base
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(cap);
    // Full jitter: spreads retries of many workers hitting the same limit.
    Duration::from_millis(rand::thread_rng().gen_range(0..=exp.as_millis() as u64))
}

/// Backoff before the next slice of a task that failed `failures` times in a row.
pub(crate) fn task_backoff(failures: i32) -> Duration {
    Duration::from_secs(1u64 << failures.clamp(0, 8) as u32).min(Duration::from_secs(300))
}

impl Worker {
    /// The tenant's client when the cached one was built from the sealed key whose nonce is
    /// `nonce` (read by the slice's first statement): a rotated key is used from the next slice
    /// on, in every worker. Otherwise the key is read and a new client built.
    pub(crate) async fn client_for(
        &self,
        tenant: &Tenant,
        nonce: Option<&[u8]>,
    ) -> Result<Arc<BigQuery>, WorkerError> {
        if let Some((v, c)) = self.caches.clients.lock().await.get(&tenant.id) {
            if v.as_slice() == nonce.unwrap_or_default() {
                return Ok(c.clone());
            }
        }
        self.client(tenant).await
    }

    /// The tenant's client. The sealed key is read (one small query) and its nonce compared
    /// with the cached client's.
    pub(crate) async fn client(&self, tenant: &Tenant) -> Result<Arc<BigQuery>, WorkerError> {
        let sealed = self.deps.control.credentials(tenant.id).await?;
        let version = sealed.as_ref().map(|s| s.nonce.clone()).unwrap_or_default();
        let mut clients = self.caches.clients.lock().await;
        if let Some((v, c)) = clients.get(&tenant.id) {
            if *v == version {
                return Ok(c.clone());
            }
        }
        let creds = match sealed {
            Some(sealed) => {
                Credentials::ServiceAccount(self.deps.master_key.open(&sealed, tenant.id)?)
            }
            None if self.cfg.endpoint.emulator => Credentials::Emulator,
            None => {
                return Err(WorkerError::Config(format!(
                    "tenant {} has no credentials and BIGQUERY_EMULATOR_HOST is not set",
                    tenant.slug
                )))
            }
        };
        let c = Arc::new(
            BigQuery::new(
                &self.cfg.endpoint,
                &tenant.bq_project,
                &tenant.bq_dataset,
                &creds,
                self.cfg.request_timeout,
            )
            .await?,
        );
        clients.insert(tenant.id, (version, c.clone()));
        Ok(c)
    }

    /// Drop the cached client of a tenant (after its credentials changed or failed).
    pub async fn forget_client(&self, tenant_id: i64) {
        self.caches.clients.lock().await.remove(&tenant_id);
    }

    /// The slice plan of a table. Built from the catalog once per process and spec, not per
    /// slice (two catalog queries were a sixth of a slice's statements): every slice read
    /// compares the catalog's fingerprint with the plan's, and a column added in Postgres
    /// makes that read fail with `CatalogChanged`, so the slice builds the plan again
    /// ([`Self::forget_plan`]) before it sends anything.
    pub(crate) async fn plan(&self, spec: &TableSpec) -> Result<Arc<SlicePlan>, WorkerError> {
        if let Some(p) = self.caches.plans.lock().await.get(&spec.id) {
            if p.spec == *spec {
                return Ok(p.plan.clone());
            }
        }
        // Tables registered before names were checked may share a BigQuery object; the later
        // one stops with the refusal `tables add` gives now, the earlier one keeps its data.
        // Names that differ only in case are two tables in a default (case-sensitive)
        // dataset: those keep syncing, with a warning.
        let tables = self.deps.control.tables().await?;
        let earlier: Vec<TableNames<'_>> = tables
            .iter()
            .filter(|t| t.id < spec.id)
            .map(TableNames::of)
            .collect();
        // One table at a time (and none, for tenantsync's own names), so a meeting in case
        // only does not hide a real one behind it.
        for others in std::iter::once(&[][..]).chain(earlier.chunks(1)) {
            match names::check_new_table(&TableNames::of(spec), others) {
                Ok(()) => {}
                Err(e) if e.is_case_only() => {
                    warn!(table = %spec.source_table, error = %e, "table names differ only in case")
                }
                Err(e) => return Err(WorkerError::Config(e.to_string())),
            }
        }
        let (columns, fingerprint) = self
            .deps
            .source
            .catalog(&spec.source_schema, &spec.source_table)
            .await?;
        let plan = SlicePlan::build(spec, &columns)?.with_catalog(fingerprint);
        let plan = Arc::new(plan);
        self.caches.plans.lock().await.insert(
            spec.id,
            CachedPlan {
                spec: spec.clone(),
                plan: plan.clone(),
            },
        );
        Ok(plan)
    }

    pub(crate) async fn forget_plan(&self, table_id: i64) {
        self.caches.plans.lock().await.remove(&table_id);
    }

    /// The read horizon, shared by the slices that start within `horizon_reuse` of one
    /// another. Reusing an older horizon is safe: every row below it was committed when it
    /// was computed, so a later read finds them all; rows past it wait for a later slice.
    /// A cached horizon earlier than `at_least` (the coordinator's detection of the task's
    /// changes) is not reused: the slice would stop short of the rows it was queued for and
    /// leave them for its next turn, a sync interval later (about 1 s of lag for a share of
    /// the rows in the freshness benchmark).
    pub(crate) async fn horizon(
        &self,
        at_least: Option<DateTime<Utc>>,
    ) -> Result<DateTime<Utc>, WorkerError> {
        // Held across the query, so slices that start together send one query, not one each.
        let mut cached = self.caches.horizon.lock().await;
        if let Some((at, h)) = *cached {
            if at.elapsed() < self.cfg.horizon_reuse && at_least.is_none_or(|t| h >= t) {
                return Ok(h);
            }
        }
        // The age counts from before the query: the result is at least that old.
        let at = Instant::now();
        let h = self.deps.source.horizon(self.cfg.cursor_skew).await?;
        *cached = Some((at, h));
        Ok(h)
    }

    /// Dataset, table (with added columns) and `_latest` view: skipped when the task's stored
    /// schema hash matches the plan (no API calls at all), the dataset once per process.
    async fn ensure_schema(
        &self,
        client: &BigQuery,
        tenant: &Tenant,
        spec: &TableSpec,
        plan: &SlicePlan,
        claim: &Claim,
    ) -> Result<(), WorkerError> {
        if claim.schema_hash.as_deref() == Some(plan.schema_hash.as_str()) {
            return Ok(());
        }
        if !self.caches.datasets.lock().await.contains(&tenant.id) {
            let created = self
                .retry_bq("ensure dataset", tenant, || async {
                    Ok(client.ensure_dataset().await?)
                })
                .await?;
            if created {
                info!(dataset = client.dataset(), "created dataset");
            }
            self.caches.datasets.lock().await.insert(tenant.id);
        }
        self.retry_bq("sync schema", tenant, || {
            self.force_schema(client, spec, plan)
        })
        .await?;
        self.deps
            .control
            .set_schema_hash(claim.task, &plan.schema_hash)
            .await?;
        Ok(())
    }

    pub(crate) async fn force_schema(
        &self,
        client: &BigQuery,
        spec: &TableSpec,
        plan: &SlicePlan,
    ) -> Result<(), WorkerError> {
        if client.ensure_dataset().await? {
            info!(dataset = client.dataset(), "created dataset");
        }
        client
            .create_table(BATCHES_TABLE, &batches_fields())
            .await?;
        let change = sync_table(client, &plan.table, &plan.fields).await?;
        debug!(table = %plan.table, ?change, "schema synced");
        if spec.mode == Mode::Merge {
            // Partial versions make a `_latest` view meaningless; `_final` is the merged table.
            sync_fields(
                client,
                &format!("{}_final", plan.table),
                final_fields(&plan.fields),
            )
            .await?;
        } else {
            client
                .put_view(
                    &format!("{}_latest", plan.table),
                    &latest_view_sql(client, &plan.table, &spec.key_columns),
                )
                .await?;
        }
        Ok(())
    }

    /// The single step: run one slice of `task` if its lease is free.
    pub async fn try_execute_task(
        &self,
        task: TaskId,
        shutdown: &CancellationToken,
    ) -> Result<SliceReport, WorkerError> {
        let report = |outcome, synced_through| SliceReport {
            task,
            outcome,
            synced_through,
        };
        let holder = format!("{}:{}", self.cfg.worker_id, uuid::Uuid::new_v4().simple());
        let Some(lease) = self
            .deps
            .leases
            .acquire(task.tenant_id, task.table_id, &holder, self.cfg.lease_ttl)
            .await?
        else {
            return Ok(report(SliceOutcome::Busy, None));
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
            .with_lease(task, &lost, shutdown)
            .instrument(span)
            .await;
        lost.cancel();
        renewer.abort();
        if !matches!(
            result,
            Ok(SliceReport {
                outcome: SliceOutcome::Crashed,
                ..
            })
        ) {
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
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<SliceReport, WorkerError> {
        let started_at = Utc::now();
        let t0 = Instant::now();
        let start = self.statements().start(task).await?;
        let (tenant, spec) = (start.tenant, start.spec);
        // Not claimed: the tenant is not active or the table is disabled.
        let Some(claim) = start.claim else {
            return Ok(SliceReport {
                task,
                outcome: SliceOutcome::Skipped,
                synced_through: None,
            });
        };
        crate::metrics::task_seen(&tenant.slug, &spec.source_table);
        let span = tracing::Span::current();
        span.record("tenant", tenant.slug.as_str());
        span.record("table", spec.source_table.as_str());
        span.record("run", claim.fencing_token);
        let nonce = start.credentials_nonce.as_deref();
        let run = self
            .run_slice(&tenant, &spec, &claim, nonce, lost, shutdown)
            .await;
        let permanent = matches!(&run, Err(e) if !e.is_retriable());
        let (rows, outcome, error, progress) = match run {
            Ok(SliceRun::Crashed) => {
                return Ok(SliceReport {
                    task,
                    outcome: SliceOutcome::Crashed,
                    synced_through: None,
                })
            }
            Ok(SliceRun::Done(p)) => (
                p.rows,
                if p.error.is_some() { "partial" } else { "ok" },
                p.error.clone(),
                p,
            ),
            Err(e) => {
                if let WorkerError::BigQuery(b) = &e {
                    if b.retry() == Retry::PauseTenant {
                        self.pause_for_credentials(&tenant, b).await?;
                    }
                }
                let failures = self
                    .deps
                    .control
                    .consecutive_failures(task)
                    .await
                    .unwrap_or(0);
                let p = Progress {
                    watermark: None,
                    synced_through: None,
                    rows: 0,
                    rerun_if_changed_in: None,
                    batches_visible_through: None,
                    next_run_in: task_backoff(failures + 1),
                    error: Some(e.to_string()),
                };
                (0, "failed", Some(e.to_string()), p)
            }
        };
        // A caught-up slice asks for the task's periodic turn in its commit: compaction of a
        // latest-mode table, the MERGE of a merge-mode one, and for every mode the report of
        // rows that cannot be synced.
        let periodic_every = match spec.mode {
            Mode::Latest | Mode::History => Some(self.cfg.compact_every),
            Mode::Merge => Some(self.cfg.merge_every),
        }
        .filter(|_| progress.error.is_none() && !progress.next_run_in.is_zero());
        let finish = self
            .statements()
            .finish(FinishRequest {
                claim: claim.clone(),
                progress: progress.clone(),
                run: RunRecord {
                    task,
                    worker: self.cfg.worker_id.clone(),
                    fencing_token: claim.fencing_token,
                    started_at,
                    duration: t0.elapsed(),
                    rows,
                    outcome,
                    error: error.clone(),
                },
                compact_every: periodic_every,
            })
            .await?;
        let committed = finish.commit;
        if committed == Commit::Committed {
            // The claim's watermark when the slice moved nothing: what an earlier failed
            // prune left would otherwise keep the task marked changed forever.
            let wm = progress.watermark.as_ref().unwrap_or(&claim.watermark);
            self.prune_changes(&tenant, &spec, Some(wm)).await;
        }
        let outcome_str = if committed == Commit::Fenced {
            "fenced"
        } else {
            outcome
        };
        crate::metrics::slice(outcome_str);
        if committed == Commit::Fenced {
            crate::metrics::lease_expired();
        } else if rows > 0 {
            crate::metrics::rows(&tenant.slug, &spec.source_table, rows as u64);
        }
        let synced_through = progress.synced_through.or(claim.synced_through);
        let outcome = match (committed, error) {
            (Commit::Fenced, _) => {
                warn!(task = %task, token = claim.fencing_token, "commit refused: fencing token superseded");
                SliceOutcome::Fenced
            }
            (Commit::Committed, Some(error)) => {
                warn!(tenant = %tenant.slug, table = %spec.source_table, rows, error = %error, "slice stopped early");
                SliceOutcome::Failed {
                    rows: rows as usize,
                    error,
                    permanent,
                }
            }
            (Commit::Committed, None) => SliceOutcome::Synced {
                rows: rows as usize,
                more: progress.next_run_in.is_zero(),
            },
        };
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
            self.periodic_now(&tenant, &spec).await;
        } else if finish.first_turn {
            self.report_unsyncable(&tenant, &spec).await;
        }
        Ok(SliceReport {
            task,
            outcome,
            synced_through,
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

    async fn run_slice(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
        claim: &Claim,
        credentials_nonce: Option<&[u8]>,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<SliceRun, WorkerError> {
        let t0 = Instant::now();
        let client = self.client_for(tenant, credentials_nonce).await?;
        let horizon = self.horizon(claim.changed_until).await?;
        let limit = i64::from(spec.slice_rows);
        let batch_id = format!("{}-{}-{}", tenant.id, spec.id, claim.fencing_token);
        let synced_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut plan = self.plan(spec).await?;
        self.ensure_schema(&client, tenant, spec, &plan, claim)
            .await?;
        let mut replanned = false;
        // A slice is read and sent in pages: memory is concurrency × page rows × row size,
        // whatever the slice size (a whole 20,000-row slice held at once made a worker at
        // concurrency 8 peak above 300 MB). The watermark still moves once, at the commit.
        let page_rows = limit.min(i64::from(self.cfg.page_rows.max(1)));
        let mut position = claim.watermark.clone();
        let (mut acked, mut dead) = (0usize, 0usize);
        let mut last: Option<SourceRow> = None;
        let mut error: Option<String> = None;
        let mut drained = false;
        let page_of = |want| PageRead {
            tenant,
            batch_id: &batch_id,
            synced_at: &synced_at,
            horizon,
            want,
        };
        // The next page, read while the previous one was sent, and how many rows it asked for.
        let mut prefetched: Option<(i64, ReadResult)> = None;
        let mut first = true;
        loop {
            let (want, read) = match prefetched.take() {
                Some(p) => p,
                // The first rows after the claimed watermark are read together with other
                // slices that start at the same time (one statement per table for all of
                // them): most slices of caught-up tasks are a few rows, and their reads were
                // the largest share of Postgres' statements. At most `SHARED_READ_ROWS` rows
                // this way (a batch of slices holds them all at once); a slice with more reads
                // on from there in pages of its own.
                None if first && position.cursor.is_some() && SourceReader::reads_groups(&plan) => {
                    let want = page_rows.min(limit - acked as i64).min(SHARED_READ_ROWS);
                    (
                        want,
                        self.read_shared(&plan, &position, page_of(want)).await,
                    )
                }
                None => {
                    let want = page_rows.min(limit - acked as i64);
                    (want, self.read_page(&plan, &position, page_of(want)).await)
                }
            };
            first = false;
            let read: Vec<(SourceRow, String)> = match read {
                Ok(read) => read,
                // The table's columns changed since the plan was built: build it again from
                // the catalog (and bring BigQuery's table along) before sending this page.
                Err(StoreError::CatalogChanged(_)) if !replanned => {
                    debug!(table = %spec.source_table, "source columns changed; planning again");
                    self.forget_plan(spec.id).await;
                    replanned = true;
                    plan = self.plan(spec).await?;
                    self.ensure_schema(&client, tenant, spec, &plan, claim)
                        .await?;
                    continue;
                }
                Err(e) => {
                    // The next slice reads the catalog again (a dropped table, say, is then
                    // named as such).
                    self.forget_plan(spec.id).await;
                    return Err(e.into());
                }
            };
            let (rows, payloads): (Vec<SourceRow>, Vec<String>) = read.into_iter().unzip();

            // Second line of tenant isolation: the SQL filtered by tenant; every row is checked
            // again before it is sent, and one stray row stops the whole slice uncommitted.
            if let Some(bad) = rows
                .iter()
                .find(|r| r.tenant.as_deref() != Some(tenant.organization_id.as_str()))
            {
                return Err(WorkerError::Isolation(format!(
                    "row {:?} of {} has tenant {:?}, expected {:?}; nothing more was sent",
                    bad.key, spec.source_table, bad.tenant, tenant.organization_id
                )));
            }
            let cx = SendCtx {
                client: &client,
                tenant,
                spec,
                plan: &plan,
                task: claim.task,
                rows: &rows,
                payloads: &payloads,
                lost,
                shutdown,
            };
            // A full page means more may follow: the next one is read while this one is sent,
            // so Postgres and insertAll work at the same time instead of taking turns (a
            // backfill left a quarter of two cores idle). It is dropped if this page stops the
            // slice; memory is at most two pages per slice.
            let next_want = page_rows.min(limit - acked as i64 - rows.len() as i64);
            let next_position = rows.last().map(SourceRow::watermark);
            let (page, next) = match &next_position {
                Some(next_position) if rows.len() as i64 == want && next_want > 0 => {
                    let (page, next) = tokio::join!(
                        self.send_page(&cx, t0),
                        self.read_page(&plan, next_position, page_of(next_want))
                    );
                    (page, Some((next_want, next)))
                }
                _ => (self.send_page(&cx, t0).await, None),
            };
            let page = match page? {
                Some(page) => page,
                None => return Ok(SliceRun::Crashed),
            };
            acked += page.handled;
            dead += page.dead;
            if page.handled > 0 {
                last = Some(rows[page.handled - 1].clone());
            }
            if page.error.is_some() {
                error = page.error;
                break;
            }
            if page.handled < rows.len() || acked as i64 >= limit {
                break; // stopped at the time bound or shutdown, or the slice is full
            }
            if (rows.len() as i64) < want {
                drained = true;
                break;
            }
            if let Some(p) = next_position {
                position = p;
            }
            prefetched = next;
        }
        if dead > 0 {
            info!(tenant = %tenant.slug, table = %spec.source_table, rows = dead, "rows dead-lettered in this slice");
        }

        if self.hooks.crash(claim.task, CrashPoint::BeforeCommit) {
            return Ok(SliceRun::Crashed);
        }
        // List this batch, and the task's earlier batches never listed, in `_sync_batches`
        // before the watermark moves: from then on the views show them. Without the listing
        // the rows stay invisible, so it must not be skipped for a commit.
        let batches_visible_through = if acked > 0 {
            let tokens = (claim.batches_visible_through + 1).max(claim.fencing_token - 999)
                ..=claim.fencing_token;
            let ids: Vec<String> = tokens
                .map(|t| format!("{}-{}-{t}", tenant.id, spec.id))
                .collect();
            self.list_batches(&client, tenant, &plan.table, &ids, (acked - dead) as i64)
                .await?;
            Some(claim.fencing_token)
        } else {
            None
        };

        let watermark = last.as_ref().map(SourceRow::watermark);
        // Everything below the horizon is in BigQuery when the slice drained; otherwise only
        // what precedes the last acknowledged row's cursor is known complete.
        let synced_through = if drained {
            Some(horizon)
        } else {
            last.as_ref().map(|r| r.cursor_ts)
        };
        let more = !drained && error.is_none();
        let next_run_in = if more {
            Duration::ZERO
        } else if error.is_some() {
            task_backoff(self.deps.control.consecutive_failures(claim.task).await? + 1)
        } else {
            // Caught up: the coordinator makes the task due again when the tenant changes.
            self.cfg.idle_recheck
        };
        Ok(SliceRun::Done(Progress {
            watermark,
            synced_through,
            // Dead-lettered rows are handled but not synced.
            rows: acked.saturating_sub(dead) as i64,
            rerun_if_changed_in: drained
                .then(|| Duration::from_millis(spec.sync_interval_ms.max(0) as u64)),
            next_run_in,
            error,
            batches_visible_through,
        }))
    }

    /// Read one page of a slice after `position`, each row turned into its insertAll payload as
    /// it arrives and its JSON dropped (holding both doubled the page's memory).
    async fn read_page(
        &self,
        plan: &SlicePlan,
        position: &Watermark,
        p: PageRead<'_>,
    ) -> ReadResult {
        self.deps
            .source
            .read_slice_map(
                plan,
                &p.tenant.organization_id,
                position,
                p.horizon,
                p.want,
                |r| p.with_payload(&plan.table, r),
            )
            .await
    }

    /// [`Self::read_page`] through the worker's read batcher.
    async fn read_shared(
        &self,
        plan: &Arc<SlicePlan>,
        position: &Watermark,
        p: PageRead<'_>,
    ) -> ReadResult {
        let rows = self
            .statements()
            .read(crate::batcher::ReadRequest {
                plan: plan.clone(),
                organization_id: p.tenant.organization_id.clone(),
                watermark: position.clone(),
                horizon: p.horizon,
                limit: p.want,
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| p.with_payload(&plan.table, r))
            .collect())
    }

    /// Send one page of a slice in chunks: oversized rows go to the dead-letter table, the rest
    /// in insertAll requests. Stops at the first error, a lost lease, shutdown or the slice's
    /// time bound. `None`: a test hook crashed the slice.
    async fn send_page(&self, cx: &SendCtx<'_>, t0: Instant) -> Result<Option<Page>, WorkerError> {
        let (rows, payloads) = (cx.rows, cx.payloads);
        let sizes: Vec<usize> = payloads.iter().map(String::len).collect();
        // `handled[i]`: row i is in BigQuery or in the dead-letter table. The watermark moves
        // to the end of the handled prefix only.
        let mut handled = vec![false; rows.len()];
        let mut dead = 0usize;
        let mut error: Option<String> = None;
        let max = self.cfg.chunk_limits.max_bytes;
        let (oversized, sendable): (Vec<usize>, Vec<usize>) =
            (0..rows.len()).partition(|&i| sizes[i] + chunk::ENVELOPE_BYTES + 1 > max);
        if !oversized.is_empty() {
            let reasons: Vec<String> = oversized
                .iter()
                .map(|&i| {
                    format!(
                        "row is {} bytes, over the {max}-byte insertAll request limit",
                        sizes[i]
                    )
                })
                .collect();
            match self.dead_letter(cx, &oversized, &reasons).await {
                Ok(()) => {
                    dead += oversized.len();
                    oversized.iter().for_each(|&i| handled[i] = true);
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        let send_sizes: Vec<usize> = sendable.iter().map(|&i| sizes[i]).collect();
        let (chunks, _) = chunk::plan(&send_sizes, self.cfg.chunk_limits);
        for range in chunks {
            if error.is_some() {
                break;
            }
            if cx.lost.is_cancelled() {
                error = Some("lease lost; stopping before the next chunk".into());
                break;
            }
            if cx.shutdown.is_cancelled() || t0.elapsed() > self.cfg.slice_max_duration {
                break;
            }
            let items = &sendable[range];
            match self.send_chunk(cx, items).await {
                Ok(n) => {
                    dead += n;
                    items.iter().for_each(|&i| handled[i] = true);
                    if items.len() < sendable.len()
                        && self.hooks.crash(cx.task, CrashPoint::AfterFirstChunk)
                    {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    if e.retry() == Retry::PauseTenant {
                        self.pause_for_credentials(cx.tenant, &e).await?;
                    }
                    error = Some(e.to_string());
                }
            }
        }
        Ok(Some(Page {
            handled: handled.iter().position(|h| !h).unwrap_or(rows.len()),
            dead,
            error,
        }))
    }

    /// Send the rows `items` (indices into `cx.rows`) in one insertAll, retrying what the error
    /// classification says can be retried. Rows BigQuery refuses go to the dead-letter table
    /// and the rest is sent again; a request refused as a whole is bisected down to the row
    /// that causes it. Returns how many rows were dead-lettered.
    pub(crate) async fn send_chunk(
        &self,
        cx: &SendCtx<'_>,
        items: &[usize],
    ) -> Result<usize, BqError> {
        let mut attempt = 0u32;
        loop {
            self.wait_for_budget(cx.tenant, items.len(), cx.lost, cx.shutdown)
                .await?;
            let body: Vec<&str> = items.iter().map(|&i| cx.payloads[i].as_str()).collect();
            let t0 = Instant::now();
            let result = cx.client.insert_all(&cx.plan.table, &body).await;
            let secs = t0.elapsed().as_secs_f64();
            let e = match result {
                Ok(out) if out.row_errors.is_empty() => {
                    crate::metrics::insert("ok", secs);
                    return Ok(0);
                }
                Ok(out) => {
                    crate::metrics::insert("invalid", secs);
                    let invalid: Vec<_> = out
                        .row_errors
                        .iter()
                        .filter(|e| e.reason != "stopped" && e.index < items.len())
                        .collect();
                    let schema_drift = invalid.iter().any(|e| e.message.contains("no such field"));
                    if invalid.is_empty() || (schema_drift && attempt == 0) {
                        // Nothing to blame on a row, or the table lost a column behind our
                        // back: fix the schema once and try again before blaming rows.
                        attempt += 1;
                        self.repair_schema(cx).await?;
                        continue;
                    }
                    let dead: Vec<usize> = invalid.iter().map(|e| items[e.index]).collect();
                    let reasons: Vec<String> = invalid
                        .iter()
                        .map(|e| format!("{}: {}", e.reason, e.message))
                        .collect();
                    self.dead_letter(cx, &dead, &reasons).await?;
                    let rest: Vec<usize> = items
                        .iter()
                        .copied()
                        .filter(|i| !dead.contains(i))
                        .collect();
                    if rest.is_empty() {
                        return Ok(dead.len());
                    }
                    // The valid rows were "stopped", not written: send them again (same insertIds).
                    return Ok(dead.len() + Box::pin(self.send_chunk(cx, &rest)).await?);
                }
                Err(e) => e,
            };
            crate::metrics::insert(e.label(), secs);
            if matches!(e, BqError::Invalid(_) | BqError::TooLarge(_)) {
                if items.len() > 1 {
                    // Refused as a whole: split, so the offending row ends up alone.
                    let (a, b) = items.split_at(items.len() / 2);
                    let dead = Box::pin(self.send_chunk(cx, a)).await?;
                    return Ok(dead + Box::pin(self.send_chunk(cx, b)).await?);
                }
                self.dead_letter(cx, items, &[e.to_string()]).await?;
                return Ok(1);
            }
            attempt += 1;
            let wait = match e.retry() {
                _ if attempt >= self.cfg.max_attempts => return Err(e),
                Retry::After(base) => backoff(base, attempt, self.cfg.max_backoff),
                Retry::AfterFix => {
                    if matches!(e, BqError::NotFound(_)) {
                        // Dataset or table deleted behind our back: recreate both.
                        self.repair_schema(cx).await?;
                    }
                    Duration::ZERO
                }
                Retry::Never | Retry::PauseTenant => return Err(e),
            };
            warn!(tenant = %cx.tenant.slug, table = %cx.plan.table, attempt, error = %e, "insert_all failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cx.lost.cancelled() => return Err(e),
                _ = cx.shutdown.cancelled() => return Err(e),
            }
        }
    }

    async fn repair_schema(&self, cx: &SendCtx<'_>) -> Result<(), BqError> {
        self.retry_bq("repair schema", cx.tenant, || async {
            cx.client.ensure_dataset().await?;
            self.force_schema(cx.client, cx.spec, cx.plan).await
        })
        .await
        .map_err(|we| match we {
            WorkerError::BigQuery(b) => b,
            other => BqError::Transient(other.to_string()),
        })
    }

    /// Run an idempotent BigQuery call (dataset, table, view), retrying what the error
    /// classification says a wait can fix, like insertAll. Without this a single 503 on a
    /// table create failed the slice and sent the task into its backoff.
    pub(crate) async fn retry_bq<T, Fut>(
        &self,
        what: &'static str,
        tenant: &Tenant,
        mut call: impl FnMut() -> Fut,
    ) -> Result<T, WorkerError>
    where
        Fut: std::future::Future<Output = Result<T, WorkerError>>,
    {
        let mut attempt = 0u32;
        loop {
            let e = match call().await {
                Ok(v) => return Ok(v),
                Err(WorkerError::BigQuery(e)) => e,
                Err(other) => return Err(other),
            };
            attempt += 1;
            let base = match e.retry() {
                Retry::After(base) if attempt < self.cfg.max_attempts => base,
                _ => return Err(WorkerError::BigQuery(e)),
            };
            warn!(tenant = %tenant.slug, what, attempt, error = %e, "bigquery call failed; retrying");
            tokio::time::sleep(backoff(base, attempt, self.cfg.max_backoff)).await;
        }
    }

    /// Record rows in the dead-letter table. Until this succeeds the watermark cannot pass them.
    async fn dead_letter(
        &self,
        cx: &SendCtx<'_>,
        items: &[usize],
        reasons: &[String],
    ) -> Result<(), BqError> {
        let letters: Vec<NewDeadLetter> = items
            .iter()
            .enumerate()
            .map(|(n, &i)| NewDeadLetter {
                key: cx.rows[i].key.clone(),
                cursor: cx.rows[i].cursor.clone(),
                reason: reasons
                    .get(n)
                    .or(reasons.last())
                    .cloned()
                    .unwrap_or_default(),
                payload: cx.payloads[i].clone(),
            })
            .collect();
        self.deps
            .control
            .add_dead_letters(cx.task, &letters)
            .await
            .map_err(|e| BqError::Transient(format!("cannot record dead letters: {e}")))?;
        for l in &letters {
            warn!(tenant = %cx.tenant.slug, table = %cx.spec.source_table, key = ?l.key, reason = %l.reason, "row dead-lettered");
        }
        crate::metrics::dead_lettered(&cx.tenant.slug, &cx.spec.source_table, letters.len() as u64);
        Ok(())
    }
}

impl Worker {
    /// Wait for this insertAll's slot in the global and the tenant's budget.
    pub(crate) async fn wait_for_budget(
        &self,
        tenant: &Tenant,
        rows: usize,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<(), BqError> {
        let budget = tenantsync_lease::ratelimit::Budget {
            requests_per_s: tenant
                .max_requests_per_s
                .or(self.cfg.tenant_budget.requests_per_s),
            rows_per_s: tenant.max_rows_per_s.or(self.cfg.tenant_budget.rows_per_s),
        };
        let global = self.cfg.global_budget;
        if budget == Default::default() && global == Default::default() {
            return Ok(());
        }
        let wait = self
            .deps
            .leases
            .reserve_insert(global, tenant.id, budget, rows as u64)
            .await
            .map_err(|e| BqError::Transient(format!("rate limiter unavailable: {e}")))?;
        if wait.is_zero() {
            return Ok(());
        }
        crate::metrics::ratelimit_wait(&tenant.slug, wait);
        tokio::select! {
            _ = tokio::time::sleep(wait) => Ok(()),
            _ = lost.cancelled() => Err(BqError::Transient("lease lost while rate limited".into())),
            _ = shutdown.cancelled() => Err(BqError::Transient("shutting down while rate limited".into())),
        }
    }
}

impl Worker {
    /// Send a dead letter's stored row again (same insertId). Err when BigQuery refuses it.
    pub async fn resend_dead_letter(
        &self,
        d: &tenantsync_store::control::dead_letters::DeadLetter,
    ) -> Result<(), WorkerError> {
        if d.payload.is_empty() {
            // Reported, never built (see `report_unsyncable`): there is nothing to send.
            return Err(WorkerError::BigQuery(BqError::Invalid(format!(
                "dead letter {} was never sent ({}); fix the source row and it syncs by itself",
                d.id, d.reason
            ))));
        }
        let tenant = self.deps.control.tenant_by_id(d.tenant_id).await?;
        let spec = self.deps.control.table(d.table_id).await?;
        let client = self.client(&tenant).await?;
        let out = client
            .insert_all(&spec.bq_table(), &[d.payload.as_str()])
            .await?;
        match out.row_errors.first() {
            None => Ok(()),
            Some(e) => Err(WorkerError::BigQuery(BqError::Invalid(format!(
                "{}: {}",
                e.reason, e.message
            )))),
        }
    }
}

/// Everything one slice's sends share.
pub(crate) struct SendCtx<'a> {
    pub(crate) client: &'a BigQuery,
    pub(crate) tenant: &'a Tenant,
    pub(crate) spec: &'a TableSpec,
    pub(crate) plan: &'a SlicePlan,
    pub(crate) task: TaskId,
    pub(crate) rows: &'a [SourceRow],
    pub(crate) payloads: &'a [String],
    pub(crate) lost: &'a CancellationToken,
    pub(crate) shutdown: &'a CancellationToken,
}

enum SliceRun {
    Done(Progress),
    Crashed,
}

/// Most rows a slice's first read takes through the read batcher (see `run_slice`).
const SHARED_READ_ROWS: i64 = 200;

/// A page read: each row with its insertAll payload.
type ReadResult = Result<Vec<(SourceRow, String)>, StoreError>;

/// What every page read of a slice shares, and the page's size.
#[derive(Clone, Copy)]
struct PageRead<'a> {
    tenant: &'a Tenant,
    batch_id: &'a str,
    synced_at: &'a str,
    horizon: DateTime<Utc>,
    want: i64,
}

impl PageRead<'_> {
    /// A row read for this page, with its insertAll payload built in the row's own JSON buffer.
    fn with_payload(&self, table: &str, mut r: SourceRow) -> (SourceRow, String) {
        let json = std::mem::take(&mut r.json);
        let body = payload_from(
            self.tenant.id,
            table,
            &r,
            json,
            self.batch_id,
            self.synced_at,
        );
        (r, body)
    }
}

/// What [`Worker::send_page`] did with one page.
struct Page {
    /// Rows at the front of the page that are in BigQuery or dead-lettered.
    handled: usize,
    /// Of those, dead-lettered.
    dead: usize,
    error: Option<String>,
}

/// `{"insertId":…,"json":{<row>,"_synced_at":…,"_batch_id":…,"_version_id":…}}`, spliced
/// from the row's JSON object without parsing it.
pub(crate) fn payload(
    tenant_id: i64,
    table: &str,
    r: &SourceRow,
    batch_id: &str,
    synced_at: &str,
) -> String {
    payload_from(tenant_id, table, r, r.json.clone(), batch_id, synced_at)
}

/// [`payload`] built in the buffer of `json` (the row's JSON, `r.json` taken out of the row):
/// the reader leaves room for the metadata, so a row costs no second allocation (the
/// `insertId` prefix is inserted in place, which moves the row's bytes once).
fn payload_from(
    tenant_id: i64,
    table: &str,
    r: &SourceRow,
    mut json: String,
    batch_id: &str,
    synced_at: &str,
) -> String {
    let id = insert_id(tenant_id, table, &r.key, &r.cursor, &json);
    json.truncate(json.trim_end().len());
    if json.ends_with('}') {
        json.pop();
    }
    json.reserve(100 + 2 * id.len() + synced_at.len() + batch_id.len());
    json.insert_str(0, &["{\"insertId\":\"", &id, "\",\"json\":"].concat());
    json.push_str(",\"_synced_at\":\"");
    json.push_str(synced_at);
    json.push_str("\",\"_batch_id\":\"");
    json.push_str(batch_id);
    json.push_str("\",\"_version_id\":\"");
    json.push_str(&id);
    json.push_str("\"}}");
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_valid_json_with_metadata() {
        let r = SourceRow {
            key: vec!["7".into()],
            cursor: "2024-01-01 00:00:00+00".into(),
            cursor_ts: Utc::now(),
            tenant: Some("1".into()),
            json: r#"{"id":"7","name":"a}b","_op":"insert","_source_ts":"2024-01-01T00:00:00.000000Z"}"#.into(),
            seq: None,
        };
        let p = payload(1, "contacts", &r, "1-2-3", "2024-01-01T00:00:01.000000Z");
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["json"]["name"], "a}b");
        assert_eq!(v["json"]["_batch_id"], "1-2-3");
        assert_eq!(v["insertId"], v["json"]["_version_id"]);
        assert_eq!(v["insertId"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn backoff_is_bounded() {
        for a in 0..40 {
            assert!(
                backoff(Duration::from_secs(1), a, Duration::from_secs(30))
                    <= Duration::from_secs(30)
            );
        }
        assert_eq!(task_backoff(0), Duration::from_secs(1));
        assert_eq!(task_backoff(100), Duration::from_secs(256));
    }
}
