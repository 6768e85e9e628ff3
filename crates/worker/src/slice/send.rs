//! One page of a slice through a [`Sink`]: chunks, retries under the worker's policy,
//! bisection of requests refused as a whole, dead letters, rate-limit waits.
//!
//! What the send path needs besides the sink (a slot in the insert budgets, the dead-letter
//! table) is behind [`SendControl`], so the logic here runs in unit tests against an in-memory
//! sink (`testing.rs`) without BigQuery, Postgres or Redis.

use super::schema::force_schema;
use super::{CrashPoint, Hooks};
use crate::retry::{backoff, retry_bq};
use crate::{Worker, WorkerError};
use chrono::{DateTime, SecondsFormat, Utc};
use std::future::Future;
use std::time::{Duration, Instant};
use tenantsync_bigquery::{BqError, InsertOutcome, Retry, RowError, Sink, TableDef};
use tenantsync_core::chunk::{self, Limits};
use tenantsync_core::retry::RetryPolicy;
use tenantsync_core::{Payload, TableSpec, Tenant};
use tenantsync_store::control::dead_letters::{DeadLetter, NewDeadLetter};
use tenantsync_store::control::tasks::TaskId;
use tenantsync_store::SourceRow;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The control side of sending: the insert budgets (Redis) and the dead-letter table
/// (Postgres). [`Worker`] is the real one.
pub(crate) trait SendControl: Sync {
    /// Reserve a slot for one append of `rows` rows in the global and the tenant's budget;
    /// the answer is how long to wait before sending it.
    fn reserve(
        &self,
        tenant: &Tenant,
        rows: usize,
    ) -> impl Future<Output = Result<Duration, WorkerError>> + Send;

    /// Record rows the sink refused. Until this succeeds the watermark cannot pass them.
    fn dead_letter(
        &self,
        task: TaskId,
        letters: &[NewDeadLetter],
    ) -> impl Future<Output = Result<(), WorkerError>> + Send;
}

/// Everything the sends of one page share.
pub(crate) struct SendCtx<'a, S, C> {
    pub(crate) sink: &'a S,
    pub(crate) control: &'a C,
    pub(crate) def: TableDef<'a>,
    /// The slice's batch: the rows' `_batch_id`, and the unit a write method commits.
    pub(crate) batch_id: &'a str,
    pub(crate) tenant: &'a Tenant,
    pub(crate) spec: &'a TableSpec,
    pub(crate) task: TaskId,
    pub(crate) rows: &'a [SourceRow],
    /// The rows as the sink takes them, in the same order.
    pub(crate) payloads: &'a [Payload],
    pub(crate) policy: RetryPolicy,
    pub(crate) lost: &'a CancellationToken,
    pub(crate) shutdown: &'a CancellationToken,
}

/// What [`SendCtx::send_page`] did with one page.
#[derive(Debug)]
pub(super) struct Page {
    /// Rows at the front of the page that are in BigQuery or dead-lettered.
    pub(super) handled: usize,
    /// Of those, dead-lettered.
    pub(super) dead: usize,
    pub(super) error: Option<WorkerError>,
}

