//! `verify`, `verify --repair` and `resync`: compare a tenant's table in Postgres with its
//! `<table>_latest` view in BigQuery, and send again what drifted.
//!
//! The comparison is by key and version: each source row's cursor (microseconds) against the
//! `_source_ts` of the key's latest version in BigQuery. Content edited in BigQuery behind our
//! back with the same version is not detected. Only rows the control plane says are confirmed
//! (cursor below the task's synced-through point) are expected in BigQuery; newer ones are
//! still on their way and are skipped on both sides. Changelog capture has no version column:
//! presence only, skipping keys with changes still pending in the change table.

use crate::slice::{force_schema, payload, table_def, SendCtx};
use crate::{Worker, WorkerError};
use chrono::{DateTime, SecondsFormat, Utc};
use std::collections::HashMap;
use tenantsync_bigquery::BigQuery;
use tenantsync_core::mapping::BqType;
use tenantsync_core::{chunk, Mode, TableSpec, Tenant};
use tenantsync_store::control::tasks::TaskId;
use tenantsync_store::source::{SlicePlan, SourceRow};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Keys per compared range. Small enough that repairing a range resends little, large enough
/// that a table of a million rows prints at most a thousand ranges.
pub const RANGE_KEYS: usize = 1000;

/// One range of keys (in Postgres key order) where BigQuery differs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DriftRange {
    pub from: Vec<String>,
    pub to: Vec<String>,
    /// Confirmed source rows whose key is not in `_latest`.
    pub missing: usize,
    /// Keys whose latest version in BigQuery is not the source row's.
    pub stale: usize,
}

/// The result of verifying one tenant's table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verification {
    pub tenant: String,
    pub table: String,
    /// Rows are expected in BigQuery when their cursor is below this point.
    pub checked_before: Option<DateTime<Utc>>,
    pub source_rows: usize,
    pub bigquery_rows: usize,
    /// Rows compared (confirmed in the control plane).
    pub compared: usize,
    pub ranges: Vec<DriftRange>,
    /// Keys in `_latest` with no row in Postgres (deleted at the source, or written behind
    /// our back).
    pub extra: Vec<Vec<String>>,
    /// Source rows whose cursor is NULL or infinite: never sent, so not compared (each is a
    /// dead letter naming its cursor value; a real time makes it sync).
    pub unsyncable: Vec<Vec<String>>,
    /// What `--repair` sent, when it ran.
    pub repaired_rows: Option<usize>,
}

impl Verification {
    pub fn drifted(&self) -> bool {
        !self.ranges.is_empty() || !self.extra.is_empty()
    }
}

/// Verify and resync read `_latest` and write through insertAll: neither fits a CDC table
/// (no view; rows must go through the default stream with change pseudo-columns).
fn refuse_cdc(spec: &TableSpec, what: &str) -> Result<(), WorkerError> {
    if spec.mode == Mode::Cdc {
        return Err(WorkerError::Config(format!(
            "{what} is not available for CDC tables yet ({}.{})",
            spec.source_schema, spec.source_table
        )));
    }
    Ok(())
}

impl Worker {
    /// Compare one tenant's table; with `repair`, resend the drifted ranges and delete the
    /// extra keys (tombstone versions), then compare again.
    pub async fn verify(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
        repair: bool,
    ) -> Result<Verification, WorkerError> {
        refuse_cdc(spec, "verify")?;
        let mut v = self.compare(tenant, spec).await?;
        if repair && v.drifted() {
            let mut sent = 0;
            for r in &v.ranges {
                sent += self
                    .resync(tenant, spec, Some(&r.from), Some(&r.to))
                    .await?;
            }
            sent += self.tombstone(tenant, spec, &v.extra).await?;
            info!(tenant = %tenant.slug, table = %spec.source_table, rows = sent, "repaired drift");
            v = self.compare(tenant, spec).await?;
            v.repaired_rows = Some(sent);
        }
        Ok(v)
    }

