//! The source side: catalog, horizon and the tenant-filtered keyset slice reader.
//!
//! A [`SlicePlan`] holds a table's statements, built once per table and catalog version by
//! the builder of its capture mode ([`cursor`], [`changelog`]); [`SourceReader`] runs them
//! ([`read`]) and turns their rows into [`SourceRow`]s ([`row`]).

mod changelog;
mod cursor;
mod plan;
mod read;
mod row;
#[cfg(test)]
mod tests;

pub use plan::SlicePlan;
pub use read::{GroupRead, TenantKey};

use crate::control::tasks::Watermark;
use crate::error::{Result, StoreError};
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use std::time::Duration;
use tenantsync_core::ident::{quote_pg, sql_ident};
use tenantsync_core::mapping::PgColumn;

#[derive(Clone, Debug)]
pub struct SourceReader {
    pool: PgPool,
}

/// One source row, ready for insertAll: `json` is the row's JSON object (rendered from the
/// binary column values, see [`tenantsync_core::wire`]) with `_op` and `_source_ts` included;
/// the worker appends the remaining metadata.
#[derive(Debug, Clone)]
pub struct SourceRow {
    pub key: Vec<String>,
    pub cursor: String,
    /// The cursor value as a UTC instant (`timestamp` columns are taken to hold UTC).
    pub cursor_ts: DateTime<Utc>,
    /// The row's tenant column as text, for the per-row isolation check.
    pub tenant: Option<String>,
    /// The row's JSON object (its source columns, `_op`, `_source_ts`); empty when the row
    /// came as [`Self::proto`].
    pub json: String,
    /// The row's protobuf message (source columns, `_op`, `_source_ts`), when its plan
    /// encodes rows that way ([`SlicePlan::proto`]) and every value could be encoded.
    pub proto: Option<Vec<u8>>,
    /// `insert`, `update` or `delete` (the change, or the soft-delete state of the row).
    pub op: String,
    /// Changelog capture: the change's sequence number. The watermark is then (txid, seq),
    /// not (cursor, key).
    pub seq: Option<String>,
}

impl SourceRow {
    /// The watermark that points just past this row.
    pub fn watermark(&self) -> Watermark {
        Watermark {
            cursor: Some(self.cursor.clone()),
            key: match &self.seq {
                Some(s) => vec![s.clone()],
                None => self.key.clone(),
            },
        }
    }
}

/// A scalar subquery: a fingerprint of the columns (names, types, order) of the relation
/// `regclass` in the catalog. A plan built from other columns than the table has now is stale.
fn catalog_fingerprint(regclass: &str) -> String {
    format!(
        "(SELECT md5(string_agg(a.attname || ' ' || a.atttypid::text || ' ' || a.atttypmod::text,
                                ',' ORDER BY a.attnum))
          FROM pg_attribute a
          WHERE a.attrelid = {regclass} AND a.attnum > 0 AND NOT a.attisdropped)"
    )
}

impl SourceReader {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The text Postgres prints for `value` cast to `column`'s type, or
    /// [`StoreError::Invalid`] when the type refuses the value (domain checks included). For
    /// organization ids of types `tenantsync_core::org_id` does not model.
    pub async fn canonical_text(&self, value: &str, column: &PgColumn) -> Result<String> {
        // sql_type comes from format_type() in the catalog, which quotes what needs quoting.
        let text: Option<String> =
            sqlx::query_scalar(&format!("SELECT ($1::text::{})::text", column.sql_type))
                .bind(value)
                .fetch_one(&self.pool)
                .await?;
        text.ok_or_else(|| StoreError::Invalid(format!("{value:?} reads as NULL")))
    }

    /// Columns of `schema.table` from the catalog, in table order.
    pub async fn columns(&self, schema: &str, table: &str) -> Result<Vec<PgColumn>> {
        Ok(self.catalog(schema, table).await?.0)
    }

    /// Columns of `schema.table` from the catalog, in table order, and their fingerprint (for
    /// [`SlicePlan::catalog`]). The fingerprint is read first: should the table change between
    /// the two reads, the plan holds an older fingerprint than its columns, and the next read
    /// only builds the plan again. The other order could pair old columns with a new fingerprint.
    pub async fn catalog(&self, schema: &str, table: &str) -> Result<(Vec<PgColumn>, String)> {
        sql_ident("schema", schema).map_err(|e| StoreError::Invalid(e.to_string()))?;
        sql_ident("table", table).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let regclass = format!("{}.{}", quote_pg(schema), quote_pg(table));
        let (exists, fingerprint): (Option<String>, Option<String>) = sqlx::query_as(&format!(
            "SELECT to_regclass($1)::text, {}",
            catalog_fingerprint("to_regclass($1)")
        ))
        .bind(&regclass)
        .fetch_one(&self.pool)
        .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(format!(
                "source table {schema}.{table} does not exist"
            )));
        }
        let rows = sqlx::query(include_str!("../queries/columns.sql"))
            .bind(&regclass)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(PgColumn {
                    name: r.try_get("name")?,
                    formatted: r.try_get("formatted")?,
                    sql_type: r.try_get("sql_type")?,
                    base_type: r.try_get("base_type")?,
                    typtype: r.try_get("typtype")?,
                    is_array: r.try_get("is_array")?,
                    numeric_precision: r.try_get("numeric_precision")?,
                    numeric_scale: r.try_get("numeric_scale")?,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(|c| (c, fingerprint.unwrap_or_default()))
    }

    /// Primary-key columns of a table, in key order (default for `tables add --key`).
    pub async fn primary_key(&self, schema: &str, table: &str) -> Result<Vec<String>> {
        let regclass = format!("{}.{}", quote_pg(schema), quote_pg(table));
        Ok(sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary
             ORDER BY k.n",
        )
        .bind(&regclass)
        .fetch_all(&self.pool)
        .await?)
    }

    /// See `queries/horizon.sql`.
    pub async fn horizon(&self, skew: Duration) -> Result<DateTime<Utc>> {
        Ok(sqlx::query_scalar(include_str!("../queries/horizon.sql"))
            .bind(skew.as_secs_f64() * 1000.0)
            .fetch_one(&self.pool)
            .await?)
    }
}
