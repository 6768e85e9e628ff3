//! [`SlicePlan`]: what is needed to read slices of one table, built once per table and catalog
//! version. The parts both capture modes share are built here ([`Common`]); each mode's
//! statements are built in its own module ([`super::cursor`], [`super::changelog`]).

use super::catalog_fingerprint;
use crate::error::{Result, StoreError};
use std::sync::Arc;
use tenantsync_core::hashing::hashed_name;
use tenantsync_core::ident::quote_pg;
use tenantsync_core::mapping::{map_column, BqField, BqType, FieldMode, MappedColumn, PgColumn};
use tenantsync_core::proto::ProtoSchema;
use tenantsync_core::wire::{self, Wire};
use tenantsync_core::{Capture, TableSpec};

/// Everything needed to read slices of one table: its BigQuery schema and two prepared SQL
/// texts (first slice, and after a watermark). Built once per table and schema version.
#[derive(Debug, Clone)]
pub struct SlicePlan {
    pub table: String,
    pub fields: Vec<BqField>,
    pub key_columns: Vec<String>,
    pub capture: Capture,
    /// Fingerprint of what lands in BigQuery (fields, key columns, mode): when it matches the
    /// one stored for a task, the task's table and views need no calls.
    pub schema_hash: String,
    /// The catalog fingerprint of the columns the plan was built from, when known: a slice read
    /// that finds another one fails with [`StoreError::CatalogChanged`] instead of sending rows
    /// without a column added since (see [`super::SourceReader::catalog`]).
    pub catalog: Option<String>,
    pub(super) sql: PlanSql,
    /// How each source column of a row read is turned into JSON, in select-list order.
    pub(super) columns: Vec<RowColumn>,
    /// Cursor capture: the key, cursor and tenant texts of a row are printed from its source
    /// columns here instead of being selected as text too (see [`Derived`]).
    pub(super) derived: Option<Derived>,
    /// Tables written through the Storage Write API: slice reads encode each row's protobuf
    /// message from the binary values, in this layout, instead of its JSON
    /// ([`super::SourceRow::proto`]).
    pub proto: Option<Arc<ProtoSchema>>,
}

/// Positions (in [`SlicePlan::columns`]) of the columns whose text forms make a row's key,
/// cursor and tenant. Set when every one of them has an exact text form in
/// [`wire::pg_text`]; selecting them a second time as text cost Postgres about a sixth of its
/// time per row (`(updated_at)::text` alone prints a timestamp).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Derived {
    pub key: Vec<usize>,
    pub cursor: usize,
    pub tenant: usize,
}

impl Derived {
    pub fn of(s: &Common<'_>, cursor: &PgColumn) -> Option<Self> {
        let pos = |c: &PgColumn| {
            let i = s.columns.iter().position(|x| x.name == c.name)?;
            let row = &s.row_columns[i];
            (!row.array && wire::has_pg_text(row.wire)).then_some(i)
        };
        Some(Self {
            key: s.keys.iter().map(|k| pos(k)).collect::<Option<_>>()?,
            cursor: pos(cursor)?,
            tenant: pos(s.tenant)?,
        })
    }
}

/// One source column of the slice and range queries' rows.
#[derive(Debug, Clone)]
pub(super) struct RowColumn {
    pub name: String,
    /// `"name":`, the column's key in the row's JSON object.
    pub key: String,
    pub wire: Wire,
    pub array: bool,
}

/// The prepared SQL texts of a plan. Parameters each statement takes are listed on the
/// [`super::SourceReader`] method that runs it.
#[derive(Debug, Clone)]
pub(super) struct PlanSql {
    /// First slice, and after a watermark.
    pub first_sql: String,
    pub next_sql: String,
    /// Rows of one tenant in a key range, in key order (resync and repair).
    pub range_sql: String,
    /// Every key of one tenant with its version in microseconds, if there is one (verify).
    pub verify_sql: String,
    /// Changelog capture: keys of one tenant with changes not yet sent (verify skips them).
    pub pending_sql: Option<String>,
    pub changed_sql: String,
    /// Cursor capture: rows of one tenant that cannot be placed in time (see
    /// [`super::cursor`]).
    pub unsyncable_sql: Option<String>,
    pub backlog_sql: String,
    /// Cursor capture: the next rows of several tenants in one statement (see
    /// [`super::SourceReader::read_slices`]).
    pub group_sql: Option<String>,
    /// Parts of the watermark's key: the key columns (cursor), or the change's seq (changelog).
    pub watermark_parts: usize,
}