    async fn compare(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
    ) -> Result<Verification, WorkerError> {
        let plan = self.plan(spec).await?;
        let checked_before = self
            .deps
            .control
            .task_synced_through(tenant.id, spec.id)
            .await?;
        let source = self
            .deps
            .source
            .tenant_keys(&plan, &tenant.organization_id)
            .await?;
        // Read after the keys: a key whose change was sent in between is no longer pending
        // but is in BigQuery, so nothing is reported twice.
        let pending = self
            .deps
            .source
            .pending_keys(&plan, &tenant.organization_id)
            .await?;
        let client = self.client(tenant).await?;
        if spec.mode == Mode::Merge {
            // `_final` is rebuilt by the periodic MERGE; bring it up to date first.
            self.merge(tenant, spec).await?;
        }
        let mut bq = self
            .bigquery_keys(tenant, &client, &plan, spec.mode == Mode::Merge)
            .await?;
        let mut v = Verification {
            tenant: tenant.slug.clone(),
            table: spec.source_table.clone(),
            checked_before,
            source_rows: source.iter().filter(|r| !r.deleted).count(),
            bigquery_rows: bq.len(),
            compared: 0,
            ranges: Vec::new(),
            extra: Vec::new(),
            unsyncable: Vec::new(),
            repaired_rows: None,
        };
        let before = checked_before.map_or(i64::MIN, |t| t.timestamp_micros());
        for block in source.chunks(RANGE_KEYS) {
            let (mut missing, mut stale) = (0, 0);
            for row in block {
                let (key, ts, deleted) = (&row.key, &row.micros, &row.deleted);
                let in_bq = bq.remove(key);
                if row.unsyncable {
                    v.unsyncable.push(key.clone());
                    continue;
                }
                if ts.is_some_and(|ts| ts >= before) || pending.contains(key) {
                    continue; // not confirmed yet: on its way
                }
                v.compared += 1;
                match in_bq {
                    // A row marked deleted must be gone from `_latest`.
                    Some(_) if *deleted => stale += 1,
                    None if *deleted => {}
                    None => missing += 1,
                    Some(b) if ts.is_some_and(|ts| b != ts) => stale += 1,
                    Some(_) => {}
                }
            }
            if missing + stale > 0 {
                v.ranges.push(DriftRange {
                    from: block[0].key.clone(),
                    to: block[block.len() - 1].key.clone(),
                    missing,
                    stale,
                });
            }
        }
        let mut extra: Vec<Vec<String>> = bq.into_keys().filter(|k| !pending.contains(k)).collect();
        extra.sort();
        v.extra = extra;
        Ok(v)
    }

    /// Key (as text, like Postgres renders it) → `_source_ts` in microseconds, from `_latest`
    /// (`_final` for merge mode).
    async fn bigquery_keys(
        &self,
        tenant: &Tenant,
        client: &BigQuery,
        plan: &SlicePlan,
        spec_mode_is_merge: bool,
    ) -> Result<HashMap<Vec<String>, i64>, WorkerError> {
        let cols: Vec<String> = plan
            .key_columns
            .iter()
            .map(|k| format!("CAST(`{k}` AS STRING)"))
            .collect();
        let sql = format!(
            "SELECT {}, _source_ts FROM {}",
            cols.join(", "),
            client.qualified(&format!(
                "{}{}",
                plan.table,
                if spec_mode_is_merge {
                    "_final"
                } else {
                    "_latest"
                }
            ))
        );
        let rows = self
            .retry_bq("verify query", tenant, || async {
                Ok(client.query(&sql).await?)
            })
            .await?;
        let n = plan.key_columns.len();
        Ok(rows
            .into_iter()
            .map(|r| {
                let key = r[..n]
                    .iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect();
                let ts = r[n]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .or(r[n].as_i64())
                    .unwrap_or(i64::MIN);
                (key, ts)
            })
            .collect())
    }

    /// Send the tenant's current rows with keys in `[from, to]` (either end open when `None`)
    /// again, as new versions (fresh insertIds, so BigQuery's de-duplication cannot drop them).
    /// The watermark does not move. Returns the rows sent.
    pub async fn resync(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
        from: Option<&[String]>,
        to: Option<&[String]>,
    ) -> Result<usize, WorkerError> {
        refuse_cdc(spec, "resync")?;
        let plan = self.plan(spec).await?;
        let client = self.client(tenant).await?;
        let def = table_def(spec, &plan, self.read_back());
        self.retry_bq("sync schema", tenant, || async {
            Ok(force_schema(&*client, &def).await?)
        })
        .await?;
        let horizon = self.deps.source.horizon(self.cfg.cursor_skew).await?;
        let limit = i64::from(spec.slice_rows.max(1));
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let mut lower: Option<(Vec<String>, bool)> = from.map(|f| (f.to_vec(), true));
        let mut sent = 0;
        loop {
            let rows = self
                .deps
                .source
                .read_range(
                    &plan,
                    &tenant.organization_id,
                    horizon,
                    lower.as_ref().map(|(k, inc)| (k.as_slice(), *inc)),
                    to,
                    limit,
                )
                .await?;
            let Some(last) = rows.last() else { break };
            lower = Some((last.key.clone(), false));
            let full = rows.len() as i64 == limit;
            sent += self
                .send_rows(&client, tenant, spec, &plan, salted(rows, &nonce), &nonce)
                .await?;
            if !full {
                break;
            }
        }
        Ok(sent)
    }

