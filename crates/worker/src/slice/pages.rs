//! The slice itself: read its rows page by page (the next page read while this one is sent),
//! check every row's tenant, send each page, list the batch, and work out what to commit.

use super::payload::{row_payload, RowMeta};
use super::schema::table_def;
use super::send::SendCtx;
use super::{CrashPoint, SliceRun};
use crate::retry::task_backoff;
use crate::{Worker, WorkerError};
use chrono::{DateTime, SecondsFormat, Utc};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tenantsync_bigquery::{Sink, WriteSink};
use tenantsync_core::hashing::ColumnHasher;
use tenantsync_core::{Mode, Payload, TableSpec, Tenant, WriteApi};
use tenantsync_store::control::tasks::{Claim, Progress, Watermark};
use tenantsync_store::{SlicePlan, SourceReader, SourceRow, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Most rows a slice's first read takes through the read batcher (see [`Worker::next_read`]).
const SHARED_READ_ROWS: i64 = 200;

/// A page read: each row with its payload.
type ReadResult = Result<Vec<(SourceRow, Payload)>, StoreError>;

/// What every page of one slice shares.
struct Slice<'a> {
    tenant: &'a Tenant,
    spec: &'a TableSpec,
    claim: &'a Claim,
    sink: &'a WriteSink,
    horizon: DateTime<Utc>,
    batch_id: String,
    /// `_synced_at` of the slice's rows: text (JSON rows) and microseconds (messages).
    synced_at: String,
    synced_at_us: i64,
    /// Rows in all, and per page.
    limit: i64,
    page_rows: i64,
    /// The slice's time bound.
    deadline: Instant,
    lost: &'a CancellationToken,
    shutdown: &'a CancellationToken,
    /// The table's `--hash-column`s under the tenant's secret.
    hasher: Option<Arc<ColumnHasher>>,
}

impl<'a> Slice<'a> {
    fn page(&self, want: i64) -> PageRead<'_> {
        PageRead {
            tenant: self.tenant,
            batch_id: &self.batch_id,
            synced_at: &self.synced_at,
            synced_at_us: self.synced_at_us,
            cdc: self.spec.mode == Mode::Cdc,
            horizon: self.horizon,
            want,
            hasher: self.hasher.as_deref(),
        }
    }
}

/// Where a slice's page loop stands, and what it did so far.
struct Pages {
    plan: Arc<SlicePlan>,
    /// The plan was built again once in this slice (the source's columns changed).
    replanned: bool,
    /// Where the next read starts.
    position: Watermark,
    first: bool,
    /// The next page, read while the previous one was sent, and how many rows it asked for.
    prefetched: Option<(i64, ReadResult)>,
    /// Rows in BigQuery or dead-lettered, and of those dead-lettered.
    acked: usize,
    dead: usize,
    /// The last handled row: the watermark moves just past it.
    last: Option<SourceRow>,
    error: Option<WorkerError>,
    /// Every row below the horizon was read.
    drained: bool,
}

/// What the page loop does after a page.
enum Step {
    Next,
    Stop,
    Crashed,
}