/// What both captures' SQL share, built once in [`SlicePlan::build`].
pub(super) struct Common<'a> {
    pub spec: &'a TableSpec,
    /// The source columns, and how each is read (same order).
    pub columns: &'a [PgColumn],
    pub row_columns: Vec<RowColumn>,
    pub keys: Vec<&'a PgColumn>,
    pub tenant: &'a PgColumn,
    /// `"schema"."table"`.
    pub source: String,
    /// The source columns' select expressions, comma-separated.
    pub cols: String,
    /// The key columns as text, comma-separated (`ARRAY[{key_text}]` is a row's key).
    pub key_text: String,
    /// The key columns, comma-separated: the key order.
    pub ko: String,
    /// The tenant column.
    pub tn: String,
    /// The catalog fingerprint as a scalar subquery (see `catalog_fingerprint`).
    pub catalog: String,
    /// The soft-delete condition: true for a row marked deleted.
    pub deleted: Option<String>,
}

impl Common<'_> {
    /// A source column as the statements name it (the source table is `t`).
    pub fn q(c: &PgColumn) -> String {
        format!("t.{}", quote_pg(&c.name))
    }

    pub fn tn_type(&self) -> &str {
        &self.tenant.sql_type
    }

    /// `op`, or `'delete'` for a row marked deleted.
    pub fn with_deletes(&self, op: String) -> String {
        match &self.deleted {
            Some(d) => format!("CASE WHEN {d} THEN 'delete' ELSE {op} END"),
            None => op,
        }
    }

    /// The columns from `cts` on of a slice or range query: the version's time (a
    /// timestamptz, also `_source_ts`), its op, the catalog fingerprint and the source columns.
    pub fn row(&self, op: &str, ts: &str, catalog: &str) -> String {
        format!(
            "{ts} AS cts, {op} AS op, {catalog} AS catalog, {}",
            self.cols
        )
    }

    /// `$start::text::type, …` for the key columns: a key bound as text and cast like the
    /// watermark.
    fn key_params(&self, start: usize) -> String {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::text::{}", start + i, c.sql_type))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Key ranges for resync: $4 is the lower bound's mode (NULL: none, true: inclusive,
    /// false: exclusive), $5 whether there is an upper bound (NULL: none), then the lower and
    /// the upper key from $6, each bound as text and cast like the watermark.
    pub fn range_filter(&self) -> String {
        let ko = &self.ko;
        let lower = self.key_params(6);
        let upper = self.key_params(6 + self.keys.len());
        format!(
            "AND ($4::bool IS NULL OR ({ko}) > ({lower}) OR ($4::bool AND ({ko}) = ({lower})))
             AND ($5::bool IS NULL OR ({ko}) <= ({upper}))
             ORDER BY {ko} LIMIT $3"
        )
    }
}

impl SlicePlan {
    /// Build the plan from the spec and the catalog columns. Fails with a message naming the
    /// column when a key, cursor or tenant column is missing or a column type has no mapping.
    pub fn build(spec: &TableSpec, columns: &[PgColumn]) -> Result<Self> {
        // Here rather than only at registration: a column added to the source later (`_rn`,
        // `Name` next to `name`) stops this table with the same message instead of vanishing
        // from its view or failing in BigQuery.
        tenantsync_core::names::check_columns(
            &format!("{}.{}", spec.source_schema, spec.source_table),
            columns.iter().map(|c| c.name.as_str()),
        )?;
        let kept = kept_columns(spec, columns)?;
        let (common, fields) = Common::new(spec, &kept)?;
        let (sql, derived) = match spec.capture {
            Capture::Cursor => {
                let cursor = find(spec, columns, "cursor", &spec.cursor_column)?;
                super::cursor::build(&common, cursor)?
            }
            Capture::Changelog => (super::changelog::build(&common), None),
        };
        Ok(Self {
            schema_hash: schema_hash(spec, &fields),
            catalog: None,
            table: spec.bq_table(),
            fields,
            key_columns: spec.key_columns.clone(),
            capture: spec.capture,
            sql,
            columns: common.row_columns,
            derived,
            proto: None,
        })
    }