impl<S: Sink, C: SendControl> SendCtx<'_, S, C> {
    /// Send the page in chunks: rows too large for any request go to the dead-letter table,
    /// the rest in appends. Stops at the first error, a lost lease, shutdown or `deadline`.
    /// `None`: a test hook crashed the slice.
    pub(super) async fn send_page(
        &self,
        limits: Limits,
        deadline: Instant,
        hooks: &dyn Hooks,
    ) -> Result<Option<Page>, WorkerError> {
        let sizes: Vec<usize> = self.payloads.iter().map(Payload::len).collect();
        // `handled[i]`: row i is in BigQuery or in the dead-letter table. The watermark moves
        // to the end of the handled prefix only.
        let mut handled = vec![false; self.rows.len()];
        let mut dead = 0usize;
        let mut error = None;
        let max = limits.max_bytes;
        let (oversized, sendable): (Vec<usize>, Vec<usize>) =
            (0..self.rows.len()).partition(|&i| sizes[i] + chunk::ENVELOPE_BYTES + 1 > max);
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
            match self.dead_letter(&oversized, &reasons).await {
                Ok(()) => {
                    dead += oversized.len();
                    oversized.iter().for_each(|&i| handled[i] = true);
                }
                Err(e) => error = Some(e),
            }
        }
        let send_sizes: Vec<usize> = sendable.iter().map(|&i| sizes[i]).collect();
        let (chunks, _) = chunk::plan(&send_sizes, limits);
        for range in chunks {
            if error.is_some() {
                break;
            }
            if self.lost.is_cancelled() {
                error = Some(WorkerError::LeaseLost);
                break;
            }
            if self.shutdown.is_cancelled() || Instant::now() > deadline {
                break;
            }
            let items = &sendable[range];
            match self.send_chunk(items).await {
                Ok(n) => {
                    dead += n;
                    items.iter().for_each(|&i| handled[i] = true);
                    if items.len() < sendable.len()
                        && hooks.crash(self.task, CrashPoint::AfterFirstChunk)
                    {
                        return Ok(None);
                    }
                }
                Err(e) => error = Some(e),
            }
        }
        Ok(Some(Page {
            handled: handled.iter().position(|h| !h).unwrap_or(self.rows.len()),
            dead,
            error,
        }))
    }

    /// Send the rows `items` (indices into `rows`) in one append, retrying what the error
    /// classification says can be retried. Rows the sink refuses go to the dead-letter table
    /// and the rest is sent again; a request refused as a whole is bisected down to the row
    /// that causes it. Returns how many rows were dead-lettered.
    pub(crate) async fn send_chunk(&self, items: &[usize]) -> Result<usize, WorkerError> {
        let mut failures = 0u32;
        loop {
            self.wait_for_slot(items.len()).await?;
            let body: Vec<&Payload> = items.iter().map(|&i| &self.payloads[i]).collect();
            let t0 = Instant::now();
            let result = self.sink.append(self.def.table, self.batch_id, &body).await;
            let secs = t0.elapsed().as_secs_f64();
            let method = self.sink.write_api().as_str();
            let e = match result {
                Ok(out) if out.row_errors.is_empty() => {
                    crate::metrics::insert(method, "ok", secs);
                    return Ok(0);
                }
                Ok(out) => {
                    crate::metrics::insert(method, "invalid", secs);
                    let refused = refused_rows(&out, items.len());
                    let drift = refused.iter().any(|e| e.message.contains("no such field"));
                    if refused.is_empty() || (drift && failures == 0) {
                        // Nothing to blame on a row, or the table lost a column behind our
                        // back: fix the schema and try again before blaming rows.
                        failures += 1;
                        if refused.is_empty() && !self.policy.allows_retry(failures) {
                            return Err(nobody_refused(&out).into());
                        }
                        self.repair_schema().await?;
                        continue;
                    }
                    return self.dead_letter_and_resend(items, &refused).await;
                }
                Err(e) => e,
            };
            crate::metrics::insert(method, e.label(), secs);
            if matches!(e, BqError::Invalid(_) | BqError::TooLarge(_)) {
                return self.split_or_dead_letter(items, e).await;
            }
            failures += 1;
            let Some(wait) = self.retry_wait(&e, failures).await? else {
                return Err(e.into());
            };
            warn!(tenant = %self.tenant.slug, table = %self.def.table, attempt = failures, error = %e, "insert_all failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.lost.cancelled() => return Err(e.into()),
                _ = self.shutdown.cancelled() => return Err(e.into()),
            }
        }
    }

    /// The wait before sending a chunk again that failed with `e`, `failures` times in all;
    /// `None`: give up. A dataset or table deleted behind our back is recreated first.
    async fn retry_wait(
        &self,
        e: &BqError,
        failures: u32,
    ) -> Result<Option<Duration>, WorkerError> {
        match e.retry() {
            Retry::After(base) => Ok(backoff(&self.policy.with_base(base), failures)),
            Retry::AfterFix if self.policy.allows_retry(failures) => {
                if matches!(e, BqError::NotFound(_)) {
                    self.repair_schema().await?;
                }
                Ok(Some(Duration::ZERO))
            }
            Retry::AfterFix | Retry::Never | Retry::PauseTenant => Ok(None),
        }
    }

    /// Dead-letter the refused rows, then send the others again: they were "stopped", not
    /// written (same insertIds).
    async fn dead_letter_and_resend(
        &self,
        items: &[usize],
        refused: &[&RowError],
    ) -> Result<usize, WorkerError> {
        let dead: Vec<usize> = refused.iter().map(|e| items[e.index]).collect();
        let reasons: Vec<String> = refused
            .iter()
            .map(|e| format!("{}: {}", e.reason, e.message))
            .collect();
        self.dead_letter(&dead, &reasons).await?;
        let rest: Vec<usize> = items
            .iter()
            .copied()
            .filter(|i| !dead.contains(i))
            .collect();
        if rest.is_empty() {
            return Ok(dead.len());
        }
        Ok(dead.len() + Box::pin(self.send_chunk(&rest)).await?)
    }

    /// A request refused as a whole: split it, so the offending row ends up alone, and
    /// dead-letter that row.
    async fn split_or_dead_letter(
        &self,
        items: &[usize],
        e: BqError,
    ) -> Result<usize, WorkerError> {
        if items.len() > 1 {
            let (a, b) = items.split_at(items.len() / 2);
            let dead = Box::pin(self.send_chunk(a)).await?;
            return Ok(dead + Box::pin(self.send_chunk(b)).await?);
        }
        self.dead_letter(items, &[e.to_string()]).await?;
        Ok(1)
    }

    async fn repair_schema(&self) -> Result<(), WorkerError> {
        retry_bq(self.policy, "repair schema", self.tenant, || async {
            Ok(force_schema(self.sink, &self.def).await?)
        })
        .await
    }

    /// Wait for this append's slot in the global and the tenant's budget.
    async fn wait_for_slot(&self, rows: usize) -> Result<(), WorkerError> {
        wait_for_slot(self.control, self.tenant, rows, self.lost, self.shutdown).await
    }

    /// Record rows in the dead-letter table, with `reasons[n]` for the n-th (the last reason
    /// for the rest).
    async fn dead_letter(&self, items: &[usize], reasons: &[String]) -> Result<(), WorkerError> {
        let letters: Vec<NewDeadLetter> = items
            .iter()
            .enumerate()
            .map(|(n, &i)| NewDeadLetter {
                key: self.rows[i].key.clone(),
                cursor: self.rows[i].cursor.clone(),
                reason: reasons
                    .get(n)
                    .or(reasons.last())
                    .cloned()
                    .unwrap_or_default(),
                // A message is kept as the JSON it reads back as: dead letters are read,
                // retried and discarded as JSON whatever the write method.
                payload: self.payloads[i].json_lossy().into_owned(),
            })
            .collect();
        self.control.dead_letter(self.task, &letters).await?;
        let (tenant, table) = (&self.tenant.slug, &self.spec.source_table);
        for l in &letters {
            warn!(tenant = %tenant, table = %table, key = ?l.key, reason = %l.reason, "row dead-lettered");
        }
        crate::metrics::dead_lettered(tenant, table, letters.len() as u64);
        Ok(())
    }
}