impl Worker {
    pub(super) async fn run_slice(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
        claim: &Claim,
        credentials_nonce: Option<&[u8]>,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<SliceRun, WorkerError> {
        let t0 = Instant::now();
        let sink = self.sink_for(tenant, spec, credentials_nonce).await?;
        let horizon = self.horizon(claim.changed_until).await?;
        let plan = self.plan(spec).await?;
        self.ensure_schema(&sink, tenant, spec, &plan, claim)
            .await?;
        let hasher = self.hasher(tenant, spec).await?;
        let limit = i64::from(spec.slice_rows);
        let now = Utc::now();
        let s = Slice {
            tenant,
            spec,
            claim,
            sink: &sink,
            horizon,
            batch_id: batch_id(&sink, tenant, spec, claim),
            synced_at: now.to_rfc3339_opts(SecondsFormat::Micros, true),
            synced_at_us: now.timestamp_micros(),
            limit,
            // A slice is read and sent in pages: memory is concurrency × page rows × row
            // size, whatever the slice size (a whole 20,000-row slice held at once made a
            // worker at concurrency 8 peak above 300 MB). The watermark still moves once, at
            // the commit.
            page_rows: limit.min(i64::from(self.cfg.page_rows.max(1))),
            deadline: t0 + self.cfg.slice_max_duration,
            lost,
            shutdown,
            hasher,
        };
        let Some(p) = self.send_pages(&s, plan).await? else {
            return Ok(SliceRun::Crashed);
        };
        if let Some(e) = &p.error {
            self.pause_if_rejected(tenant, e).await?;
        }
        if p.dead > 0 {
            info!(tenant = %tenant.slug, table = %spec.source_table, rows = p.dead, "rows dead-lettered in this slice");
        }
        if self.hooks.crash(claim.task, CrashPoint::BeforeCommit) {
            return Ok(SliceRun::Crashed);
        }
        let batches_visible_through = self.list_slice_batches(&s, &p).await?;
        self.check_visible_in_time(&s, &p)?;
        Ok(SliceRun::Done(
            self.progress(&s, p, batches_visible_through).await?,
        ))
    }

    /// Read and send pages until the slice is full, drained, out of time, stopped by an
    /// error, or shut down. `None`: a test hook crashed the slice.
    async fn send_pages(
        &self,
        s: &Slice<'_>,
        plan: Arc<SlicePlan>,
    ) -> Result<Option<Pages>, WorkerError> {
        let mut p = Pages {
            plan,
            replanned: false,
            position: s.claim.watermark.clone(),
            first: true,
            prefetched: None,
            acked: 0,
            dead: 0,
            last: None,
            error: None,
            drained: false,
        };
        loop {
            let (want, read) = self.next_read(s, &mut p).await;
            let read = match read {
                Ok(read) => read,
                // The table's columns changed since the plan was built: build it again from
                // the catalog (and bring BigQuery's table along) before sending this page.
                Err(StoreError::CatalogChanged(_)) if !p.replanned => {
                    debug!(table = %s.spec.source_table, "source columns changed; planning again");
                    self.forget_plan(s.spec.id).await;
                    p.replanned = true;
                    p.plan = self.plan(s.spec).await?;
                    self.ensure_schema(s.sink, s.tenant, s.spec, &p.plan, s.claim)
                        .await?;
                    continue;
                }
                Err(e) => {
                    // The next slice reads the catalog again (a dropped table, say, is then
                    // named as such).
                    self.forget_plan(s.spec.id).await;
                    return Err(e.into());
                }
            };
            let (rows, payloads): (Vec<SourceRow>, Vec<Payload>) = read.into_iter().unzip();
            check_tenant(s.tenant, s.spec, &rows)?;
            match self.send_one(s, &mut p, want, &rows, &payloads).await? {
                Step::Next => {}
                Step::Stop => return Ok(Some(p)),
                Step::Crashed => return Ok(None),
            }
        }
    }

    /// The next page: the one prefetched, or a read of its own. The first rows after the
    /// claimed watermark are read together with other slices that start at the same time (one
    /// statement per table for all of them): most slices of caught-up tasks are a few rows,
    /// and their reads were the largest share of Postgres' statements. At most
    /// `SHARED_READ_ROWS` rows this way (a batch of slices holds them all at once); a slice
    /// with more reads on from there in pages of its own.
    async fn next_read(&self, s: &Slice<'_>, p: &mut Pages) -> (i64, ReadResult) {
        let first = std::mem::replace(&mut p.first, false);
        if let Some(prefetched) = p.prefetched.take() {
            return prefetched;
        }
        let want = s.page_rows.min(s.limit - p.acked as i64);
        if first && p.position.cursor.is_some() && SourceReader::reads_groups(&p.plan) {
            let want = want.min(SHARED_READ_ROWS);
            return (
                want,
                self.read_shared(&p.plan, &p.position, s.page(want)).await,
            );
        }
        (
            want,
            self.read_page(&p.plan, &p.position, s.page(want)).await,
        )
    }

    /// Send one page. A full page means more may follow: the next one is read while this one
    /// is sent, so Postgres and insertAll work at the same time instead of taking turns (a
    /// backfill left a quarter of two cores idle). It is dropped if this page stops the slice;
    /// memory is at most two pages per slice.
    async fn send_one(
        &self,
        s: &Slice<'_>,
        p: &mut Pages,
        want: i64,
        rows: &[SourceRow],
        payloads: &[Payload],
    ) -> Result<Step, WorkerError> {
        let cx = SendCtx {
            sink: s.sink,
            control: self,
            def: table_def(s.spec, &p.plan, self.read_back()),
            batch_id: &s.batch_id,
            tenant: s.tenant,
            spec: s.spec,
            task: s.claim.task,
            rows,
            payloads,
            policy: self.cfg.retry_policy(),
            lost: s.lost,
            shutdown: s.shutdown,
        };
        let send = cx.send_page(self.cfg.chunk_limits, s.deadline, &*self.hooks);
        let next_want = s
            .page_rows
            .min(s.limit - p.acked as i64 - rows.len() as i64);
        let next_position = rows.last().map(SourceRow::watermark);
        let (page, next) = match &next_position {
            Some(at) if rows.len() as i64 == want && next_want > 0 => {
                let read = self.read_page(&p.plan, at, s.page(next_want));
                let (page, next) = tokio::join!(send, read);
                (page, Some((next_want, next)))
            }
            _ => (send.await, None),
        };
        let Some(page) = page? else {
            return Ok(Step::Crashed);
        };
        p.acked += page.handled;
        p.dead += page.dead;
        if page.handled > 0 {
            p.last = Some(rows[page.handled - 1].clone());
        }
        if page.error.is_some() {
            p.error = page.error;
            return Ok(Step::Stop);
        }
        if page.handled < rows.len() || p.acked as i64 >= s.limit {
            return Ok(Step::Stop); // stopped at the time bound or shutdown, or the slice is full
        }
        if (rows.len() as i64) < want {
            p.drained = true;
            return Ok(Step::Stop);
        }
        if let Some(at) = next_position {
            p.position = at;
        }
        p.prefetched = next;
        Ok(Step::Next)
    }

    /// List this batch in `_sync_batches` before the watermark moves: from then on the views
    /// show it. Without the listing the rows stay invisible, so it must not be skipped for a
    /// commit. Earlier batches of the task never listed (a dead or fenced slice's) stay
    /// invisible: this slice sent their rows again under its own batch (insertIds name the
    /// batch, so BigQuery does not drop the resend), and listing them now would make rows
    /// written long ago visible behind the merges' read-back (they were once listed here, and
    /// a merge point passing them lost them: issue 16's chaos run).
    async fn list_slice_batches(
        &self,
        s: &Slice<'_>,
        p: &Pages,
    ) -> Result<Option<i64>, WorkerError> {
        if p.acked == 0 {
            return Ok(None);
        }
        let (claim, tenant, spec) = (s.claim, s.tenant, s.spec);
        // Storage Write: the sink commits the pending stream here; that is all it takes, a
        // listing after it would be a second step a failure could separate from the first
        // (measured: the fault test doubled a slice's rows that way; docs/architecture.md,
        // "Write methods").
        let def = table_def(spec, &p.plan, self.read_back());
        self.list_batches(
            s.sink,
            tenant,
            &def,
            std::slice::from_ref(&s.batch_id),
            (p.acked - p.dead) as i64,
        )
        .await?;
        Ok(Some(claim.fencing_token))
    }

    /// A slice's rows must become visible within [`Worker::visible_within`] of their
    /// `_synced_at`: merges into `<table>_current` and `<table>_latest` read versions only
    /// from shortly before their point, so rows made visible later might be seen by neither.
    /// Such a slice (held up by retries, or by a stall) is not committed: the next one sends
    /// its rows again with a new `_synced_at`.
    fn check_visible_in_time(&self, s: &Slice<'_>, p: &Pages) -> Result<(), WorkerError> {
        // Merge mode rereads every version; CDC tables have no view.
        if p.acked == 0 || !matches!(s.spec.mode, Mode::Latest | Mode::History) {
            return Ok(());
        }
        self.visible_in_time(s.synced_at_us, "the slice's rows", "they are sent again")
    }

    /// What the commit records: the watermark just past the last handled row, how far the
    /// source is confirmed, and when the task should run next.
    async fn progress(
        &self,
        s: &Slice<'_>,
        p: Pages,
        batches_visible_through: Option<i64>,
    ) -> Result<Progress, WorkerError> {
        // Everything below the horizon is in BigQuery when the slice drained; otherwise only
        // what precedes the last acknowledged row's cursor is known complete.
        let synced_through = if p.drained {
            Some(s.horizon)
        } else {
            p.last.as_ref().map(|r| r.cursor_ts)
        };
        let more = !p.drained && p.error.is_none();
        let next_run_in = if more {
            Duration::ZERO
        } else if p.error.is_some() {
            task_backoff(self.deps.control.consecutive_failures(s.claim.task).await? + 1)
        } else {
            // Caught up: the coordinator makes the task due again when the tenant changes.
            self.cfg.idle_recheck
        };
        Ok(Progress {
            watermark: p.last.as_ref().map(SourceRow::watermark),
            synced_through,
            // Dead-lettered rows are handled but not synced.
            rows: p.acked.saturating_sub(p.dead) as i64,
            rerun_if_changed_in: p
                .drained
                .then(|| Duration::from_millis(s.spec.sync_interval_ms.max(0) as u64)),
            next_run_in,
            // Stored with the task and the run: text from here on.
            error: p.error.map(|e| e.to_string()),
            batches_visible_through,
        })
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
                |r| p.with_payload(plan, r),
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
        Ok(rows.into_iter().map(|r| p.with_payload(plan, r)).collect())
    }
}

/// The slice's batch id. Storage Write batches carry their prefix: the views show them without
/// a listing (their pending stream's commit is their visibility point).
fn batch_id(sink: &WriteSink, tenant: &Tenant, spec: &TableSpec, claim: &Claim) -> String {
    let prefix = match sink.write_api() {
        WriteApi::Storage => tenantsync_core::names::STORAGE_BATCH_PREFIX,
        WriteApi::InsertAll => "",
    };
    format!("{prefix}{}-{}-{}", tenant.id, spec.id, claim.fencing_token)
}

/// Second line of tenant isolation: the SQL filtered by tenant; every row is checked again
/// before it is sent, and one stray row stops the whole slice uncommitted.
fn check_tenant(tenant: &Tenant, spec: &TableSpec, rows: &[SourceRow]) -> Result<(), WorkerError> {
    match rows
        .iter()
        .find(|r| r.tenant.as_deref() != Some(tenant.organization_id.as_str()))
    {
        Some(bad) => Err(WorkerError::Isolation(format!(
            "row {:?} of {} has tenant {:?}, expected {:?}; nothing more was sent",
            bad.key, spec.source_table, bad.tenant, tenant.organization_id
        ))),
        None => Ok(()),
    }
}

/// What every page read of a slice shares, and the page's size.
#[derive(Clone, Copy)]
struct PageRead<'a> {
    tenant: &'a Tenant,
    batch_id: &'a str,
    synced_at: &'a str,
    synced_at_us: i64,
    /// CDC mode: rows carry `_CHANGE_TYPE` and `_CHANGE_SEQUENCE_NUMBER`.
    cdc: bool,
    horizon: DateTime<Utc>,
    want: i64,
    hasher: Option<&'a ColumnHasher>,
}

impl PageRead<'_> {
    /// A row read for this page, with its payload built from the row's own message or JSON
    /// (moved out of the row: holding both doubled the page's memory).
    fn with_payload(&self, plan: &SlicePlan, mut r: SourceRow) -> (SourceRow, Payload) {
        let meta = RowMeta {
            tenant_id: self.tenant.id,
            table: &plan.table,
            batch_id: self.batch_id,
            synced_at: self.synced_at,
            synced_at_us: self.synced_at_us,
            cdc: self.cdc,
            hasher: self.hasher,
        };
        let body = row_payload(&meta, &mut r, plan.proto.as_ref());
        (r, body)
    }
}