    /// Delete `keys` from `_latest`: a tombstone version (`_op = 'delete'`) per key.
    async fn tombstone(
        &self,
        tenant: &Tenant,
        spec: &TableSpec,
        keys: &[Vec<String>],
    ) -> Result<usize, WorkerError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let plan = self.plan(spec).await?;
        let client = self.client(tenant).await?;
        let now = Utc::now();
        let ts = now.to_rfc3339_opts(SecondsFormat::Micros, true);
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let rows: Vec<SourceRow> = keys
            .iter()
            .map(|key| {
                let mut obj = serde_json::Map::new();
                for (col, val) in plan.key_columns.iter().zip(key) {
                    let integer = plan
                        .fields
                        .iter()
                        .any(|f| &f.name == col && f.field_type == BqType::Int64);
                    let v = match val.parse::<i64>() {
                        Ok(n) if integer => serde_json::Value::from(n),
                        _ => serde_json::Value::from(val.clone()),
                    };
                    obj.insert(col.clone(), v);
                }
                obj.insert("_op".into(), "delete".into());
                obj.insert("_source_ts".into(), ts.clone().into());
                SourceRow {
                    key: key.clone(),
                    cursor: ts.clone(),
                    cursor_ts: now,
                    tenant: Some(tenant.organization_id.clone()),
                    json: serde_json::Value::Object(obj).to_string(),
                    proto: None,
                    op: "delete".into(),
                    seq: None,
                }
            })
            .collect();
        self.send_rows(&client, tenant, spec, &plan, salted(rows, &nonce), &nonce)
            .await
    }

    /// insertAll `rows` in chunks through the slice path (rate limits, retries, dead letters).
    /// Each part of at most a chunk's rows is a batch of its own, stamped when it is sent and
    /// listed right after: a long resync must not make rows visible later than merges into
    /// `<table>_current` read back (see `Worker::visible_within`).
    async fn send_rows(
        &self,
        client: &BigQuery,
        tenant: &Tenant,
        spec: &TableSpec,
        plan: &SlicePlan,
        rows: Vec<SourceRow>,
        nonce: &str,
    ) -> Result<usize, WorkerError> {
        let part_rows = self.cfg.chunk_limits.max_rows.max(1);
        let mut sent = 0;
        for (i, part) in rows.chunks(part_rows).enumerate() {
            sent += self
                .send_part(client, tenant, spec, plan, part, &format!("{nonce}-{i}"))
                .await?;
        }
        Ok(sent)
    }

    async fn send_part(
        &self,
        client: &BigQuery,
        tenant: &Tenant,
        spec: &TableSpec,
        plan: &SlicePlan,
        rows: &[SourceRow],
        part: &str,
    ) -> Result<usize, WorkerError> {
        let batch_id = format!("{}-{}-resync-{part}", tenant.id, spec.id);
        let started = Utc::now();
        let synced_at = started.to_rfc3339_opts(SecondsFormat::Micros, true);
        let hasher = self.hasher(tenant, spec).await?;
        let payloads: Vec<tenantsync_core::Payload> = rows
            .iter()
            .map(|r| {
                let h = hasher.as_deref();
                payload(tenant.id, &plan.table, r, &batch_id, &synced_at, h).into()
            })
            .collect();
        let sizes: Vec<usize> = payloads.iter().map(tenantsync_core::Payload::len).collect();
        let (never, stop) = (CancellationToken::new(), CancellationToken::new());
        let def = table_def(spec, plan, self.read_back());
        let cx = SendCtx {
            sink: client,
            control: self,
            def,
            batch_id: &batch_id,
            tenant,
            spec,
            task: TaskId {
                tenant_id: tenant.id,
                table_id: spec.id,
            },
            rows,
            payloads: &payloads,
            policy: self.cfg.retry_policy(),
            lost: &never,
            shutdown: &stop,
        };
        let (chunks, _) = chunk::plan(&sizes, self.cfg.chunk_limits);
        let mut sent = 0;
        for range in chunks {
            let items: Vec<usize> = range.collect();
            let dead = cx.send_chunk(&items).await?;
            sent += items.len() - dead;
        }
        self.list_batches(client, tenant, &def, &[batch_id], sent as i64)
            .await?;
        self.visible_in_time(
            started.timestamp_micros(),
            "resent rows",
            "run resync again",
        )?;
        Ok(sent)
    }
}

/// The same rows with a per-run salt in the cursor text, which feeds the insertId (and only
/// that): a resent version must not be taken for a retry of the original.
fn salted(rows: Vec<SourceRow>, nonce: &str) -> Vec<SourceRow> {
    rows.into_iter()
        .map(|mut r| {
            r.cursor = format!("{}#resync-{nonce}", r.cursor);
            r
        })
        .collect()
}