/// The rows of an append that the sink blamed: not `stopped`, and in the request.
fn refused_rows(out: &InsertOutcome, rows: usize) -> Vec<&RowError> {
    out.row_errors
        .iter()
        .filter(|e| !e.is_stopped() && e.index < rows)
        .collect()
}

/// The error of an append refused again and again without a row named at fault.
fn nobody_refused(out: &InsertOutcome) -> BqError {
    let first = out.row_errors.first();
    BqError::Transient(format!(
        "insertAll refused {} rows without naming one at fault (first: {}: {})",
        out.row_errors.len(),
        first.map_or("", |e| e.reason.as_str()),
        first.map_or("", |e| e.message.as_str()),
    ))
}

/// Wait for the slot of an append of `rows` rows; a lost lease or shutdown ends the wait.
pub(crate) async fn wait_for_slot<C: SendControl>(
    control: &C,
    tenant: &Tenant,
    rows: usize,
    lost: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let wait = control.reserve(tenant, rows).await?;
    if wait.is_zero() {
        return Ok(());
    }
    crate::metrics::ratelimit_wait(&tenant.slug, wait);
    tokio::select! {
        _ = tokio::time::sleep(wait) => Ok(()),
        _ = lost.cancelled() => Err(WorkerError::LeaseLost),
        _ = shutdown.cancelled() => Err(WorkerError::ShuttingDown),
    }
}

