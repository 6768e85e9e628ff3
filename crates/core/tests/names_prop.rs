//! Generative test of name derivation (issue 13): for random sets of schemas, tables and
//! columns, registered one by one the way `tables add` does, every table that is accepted
//! leaves all derived names distinct (case-insensitively in BigQuery) and within their limits.

use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use tenantsync_core::ident::sql_ident;
use tenantsync_core::mapping::metadata_fields;
use tenantsync_core::names::{
    check_columns, check_new_table, Namespace, TableNames, BQ_COLUMN_MAX, INTERNAL_TABLES,
};
use tenantsync_core::{Capture, Mode};

/// Pieces that make names meet: case, `_` and `__`, the suffixes and internal names
/// tenantsync derives, metadata and helper columns, and long runs.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("A".to_string()),
        Just("B".to_string()),
        Just("public".to_string()),
        Just("notes".to_string()),
        Just("Notes".to_string()),
        Just("_".to_string()),
        Just("__".to_string()),
        Just("_latest".to_string()),
        Just("_LATEST".to_string()),
        Just("_final".to_string()),
        Just("_sync_batches".to_string()),
        Just("_op".to_string()),
        Just("_OP".to_string()),
        Just("_rn".to_string()),
        Just("_reset".to_string()),
        Just("_merged_at".to_string()),
        Just("_source_ts".to_string()),
        Just("_version_id".to_string()),
        Just("_partitiontime".to_string()),
        (1usize..=63).prop_map(|n| "l".repeat(n)),
        "[a-zA-Z_][a-zA-Z0-9_]{0,8}",
    ]
}

/// A name the identifier check accepts (what `tables add` lets through before names).
fn ident() -> impl Strategy<Value = String> {
    prop::collection::vec(fragment(), 1..4).prop_filter_map("not a valid identifier", |parts| {
        let s: String = parts.concat();
        let s = if s.len() > 63 { s[..63].to_string() } else { s };
        sql_ident("name", &s).is_ok().then_some(s)
    })
}

fn schema() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("public".to_string()),
        1 => Just("a".to_string()),
        1 => Just("A".to_string()),
        1 => Just("a__b".to_string()),
        1 => Just("public__a".to_string()),
        1 => Just("tenantsync_changes".to_string()),
        2 => ident(),
    ]
}

#[derive(Debug, Clone)]
struct Spec {
    schema: String,
    table: String,
    mode: Mode,
    capture: Capture,
    columns: Vec<String>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        schema(),
        ident(),
        prop::sample::select(Mode::ALL.to_vec()),
        prop::sample::select(Capture::ALL.to_vec()),
        prop::collection::vec(ident(), 1..6),
    )
        .prop_map(|(schema, table, mode, capture, columns)| Spec {
            schema,
            table,
            // Merge mode only exists with changelog capture (`tables add` refuses the rest).
            capture: if mode == Mode::Merge {
                Capture::Changelog
            } else {
                capture
            },
            mode,
            columns,
        })
}

fn names(s: &Spec) -> TableNames<'_> {
    TableNames {
        schema: &s.schema,
        table: &s.table,
        mode: s.mode,
        capture: s.capture,
    }
}

/// Register like `tables add`: the columns, then the names against what is registered; a
/// second registration of one source table is the store's unique constraint.
fn register(specs: &[Spec]) -> Vec<&Spec> {
    let mut accepted: Vec<&Spec> = Vec::new();
    for s in specs {
        if accepted
            .iter()
            .any(|a| a.schema == s.schema && a.table == s.table)
        {
            continue;
        }
        let qualified = format!("{}.{}", s.schema, s.table);
        if check_columns(&qualified, s.columns.iter().map(String::as_str)).is_err() {
            continue;
        }
        let registered: Vec<TableNames<'_>> = accepted.iter().map(|a| names(a)).collect();
        if check_new_table(&names(s), &registered).is_ok() {
            accepted.push(s);
        }
    }
    accepted
}

fn assert_distinct_and_fitting(accepted: &[&Spec]) -> Result<(), TestCaseError> {
    // Namespace → (normalized name → owner).
    let mut seen: HashMap<(Namespace, String), String> = HashMap::new();
    for t in INTERNAL_TABLES {
        seen.insert((Namespace::Dataset, t.to_lowercase()), "tenantsync".into());
    }
    for s in accepted {
        let owner = format!("{}.{}", s.schema, s.table);
        for d in names(s).derived() {
            prop_assert!(
                d.name.len() <= d.kind.max_len(),
                "{owner}: {:?} {} is {} bytes",
                d.kind,
                d.name,
                d.name.len()
            );
            let ns = d.kind.namespace();
            let key = match ns {
                Namespace::Dataset => d.name.to_lowercase(),
                _ => d.name.clone(),
            };
            if let Some(other) = seen.insert((ns, key), owner.clone()) {
                prop_assert!(
                    false,
                    "{owner} and {other} both derive {:?} {}",
                    d.kind,
                    d.name
                );
            }
        }
        // The BigQuery columns of the table (and of `_final`, which adds `_source_ts` and
        // `_merged_at`) and the names the views' SQL adds.
        let mut cols: HashSet<String> = HashSet::new();
        let ours = metadata_fields().into_iter().map(|f| f.name).chain(
            tenantsync_core::names::HELPER_COLUMNS
                .iter()
                .map(|c| c.to_string()),
        );
        for c in s.columns.iter().cloned().chain(ours) {
            prop_assert!(c.len() <= BQ_COLUMN_MAX);
            prop_assert!(
                cols.insert(c.to_lowercase()),
                "{owner}: column {c} meets another in BigQuery"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn accepted_tables_never_share_a_name(specs in prop::collection::vec(spec(), 1..10)) {
        let accepted = register(&specs);
        assert_distinct_and_fitting(&accepted)?;
    }

    /// The check refuses only what meets: plain distinct lowercase names always pass, so the
    /// property above is not met by refusing everything.
    #[test]
    fn distinct_plain_names_are_accepted(
        tables in prop::collection::btree_set("[a-z]{1,12}", 1..8),
        long in 40usize..=63,
    ) {
        let mut specs: Vec<Spec> = tables
            .iter()
            .map(|t| Spec {
                schema: "public".into(),
                table: t.clone(),
                mode: Mode::Latest,
                capture: Capture::Changelog,
                columns: vec!["id".into(), format!("{t}_value")],
            })
            .collect();
        // Two long names with a common prefix: their change tables must stay apart.
        for end in ["one", "two"] {
            specs.push(Spec {
                schema: "public".into(),
                table: format!("{}{end}", "q".repeat(long - 3)),
                mode: Mode::Latest,
                capture: Capture::Changelog,
                columns: vec!["id".into()],
            });
        }
        prop_assert_eq!(register(&specs).len(), specs.len());
    }
}
