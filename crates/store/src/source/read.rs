//! Running a plan's statements: slice, group, range and verify reads, change detection and
//! the backlog gauge.

use super::plan::SlicePlan;
use super::row::{source_row, stale_plan, Layout};
use super::{SourceReader, SourceRow};
use crate::control::tasks::Watermark;
use crate::error::{Result, StoreError};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::Row;

impl SourceReader {
    /// Tenant ids (as text) with rows whose cursor lies in `[since, horizon)`.
    pub async fn changed_tenants(
        &self,
        plan: &SlicePlan,
        since: DateTime<Utc>,
        horizon: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(&plan.sql.changed_sql)
            .bind(since)
            .bind(horizon)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Per tenant (organization id as text): source rows whose cursor is at or after `since`
    /// (all rows when `None`), counting at most `cap`. An estimate of what is not yet in
    /// BigQuery: rows confirmed but updated again since count too.
    pub async fn backlog(
        &self,
        plan: &SlicePlan,
        tenants: &[(String, Option<DateTime<Utc>>)],
        cap: i64,
    ) -> Result<Vec<(String, i64)>> {
        let (ids, since): (Vec<String>, Vec<Option<DateTime<Utc>>>) =
            tenants.iter().cloned().unzip();
        let rows = sqlx::query(&plan.sql.backlog_sql)
            .bind(ids)
            .bind(since)
            .bind(cap)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("tenant")?, r.try_get("n")?)))
            .collect()
    }

    /// Up to `limit` rows of one tenant after `watermark` and below `horizon`, in keyset order.
    pub async fn read_slice(
        &self,
        plan: &SlicePlan,
        organization_id: &str,
        watermark: &Watermark,
        horizon: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<SourceRow>> {
        self.read_slice_map(plan, organization_id, watermark, horizon, limit, |r| r)
            .await
    }

    /// [`Self::read_slice`], passing each row through `f` as it arrives. The worker turns a row
    /// into its insertAll payload there, so a slice never holds every row's JSON twice (and
    /// never every raw row next to every converted one, as `fetch_all` would).
    pub async fn read_slice_map<T>(
        &self,
        plan: &SlicePlan,
        organization_id: &str,
        watermark: &Watermark,
        horizon: DateTime<Utc>,
        limit: i64,
        mut f: impl FnMut(SourceRow) -> T,
    ) -> Result<Vec<T>> {
        let mut query = match &watermark.cursor {
            None => sqlx::query(&plan.sql.first_sql),
            Some(_) => {
                if watermark.key.len() != plan.sql.watermark_parts {
                    return Err(StoreError::Invalid(format!(
                        "watermark key has {} parts but table {} ({} capture) needs {}; resync the table",
                        watermark.key.len(),
                        plan.table,
                        plan.capture,
                        plan.sql.watermark_parts
                    )));
                }
                sqlx::query(&plan.sql.next_sql)
            }
        };
        query = query.bind(organization_id).bind(horizon).bind(limit);
        if let Some(c) = &watermark.cursor {
            query = query.bind(c);
            for k in &watermark.key {
                query = query.bind(k);
            }
        }
        let mut out = Vec::with_capacity(limit.clamp(0, 1024) as usize);
        let mut rows = query.fetch(&self.pool);
        let mut layout = None;
        while let Some(r) = rows.try_next().await.map_err(|e| stale_plan(plan, e))? {
            let l = match layout {
                Some(l) => l,
                None => *layout.insert(Layout::checked(plan, &r, false)?),
            };
            out.push(f(source_row(plan, &l, &r, plan.proto.as_deref())?));
        }
        Ok(out)
    }
}

/// One tenant's part of [`SourceReader::read_slices`].
#[derive(Debug, Clone)]
pub struct GroupRead<'a> {
    pub organization_id: &'a str,
    /// Where the tenant's slice stands; it must have a cursor (a first slice reads alone).
    pub watermark: &'a Watermark,
    pub horizon: DateTime<Utc>,
    pub limit: i64,
}

impl SourceReader {
    /// Whether [`Self::read_slices`] can read this plan's tenants together (cursor capture).
    pub fn reads_groups(plan: &SlicePlan) -> bool {
        plan.sql.group_sql.is_some()
    }