impl SendControl for Worker {
    async fn reserve(&self, tenant: &Tenant, rows: usize) -> Result<Duration, WorkerError> {
        let budget = tenantsync_lease::ratelimit::Budget {
            requests_per_s: tenant
                .max_requests_per_s
                .or(self.cfg.tenant_budget.requests_per_s),
            rows_per_s: tenant.max_rows_per_s.or(self.cfg.tenant_budget.rows_per_s),
        };
        let global = self.cfg.global_budget;
        if budget == Default::default() && global == Default::default() {
            return Ok(Duration::ZERO);
        }
        Ok(self
            .deps
            .leases
            .reserve_insert(global, tenant.id, budget, rows as u64)
            .await?)
    }

    async fn dead_letter(
        &self,
        task: TaskId,
        letters: &[NewDeadLetter],
    ) -> Result<(), WorkerError> {
        Ok(self.deps.control.add_dead_letters(task, letters).await?)
    }
}

impl Worker {
    /// Send a dead letter's stored row again, as a batch of its own, synced now and listed.
    /// Err when BigQuery refuses it. Its original `_synced_at` is older than what the views
    /// and merges read back, so resent as it was it would never show.
    pub async fn resend_dead_letter(&self, d: &DeadLetter) -> Result<(), WorkerError> {
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
        let batch_id = format!("{}-{}-dl{}", tenant.id, spec.id, d.id);
        let row = restamp(&d.payload, &batch_id, Utc::now())?;
        let table = spec.bq_table();
        let out = client
            .append(&table, &batch_id, &[&Payload::Json(row)])
            .await?;
        if let Some(e) = out.row_errors.first() {
            return Err(WorkerError::BigQuery(BqError::Invalid(format!(
                "{}: {}",
                e.reason, e.message
            ))));
        }
        let listed = client.list_batches(&table, &[batch_id], 1).await?;
        match listed.row_errors.first() {
            None => Ok(()),
            Some(e) => Err(WorkerError::BigQuery(BqError::Invalid(format!(
                "listing the resent row's batch: {}: {}",
                e.reason, e.message
            )))),
        }
    }
}

/// A stored insertAll row as a new batch's: `_batch_id` and `_synced_at` replaced, and the
/// insertId naming the batch (as a slice's rows do).
fn restamp(payload: &str, batch_id: &str, now: DateTime<Utc>) -> Result<String, WorkerError> {
    let bad = |e: String| WorkerError::BigQuery(BqError::Invalid(e));
    let mut v: serde_json::Value =
        serde_json::from_str(payload).map_err(|e| bad(format!("stored row is not JSON: {e}")))?;
    let row = v["json"]
        .as_object_mut()
        .ok_or_else(|| bad("stored row has no json object".into()))?;
    let version = row
        .get("_version_id")
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string();
    row.insert("_batch_id".into(), batch_id.into());
    row.insert(
        "_synced_at".into(),
        now.to_rfc3339_opts(SecondsFormat::Micros, true).into(),
    );
    v["insertId"] = format!("{version}-{batch_id}").into();
    Ok(v.to_string())
}

#[cfg(test)]
mod restamp_tests {
    use super::*;

    #[test]
    fn a_resent_row_is_a_new_batch_synced_now() {
        let stored = r#"{"insertId":"abc-1-2-3","json":{"id":"7","_synced_at":"2020-01-01T00:00:00.000000Z","_batch_id":"1-2-3","_version_id":"abc"}}"#;
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&restamp(stored, "1-2-dl9", now).unwrap()).unwrap();
        assert_eq!(v["insertId"], "abc-1-2-dl9");
        assert_eq!(v["json"]["_batch_id"], "1-2-dl9");
        assert_eq!(v["json"]["_synced_at"], "2023-11-14T22:13:20.000000Z");
        assert_eq!(v["json"]["_version_id"], "abc");
        assert_eq!(v["json"]["id"], "7");
        assert!(restamp("not json", "b", now).is_err());
    }
}
