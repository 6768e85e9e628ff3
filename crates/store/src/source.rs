//! The source side: catalog, horizon and the tenant-filtered keyset slice reader.

use crate::control::tasks::Watermark;
use crate::error::{Result, StoreError};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{PgPool, Row};
use std::time::Duration;
use tenantsync_core::ident::{quote_pg, sql_ident};
use tenantsync_core::mapping::{map_column, BqField, PgColumn};
use tenantsync_core::wire::{self, Wire};
use tenantsync_core::{Capture, TableSpec};

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
    pub json: String,
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
    /// without a column added since (see [`SourceReader::catalog`]).
    pub catalog: Option<String>,
    sql: PlanSql,
    /// How each source column of a row read is turned into JSON, in select-list order.
    columns: Vec<RowColumn>,
    /// Cursor capture: the key, cursor and tenant texts of a row are printed from its source
    /// columns here instead of being selected as text too (see [`Derived`]).
    derived: Option<Derived>,
}

/// Positions (in [`SlicePlan::columns`]) of the columns whose text forms make a row's key,
/// cursor and tenant. Set when every one of them has an exact text form in
/// [`wire::pg_text`]; selecting them a second time as text cost Postgres about a sixth of its
/// time per row (`(updated_at)::text` alone prints a timestamp).
#[derive(Debug, Clone)]
struct Derived {
    key: Vec<usize>,
    cursor: usize,
    tenant: usize,
}

impl Derived {
    fn of(
        columns: &[PgColumn],
        row: &[RowColumn],
        keys: &[&PgColumn],
        cursor: &PgColumn,
        tenant: &PgColumn,
    ) -> Option<Self> {
        let pos = |c: &PgColumn| {
            let i = columns.iter().position(|x| x.name == c.name)?;
            (!row[i].array && wire::has_pg_text(row[i].wire)).then_some(i)
        };
        Some(Self {
            key: keys.iter().map(|k| pos(k)).collect::<Option<_>>()?,
            cursor: pos(cursor)?,
            tenant: pos(tenant)?,
        })
    }
}

/// One source column of the slice and range queries' rows.
#[derive(Debug, Clone)]
struct RowColumn {
    name: String,
    /// `"name":`, the column's key in the row's JSON object.
    key: String,
    wire: Wire,
    array: bool,
}

/// Columns every slice and range query selects before the source columns: `k`, `c`, `seq`,
/// `tn`, `cts`, `op`, `catalog` (see [`source_row`]).
const FIXED_COLUMNS: usize = 7;

/// The prepared SQL texts of a plan.
#[derive(Debug, Clone)]
struct PlanSql {
    /// First slice, and after a watermark.
    first_sql: String,
    next_sql: String,
    /// Rows of one tenant in a key range, in key order (resync and repair).
    range_sql: String,
    /// Every key of one tenant with its version in microseconds, if there is one (verify).
    verify_sql: String,
    /// Changelog capture: keys of one tenant with changes not yet sent (verify skips them).
    pending_sql: Option<String>,
    changed_sql: String,
    /// Cursor capture: rows of one tenant that cannot be placed in time (see `cursor_sql`).
    unsyncable_sql: Option<String>,
    backlog_sql: String,
    /// Cursor capture: the next rows of several tenants in one statement (see
    /// [`SourceReader::read_slices`]).
    group_sql: Option<String>,
    /// Parts of the watermark's key: the key columns (cursor), or the change's seq (changelog).
    watermark_parts: usize,
}

