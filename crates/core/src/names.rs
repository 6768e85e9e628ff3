//! Every name a registered table puts into a tenant's dataset and into the source database,
//! and the checks that no two of them meet.
//!
//! All tables share each tenant's dataset, so one table's objects can land on another's:
//! `public.a__b` and `a.b` both become BigQuery table `a__b`, a source table `notes_latest`
//! would be overwritten by the view of `notes`. Postgres truncates identifiers past 63 bytes,
//! so two change tables named after long source tables would be one. Registration refuses
//! such a table naming both sides ([`check_new_table`], [`check_columns`]); the same column
//! check runs whenever a slice plan is built, so a column added to the source later stops its
//! table with the same message instead of breaking a view.
//!
//! BigQuery names are compared case-insensitively: BigQuery refuses two columns that differ
//! only in case, and a dataset may be case-insensitive for table names (the conservative
//! reading). Postgres names are quoted everywhere, so they compare exactly.

use crate::mapping::{META_BATCH_ID, META_OP, META_SOURCE_TS, META_SYNCED_AT, META_VERSION_ID};
use crate::model::{Capture, Mode, TableSpec};
use std::fmt;
use thiserror::Error;

/// Postgres truncates longer identifiers (NAMEDATALEN - 1), silently.
pub const PG_MAX: usize = 63;
/// BigQuery table and view names.
pub const BQ_TABLE_MAX: usize = 1024;
/// BigQuery column names.
pub const BQ_COLUMN_MAX: usize = 300;

/// The dataset-wide list of committed batches that releases before per-table listings wrote
/// (see `tenantsync_bigquery::listings`): read once, when a table's own listing table is
/// created, and kept reserved so no source table lands on it.
pub const BATCHES_TABLE: &str = "_sync_batches";
/// `_sync_batches_<table>`: the table's list of committed insertAll batches. One per table,
/// so that pruning it (a DELETE under the task's lease) never meets another task's listing.
pub const BATCHES_PREFIX: &str = "_sync_batches_";
/// First character of the `_batch_id` of a batch written through the Storage Write API. Such
/// a batch is visible from its pending stream's commit on, with no listing in
/// [`BATCHES_PREFIX`]`<table>`; insertAll batch ids start with a digit (the tenant id).
pub const STORAGE_BATCH_PREFIX: &str = "w";
/// Tables tenantsync keeps in every dataset besides the synced ones.
pub const INTERNAL_TABLES: &[&str] = &[BATCHES_TABLE];
/// `<table>_latest`: the view of latest and history mode.
pub const LATEST_SUFFIX: &str = "_latest";
/// `<table>_final`: the merged table of merge mode.
pub const FINAL_SUFFIX: &str = "_final";
/// `<table>_current`: latest and history mode's current state, one row per key as of its
/// last merge point, which `<table>_latest` reads instead of every version.
pub const CURRENT_SUFFIX: &str = "_current";
/// The source database's schema that holds the change tables and their trigger functions.
pub const CHANGES_SCHEMA: &str = "tenantsync_changes";
/// Appended to a change table's name for its trigger function.
const CAPTURE_SUFFIX: &str = "_capture";

/// Columns tenantsync adds to every synced table.
pub const METADATA_COLUMNS: &[&str] = &[
    META_OP,
    META_SOURCE_TS,
    META_SYNCED_AT,
    META_BATCH_ID,
    META_VERSION_ID,
];
/// Columns the generated SQL introduces besides the metadata: the views' and compaction's
/// row number (`SELECT * EXCEPT(_rn)` would drop a source column of that name), merge mode's
/// reset point, and `_final`'s merge time. Every `AS _name` of the SQL in
/// `tenantsync_bigquery::schema` must be listed here (a test there checks it).
pub const HELPER_COLUMNS: &[&str] = &["_rn", "_reset", "_merged_at"];
/// Column name prefixes BigQuery reserves (its schema documentation), and the pseudo-columns
/// of the Storage Write API's change data capture.
pub const BQ_RESERVED_PREFIXES: &[&str] = &[
    "_TABLE_",
    "_FILE_",
    "_PARTITION",
    "_ROW_TIMESTAMP",
    "__ROOT__",
    "_COLIDENTIFIER",
    "_CHANGE_TYPE",
    "_CHANGE_SEQUENCE_NUMBER",
];