    /// This plan with slice reads encoding rows as protobuf messages (see [`Self::proto`]):
    /// the fields are the source columns in select-list order, so field `i` is column `i`.
    pub fn with_proto(mut self, cdc: bool) -> Self {
        debug_assert_eq!(self.fields.len(), self.columns.len());
        self.proto = Some(Arc::new(ProtoSchema::new(&self.fields, cdc)));
        self
    }

    /// The plan for columns whose catalog fingerprint is `fingerprint` (see [`Self::catalog`]).
    /// The fingerprint also goes into the text of the statements that select the columns, as
    /// a comment: after a column changes type, a plan built again has statements of its own
    /// instead of the ones each connection prepared for the old plan, which Postgres refuses
    /// to run ("cached plan must not change result type") because their result type changed.
    pub fn with_catalog(mut self, fingerprint: String) -> Self {
        let tag = format!("/* catalog {} */ ", fingerprint.replace('*', ""));
        for sql in [
            &mut self.sql.first_sql,
            &mut self.sql.next_sql,
            &mut self.sql.range_sql,
        ]
        .into_iter()
        .chain(self.sql.group_sql.as_mut())
        {
            sql.insert_str(0, &tag);
        }
        self.catalog = Some(fingerprint);
        self
    }
}

impl RowColumn {
    fn of(c: &PgColumn, wire: Wire) -> Self {
        let mut key = String::new();
        wire::string(&c.name, &mut key);
        key.push(':');
        Self {
            name: c.name.clone(),
            key,
            wire,
            array: c.is_array,
        }
    }
}

impl<'a> Common<'a> {
    /// The shared parts, and the BigQuery fields of the columns.
    fn new(spec: &'a TableSpec, columns: &'a [PgColumn]) -> Result<(Self, Vec<BqField>)> {
        let tenant = find(spec, columns, "tenant", &spec.tenant_column)?;
        let keys = spec
            .key_columns
            .iter()
            .map(|k| find(spec, columns, "key", k))
            .collect::<Result<Vec<_>>>()?;
        let mut fields = Vec::with_capacity(columns.len());
        let mut exprs = Vec::with_capacity(columns.len());
        let mut row_columns = Vec::with_capacity(columns.len());
        for c in columns {
            let (m, row) = match spec.hash_columns.contains(&c.name) {
                true => hashed(c),
                false => {
                    let m = map_column(c)?;
                    let row = RowColumn::of(c, m.wire);
                    (m, row)
                }
            };
            exprs.push(m.select_expr);
            row_columns.push(row);
            fields.push(m.field);
        }
        let deleted = match &spec.soft_delete_column {
            None => None,
            Some(name) => Some(soft_delete(find(spec, columns, "soft-delete", name)?)?),
        };
        let key_text: Vec<String> = keys
            .iter()
            .map(|k| format!("({})::text", Self::q(k)))
            .collect();
        let key_order: Vec<String> = keys.iter().map(|k| Self::q(k)).collect();
        let source = format!(
            "{}.{}",
            quote_pg(&spec.source_schema),
            quote_pg(&spec.source_table)
        );
        let common = Self {
            catalog: catalog_fingerprint(&format!("'{}'::regclass", source.replace('\'', "''"))),
            spec,
            columns,
            row_columns,
            key_text: key_text.join(", "),
            ko: key_order.join(", "),
            tn: Self::q(tenant),
            keys,
            tenant,
            source,
            cols: exprs.join(", "),
            deleted,
        };
        Ok((common, fields))
    }
}