/// What both captures' SQL share, built once in [`SlicePlan::build`].
struct CommonSql<'a> {
    keys: &'a [&'a PgColumn],
    q: &'a dyn Fn(&PgColumn) -> String,
    key_text: &'a str,
    ko: &'a str,
    tn: &'a str,
    tn_type: &'a str,
    source: &'a str,
    /// The catalog fingerprint as a scalar subquery (see `catalog_fingerprint`).
    catalog: &'a str,
    range_filter: &'a str,
    deleted: Option<&'a str>,
    with_deletes: &'a dyn Fn(String) -> String,
    row: &'a dyn Fn(&str, &str, &str) -> String,
    /// The source columns: for [`Derived`].
    columns: &'a [PgColumn],
    row_columns: &'a [RowColumn],
    tenant: &'a PgColumn,
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
        let find = |role: &str, name: &str| {
            columns.iter().find(|c| c.name == name).ok_or_else(|| {
                StoreError::Invalid(format!(
                    "{role} column {name:?} does not exist in {}.{}",
                    spec.source_schema, spec.source_table
                ))
            })
        };
        let tenant = find("tenant", &spec.tenant_column)?;
        let keys = spec
            .key_columns
            .iter()
            .map(|k| find("key", k))
            .collect::<Result<Vec<_>>>()?;

        let mut fields = Vec::with_capacity(columns.len());
        let mut exprs = Vec::with_capacity(columns.len());
        let mut row_columns = Vec::with_capacity(columns.len());
        for c in columns {
            let m = map_column(c)?;
            exprs.push(m.select_expr);
            let mut key = String::new();
            wire::string(&c.name, &mut key);
            key.push(':');
            row_columns.push(RowColumn {
                name: c.name.clone(),
                key,
                wire: m.wire,
                array: c.is_array,
            });
            fields.push(m.field);
        }
        let q = |c: &PgColumn| format!("t.{}", quote_pg(&c.name));
        // A soft-delete column turns marked rows into deletes.
        let deleted = match &spec.soft_delete_column {
            None => None,
            Some(name) => {
                let c = find("soft-delete", name)?;
                let col = q(c);
                Some(match c.base_type.as_str() {
                    _ if c.is_array => {
                        return Err(StoreError::Invalid(format!(
                            "soft-delete column {name:?} is an array ({}); it needs boolean or a timestamp/date",
                            c.formatted
                        )))
                    }
                    "bool" | "boolean" => format!("coalesce({col}, false)"),
                    "timestamptz" | "timestamp" | "date" => format!("({col} IS NOT NULL)"),
                    _ => {
                        return Err(StoreError::Invalid(format!(
                            "soft-delete column {name:?} has type {}; it needs boolean (true = deleted) or a timestamp/date (set = deleted)",
                            c.formatted
                        )))
                    }
                })
            }
        };
        let with_deletes = |op: String| match &deleted {
            Some(d) => format!("CASE WHEN {d} THEN 'delete' ELSE {op} END"),
            None => op,
        };
        // The columns from `cts` on of a slice or range query: the version's time (a
        // timestamptz, also `_source_ts`), its op, the catalog fingerprint and the source columns.
        let cols = exprs.join(", ");
        let row = |op: &str, ts: &str, catalog: &str| {
            format!("{ts} AS cts, {op} AS op, {catalog} AS catalog, {cols}")
        };
        let key_text: Vec<String> = keys.iter().map(|k| format!("({})::text", q(k))).collect();
        let key_text = key_text.join(", ");
        let key_order: Vec<String> = keys.iter().map(|k| q(k)).collect();
        let ko = key_order.join(", ");
        let tn = q(tenant);
        let tn_type = &tenant.sql_type;
        let source = format!(
            "{}.{}",
            quote_pg(&spec.source_schema),
            quote_pg(&spec.source_table)
        );
        let catalog = catalog_fingerprint(&format!("'{}'::regclass", source.replace('\'', "''")));
        // Key ranges for resync: $4 is the lower bound's mode (NULL: none, true: inclusive,
        // false: exclusive), $5 whether there is an upper bound (NULL: none), then the lower and
        // the upper key, each bound as text and cast like the watermark.
        let key_params = |start: usize| -> String {
            keys.iter()
                .enumerate()
                .map(|(i, c)| format!("${}::text::{}", start + i, c.sql_type))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let lower = key_params(6);
        let upper = key_params(6 + keys.len());
        let range_filter = format!(
            "AND ($4::bool IS NULL OR ({ko}) > ({lower}) OR ($4::bool AND ({ko}) = ({lower})))
             AND ($5::bool IS NULL OR ({ko}) <= ({upper}))
             ORDER BY {ko} LIMIT $3"
        );

        let mut derived = None;
        let sql = match spec.capture {
            Capture::Cursor => {
                let cursor = find("cursor", &spec.cursor_column)?;
                Self::cursor_sql(
                    spec,
                    cursor,
                    &mut derived,
                    &CommonSql {
                        keys: &keys,
                        q: &q,
                        key_text: &key_text,
                        ko: &ko,
                        tn: &tn,
                        tn_type,
                        source: &source,
                        catalog: &catalog,
                        range_filter: &range_filter,
                        deleted: deleted.as_deref(),
                        with_deletes: &with_deletes,
                        row: &row,
                        columns,
                        row_columns: &row_columns,
                        tenant,
                    },
                )?
            }
            Capture::Changelog => {
                let ct = crate::changelog::change_table(&spec.source_schema, &spec.source_table);
                // The change row rebuilt as a row of the source table, so every column goes
                // through the same type mapping as in cursor mode. Columns a partial update
                // left out come back NULL, which is what merge mode expects.
                let base = format!(
                    "SELECT c.key AS k, c.txid::text AS c, c.seq::text AS seq, ({tn})::text AS tn,
                            {r}
                     FROM {ct} c CROSS JOIN LATERAL jsonb_populate_record(NULL::{source}, c.row) t
                     WHERE c.tenant = $1::text AND $2::timestamptz IS NOT NULL
                       AND c.txid < pg_snapshot_xmin(pg_current_snapshot())",
                    r = row(&with_deletes("c.op".into()), "c.changed_at", &catalog),
                );
                let tail = "ORDER BY c.txid, c.seq LIMIT $3";
                // A repair sends the current row as a version newer than every change so far.
                let now_row = row(
                    &with_deletes("'update'".into()),
                    "clock_timestamp()",
                    "NULL::text",
                );
                PlanSql {
                    first_sql: format!("{base} {tail}"),
                    next_sql: format!(
                        "{base} AND (c.txid, c.seq) > ($4::text::xid8, $5::text::bigint) {tail}"
                    ),
                    range_sql: format!(
                        "SELECT ARRAY[{key_text}] AS k, clock_timestamp()::text AS c, NULL::text AS seq,
                                ({tn})::text AS tn, {now_row}
                         FROM {source} t
                         WHERE {tn} = $1::text::{tn_type} AND $2::timestamptz IS NOT NULL {range_filter}"
                    ),
                    // No version to compare: the change table has no lasting record of one.
                    // Keys with changes still pending are left out by `pending_keys`.
                    verify_sql: format!(
                        "SELECT ARRAY[{key_text}] AS k, NULL::bigint AS ts, {del} AS del,
                                false AS bad
                         FROM {source} t WHERE {tn} = $1::text::{tn_type} ORDER BY {ko}",
                        del = deleted.as_deref().unwrap_or("false"),
                    ),
                    group_sql: None,
                    pending_sql: Some(format!(
                        "SELECT DISTINCT key FROM {ct} WHERE tenant = $1::text"
                    )),
                    // Workers delete what they sent, so whatever is left below the snapshot
                    // horizon is pending: one query finds every tenant with changes.
                    changed_sql: format!(
                        "SELECT DISTINCT tenant FROM {ct}
                         WHERE txid < pg_snapshot_xmin(pg_current_snapshot())
                           AND $1::timestamptz IS NOT NULL AND $2::timestamptz IS NOT NULL"
                    ),
                    backlog_sql: format!(
                        "SELECT w.tenant, (SELECT count(*) FROM (
                             SELECT 1 FROM {ct} c WHERE c.tenant = w.tenant LIMIT $3) x) AS n
                         FROM unnest($1::text[], $2::timestamptz[]) AS w(tenant, since)"
                    ),
                    unsyncable_sql: None,
                    watermark_parts: 1,
                }
            }
        };
        let schema_hash = {
            let mut h = blake3::Hasher::new();
            h.update(
                serde_json::to_string(&fields)
                    .expect("fields serialize")
                    .as_bytes(),
            );
            h.update(spec.key_columns.join("\0").as_bytes());
            h.update(spec.mode.as_str().as_bytes());
            // The view definitions' version: bump it when they change, so every task
            // re-creates its views once.
            h.update(b"views: committed batches only");
            h.finalize().to_hex()[..16].to_string()
        };
        Ok(Self {
            schema_hash,
            catalog: None,
            table: spec.bq_table(),
            fields,
            key_columns: spec.key_columns.clone(),
            capture: spec.capture,
            sql,
            columns: row_columns,
            derived,
        })
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

    fn cursor_sql(
        spec: &TableSpec,
        cursor: &PgColumn,
        derived: &mut Option<Derived>,
        s: &CommonSql<'_>,
    ) -> Result<PlanSql> {
        let columns = s.columns;
        let q = s.q;
        let (key_text, ko, tn, tn_type, source) = (s.key_text, s.ko, s.tn, s.tn_type, s.source);
        let cursor_is_tz = match cursor.base_type.as_str() {
            "timestamptz" if !cursor.is_array => true,
            "timestamp" if !cursor.is_array => false,
            _ => {
                return Err(StoreError::Invalid(format!(
                    "cursor column {:?} has type {}; cursor mode needs timestamp or timestamptz",
                    cursor.name, cursor.formatted
                )))
            }
        };
        let cur = q(cursor);
        // Without an `inserted_at` column an insert and an update look alike in cursor mode.
        let op = match columns.iter().find(|c| c.name == "inserted_at") {
            Some(ins) if ins.name != cursor.name => {
                format!(
                    "CASE WHEN {} = {cur} THEN 'insert' ELSE 'update' END",
                    q(ins)
                )
            }
            _ => "'upsert'".to_string(),
        };
        let op = (s.with_deletes)(op);
        let cur_tz = if cursor_is_tz {
            cur.clone()
        } else {
            format!("{cur} AT TIME ZONE 'UTC'")
        };
        let horizon = if cursor_is_tz {
            "$2::timestamptz".to_string()
        } else {
            "($2::timestamptz AT TIME ZONE 'UTC')".to_string()
        };
        let order: Vec<String> = std::iter::once(cur.clone())
            .chain(s.keys.iter().map(|k| q(k)))
            .collect();
        // The fingerprint is uncorrelated: Postgres computes it once per read, not per row.
        *derived = Derived::of(columns, s.row_columns, s.keys, cursor, s.tenant);
        let texts = match derived {
            Some(_) => {
                "NULL::text[] AS k, NULL::text AS c, NULL::text AS seq, NULL::text AS tn".into()
            }
            None => format!(
                "ARRAY[{key_text}] AS k, ({cur})::text AS c, NULL::text AS seq, ({tn})::text AS tn"
            ),
        };
        let base = format!(
            "SELECT {texts}, {r}
             FROM {source} t
             WHERE {tn} = $1::text::{tn_type} AND ({tn}, {cur}) < ($1::text::{tn_type}, {horizon})",
            r = (s.row)(&op, &format!("({cur_tz})"), s.catalog),
        );
        // Watermark parameters start at $4, all bound as text and cast to the column types so
        // the comparison (and the index on them) works on real values, not strings.
        let wm_params: Vec<String> = std::iter::once(cursor)
            .chain(s.keys.iter().copied())
            .enumerate()
            .map(|(i, c)| format!("${}::text::{}", i + 4, c.sql_type))
            .collect();
        // Both bounds are row comparisons led by the tenant column, so they are index
        // conditions on a (tenant, cursor, key) index: with `cursor < horizon` and
        // `(cursor, key) > watermark` instead, the planner preferred an index on the cursor alone
        // (it follows the heap order) and filtered out every other tenant's rows one by one,
        // casting the watermark parameters again for each: 3× the time per slice read in the
        // throughput benchmark. The first slice's lower bound only gives that index its range.
        let tail = format!("ORDER BY {} LIMIT $3", order.join(", "));
        // Strictly after -infinity: a row there (or at infinity, or NULL) has no place in
        // time, so no version time and no place in the keyset order; it is never read here but
        // reported by `unsyncable_sql` (before, one such row stopped its table for good).
        let not_minus_inf = format!(
            "({tn}, {cur}) > ($1::text::{tn_type}, '-infinity'::{ct})",
            ct = cursor.sql_type
        );
        let first_sql = format!("{base} AND {not_minus_inf} {tail}");
        let next_sql = format!(
            "{base} AND ({tn}, {}) > ($1::text::{tn_type}, {}) {tail}",
            order.join(", "),
            wm_params.join(", ")
        );
        let range_sql = format!("{base} AND {not_minus_inf} {}", s.range_filter);
        // The next rows of several tenants, each after its own watermark and below its own
        // horizon, in one statement: one index range per tenant, as `next_sql` reads it, and
        // each row tagged with its request's position (`i`, after the source columns).
        let horizon_w = if cursor_is_tz {
            "w.h".to_string()
        } else {
            "(w.h AT TIME ZONE 'UTC')".to_string()
        };
        let wm_cols: Vec<String> = (0..=s.keys.len()).map(|i| format!("w{i}")).collect();
        let wm_w: Vec<String> = std::iter::once(cursor)
            .chain(s.keys.iter().copied())
            .enumerate()
            .map(|(i, c)| format!("w.w{i}::{}", c.sql_type))
            .collect();
        let wm_arrays: Vec<String> = (0..=s.keys.len())
            .map(|i| format!("${}::text[]", i + 4))
            .collect();
        let group_sql = format!(
            "SELECT {texts}, {r}, w.i
             FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], {arrays})
                  WITH ORDINALITY AS w(tenant, h, lim, {cols}, i)
             CROSS JOIN LATERAL (
                 SELECT * FROM {source} t
                 WHERE {tn} = w.tenant::{tn_type}
                   AND ({tn}, {cur}) < (w.tenant::{tn_type}, {horizon_w})
                   AND ({tn}, {order}) > (w.tenant::{tn_type}, {wm})
                 ORDER BY {order} LIMIT w.lim
             ) t
             ORDER BY w.i, {order}",
            r = (s.row)(&op, &format!("({cur_tz})"), s.catalog),
            arrays = wm_arrays.join(", "),
            cols = wm_cols.join(", "),
            wm = wm_w.join(", "),
            order = order.join(", "),
        );
        let verify_sql = format!(
            "SELECT ARRAY[{key_text}] AS k,
                    CASE WHEN isfinite({cur}) THEN (extract(epoch FROM {cur_tz}) * 1000000)::bigint END AS ts,
                    {del} AS del, ({cur} IS NULL OR NOT isfinite({cur})) AS bad
             FROM {source} t WHERE {tn} = $1::text::{tn_type} ORDER BY {ko}",
            del = s.deleted.unwrap_or("false"),
        );
        // Rows of one tenant whose cursor is NULL or ±infinity, with its text: each is an
        // index range of the (tenant, cursor) index, where `NOT isfinite(...)` would read
        // every row of the tenant.
        let unsyncable_sql = ["IS NULL", "= 'infinity'", "= '-infinity'"]
            .iter()
            .map(|cond| {
                format!(
                    "(SELECT ARRAY[{key_text}] AS k, ({cur})::text AS c FROM {source} t
                      WHERE {tn} = $1::text::{tn_type} AND {cur} {cond} ORDER BY {ko} LIMIT $2)"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
            + " LIMIT $2";
        // Which tenants have rows in [$1, horizon $2): one query per table per coordinator tick,
        // however many tenants are idle.
        let since = if cursor_is_tz {
            "$1::timestamptz".to_string()
        } else {
            "($1::timestamptz AT TIME ZONE 'UTC')".to_string()
        };
        // A row whose tenant is NULL belongs to no tenant and is never read: it must not
        // fail the scan of every tenant's changes either (issue 13).
        let changed_sql = format!(
            "SELECT DISTINCT ({tn})::text FROM {source} t
             WHERE {cur} >= {since} AND {cur} < {horizon} AND {tn} IS NOT NULL",
        );
        // Rows at or after each tenant's confirmed point, for the backlog gauge: one query per
        // table for all lagging tenants, each count capped at $3 so a huge backfill costs a
        // bounded index scan. The tenant comparison is typed, so the (tenant, cursor) index
        // serves it.
        let since_w = if cursor_is_tz {
            "w.since".to_string()
        } else {
            "(w.since AT TIME ZONE 'UTC')".to_string()
        };
        let backlog_sql = format!(
            "SELECT w.tenant, (SELECT count(*) FROM (
                 SELECT 1 FROM {source} t
                 WHERE {tn} = w.tenant::{tn_type} AND (w.since IS NULL OR {cur} >= {since_w})
                   AND {cur} > '-infinity' AND {cur} < 'infinity'
                 LIMIT $3) x) AS n
             FROM unnest($1::text[], $2::timestamptz[]) AS w(tenant, since)",
        );
        Ok(PlanSql {
            first_sql,
            next_sql,
            range_sql,
            verify_sql,
            pending_sql: None,
            group_sql: Some(group_sql),
            changed_sql,
            backlog_sql,
            unsyncable_sql: Some(unsyncable_sql),
            watermark_parts: spec.key_columns.len(),
        })
    }
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
        let rows = sqlx::query(include_str!("queries/columns.sql"))
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
        Ok(sqlx::query_scalar(include_str!("queries/horizon.sql"))
            .bind(skew.as_secs_f64() * 1000.0)
            .fetch_one(&self.pool)
            .await?)
    }

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
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
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
        while let Some(r) = rows.try_next().await.map_err(|e| stale_plan(plan, e))? {
            if out.is_empty() {
                check_catalog(plan, &r)?;
            }
            out.push(f(source_row(plan, &r)?));
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
        let position = FIXED_COLUMNS + plan.columns.len();
        let mut out: Vec<Vec<SourceRow>> = vec![Vec::new(); reqs.len()];
        let mut rows = query.fetch(&self.pool);
        let mut first = true;
        while let Some(r) = rows.try_next().await.map_err(|e| stale_plan(plan, e))? {
            if first {
                check_catalog(plan, &r)?;
            }
            first = false;
            let i: i64 = r.try_get(position)?;
            let slot = usize::try_from(i - 1)
                .ok()
                .and_then(|i| out.get_mut(i))
                .ok_or_else(|| StoreError::Invalid(format!("group read returned request {i}")))?;
            slot.push(source_row(plan, &r)?);
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
        while let Some(r) = rows.try_next().await.map_err(|e| stale_plan(plan, e))? {
            out.push(source_row(plan, &r)?);
        }
        Ok(out)
    }
}