/// `_sync_batches_<table>`: the batch listings of BigQuery table `bq_table`.
pub fn batches_table(bq_table: &str) -> String {
    format!("{BATCHES_PREFIX}{bq_table}")
}

/// Name of a source table's table in the tenant's dataset. Non-default schemas are prefixed
/// so that `a.users` and `b.users` do not meet; `public.a__b` and `a.b` still would, which
/// [`check_new_table`] refuses.
pub fn bq_table(schema: &str, table: &str) -> String {
    if schema == "public" {
        table.to_string()
    } else {
        format!("{schema}__{table}")
    }
}

/// Name (unquoted) of a source table's change table in [`CHANGES_SCHEMA`]: `<schema>__<table>`
/// when that fits Postgres' 63 bytes, so existing installs keep their tables; otherwise cut
/// short and made unique by a hash of the full schema-qualified name.
pub fn change_table(schema: &str, table: &str) -> String {
    fit(schema, table, "")
}

/// Name (unquoted) of the trigger function that fills the change table: the change table's
/// name plus `_capture`, shortened like [`change_table`] when that is too long.
pub fn capture_function(schema: &str, table: &str) -> String {
    fit(schema, table, CAPTURE_SUFFIX)
}

/// What Postgres made of the trigger function's name before names were made to fit: the
/// first 63 bytes. Kept to clean up functions left by older installs.
pub fn legacy_capture_function(schema: &str, table: &str) -> String {
    truncate(&format!("{schema}__{table}{CAPTURE_SUFFIX}"), PG_MAX).to_string()
}

fn fit(schema: &str, table: &str, suffix: &str) -> String {
    let base = format!("{schema}__{table}");
    if base.len() + suffix.len() <= PG_MAX {
        return base + suffix;
    }
    // 8 hex digits (32 bits) of a hash of `schema.table` ('.' is not in any accepted name, so
    // the input is unambiguous, unlike `base`). A clash would need two long names with one
    // 54-byte prefix and one hash; installing the changelog checks ownership anyway.
    let hash = blake3::hash(format!("{schema}.{table}").as_bytes()).to_hex();
    let hash = &hash.as_str()[..8];
    let keep = PG_MAX - suffix.len() - 1 - hash.len();
    format!("{}_{hash}{suffix}", truncate(&base, keep))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The kinds of object a table derives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// `<table>`: its row versions.
    BqTable,
    /// `<table>_latest` (latest and history mode).
    BqLatestView,
    /// `<table>_final` (merge mode).
    BqFinalTable,
    /// `<table>_current` (latest and history mode).
    BqCurrentTable,
    /// `_sync_batches_<table>`: the table's batch listings (every mode but CDC).
    BqListings,
    /// `_sync_batches` and the like, one per dataset.
    BqInternal,
    /// `tenantsync_changes.<change table>` (changelog capture).
    PgChangeTable,
    /// `tenantsync_changes.<function>()` (changelog capture).
    PgCaptureFunction,
}

/// Which names can meet: each namespace compares within itself only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Namespace {
    /// Tables and views of a tenant's dataset (case-insensitive).
    Dataset,
    /// Relations of the source database's `tenantsync_changes` schema.
    PgRelations,
    /// Functions of the same schema.
    PgFunctions,
}

impl Kind {
    pub fn namespace(self) -> Namespace {
        match self {
            Self::BqTable
            | Self::BqLatestView
            | Self::BqFinalTable
            | Self::BqCurrentTable
            | Self::BqListings
            | Self::BqInternal => Namespace::Dataset,
            Self::PgChangeTable => Namespace::PgRelations,
            Self::PgCaptureFunction => Namespace::PgFunctions,
        }
    }

