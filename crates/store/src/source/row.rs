//! Decoding the rows of the slice, group and range statements.

use super::plan::SlicePlan;
use super::SourceRow;
use crate::error::{Result, StoreError};
use chrono::DateTime;
use sqlx::postgres::PgRow;
use sqlx::{Column, Row};
use tenantsync_core::proto::{self, ProtoSchema};
use tenantsync_core::wire::{self, Wire};

/// Where a read's columns are. Every slice, group and range statement selects seven named
/// columns first (see [`Layout::FIXED`]), then the plan's source columns, then, in a group
/// read, the request's position `i`. Resolved by name once per read, from its first row (a
/// lookup per column per row would cost a hash lookup each, at ~100k rows/s).
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    key: usize,
    cursor: usize,
    seq: usize,
    tenant: usize,
    cts: usize,
    op: usize,
    catalog: usize,
    /// Group reads: the position of the row's request.
    pub request: Option<usize>,
}

impl Layout {
    /// The names of the columns before the source columns: the row's key (text array), its
    /// cursor (text), its changelog seq (text), its tenant (text), its version time
    /// (timestamptz, `_source_ts`), its op (text) and the catalog fingerprint (text). The
    /// first four are NULL when the plan derives them from the source columns.
    pub const FIXED: [&'static str; 7] = ["k", "c", "seq", "tn", "cts", "op", "catalog"];

    /// The layout of `r`'s statement, or an error when it does not select what a plan's rows
    /// need. The fixed columns are looked up among the first seven only, so a source column of
    /// the same name (`op`, `k`) cannot be taken for one.
    pub fn of(plan: &SlicePlan, r: &PgRow, group: bool) -> Result<Self> {
        let cols = r.columns();
        let fixed = Self::FIXED.len();
        let want = fixed + plan.columns.len() + usize::from(group);
        if cols.len() != want {
            return Err(StoreError::Invalid(format!(
                "a row read of {} has {} columns; its plan expects {want}",
                plan.table,
                cols.len()
            )));
        }
        let at = |name: &str| {
            cols[..fixed]
                .iter()
                .position(|c| c.name() == name)
                .ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "a row read of {} has no column {name:?}",
                        plan.table
                    ))
                })
        };
        let request = match group {
            true if cols[want - 1].name() == "i" => Some(want - 1),
            true => {
                return Err(StoreError::Invalid(format!(
                    "a group read of {} does not end with its request column \"i\"",
                    plan.table
                )))
            }
            false => None,
        };
        Ok(Self {
            key: at("k")?,
            cursor: at("c")?,
            seq: at("seq")?,
            tenant: at("tn")?,
            cts: at("cts")?,
            op: at("op")?,
            catalog: at("catalog")?,
            request,
        })
    }

    /// The position of the plan's `i`th source column.
    fn source(&self, i: usize) -> usize {
        Self::FIXED.len() + i
    }
}

impl Layout {
    /// [`Self::of`] a read's first row, checked against the catalog fingerprint its plan was
    /// built from ([`SlicePlan::catalog`]): before anything is handed on, since every row of a
    /// read carries the same value.
    pub fn checked(plan: &SlicePlan, r: &PgRow, group: bool) -> Result<Self> {
        let layout = Self::of(plan, r, group)?;
        if let Some(expected) = &plan.catalog {
            if r.try_get::<Option<&str>, _>(layout.catalog)? != Some(expected) {
                return Err(StoreError::CatalogChanged(plan.table.clone()));
            }
        }
        Ok(layout)
    }
}

/// A read that Postgres refused because the columns it selects changed type since the
/// connection prepared it: the plan is stale (see [`SlicePlan::with_catalog`]).
pub(super) fn stale_plan(plan: &SlicePlan, e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db)
            if db.code().as_deref() == Some("0A000")
                && db
                    .message()
                    .contains("cached plan must not change result type") =>
        {
            StoreError::CatalogChanged(plan.table.clone())
        }
        _ => e.into(),
    }
}

