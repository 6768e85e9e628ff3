//! Cursor capture: a row's version is its cursor column (`timestamp` or `timestamptz`), and
//! slices walk the keyset (tenant, cursor, key) below a horizon.
//!
//! Statements and their parameters (the reader binds them, see [`super::SourceReader`]):
//! - first slice: $1 tenant, $2 horizon, $3 limit;
//! - next slice: the same, then the watermark: $4 cursor, $5.. the key columns (all text);
//! - range: $1..$3 as above, $4 lower bound mode, $5 upper bound flag, $6.. lower then upper key;
//! - group: arrays of the above per request: $1 tenants, $2 horizons, $3 limits, $4.. watermark
//!   parts (cursor, then key columns);
//! - verify: $1 tenant; unsyncable: $1 tenant, $2 limit; changed: $1 since, $2 horizon;
//!   backlog: $1 tenants, $2 since per tenant, $3 cap.

use super::plan::{Common, Derived, PlanSql};
use crate::error::{Result, StoreError};
use tenantsync_core::mapping::PgColumn;

/// The statements of a cursor-capture plan, and whether a row's key, cursor and tenant texts
/// can be derived from its source columns.
pub(super) fn build(s: &Common<'_>, cursor: &PgColumn) -> Result<(PlanSql, Option<Derived>)> {
    let c = Cursor::new(s, cursor)?;
    let derived = Derived::of(s, cursor);
    let texts = match derived {
        Some(_) => "NULL::text[] AS k, NULL::text AS c, NULL::text AS seq, NULL::text AS tn".into(),
        None => format!(
            "ARRAY[{}] AS k, ({})::text AS c, NULL::text AS seq, ({})::text AS tn",
            s.key_text, c.cur, s.tn
        ),
    };
    let base = c.base(&texts);
    let sql = PlanSql {
        first_sql: format!("{base} AND {} {}", c.not_minus_inf(), c.tail()),
        next_sql: c.next(&base),
        range_sql: format!("{base} AND {} {}", c.not_minus_inf(), s.range_filter()),
        verify_sql: c.verify(),
        pending_sql: None,
        group_sql: Some(c.group(&texts)),
        changed_sql: c.changed(),
        backlog_sql: c.backlog(),
        unsyncable_sql: Some(c.unsyncable()),
        watermark_parts: s.keys.len(),
    };
    Ok((sql, derived))
}