    /// Longest name the system holding the object keeps whole.
    pub fn max_len(self) -> usize {
        match self.namespace() {
            Namespace::Dataset => BQ_TABLE_MAX,
            Namespace::PgRelations | Namespace::PgFunctions => PG_MAX,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::BqTable => "BigQuery table",
            Self::BqLatestView => "BigQuery view",
            Self::BqFinalTable => "BigQuery merge table",
            Self::BqCurrentTable => "BigQuery current-state table",
            Self::BqListings => "BigQuery batch listing table",
            Self::BqInternal => "BigQuery internal table",
            Self::PgChangeTable => "change table",
            Self::PgCaptureFunction => "trigger function",
        }
    }
}

impl Namespace {
    /// Whether two names are the same object here.
    pub fn same(self, a: &str, b: &str) -> bool {
        match self {
            Self::Dataset => a.eq_ignore_ascii_case(b),
            Self::PgRelations | Self::PgFunctions => a == b,
        }
    }
}

/// One derived object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    pub kind: Kind,
    pub name: String,
}

/// What decides a table's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableNames<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    pub mode: Mode,
    pub capture: Capture,
}

impl<'a> TableNames<'a> {
    pub fn of(spec: &'a TableSpec) -> Self {
        Self {
            schema: &spec.source_schema,
            table: &spec.source_table,
            mode: spec.mode,
            capture: spec.capture,
        }
    }

    /// Every object the table derives: in each tenant's dataset, and with changelog capture
    /// in the source database.
    pub fn derived(&self) -> Vec<Derived> {
        let bq = bq_table(self.schema, self.table);
        let mut out = vec![Derived {
            kind: Kind::BqTable,
            name: bq.clone(),
        }];
        match self.mode {
            // `<t>_current` holds merge mode's folded state (tenantsync_bigquery::final_merge).
            Mode::Merge => out.extend([
                Derived {
                    kind: Kind::BqFinalTable,
                    name: format!("{bq}{FINAL_SUFFIX}"),
                },
                Derived {
                    kind: Kind::BqCurrentTable,
                    name: format!("{bq}{CURRENT_SUFFIX}"),
                },
            ]),
            Mode::Latest | Mode::History => out.extend([
                Derived {
                    kind: Kind::BqLatestView,
                    name: format!("{bq}{LATEST_SUFFIX}"),
                },
                Derived {
                    kind: Kind::BqCurrentTable,
                    name: format!("{bq}{CURRENT_SUFFIX}"),
                },
            ]),
            // BigQuery keeps one row per key in the table itself: nothing derived.
            Mode::Cdc => {}
        }
        if self.mode != Mode::Cdc {
            out.push(Derived {
                kind: Kind::BqListings,
                name: batches_table(&bq),
            });
        }
        if self.capture == Capture::Changelog {
            out.push(Derived {
                kind: Kind::PgChangeTable,
                name: change_table(self.schema, self.table),
            });
            out.push(Derived {
                kind: Kind::PgCaptureFunction,
                name: capture_function(self.schema, self.table),
            });
        }
        out
    }

    fn same_source(&self, other: &TableNames<'_>) -> bool {
        self.schema == other.schema && self.table == other.table
    }
}

impl fmt::Display for TableNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// One of the new table's objects has a name another object already uses.
    #[error(
        "table {table} maps to {kind} {name}, which {other} already uses as its {other_kind}{note}"
    )]
    Collision {
        table: String,
        kind: &'static str,
        name: String,
        /// `public.a__b (registered)`, or `tenantsync` for an internal table.
        other: String,
        other_kind: &'static str,
        /// Why two names that look different meet (case), or nothing.
        note: &'static str,
    },
    #[error("table {table} maps to {kind} {name}, which is longer than the {max} bytes allowed")]
    TooLong {
        table: String,
        kind: &'static str,
        name: String,
        max: usize,
    },
    #[error("table {table} is in schema {CHANGES_SCHEMA}, which holds tenantsync's change tables; it cannot be synced")]
    ReservedSchema { table: String },
    /// A source column named like a column tenantsync adds or its SQL uses.
    #[error("column {column:?} of {table} maps to BigQuery column {column}, which tenantsync's {role} {reserved} already uses{note}; rename the column in the source")]
    ReservedColumn {
        table: String,
        column: String,
        reserved: String,
        role: &'static str,
        /// Why two names that look different meet (case), or nothing.
        note: &'static str,
    },
    #[error("column {column:?} of {table} starts with {prefix}, which BigQuery reserves for its own columns; rename the column in the source")]
    ReservedPrefix {
        table: String,
        column: String,
        prefix: &'static str,
    },
    #[error("columns {column:?} and {other:?} of {table} map to the same BigQuery column (BigQuery column names are case-insensitive); rename one in the source")]
    ColumnCollision {
        table: String,
        column: String,
        other: String,
    },
    #[error("column {column:?} of {table} is longer than the {BQ_COLUMN_MAX} characters of a BigQuery column name")]
    ColumnTooLong { table: String, column: String },
}

