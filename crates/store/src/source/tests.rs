//! The statements each capture mode builds, as text and parameters.

use super::row::Layout;
use super::*;
use std::collections::BTreeSet;
use tenantsync_core::{Capture, Mode, TableSpec};

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
        write_api: None,
        max_staleness_s: tenantsync_core::model::DEFAULT_MAX_STALENESS_S,
        exclude_columns: Vec::new(),
        hash_columns: Vec::new(),
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

fn spec(capture: Capture, keys: &[&str], cursor: &str, soft_delete: Option<&str>) -> TableSpec {
    TableSpec {
        id: 1,
        source_schema: "public".into(),
        source_table: "it's".into(),
        key_columns: keys.iter().map(|k| k.to_string()).collect(),
        cursor_column: cursor.into(),
        tenant_column: "org".into(),
        mode: Mode::Latest,
        enabled: true,
        sync_interval_ms: 100,
        slice_rows: 100,
        soft_delete_column: soft_delete.map(Into::into),
        capture,
        write_api: None,
        max_staleness_s: tenantsync_core::model::DEFAULT_MAX_STALENESS_S,
        exclude_columns: Vec::new(),
        hash_columns: Vec::new(),
    }
}

/// A table with a text tenant, a composite key, a `timestamp` (UTC) cursor, an
/// `inserted_at`, a soft-delete flag, an array, and source columns named like the fixed ones.
fn wide_columns() -> Vec<PgColumn> {
    let mut tags = column("tags", "text", "text[]");
    tags.is_array = true;
    vec![
        column("org", "text", "text"),
        column("id", "int4", "integer"),
        tags,
        column("inserted_at", "timestamp", "timestamp without time zone"),
        column("changed", "timestamp", "timestamp without time zone"),
        column("gone", "bool", "boolean"),
        column("op", "text", "text"),
        column("k", "int8", "bigint"),
    ]
}

fn wide(capture: Capture) -> SlicePlan {
    SlicePlan::build(
        &spec(capture, &["org", "id"], "changed", Some("gone")),
        &wide_columns(),
    )
    .unwrap()
}

/// The parameter numbers a statement uses.
fn params(sql: &str) -> BTreeSet<usize> {
    let mut out = BTreeSet::new();
    let mut rest = sql;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse() {
            out.insert(n);
        }
    }
    out
}

fn upto(n: usize) -> BTreeSet<usize> {
    (1..=n).collect()
}

#[test]
fn cursor_statements_take_the_parameters_the_reader_binds() {
    // One key column: the watermark is (cursor, key) from $4; a range has a lower and an
    // upper key from $6.
    let p = plan(Capture::Cursor);
    let s = &p.sql;
    assert_eq!(params(&s.first_sql), upto(3));
    assert_eq!(params(&s.next_sql), upto(5));
    assert_eq!(params(&s.range_sql), upto(7));
    assert_eq!(params(s.group_sql.as_deref().unwrap()), upto(5));
    assert_eq!(params(&s.verify_sql), upto(1));
    assert_eq!(params(s.unsyncable_sql.as_deref().unwrap()), upto(2));
    assert_eq!(params(&s.changed_sql), upto(2));
    assert_eq!(params(&s.backlog_sql), upto(3));
    assert_eq!(s.watermark_parts, 1);
    // Two key columns: one more watermark part, two more range parameters.
    let p = wide(Capture::Cursor);
    let s = &p.sql;
    assert_eq!(params(&s.next_sql), upto(6));
    assert_eq!(params(&s.range_sql), upto(9));
    assert_eq!(params(s.group_sql.as_deref().unwrap()), upto(6));
    assert_eq!(s.watermark_parts, 2);
    assert!(
        s.next_sql.contains(
            r#"(t."org", t."changed", t."org", t."id") > ($1::text::text, $4::text::timestamp without time zone, $5::text::text, $6::text::integer)"#
        ),
        "{}",
        s.next_sql
    );
}