/// A read's first row against the catalog fingerprint its plan was built from
/// ([`SlicePlan::catalog`]): checked on the first row, before anything is handed on, since
/// every row of a read carries the same value.
fn check_catalog(plan: &SlicePlan, r: &sqlx::postgres::PgRow) -> Result<()> {
    if let Some(expected) = &plan.catalog {
        if r.try_get::<Option<&str>, _>(6)? != Some(expected) {
            return Err(StoreError::CatalogChanged(plan.table.clone()));
        }
    }
    Ok(())
}

/// A read that Postgres refused because the columns it selects changed type since the
/// connection prepared it: the plan is stale (see [`SlicePlan::with_catalog`]).
fn stale_plan(plan: &SlicePlan, e: sqlx::Error) -> StoreError {
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

/// A row of the slice and range queries: `k`, `c`, `seq`, `tn`, `cts`, `op`, `catalog`, then
/// the source columns, whose binary values become the row's JSON object here. NULL scalars are
/// left out of the object (insertAll reads a missing field as NULL, and the request is smaller);
/// a NULL array is `[]`.
fn source_row(plan: &SlicePlan, r: &sqlx::postgres::PgRow) -> Result<SourceRow> {
    let raw = |i: usize, what: &str| -> Result<Option<&[u8]>> { binary(&r.try_get_raw(i)?, what) };
    let text = |i: usize, what: &str| -> Result<Option<String>> {
        raw(i, what)?
            .map(|b| {
                std::str::from_utf8(b)
                    .map(str::to_owned)
                    .map_err(|_| StoreError::Invalid(format!("{what} is not UTF-8")))
            })
            .transpose()
    };
    let column_text = |i: usize| -> Result<String> {
        let c = &plan.columns[i];
        let v = raw(FIXED_COLUMNS + i, &c.name)?.ok_or_else(|| {
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
    let cts_bytes = raw(4, "cts")?;
    let cursor_ts = cts_bytes
        .and_then(wire::unix_micros)
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| {
            StoreError::Invalid(format!("a row of {} has no version time", plan.table))
        })?;
    let op = text(5, "op")?.unwrap_or_default();
    // Room for the row and the metadata the worker adds around it (about 200 bytes).
    let mut json = String::with_capacity(256 + 48 * plan.columns.len());
    json.push('{');
    for (i, c) in plan.columns.iter().enumerate() {
        let bytes = binary(&r.try_get_raw(FIXED_COLUMNS + i)?, &c.name)?;
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
    wire::string(&op, &mut json);
    json.push_str(",\"_source_ts\":");
    wire::render(Wire::Timestamptz, false, cts_bytes, &mut json)
        .map_err(|e| StoreError::Invalid(format!("_source_ts of {}: {e}", plan.table)))?;
    json.push('}');
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
            r.try_get(0)?,
            text(1, "cursor")?.unwrap_or_default(),
            text(3, "tenant")?,
        ),
    };
    Ok(SourceRow {
        key,
        cursor,
        cursor_ts,
        tenant,
        json,
        seq: text(2, "seq")?,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use tenantsync_core::Mode;

    fn column(name: &str, base: &str, sql_type: &str) -> PgColumn {
        PgColumn {
            name: name.into(),
            formatted: sql_type.into(),
            sql_type: sql_type.into(),
            base_type: base.into(),
            typtype: "b".into(),
            is_array: false,
            numeric_precision: None,
            numeric_scale: None,
        }
    }

    fn plan(capture: Capture) -> SlicePlan {
        let spec = TableSpec {
            id: 1,
            source_schema: "public".into(),
            source_table: "notes".into(),
            key_columns: vec!["id".into()],
            cursor_column: "updated_at".into(),
            tenant_column: "org".into(),
            mode: Mode::Latest,
            enabled: true,
            sync_interval_ms: 100,
            slice_rows: 100,
            soft_delete_column: None,
            capture,
        };
        let columns = [
            column("id", "int8", "bigint"),
            column("org", "int8", "bigint"),
            column("updated_at", "timestamptz", "timestamp with time zone"),
        ];
        SlicePlan::build(&spec, &columns).unwrap()
    }

    #[test]
    fn change_detection_passes_over_rows_without_a_tenant() {
        let p = plan(Capture::Cursor);
        assert!(
            p.sql.changed_sql.contains(r#"t."org" IS NOT NULL"#),
            "{}",
            p.sql.changed_sql
        );
    }

    #[test]
    fn slice_reads_start_strictly_after_minus_infinity() {
        let p = plan(Capture::Cursor);
        for sql in [&p.sql.first_sql, &p.sql.range_sql] {
            assert!(
                sql.contains(r#"(t."org", t."updated_at") > ($1::text::bigint, '-infinity'"#),
                "{sql}"
            );
        }
        // The keyset continuation is strictly after a finite watermark: no bound needed.
        assert!(!p.sql.next_sql.contains("'-infinity'"));
    }

    #[test]
    fn unsyncable_rows_are_found_by_index_ranges() {
        let p = plan(Capture::Cursor);
        let sql = p.sql.unsyncable_sql.as_deref().unwrap();
        for cond in [
            r#"t."updated_at" IS NULL"#,
            r#"t."updated_at" = 'infinity'"#,
            r#"t."updated_at" = '-infinity'"#,
        ] {
            assert!(sql.contains(cond), "{sql}");
        }
        assert!(
            !sql.contains("isfinite"),
            "an isfinite() filter reads every row: {sql}"
        );
        assert!(plan(Capture::Changelog).sql.unsyncable_sql.is_none());
    }

    #[test]
    fn verify_never_casts_an_infinite_cursor() {
        let p = plan(Capture::Cursor);
        assert!(
            p.sql
                .verify_sql
                .contains(r#"CASE WHEN isfinite(t."updated_at") THEN"#),
            "{}",
            p.sql.verify_sql
        );
    }
}