    /// [`Self::read_slice`] for several tenants of one table in one statement: for each
    /// request, up to `limit` rows after its watermark and below its horizon, in keyset order.
    /// Slices that start together read with one round trip instead of one each.
    pub async fn read_slices(
        &self,
        plan: &SlicePlan,
        reqs: &[GroupRead<'_>],
    ) -> Result<Vec<Vec<SourceRow>>> {
        let sql = plan.sql.group_sql.as_deref().ok_or_else(|| {
            StoreError::Invalid(format!(
                "table {} ({} capture) cannot be read for several tenants at once",
                plan.table, plan.capture
            ))
        })?;
        let parts = plan.sql.watermark_parts;
        let mut tenants = Vec::with_capacity(reqs.len());
        let mut horizons = Vec::with_capacity(reqs.len());
        let mut limits = Vec::with_capacity(reqs.len());
        let mut marks: Vec<Vec<String>> = vec![Vec::with_capacity(reqs.len()); parts + 1];
        for r in reqs {
            let cursor = match &r.watermark.cursor {
                Some(c) if r.watermark.key.len() == parts => c,
                _ => {
                    return Err(StoreError::Invalid(format!(
                        "a read of several tenants of {} needs a watermark of {} part(s) for each",
                        plan.table,
                        parts + 1
                    )))
                }
            };
            tenants.push(r.organization_id);
            horizons.push(r.horizon);
            limits.push(r.limit);
            marks[0].push(cursor.clone());
            for (i, k) in r.watermark.key.iter().enumerate() {
                marks[i + 1].push(k.clone());
            }
        }
        let mut query = sqlx::query(sql).bind(tenants).bind(horizons).bind(limits);
        for m in marks {
            query = query.bind(m);
        }
        let mut out: Vec<Vec<SourceRow>> = vec![Vec::new(); reqs.len()];
        let mut rows = query.fetch(&self.pool);
        let mut layout = None;
        while let Some(r) = rows.try_next().await.map_err(|e| stale_plan(plan, e))? {
            let l = match layout {
                Some(l) => l,
                None => *layout.insert(Layout::checked(plan, &r, true)?),
            };
            let i: i64 = r.try_get(l.request.expect("a group layout has a request column"))?;
            let slot = usize::try_from(i - 1)
                .ok()
                .and_then(|i| out.get_mut(i))
                .ok_or_else(|| StoreError::Invalid(format!("group read returned request {i}")))?;
            slot.push(source_row(plan, &l, &r, plan.proto.as_deref())?);
        }
        Ok(out)
    }
}

/// One source row as `verify` sees it.
#[derive(Debug, Clone)]
pub struct TenantKey {
    pub key: Vec<String>,
    /// The cursor as microseconds since the epoch (what `_source_ts` holds in BigQuery); None
    /// under changelog capture, or when the row is unsyncable.
    pub micros: Option<i64>,
    /// Marked deleted (soft delete).
    pub deleted: bool,
    /// The cursor is NULL or infinite: the row is never sent (reported as a dead letter).
    pub unsyncable: bool,
}

impl SourceReader {
    /// Every key of one tenant, in key order, with its cursor as microseconds since the epoch
    /// (what `_source_ts` holds in BigQuery; None under changelog capture, where no source
    /// column holds the version) and whether it is marked deleted. Held in memory: verify is
    /// an operator's command.
    pub async fn tenant_keys(
        &self,
        plan: &SlicePlan,
        organization_id: &str,
    ) -> Result<Vec<TenantKey>> {
        let mut out = Vec::new();
        let mut rows = sqlx::query(&plan.sql.verify_sql)
            .bind(organization_id)
            .fetch(&self.pool);
        while let Some(r) = rows.try_next().await? {
            out.push(TenantKey {
                key: r.try_get("k")?,
                micros: r.try_get("ts")?,
                deleted: r.try_get("del")?,
                unsyncable: r.try_get("bad")?,
            });
        }
        Ok(out)
    }

    /// Cursor capture: up to `limit` rows of one tenant whose cursor is NULL, `infinity` or
    /// `-infinity`, as (key, cursor text). Such a row cannot be ordered among versions, so it
    /// is never sent; this is how it is found and reported. Empty under changelog capture.
    pub async fn unsyncable_rows(
        &self,
        plan: &SlicePlan,
        organization_id: &str,
        limit: i64,
    ) -> Result<Vec<(Vec<String>, Option<String>)>> {
        let Some(sql) = &plan.sql.unsyncable_sql else {
            return Ok(vec![]);
        };
        let rows = sqlx::query(sql)
            .bind(organization_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("k")?, r.try_get("c")?)))
            .collect()
    }

    /// Changelog capture: the keys of one tenant with changes not yet in BigQuery (their
    /// BigQuery state may lag the source). Empty under cursor capture.
    pub async fn pending_keys(
        &self,
        plan: &SlicePlan,
        organization_id: &str,
    ) -> Result<std::collections::HashSet<Vec<String>>> {
        let Some(sql) = &plan.sql.pending_sql else {
            return Ok(Default::default());
        };
        Ok(sqlx::query_scalar(sql)
            .bind(organization_id)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .collect())
    }

    /// Up to `limit` rows of one tenant below `horizon` with keys after `from` (inclusive or
    /// not; `None`: from the first) up to `to` inclusive (`None`: to the last), in key order.
    pub async fn read_range(
        &self,
        plan: &SlicePlan,
        organization_id: &str,
        horizon: DateTime<Utc>,
        from: Option<(&[String], bool)>,
        to: Option<&[String]>,
        limit: i64,
    ) -> Result<Vec<SourceRow>> {
        let n = plan.key_columns.len();
        for k in from.map(|f| f.0).into_iter().chain(to) {
            if k.len() != n {
                return Err(StoreError::Invalid(format!(
                    "a key of {} has {n} part(s) ({}); got {}",
                    plan.table,
                    plan.key_columns.join(", "),
                    k.len()
                )));
            }
        }
        let mut q = sqlx::query(&plan.sql.range_sql)
            .bind(organization_id)
            .bind(horizon)
            .bind(limit)
            .bind(from.map(|f| f.1))
            .bind(to.map(|_| true));
        let none = vec![None::<String>; n];
        let lower: Vec<Option<String>> = from
            .map(|f| f.0.iter().cloned().map(Some).collect())
            .unwrap_or_else(|| none.clone());
        let upper: Vec<Option<String>> = to
            .map(|t| t.iter().cloned().map(Some).collect())
            .unwrap_or(none);
        for v in lower.into_iter().chain(upper) {
            q = q.bind(v);
        }
        let mut out = Vec::new();
        let mut rows = q.fetch(&self.pool);
        let mut layout = None;
        // No catalog check: a changelog range reads the current rows, with no fingerprint.
        while let Some(r) = rows.try_next().await.map_err(|e| stale_plan(plan, e))? {
            let l = match layout {
                Some(l) => l,
                None => *layout.insert(Layout::of(plan, &r, false)?),
            };
            // Verify compares and repairs rows as JSON, whatever the table's write method.
            out.push(source_row(plan, &l, &r, None)?);
        }
        Ok(out)
    }
}