/// A row of the slice and range queries (see [`Layout`]): the source columns' binary values
/// become the row's protobuf message in `proto`'s layout ([`row_proto`]) or, without one or
/// when a value cannot be encoded, its JSON object ([`row_json`]); its key, cursor and tenant
/// are the fixed columns' texts, or printed from its source columns (see
/// [`super::plan::Derived`]).
pub(super) fn source_row(
    plan: &SlicePlan,
    l: &Layout,
    r: &PgRow,
    proto: Option<&ProtoSchema>,
) -> Result<SourceRow> {
    let text = |i: usize, what: &str| -> Result<Option<String>> {
        binary(&r.try_get_raw(i)?, what)?
            .map(|b| {
                std::str::from_utf8(b)
                    .map(str::to_owned)
                    .map_err(|_| StoreError::Invalid(format!("{what} is not UTF-8")))
            })
            .transpose()
    };
    let column_text = |i: usize| -> Result<String> {
        let c = &plan.columns[i];
        let v = binary(&r.try_get_raw(l.source(i))?, &c.name)?.ok_or_else(|| {
            StoreError::Invalid(format!(
                "column {:?} of {} is NULL in a row read",
                c.name, plan.table
            ))
        })?;
        let mut s = String::new();
        wire::pg_text(c.wire, v, &mut s)
            .map_err(|e| StoreError::Invalid(format!("column {:?}: {e}", c.name)))?;
        Ok(s)
    };
    let cts_bytes = binary(&r.try_get_raw(l.cts)?, "cts")?;
    let cursor_ts = cts_bytes
        .and_then(wire::unix_micros)
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| {
            StoreError::Invalid(format!("a row of {} has no version time", plan.table))
        })?;
    let op = text(l.op, "op")?.unwrap_or_default();
    // A value BigQuery cannot hold (an infinite date, 24:00) is not encoded: the row goes as
    // JSON, whose encoder in the sink refuses it naming the column, and it is dead-lettered
    // with its key like any row BigQuery refuses.
    let proto = proto.and_then(|p| row_proto(plan, p, l, r, &op, cts_bytes).ok());
    let json = match proto {
        Some(_) => String::new(),
        None => row_json(plan, l, r, &op, cts_bytes)?,
    };
    let (key, cursor, tenant) = match &plan.derived {
        Some(d) => (
            d.key
                .iter()
                .map(|&i| column_text(i))
                .collect::<Result<_>>()?,
            column_text(d.cursor)?,
            Some(column_text(d.tenant)?),
        ),
        None => (
            r.try_get(l.key)?,
            text(l.cursor, "cursor")?.unwrap_or_default(),
            text(l.tenant, "tenant")?,
        ),
    };
    Ok(SourceRow {
        key,
        cursor,
        cursor_ts,
        tenant,
        json,
        proto,
        op,
        seq: text(l.seq, "seq")?,
    })
}

/// The row's protobuf message: its source columns, `_op` and `_source_ts`; NULLs are left
/// out (an absent field is NULL, and an empty repeated field an empty array). An error names
/// the column whose value cannot be sent.
fn row_proto(
    plan: &SlicePlan,
    schema: &ProtoSchema,
    l: &Layout,
    r: &PgRow,
    op: &str,
    cts_bytes: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(128 + 16 * plan.columns.len());
    for (i, c) in plan.columns.iter().enumerate() {
        let Some(bytes) = binary(&r.try_get_raw(l.source(i))?, &c.name)? else {
            continue;
        };
        let (tag, bq) = (schema.source_tag(i), schema.source_type(i));
        proto::encode_binary(tag, bq, c.wire, c.array, bytes, &mut buf)
            .map_err(|e| StoreError::Invalid(format!("column {:?}: {e}", c.name)))?;
    }
    let m = schema.meta_tags();
    proto::encode_str(m.op, op, &mut buf);
    let cts = cts_bytes.and_then(wire::unix_micros).ok_or_else(|| {
        StoreError::Invalid(format!("a row of {} has no version time", plan.table))
    })?;
    proto::encode_micros(m.source_ts, cts, &mut buf);
    Ok(buf)
}

/// The row's JSON object: its source columns, `_op` and `_source_ts`. NULL scalars are left
/// out of the object (insertAll reads a missing field as NULL, and the request is smaller); a
/// NULL array is `[]`.
fn row_json(
    plan: &SlicePlan,
    l: &Layout,
    r: &PgRow,
    op: &str,
    cts_bytes: Option<&[u8]>,
) -> Result<String> {
    // Room for the row and the metadata the worker adds around it (about 200 bytes).
    let mut json = String::with_capacity(256 + 48 * plan.columns.len());
    json.push('{');
    for (i, c) in plan.columns.iter().enumerate() {
        let bytes = binary(&r.try_get_raw(l.source(i))?, &c.name)?;
        if bytes.is_none() && !c.array {
            continue;
        }
        if json.len() > 1 {
            json.push(',');
        }
        json.push_str(&c.key);
        wire::render(c.wire, c.array, bytes, &mut json).map_err(|e| {
            StoreError::Invalid(format!("column {:?} of {}: {e}", c.name, plan.table))
        })?;
    }
    if json.len() > 1 {
        json.push(',');
    }
    json.push_str("\"_op\":");
    wire::string(op, &mut json);
    json.push_str(",\"_source_ts\":");
    wire::render(Wire::Timestamptz, false, cts_bytes, &mut json)
        .map_err(|e| StoreError::Invalid(format!("_source_ts of {}: {e}", plan.table)))?;
    json.push('}');
    Ok(json)
}

/// The bytes of a non-NULL value in binary format (sqlx asks for binary results; a text value
/// here would be decoded as garbage, so it is refused).
fn binary<'r>(v: &sqlx::postgres::PgValueRef<'r>, what: &str) -> Result<Option<&'r [u8]>> {
    use sqlx::ValueRef;
    if v.is_null() {
        return Ok(None);
    }
    if v.format() != sqlx::postgres::PgValueFormat::Binary {
        return Err(StoreError::Invalid(format!(
            "{what}: the database sent a text value where a binary one was requested"
        )));
    }
    v.as_bytes()
        .map(Some)
        .map_err(|e| StoreError::Invalid(format!("{what}: {e}")))
}