/// The parts of a cursor plan's statements.
struct Cursor<'a> {
    s: &'a Common<'a>,
    cursor: &'a PgColumn,
    /// The cursor column is a `timestamptz` (else a `timestamp`, taken to hold UTC).
    tz: bool,
    /// The cursor column.
    cur: String,
    /// The keyset order: the cursor, then the key columns, comma-separated.
    order: String,
    /// The row's op (`_op`).
    op: String,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a Common<'a>, cursor: &'a PgColumn) -> Result<Self> {
        let tz = match cursor.base_type.as_str() {
            "timestamptz" if !cursor.is_array => true,
            "timestamp" if !cursor.is_array => false,
            _ => {
                return Err(StoreError::Invalid(format!(
                    "cursor column {:?} has type {}; cursor mode needs timestamp or timestamptz",
                    cursor.name, cursor.formatted
                )))
            }
        };
        let cur = Common::q(cursor);
        // Without an `inserted_at` column an insert and an update look alike in cursor mode.
        let op = match s.columns.iter().find(|c| c.name == "inserted_at") {
            Some(ins) if ins.name != cursor.name => format!(
                "CASE WHEN {} = {cur} THEN 'insert' ELSE 'update' END",
                Common::q(ins)
            ),
            _ => "'upsert'".to_string(),
        };
        let order: Vec<String> = std::iter::once(cur.clone())
            .chain(s.keys.iter().map(|k| Common::q(k)))
            .collect();
        Ok(Self {
            op: s.with_deletes(op),
            order: order.join(", "),
            s,
            cursor,
            tz,
            cur,
        })
    }

    /// A timestamptz expression compared with the cursor column: as is, or as the UTC
    /// `timestamp` for a `timestamp` cursor.
    fn local(&self, ts: &str) -> String {
        if self.tz {
            ts.to_string()
        } else {
            format!("({ts} AT TIME ZONE 'UTC')")
        }
    }

    /// The cursor as a timestamptz (the version time, `_source_ts`).
    fn cur_tz(&self) -> String {
        if self.tz {
            self.cur.clone()
        } else {
            format!("{} AT TIME ZONE 'UTC'", self.cur)
        }
    }

    /// The cursor and the key columns, then the tenant: the watermark's parts in order.
    fn watermark_columns(&self) -> impl Iterator<Item = &PgColumn> {
        std::iter::once(self.cursor).chain(self.s.keys.iter().copied())
    }

    /// The columns from `cts` on (see [`Common::row`]).
    fn row(&self) -> String {
        self.s
            .row(&self.op, &format!("({})", self.cur_tz()), &self.s.catalog)
    }

    /// One tenant's rows below the horizon, before the lower bound and order. The
    /// fingerprint is uncorrelated: Postgres computes it once per read, not per row.
    fn base(&self, texts: &str) -> String {
        let (s, cur) = (self.s, &self.cur);
        let (tn, tn_type, source) = (&s.tn, s.tn_type(), &s.source);
        format!(
            "SELECT {texts}, {r}
             FROM {source} t
             WHERE {tn} = $1::text::{tn_type} AND ({tn}, {cur}) < ($1::text::{tn_type}, {horizon})",
            r = self.row(),
            horizon = self.local("$2::timestamptz"),
        )
    }

    fn tail(&self) -> String {
        format!("ORDER BY {} LIMIT $3", self.order)
    }

    /// Strictly after -infinity: a row there (or at infinity, or NULL) has no place in time,
    /// so no version time and no place in the keyset order; it is never read here but
    /// reported by the unsyncable statement (before, one such row stopped its table for
    /// good). The first slice's lower bound, which also gives the (tenant, cursor, key) index
    /// its range.
    fn not_minus_inf(&self) -> String {
        let (tn, tn_type) = (&self.s.tn, self.s.tn_type());
        format!(
            "({tn}, {}) > ($1::text::{tn_type}, '-infinity'::{ct})",
            self.cur,
            ct = self.cursor.sql_type
        )
    }

    /// After the watermark. Both bounds are row comparisons led by the tenant column, so they
    /// are index conditions on a (tenant, cursor, key) index: with `cursor < horizon` and
    /// `(cursor, key) > watermark` instead, the planner preferred an index on the cursor alone
    /// (it follows the heap order) and filtered out every other tenant's rows one by one,
    /// casting the watermark parameters again for each: 3× the time per slice read in the
    /// throughput benchmark. The watermark's parts start at $4, all bound as text and cast to
    /// the column types so the comparison (and the index) works on real values, not strings.
    fn next(&self, base: &str) -> String {
        let (tn, tn_type) = (&self.s.tn, self.s.tn_type());
        let wm: Vec<String> = self
            .watermark_columns()
            .enumerate()
            .map(|(i, c)| format!("${}::text::{}", i + 4, c.sql_type))
            .collect();
        format!(
            "{base} AND ({tn}, {}) > ($1::text::{tn_type}, {}) {}",
            self.order,
            wm.join(", "),
            self.tail()
        )
    }

    /// The next rows of several tenants, each after its own watermark and below its own
    /// horizon, in one statement: one index range per tenant, as the next-slice statement
    /// reads it, and each row tagged with its request's position (`i`, after the source
    /// columns).
    fn group(&self, texts: &str) -> String {
        let s = self.s;
        let (tn, tn_type, source, cur, order) =
            (&s.tn, s.tn_type(), &s.source, &self.cur, &self.order);
        let parts = s.keys.len() + 1;
        let cols: Vec<String> = (0..parts).map(|i| format!("w{i}")).collect();
        let wm: Vec<String> = self
            .watermark_columns()
            .enumerate()
            .map(|(i, c)| format!("w.w{i}::{}", c.sql_type))
            .collect();
        let arrays: Vec<String> = (0..parts).map(|i| format!("${}::text[]", i + 4)).collect();
        format!(
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
            r = self.row(),
            arrays = arrays.join(", "),
            cols = cols.join(", "),
            wm = wm.join(", "),
            horizon_w = self.local("w.h"),
        )
    }

    /// Every key of one tenant with its version in microseconds (none for an unsyncable row).
    fn verify(&self) -> String {
        let s = self.s;
        let (key_text, ko, tn, tn_type, source, cur) =
            (&s.key_text, &s.ko, &s.tn, s.tn_type(), &s.source, &self.cur);
        format!(
            "SELECT ARRAY[{key_text}] AS k,
                    CASE WHEN isfinite({cur}) THEN (extract(epoch FROM {cur_tz}) * 1000000)::bigint END AS ts,
                    {del} AS del, ({cur} IS NULL OR NOT isfinite({cur})) AS bad
             FROM {source} t WHERE {tn} = $1::text::{tn_type} ORDER BY {ko}",
            del = s.deleted.as_deref().unwrap_or("false"),
            cur_tz = self.cur_tz(),
        )
    }

    /// Rows of one tenant whose cursor is NULL or ±infinity, with its text: each is an index
    /// range of the (tenant, cursor) index, where `NOT isfinite(...)` would read every row of
    /// the tenant.
    fn unsyncable(&self) -> String {
        let s = self.s;
        let (key_text, ko, tn, tn_type, source, cur) =
            (&s.key_text, &s.ko, &s.tn, s.tn_type(), &s.source, &self.cur);
        ["IS NULL", "= 'infinity'", "= '-infinity'"]
            .iter()
            .map(|cond| {
                format!(
                    "(SELECT ARRAY[{key_text}] AS k, ({cur})::text AS c FROM {source} t
                      WHERE {tn} = $1::text::{tn_type} AND {cur} {cond} ORDER BY {ko} LIMIT $2)"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
            + " LIMIT $2"
    }

    /// Which tenants have rows in [$1, horizon $2): one query per table per coordinator tick,
    /// however many tenants are idle. A row whose tenant is NULL belongs to no tenant and is
    /// never read: it must not fail the scan of every tenant's changes either (issue 13).
    fn changed(&self) -> String {
        let (tn, source, cur) = (&self.s.tn, &self.s.source, &self.cur);
        format!(
            "SELECT DISTINCT ({tn})::text FROM {source} t
             WHERE {cur} >= {since} AND {cur} < {horizon} AND {tn} IS NOT NULL",
            since = self.local("$1::timestamptz"),
            horizon = self.local("$2::timestamptz"),
        )
    }

    /// Rows at or after each tenant's confirmed point, for the backlog gauge: one query per
    /// table for all lagging tenants, each count capped at $3 so a huge backfill costs a
    /// bounded index scan. The tenant comparison is typed, so the (tenant, cursor) index
    /// serves it.
    fn backlog(&self) -> String {
        let (tn, tn_type, source, cur) = (&self.s.tn, self.s.tn_type(), &self.s.source, &self.cur);
        format!(
            "SELECT w.tenant, (SELECT count(*) FROM (
                 SELECT 1 FROM {source} t
                 WHERE {tn} = w.tenant::{tn_type} AND (w.since IS NULL OR {cur} >= {since_w})
                   AND {cur} > '-infinity' AND {cur} < 'infinity'
                 LIMIT $3) x) AS n
             FROM unnest($1::text[], $2::timestamptz[]) AS w(tenant, since)",
            since_w = self.local("w.since"),
        )
    }
}
