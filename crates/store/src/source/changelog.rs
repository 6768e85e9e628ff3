//! Changelog capture: triggers write each change to a change table (see
//! [`crate::changelog`]), and slices walk it in (txid, seq) order below the snapshot's xmin.
//!
//! Statements and their parameters (the reader binds them, see [`super::SourceReader`]):
//! - first slice: $1 tenant, $2 horizon (unused but bound, so every capture binds alike),
//!   $3 limit; next slice: the same, then the watermark: $4 txid, $5 seq (text);
//! - range (the current rows, for resync and repair): as in cursor capture;
//! - verify and pending: $1 tenant; changed: $1 since, $2 horizon (both unused);
//!   backlog: $1 tenants, $2 since per tenant (unused), $3 cap.

use super::plan::{Common, PlanSql};

/// The statements of a changelog-capture plan.
pub(super) fn build(s: &Common<'_>) -> PlanSql {
    let ct = crate::changelog::change_table(&s.spec.source_schema, &s.spec.source_table);
    let base = slice_base(s, &ct);
    let tail = "ORDER BY c.txid, c.seq LIMIT $3";
    PlanSql {
        first_sql: format!("{base} {tail}"),
        next_sql: format!("{base} AND (c.txid, c.seq) > ($4::text::xid8, $5::text::bigint) {tail}"),
        range_sql: range(s),
        verify_sql: verify(s),
        group_sql: None,
        pending_sql: Some(format!(
            "SELECT DISTINCT key FROM {ct} WHERE tenant = $1::text"
        )),
        // Workers delete what they sent, so whatever is left below the snapshot horizon is
        // pending: one query finds every tenant with changes.
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

/// One tenant's changes below the snapshot's xmin, before the lower bound and order. The
/// change row is rebuilt as a row of the source table, so every column goes through the same
/// type mapping as in cursor mode. Columns a partial update left out come back NULL, which is
/// what merge mode expects.
fn slice_base(s: &Common<'_>, ct: &str) -> String {
    let (tn, source) = (&s.tn, &s.source);
    format!(
        "SELECT c.key AS k, c.txid::text AS c, c.seq::text AS seq, ({tn})::text AS tn,
                            {r}
                     FROM {ct} c CROSS JOIN LATERAL jsonb_populate_record(NULL::{source}, c.row) t
                     WHERE c.tenant = $1::text AND $2::timestamptz IS NOT NULL
                       AND c.txid < pg_snapshot_xmin(pg_current_snapshot())",
        r = s.row(&s.with_deletes("c.op".into()), "c.changed_at", &s.catalog),
    )
}

/// The current rows of one tenant in a key range: a repair sends each as a version newer
/// than every change so far.
fn range(s: &Common<'_>) -> String {
    let (key_text, tn, tn_type, source) = (&s.key_text, &s.tn, s.tn_type(), &s.source);
    let now_row = s.row(
        &s.with_deletes("'update'".into()),
        "clock_timestamp()",
        "NULL::text",
    );
    format!(
        "SELECT ARRAY[{key_text}] AS k, clock_timestamp()::text AS c, NULL::text AS seq,
                                ({tn})::text AS tn, {now_row}
                         FROM {source} t
                         WHERE {tn} = $1::text::{tn_type} AND $2::timestamptz IS NOT NULL {range_filter}",
        range_filter = s.range_filter(),
    )
}

/// Every key of one tenant. No version to compare: the change table has no lasting record of
/// one. Keys with changes still pending are left out by the pending statement.
fn verify(s: &Common<'_>) -> String {
    let (key_text, ko, tn, tn_type, source) = (&s.key_text, &s.ko, &s.tn, s.tn_type(), &s.source);
    format!(
        "SELECT ARRAY[{key_text}] AS k, NULL::bigint AS ts, {del} AS del,
                                false AS bad
                         FROM {source} t WHERE {tn} = $1::text::{tn_type} ORDER BY {ko}",
        del = s.deleted.as_deref().unwrap_or("false"),
    )
}