#[test]
fn changelog_statements_take_the_parameters_the_reader_binds() {
    let p = wide(Capture::Changelog);
    let s = &p.sql;
    assert_eq!(params(&s.first_sql), upto(3));
    assert_eq!(params(&s.next_sql), upto(5));
    assert!(s
        .next_sql
        .contains("(c.txid, c.seq) > ($4::text::xid8, $5::text::bigint)"));
    assert_eq!(params(&s.range_sql), upto(9));
    assert_eq!(params(&s.verify_sql), upto(1));
    assert_eq!(params(s.pending_sql.as_deref().unwrap()), upto(1));
    assert_eq!(params(&s.changed_sql), upto(2));
    assert_eq!(params(&s.backlog_sql), upto(3));
    assert_eq!(s.watermark_parts, 1);
    // Changelog reads one tenant at a time, finds no unsyncable rows and derives nothing.
    assert!(s.group_sql.is_none() && s.unsyncable_sql.is_none() && p.derived.is_none());
    assert!(!SourceReader::reads_groups(&p));
    // Only changes whose transactions every snapshot sees as finished.
    for sql in [&s.first_sql, &s.next_sql, &s.changed_sql] {
        assert!(
            sql.contains("txid < pg_snapshot_xmin(pg_current_snapshot())"),
            "{sql}"
        );
    }
}

/// The fixed columns of every row-reading statement, in the order [`Layout`] expects them,
/// then the source columns.
#[test]
fn row_statements_select_the_fixed_columns_then_the_source_columns() {
    for p in [
        plan(Capture::Cursor),
        plan(Capture::Changelog),
        wide(Capture::Cursor),
        wide(Capture::Changelog),
    ] {
        let s = &p.sql;
        let cols = p
            .columns
            .iter()
            .map(|c| format!("t.{}", tenantsync_core::ident::quote_pg(&c.name)))
            .collect::<Vec<_>>();
        for sql in [&s.first_sql, &s.next_sql, &s.range_sql]
            .into_iter()
            .chain(s.group_sql.as_ref())
        {
            let mut at = 0;
            for name in Layout::FIXED {
                let alias = format!(" AS {name},");
                let found = sql[at..]
                    .find(&alias)
                    .unwrap_or_else(|| panic!("{alias:?} is missing or out of order in {sql}"));
                at += found + alias.len();
            }
            let first = sql[at..].trim_start();
            assert!(first.starts_with(&cols[0]), "{first}");
        }
        if let Some(g) = &s.group_sql {
            assert!(g.contains(", w.i\n"), "the request column comes last: {g}");
        }
    }
}

#[test]
fn key_cursor_and_tenant_texts_are_derived_when_every_one_prints_exactly() {
    let p = plan(Capture::Cursor);
    assert_eq!(
        p.derived,
        Some(super::plan::Derived {
            key: vec![0],
            cursor: 2,
            tenant: 1,
        })
    );
    assert!(p.sql.first_sql.starts_with(
        "SELECT NULL::text[] AS k, NULL::text AS c, NULL::text AS seq, NULL::text AS tn,"
    ));
    // An array key has no text form of its own: the statements print it.
    let p = SlicePlan::build(
        &spec(Capture::Cursor, &["tags"], "changed", None),
        &wide_columns(),
    )
    .unwrap();
    assert!(p.derived.is_none());
    assert!(p.sql.first_sql.starts_with(
        r#"SELECT ARRAY[(t."tags")::text] AS k, (t."changed")::text AS c, NULL::text AS seq, (t."org")::text AS tn,"#
    ), "{}", p.sql.first_sql);
}