impl NameError {
    /// A collision of two BigQuery names that differ in case: real in a case-insensitive
    /// dataset, harmless in a default (case-sensitive) one. Registration refuses it either
    /// way; tables registered before the check keep syncing.
    pub fn is_case_only(&self) -> bool {
        matches!(self, Self::Collision { note, .. } if !note.is_empty())
    }
}

fn case_note(ns: Namespace, a: &str, b: &str) -> &'static str {
    if ns == Namespace::Dataset && a != b {
        " (BigQuery table names are compared case-insensitively)"
    } else {
        ""
    }
}

/// Refuse `new` when one of its objects would meet an object of a `registered` table (the
/// same source table among them is skipped: registering it twice is the store's conflict),
/// one of tenantsync's own, or another of its own; or when a name is too long to be kept
/// whole.
pub fn check_new_table(
    new: &TableNames<'_>,
    registered: &[TableNames<'_>],
) -> Result<(), NameError> {
    if new.schema == CHANGES_SCHEMA {
        return Err(NameError::ReservedSchema {
            table: new.to_string(),
        });
    }
    let mine = new.derived();
    for d in &mine {
        if d.name.len() > d.kind.max_len() {
            return Err(NameError::TooLong {
                table: new.to_string(),
                kind: d.kind.describe(),
                name: d.name.clone(),
                max: d.kind.max_len(),
            });
        }
    }
    let collision = |d: &Derived, other: String, o: &Derived| NameError::Collision {
        table: new.to_string(),
        kind: d.kind.describe(),
        name: d.name.clone(),
        other,
        other_kind: o.kind.describe(),
        note: case_note(d.kind.namespace(), &d.name, &o.name),
    };
    let internal: Vec<Derived> = INTERNAL_TABLES
        .iter()
        .map(|t| Derived {
            kind: Kind::BqInternal,
            name: t.to_string(),
        })
        .collect();
    for (i, d) in mine.iter().enumerate() {
        let ns = d.kind.namespace();
        for o in &internal {
            if o.kind.namespace() == ns && ns.same(&d.name, &o.name) {
                return Err(collision(d, "tenantsync".into(), o));
            }
        }
        for o in &mine[i + 1..] {
            if o.kind.namespace() == ns && ns.same(&d.name, &o.name) {
                return Err(collision(d, format!("{new} itself"), o));
            }
        }
        for r in registered.iter().filter(|r| !r.same_source(new)) {
            for o in r.derived() {
                if o.kind.namespace() == ns && ns.same(&d.name, &o.name) {
                    return Err(collision(d, format!("{r} (registered)"), &o));
                }
            }
        }
    }
    Ok(())
}

/// Refuse source columns that would meet in BigQuery: named like a metadata or helper column
/// in any case, with a prefix BigQuery reserves, or differing from another only in case.
/// `table` is `schema.table`, for the message.
pub fn check_columns<'c>(
    table: &str,
    columns: impl IntoIterator<Item = &'c str>,
) -> Result<(), NameError> {
    let mut seen: Vec<&str> = Vec::new();
    for c in columns {
        if c.len() > BQ_COLUMN_MAX {
            return Err(NameError::ColumnTooLong {
                table: table.to_string(),
                column: c.to_string(),
            });
        }
        let reserved = METADATA_COLUMNS
            .iter()
            .map(|r| (r, "metadata column"))
            .chain(HELPER_COLUMNS.iter().map(|r| (r, "helper column")))
            .find(|(r, _)| r.eq_ignore_ascii_case(c));
        if let Some((r, role)) = reserved {
            return Err(NameError::ReservedColumn {
                table: table.to_string(),
                column: c.to_string(),
                reserved: r.to_string(),
                role,
                note: if *r == c {
                    ""
                } else {
                    " (BigQuery column names are case-insensitive)"
                },
            });
        }
        if let Some(prefix) = BQ_RESERVED_PREFIXES.iter().find(|p| {
            c.len() >= p.len() && c.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
        }) {
            return Err(NameError::ReservedPrefix {
                table: table.to_string(),
                column: c.to_string(),
                prefix,
            });
        }
        if let Some(other) = seen.iter().find(|s| s.eq_ignore_ascii_case(c)) {
            return Err(NameError::ColumnCollision {
                table: table.to_string(),
                column: c.to_string(),
                other: other.to_string(),
            });
        }
        seen.push(c);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &'static str, table: &'static str) -> TableNames<'static> {
        TableNames {
            schema,
            table,
            mode: Mode::Latest,
            capture: Capture::Cursor,
        }
    }

    fn refusal(new: TableNames<'_>, registered: &[TableNames<'_>]) -> String {
        check_new_table(&new, registered)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn schema_prefix_against_double_underscore_names_both_tables() {
        assert_eq!(
            refusal(t("a", "b"), &[t("public", "a__b")]),
            "table a.b maps to BigQuery table a__b, which public.a__b (registered) already uses as its BigQuery table"
        );
        assert!(check_new_table(&t("a", "b"), &[t("b", "a")]).is_ok());
    }

    #[test]
    fn views_final_tables_and_internal_tables_are_taken() {
        let e = refusal(t("public", "notes_latest"), &[t("public", "notes")]);
        assert!(
            e.contains("public.notes (registered) already uses as its BigQuery view"),
            "{e}"
        );
        // The other order: the new table's view lands on a registered table.
        let e = refusal(t("public", "notes"), &[t("public", "notes_latest")]);
        assert!(e.contains("maps to BigQuery view notes_latest"), "{e}");
        let merge = TableNames {
            mode: Mode::Merge,
            capture: Capture::Changelog,
            ..t("public", "p")
        };
        let e = refusal(t("public", "p_final"), &[merge]);
        assert!(e.contains("BigQuery merge table"), "{e}");
        let e = refusal(t("public", "notes_current"), &[t("public", "notes")]);
        assert!(e.contains("BigQuery current-state table"), "{e}");
        // Merge mode keeps its folded state in `_current` too.
        let e = refusal(t("public", "p_current"), &[merge]);
        assert!(e.contains("BigQuery current-state table"), "{e}");
        // Latest mode has no `_final`, merge mode no `_latest`.

        assert!(check_new_table(&t("public", "q_final"), &[t("public", "q")]).is_ok());
        assert!(check_new_table(&t("public", "p_latest"), &[merge]).is_ok());
        let e = refusal(t("public", "_SYNC_batches"), &[]);
        assert!(
            e.contains("which tenantsync already uses") && e.contains("case-insensitively"),
            "{e}"
        );
    }

    #[test]
    fn each_table_but_a_cdc_one_has_its_own_listing_table() {
        let e = refusal(t("public", "_sync_batches_notes"), &[t("public", "notes")]);
        assert!(
            e.contains("BigQuery batch listing table") && e.contains("public.notes (registered)"),
            "{e}"
        );
        let e = refusal(t("public", "notes"), &[t("public", "_Sync_Batches_notes")]);
        assert!(e.contains("maps to BigQuery batch listing table"), "{e}");
        let cdc = TableNames {
            mode: Mode::Cdc,
            ..t("public", "c")
        };
        assert!(check_new_table(&t("public", "_sync_batches_c"), &[cdc]).is_ok());
        // The prefix makes the listing table the longest BigQuery name a table derives.
        let long = "n".repeat(BQ_TABLE_MAX - BATCHES_PREFIX.len() + 1);
        let long = TableNames {
            table: &long,
            ..t("public", "x")
        };
        assert!(matches!(
            check_new_table(&long, &[]),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn case_only_differences_meet_in_bigquery() {
        let e = check_new_table(&t("public", "Notes"), &[t("public", "notes")]).unwrap_err();
        assert!(e.is_case_only());
        let e = e.to_string();
        assert!(
            e.contains("public.Notes") && e.contains("public.notes (registered)"),
            "{e}"
        );
        assert!(!check_new_table(&t("a", "b"), &[t("public", "a__b")])
            .unwrap_err()
            .is_case_only());
        // Re-registering the same table is the store's conflict, not a name clash.
        assert!(check_new_table(&t("public", "notes"), &[t("public", "notes")]).is_ok());
        assert!(matches!(
            check_new_table(&t(CHANGES_SCHEMA, "x"), &[]),
            Err(NameError::ReservedSchema { .. })
        ));
    }

    #[test]
    fn change_tables_compare_exactly_and_only_under_changelog_capture() {
        let cl = |schema, table| TableNames {
            capture: Capture::Changelog,
            ..t(schema, table)
        };
        // `public.a__b` and `public__a.b` are BigQuery tables `a__b` and `public__a__b`, but
        // both `public__a__b` as `<schema>__<table>`.
        let e = refusal(cl("public__a", "b"), &[cl("public", "a__b")]);
        assert_eq!(
            e,
            "table public__a.b maps to change table public__a__b, which public.a__b (registered) already uses as its change table"
        );
        assert!(check_new_table(&t("public__a", "b"), &[cl("public", "a__b")]).is_ok());
        let e = refusal(cl("x", "y"), &[cl("x", "Y")]);
        assert!(
            e.contains("BigQuery table x__y") && e.contains("x.Y"),
            "{e}"
        );
    }

    #[test]
    fn changelog_names_fit_and_short_ones_are_unchanged() {
        assert_eq!(change_table("public", "items"), "public__items");
        assert_eq!(capture_function("public", "items"), "public__items_capture");
        let long = "l".repeat(63);
        let (one, two) = (format!("{}one", &long[..58]), format!("{}two", &long[..58]));
        for (s, tb) in [
            ("public", one.as_str()),
            ("public", two.as_str()),
            (long.as_str(), long.as_str()),
        ] {
            assert!(change_table(s, tb).len() <= PG_MAX);
            assert!(capture_function(s, tb).len() <= PG_MAX);
            assert!(capture_function(s, tb).ends_with("_capture"));
        }
        assert_ne!(change_table("public", &one), change_table("public", &two));
        assert_ne!(
            capture_function("public", &one),
            capture_function("public", &two)
        );
        // 55 bytes plus `_capture` is 63: the last function name kept whole.
        let at_limit = "t".repeat(55 - "public__".len());
        assert_eq!(
            capture_function("public", &at_limit),
            format!("public__{at_limit}_capture")
        );
        assert_eq!(
            legacy_capture_function("public", &one),
            format!("public__{}", &one[..55])
        );
    }

    #[test]
    fn columns_named_like_ours_in_any_case_are_refused() {
        let e = check_columns("public.t", ["id", "_OP"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "column \"_OP\" of public.t maps to BigQuery column _OP, which tenantsync's metadata column _op already uses (BigQuery column names are case-insensitive); rename the column in the source"
        );
        for c in [
            "_rn",
            "_RN",
            "_reset",
            "_merged_at",
            "_Version_Id",
            "_batch_id",
        ] {
            assert!(check_columns("public.t", ["id", c]).is_err(), "{c}");
        }
        let e = check_columns("public.t", ["_partitiontime"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("_PARTITION"), "{e}");
        let e = check_columns("public.t", ["Name", "id", "name"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"name\" and \"Name\""), "{e}");
        assert!(check_columns("public.t", ["id", "rn", "op_", "name", "_opinion"]).is_ok());
    }
}