/// A hashed column (`--hash-column`): read as its text (any type has one), sent as the
/// STRING column `<name>_hmac` once the worker has replaced the value by its keyed hash
/// (`tenantsync_core::hashing`); the row's JSON carries it under its own name until then.
fn hashed(c: &PgColumn) -> (MappedColumn, RowColumn) {
    let m = MappedColumn {
        field: BqField {
            name: hashed_name(&c.name),
            field_type: BqType::String,
            mode: FieldMode::Nullable,
        },
        select_expr: format!("(t.{})::text", quote_pg(&c.name)),
        wire: Wire::Text,
    };
    let mut row = RowColumn::of(c, Wire::Text);
    row.array = false;
    (m, row)
}

/// The column `name` in its `role` (key, cursor, …), or an error naming both.
/// The source columns a plan reads: all but the spec's excluded ones. The key, cursor, tenant
/// and soft-delete columns cannot be excluded (every read needs them). An excluded name the
/// table no longer has is ignored: a dropped PII column must not stop the table.
fn kept_columns(spec: &TableSpec, columns: &[PgColumn]) -> Result<Vec<PgColumn>> {
    let excluded = |name: &str| spec.exclude_columns.iter().any(|e| e == name);
    let hashed = |name: &str| spec.hash_columns.iter().any(|e| e == name);
    let table = format!("{}.{}", spec.source_schema, spec.source_table);
    let needed = spec
        .key_columns
        .iter()
        .chain([&spec.cursor_column, &spec.tenant_column])
        .chain(spec.soft_delete_column.as_ref());
    for c in needed {
        for (policy, applies) in [("excluded", excluded(c)), ("hashed", hashed(c))] {
            if applies {
                return Err(StoreError::Invalid(format!(
                    "column {c:?} of {table} cannot be {policy}: it is the table's key, cursor, \
                     tenant or soft-delete column"
                )));
            }
        }
    }
    for h in &spec.hash_columns {
        if excluded(h) {
            return Err(StoreError::Invalid(format!(
                "column {h:?} of {table} cannot be both excluded and hashed"
            )));
        }
        let name = hashed_name(h);
        if columns.iter().any(|c| c.name == name) {
            return Err(StoreError::Invalid(format!(
                "column {h:?} of {table} cannot be hashed: its hash would be column {name:?}, \
                 which the table already has"
            )));
        }
    }
    Ok(columns
        .iter()
        .filter(|c| !excluded(&c.name))
        .cloned()
        .collect())
}

pub(super) fn find<'c>(
    spec: &TableSpec,
    columns: &'c [PgColumn],
    role: &str,
    name: &str,
) -> Result<&'c PgColumn> {
    columns.iter().find(|c| c.name == name).ok_or_else(|| {
        StoreError::Invalid(format!(
            "{role} column {name:?} does not exist in {}.{}",
            spec.source_schema, spec.source_table
        ))
    })
}

/// The condition that turns a row marked by the soft-delete column `c` into a delete.
fn soft_delete(c: &PgColumn) -> Result<String> {
    let (name, col) = (&c.name, Common::q(c));
    match c.base_type.as_str() {
        _ if c.is_array => Err(StoreError::Invalid(format!(
            "soft-delete column {name:?} is an array ({}); it needs boolean or a timestamp/date",
            c.formatted
        ))),
        "bool" | "boolean" => Ok(format!("coalesce({col}, false)")),
        "timestamptz" | "timestamp" | "date" => Ok(format!("({col} IS NOT NULL)")),
        _ => Err(StoreError::Invalid(format!(
            "soft-delete column {name:?} has type {}; it needs boolean (true = deleted) or a timestamp/date (set = deleted)",
            c.formatted
        ))),
    }
}

/// See [`SlicePlan::schema_hash`].
fn schema_hash(spec: &TableSpec, fields: &[BqField]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(
        serde_json::to_string(fields)
            .expect("fields serialize")
            .as_bytes(),
    );
    h.update(spec.key_columns.join("\0").as_bytes());
    h.update(spec.mode.as_str().as_bytes());
    // The view definitions' version: bump it when they change, so every task re-creates its
    // views once.
    h.update(b"views: committed batches only");
    h.finalize().to_hex()[..16].to_string()
}