#[test]
fn a_timestamp_cursor_is_compared_and_sent_as_utc() {
    let p = wide(Capture::Cursor);
    let s = &p.sql;
    assert!(s.first_sql.contains(
        r#"(t."org", t."changed") < ($1::text::text, ($2::timestamptz AT TIME ZONE 'UTC'))"#
    ));
    assert!(s
        .first_sql
        .contains(r#"(t."changed" AT TIME ZONE 'UTC') AS cts"#));
    assert!(s
        .group_sql
        .as_deref()
        .unwrap()
        .contains("(w.h AT TIME ZONE 'UTC')"));
    assert!(s.changed_sql.contains(
        r#"t."changed" >= ($1::timestamptz AT TIME ZONE 'UTC') AND t."changed" < ($2::timestamptz AT TIME ZONE 'UTC')"#
    ));
    // A timestamptz cursor is compared as it is.
    let p = plan(Capture::Cursor);
    assert!(p
        .sql
        .first_sql
        .contains(r#"< ($1::text::bigint, $2::timestamptz)"#));
}

#[test]
fn op_tells_inserts_from_updates_and_soft_deletes_from_both() {
    let p = wide(Capture::Cursor);
    assert!(p.sql.first_sql.contains(
        r#"CASE WHEN coalesce(t."gone", false) THEN 'delete' ELSE CASE WHEN t."inserted_at" = t."changed" THEN 'insert' ELSE 'update' END END AS op"#
    ), "{}", p.sql.first_sql);
    assert!(p
        .sql
        .verify_sql
        .contains(r#"coalesce(t."gone", false) AS del"#));
    let p = wide(Capture::Changelog);
    assert!(p
        .sql
        .first_sql
        .contains(r#"CASE WHEN coalesce(t."gone", false) THEN 'delete' ELSE c.op END AS op"#));
    // Without an inserted_at column every version is an upsert.
    assert!(plan(Capture::Cursor)
        .sql
        .first_sql
        .contains("'upsert' AS op"));
    // A timestamp marks a row deleted once set.
    let p = SlicePlan::build(
        &spec(Capture::Cursor, &["id"], "changed", Some("inserted_at")),
        &wide_columns(),
    )
    .unwrap();
    assert!(p
        .sql
        .verify_sql
        .contains(r#"(t."inserted_at" IS NOT NULL) AS del"#));
}

#[test]
fn unusable_columns_are_refused_by_name() {
    let cols = wide_columns();
    for (spec, needle) in [
        (
            spec(Capture::Cursor, &["id"], "k", None),
            "cursor column \"k\" has type bigint",
        ),
        (
            spec(Capture::Cursor, &["id"], "changed", Some("op")),
            "soft-delete column \"op\" has type text",
        ),
        (
            spec(Capture::Cursor, &["id"], "changed", Some("tags")),
            "soft-delete column \"tags\" is an array",
        ),
        (
            spec(Capture::Cursor, &["nope"], "changed", None),
            "key column \"nope\" does not exist",
        ),
        (spec(Capture::Changelog, &["id"], "nope", None), ""),
    ] {
        match SlicePlan::build(&spec, &cols) {
            // Changelog capture has no cursor column to check.
            Ok(_) => assert!(needle.is_empty()),
            Err(e) => assert!(e.to_string().contains(needle), "{e}"),
        }
    }
}

#[test]
fn the_catalog_fingerprint_names_the_table_as_a_quoted_literal() {
    let p = wide(Capture::Cursor);
    assert!(
        p.sql
            .first_sql
            .contains(r#"a.attrelid = '"public"."it''s"'::regclass"#),
        "{}",
        p.sql.first_sql
    );
    assert!(p.sql.first_sql.contains(r#"FROM "public"."it's" t"#));
}

#[test]
fn another_catalog_gives_other_statement_texts() {
    // Connections cache prepared statements by text: a plan built for changed columns must not
    // run a statement prepared for the old ones.
    for capture in [Capture::Cursor, Capture::Changelog] {
        let a = wide(capture).with_catalog("aaa".into());
        let b = wide(capture).with_catalog("bbb".into());
        assert_eq!(a.catalog.as_deref(), Some("aaa"));
        for (x, y) in [
            (&a.sql.first_sql, &b.sql.first_sql),
            (&a.sql.next_sql, &b.sql.next_sql),
            (&a.sql.range_sql, &b.sql.range_sql),
        ] {
            assert_ne!(x, y);
            assert!(x.starts_with("/* catalog aaa */ SELECT"), "{x}");
        }
        assert_eq!(
            a.sql.group_sql.is_some(),
            a.sql.group_sql != b.sql.group_sql
        );
    }
    // A fingerprint cannot end the comment early.
    let p = plan(Capture::Cursor).with_catalog("x*/ DROP".into());
    assert!(p.sql.first_sql.starts_with("/* catalog x/ DROP */ "));
}

#[test]
fn excluded_columns_are_not_read_and_required_ones_cannot_be_excluded() {
    let mut s = spec(Capture::Cursor, &["org", "id"], "changed", Some("gone"));
    s.exclude_columns = vec!["tags".into(), "op".into(), "dropped_since".into()];
    let p = SlicePlan::build(&s, &wide_columns()).unwrap();
    let names: Vec<&str> = p.fields.iter().map(|f| f.name.as_str()).collect();
    assert!(
        !names.contains(&"tags") && !names.contains(&"op"),
        "{names:?}"
    );
    assert!(
        names.contains(&"k") && names.contains(&"inserted_at"),
        "{names:?}"
    );
    for sql in [&p.sql.first_sql, &p.sql.next_sql, &p.sql.range_sql] {
        assert!(
            !sql.contains("t.\"tags\"") && !sql.contains("t.tags"),
            "{sql}"
        );
    }
    for needed in ["org", "id", "changed", "gone"] {
        s.exclude_columns = vec![needed.into()];
        let e = SlicePlan::build(&s, &wide_columns())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{needed:?}")) && e.contains("cannot be excluded"),
            "{e}"
        );
    }
}
