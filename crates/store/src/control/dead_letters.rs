//! The dead-letter table: rows BigQuery refused, kept with the reason until retried or discarded.

use super::tasks::TaskId;
use super::ControlPlane;
use crate::error::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub key: Vec<String>,
    pub cursor: String,
    pub reason: String,
    pub payload: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub tenant: String,
    pub tenant_id: i64,
    pub table: String,
    pub table_id: i64,
    pub key: Vec<String>,
    pub cursor: String,
    pub reason: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    #[serde(skip)]
    pub payload: String,
}

/// Keys, cursors and reasons of dead letters as parallel arrays for `unnest`. Keys are text[];
/// unnest cannot take an array of arrays, so keys travel as JSON.
fn columns(rows: &[NewDeadLetter]) -> (Vec<String>, Vec<&str>, Vec<&str>) {
    let keys = rows
        .iter()
        .map(|r| serde_json::to_string(&r.key).expect("strings serialize"))
        .collect();
    let cursors = rows.iter().map(|r| r.cursor.as_str()).collect();
    let reasons = rows.iter().map(|r| r.reason.as_str()).collect();
    (keys, cursors, reasons)
}

impl ControlPlane {
    /// Record refused rows of one task (one statement for the batch).
    pub async fn add_dead_letters(&self, task: TaskId, rows: &[NewDeadLetter]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (keys, cursors, reasons) = columns(rows);
        let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
        sqlx::query(
            "INSERT INTO dead_letters (tenant_id, table_id, row_key, cursor, reason, payload)
             SELECT $1, $2, ARRAY(SELECT jsonb_array_elements_text(k::jsonb)), c, r, p
             FROM unnest($3::text[], $4::text[], $5::text[], $6::text[]) AS u(k, c, r, p)",
        )
        .bind(task.tenant_id)
        .bind(task.table_id)
        .bind(&keys)
        .bind(&cursors)
        .bind(&reasons)
        .bind(&payloads)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Record the rows of one task that can never be sent (their cursor is NULL or infinite)
    /// as dead letters with an empty payload, once per key while open. With `complete` (the
    /// list is every such row, not a truncated one), open letters of this kind whose rows are
    /// no longer in the list are closed as discarded: the row got a real time and syncs (or
    /// went away). Returns how many letters were added.
    pub async fn report_unsyncable(
        &self,
        task: TaskId,
        rows: &[NewDeadLetter],
        complete: bool,
    ) -> Result<u64> {
        let (keys, cursors, reasons) = columns(rows);
        let added: i64 = sqlx::query_scalar(include_str!("../queries/report_unsyncable.sql"))
            .bind(task.tenant_id)
            .bind(task.table_id)
            .bind(&keys)
            .bind(&cursors)
            .bind(&reasons)
            .bind(complete)
            .fetch_one(self.pool())
            .await?;
        Ok(added as u64)
    }

    /// Dead letters, newest first; `status` None means every status.
    pub async fn dead_letters(
        &self,
        tenant: Option<&str>,
        status: Option<&str>,
    ) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT d.id, tn.slug, d.tenant_id, ts.source_table, d.table_id, d.row_key, d.cursor,
                    d.reason, d.status, d.created_at, d.payload
             FROM dead_letters d
             JOIN tenants tn ON tn.id = d.tenant_id
             JOIN table_specs ts ON ts.id = d.table_id
             WHERE ($1::text IS NULL OR tn.slug = $1) AND ($2::text IS NULL OR d.status = $2)
             ORDER BY d.id DESC",
        )
        .bind(tenant)
        .bind(status)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetter {
                    id: r.try_get(0)?,
                    tenant: r.try_get(1)?,
                    tenant_id: r.try_get(2)?,
                    table: r.try_get(3)?,
                    table_id: r.try_get(4)?,
                    key: r.try_get(5)?,
                    cursor: r.try_get(6)?,
                    reason: r.try_get(7)?,
                    status: r.try_get(8)?,
                    created_at: r.try_get(9)?,
                    payload: r.try_get(10)?,
                })
            })
            .collect()
    }

    /// Mark an open dead letter retried or discarded; false when it was not open.
    pub async fn resolve_dead_letter(
        &self,
        id: i64,
        status: &str,
        reason: Option<&str>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE dead_letters SET status = $2, resolved_at = now(), reason = COALESCE($3, reason)
             WHERE id = $1 AND status = 'open'",
        )
        .bind(id)
        .bind(status)
        .bind(reason)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Update the reason of a dead letter whose retry failed again.
    pub async fn note_dead_letter(&self, id: i64, reason: &str) -> Result<()> {
        sqlx::query("UPDATE dead_letters SET reason = $2 WHERE id = $1")
            .bind(id)
            .bind(reason)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Open dead letters per tenant and table (for the `tenantsync_dlq_rows` gauge).
    pub async fn open_dead_letters(&self) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT tn.slug, ts.source_table, count(d.id)
             FROM sync_state s
             JOIN tenants tn ON tn.id = s.tenant_id
             JOIN table_specs ts ON ts.id = s.table_id
             LEFT JOIN dead_letters d ON d.tenant_id = s.tenant_id AND d.table_id = s.table_id
                                     AND d.status = 'open'
             GROUP BY tn.slug, ts.source_table",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }
}
