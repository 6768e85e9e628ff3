//! Postgres → BigQuery type mapping.
//!
//! Postgres renders each row as JSON (`row_to_json` over a list of per-column expressions) so the
//! worker never decodes column values itself: the expression chosen here turns a value into the
//! exact JSON shape insertAll accepts for the BigQuery type (e.g. `int8` and `numeric` as strings,
//! so no precision is lost in a JSON number; `bytea` as base64). A column whose type has no
//! mapping is an error that names the column and its type.

use crate::ident::quote_pg;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A column as read from the Postgres catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgColumn {
    pub name: String,
    /// `format_type()` of the column, for messages (`numeric(12,2)`, `text[]`, `my_enum`).
    pub formatted: String,
    /// The type without modifiers (`timestamp without time zone`), for casts of bound
    /// parameters: casting to `timestamp(0)` would round the value we compare with.
    pub sql_type: String,
    /// `typname` of the base type (domains resolved); for arrays, of the element type.
    pub base_type: String,
    /// `typtype` of that base type: `b` base, `e` enum, `r` range, `c` composite, …
    pub typtype: String,
    pub is_array: bool,
    /// Declared numeric precision and scale, when the column has them.
    pub numeric_precision: Option<i32>,
    pub numeric_scale: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BqType {
    #[serde(rename = "INT64")]
    Int64,
    #[serde(rename = "FLOAT64")]
    Float64,
    #[serde(rename = "NUMERIC")]
    Numeric,
    #[serde(rename = "BIGNUMERIC")]
    BigNumeric,
    #[serde(rename = "BOOL")]
    Bool,
    #[serde(rename = "STRING")]
    String,
    #[serde(rename = "BYTES")]
    Bytes,
    #[serde(rename = "DATE")]
    Date,
    #[serde(rename = "TIME")]
    Time,
    #[serde(rename = "DATETIME")]
    DateTime,
    #[serde(rename = "TIMESTAMP")]
    Timestamp,
    #[serde(rename = "JSON")]
    Json,
}

impl BqType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Int64 => "INT64",
            Self::Float64 => "FLOAT64",
            Self::Numeric => "NUMERIC",
            Self::BigNumeric => "BIGNUMERIC",
            Self::Bool => "BOOL",
            Self::String => "STRING",
            Self::Bytes => "BYTES",
            Self::Date => "DATE",
            Self::Time => "TIME",
            Self::DateTime => "DATETIME",
            Self::Timestamp => "TIMESTAMP",
            Self::Json => "JSON",
        }
    }

    /// BigQuery reports some types under legacy names in table metadata.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "INT64" | "INTEGER" => Self::Int64,
            "FLOAT64" | "FLOAT" => Self::Float64,
            "NUMERIC" => Self::Numeric,
            "BIGNUMERIC" => Self::BigNumeric,
            "BOOL" | "BOOLEAN" => Self::Bool,
            "STRING" => Self::String,
            "BYTES" => Self::Bytes,
            "DATE" => Self::Date,
            "TIME" => Self::Time,
            "DATETIME" => Self::DateTime,
            "TIMESTAMP" => Self::Timestamp,
            "JSON" => Self::Json,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FieldMode {
    Nullable,
    Required,
    Repeated,
}

/// One field of a BigQuery table schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BqField {
    pub name: String,
    #[serde(rename = "type")]
    pub field_type: BqType,
    pub mode: FieldMode,
}

/// A source column with its BigQuery field and the SQL expression that renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedColumn {
    pub field: BqField,
    /// SQL expression over the source row alias `t`, producing a value whose JSON rendering is
    /// what insertAll wants for `field`.
    pub select_expr: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MappingError {
    #[error("column {column:?} has type {pg_type} which has no BigQuery mapping; exclude the column or change its type")]
    UnsupportedType { column: String, pg_type: String },
    #[error("column {column:?} cannot be a BigQuery column name (letters, digits and underscores only, not starting with a digit)")]
    BadColumnName { column: String },
    #[error(
        "column {column:?} clashes with a tenantsync metadata column; rename it in the source"
    )]
    ReservedColumnName { column: String },
}

/// Metadata columns added to every synced table. All REQUIRED: BigQuery and DuckDB-based
/// emulators disagree on NULLs in comparisons, so these never hold one.
pub const META_OP: &str = "_op";
pub const META_SOURCE_TS: &str = "_source_ts";
pub const META_SYNCED_AT: &str = "_synced_at";
pub const META_BATCH_ID: &str = "_batch_id";
pub const META_VERSION_ID: &str = "_version_id";

pub fn metadata_fields() -> Vec<BqField> {
    let f = |name: &str, t| BqField {
        name: name.to_string(),
        field_type: t,
        mode: FieldMode::Required,
    };
    vec![
        f(META_OP, BqType::String),
        f(META_SOURCE_TS, BqType::Timestamp),
        f(META_SYNCED_AT, BqType::Timestamp),
        f(META_BATCH_ID, BqType::String),
        f(META_VERSION_ID, BqType::String),
    ]
}

/// Renders a SQL value expression into the JSON-ready expression for its BigQuery type.
type Render = fn(&str) -> String;

/// How one scalar Postgres type maps: the BigQuery type and how to render a value `v`.
fn scalar(col: &PgColumn) -> Option<(BqType, Render)> {
    fn same(v: &str) -> String {
        v.to_string()
    }
    fn text(v: &str) -> String {
        format!("({v})::text")
    }
    fn base64(v: &str) -> String {
        // encode(.., 'base64') wraps lines at 76 characters; BigQuery wants one line.
        format!("translate(encode({v}, 'base64'), E'\\n', '')")
    }
    let t = col.base_type.as_str();
    Some(match (t, col.typtype.as_str()) {
        (_, "e") | (_, "r") | (_, "m") => (BqType::String, text),
        ("int2" | "int4", _) => (BqType::Int64, same),
        // Strings keep all 64 bits; a JSON number would go through f64 somewhere on the way.
        ("int8" | "oid", _) => (BqType::Int64, text),
        ("float4" | "float8", _) => (BqType::Float64, same),
        ("numeric", _) => (numeric_type(col.numeric_precision, col.numeric_scale), text),
        ("bool", _) => (BqType::Bool, same),
        (
            "text" | "varchar" | "bpchar" | "name" | "citext" | "uuid" | "inet" | "cidr"
            | "macaddr" | "macaddr8" | "money" | "interval" | "timetz" | "bit" | "varbit" | "xml"
            | "char",
            _,
        ) => (BqType::String, text),
        ("bytea", _) => (BqType::Bytes, base64),
        ("date", _) => (BqType::Date, same),
        ("time", _) => (BqType::Time, same),
        ("timestamp", _) => (BqType::DateTime, same),
        ("timestamptz", _) => (BqType::Timestamp, same),
        ("json" | "jsonb", _) => (BqType::Json, text),
        _ => return None,
    })
}

/// NUMERIC holds 29 integer and 9 fractional digits; anything wider (or unconstrained
/// `numeric`) goes to BIGNUMERIC (38 fractional digits) so no digit is dropped.
fn numeric_type(precision: Option<i32>, scale: Option<i32>) -> BqType {
    match (precision, scale) {
        (Some(p), Some(s)) if s <= 9 && p - s <= 29 => BqType::Numeric,
        _ => BqType::BigNumeric,
    }
}

pub fn is_bq_column_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 300
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Map one column. Arrays become REPEATED fields; BigQuery arrays cannot hold NULL, so NULL
/// elements are dropped and a NULL array becomes an empty one (documented in the README).
pub fn map_column(col: &PgColumn) -> Result<MappedColumn, MappingError> {
    if !is_bq_column_name(&col.name) {
        return Err(MappingError::BadColumnName {
            column: col.name.clone(),
        });
    }
    if metadata_fields().iter().any(|f| f.name == col.name) {
        return Err(MappingError::ReservedColumnName {
            column: col.name.clone(),
        });
    }
    let (bq_type, render) = scalar(col).ok_or_else(|| MappingError::UnsupportedType {
        column: col.name.clone(),
        pg_type: col.formatted.clone(),
    })?;
    let src = format!("t.{}", quote_pg(&col.name));
    let (mode, select_expr) = if col.is_array {
        let flatten = format!(
            "ARRAY(SELECT {} FROM unnest({src}) WITH ORDINALITY AS a(e, n) WHERE e IS NOT NULL ORDER BY n)",
            render("a.e")
        );
        // array_remove keeps the order and drops NULLs without a subquery per row (that
        // subquery was about a fifth of Postgres' CPU per row); it refuses multi-dimensional
        // arrays, which keep the flattening subquery, as do elements that need more than a
        // cast (bytea).
        let removed = match render("a.e").as_str() {
            "a.e" => Some(format!("array_remove({src}, NULL)")),
            "(a.e)::text" => Some(format!("array_remove({src}, NULL)::text[]")),
            _ => None,
        };
        let expr = match removed {
            Some(r) => format!(
                "CASE WHEN array_ndims({src}) > 1 THEN {flatten} ELSE coalesce({r}, '{{}}') END"
            ),
            None => format!("coalesce({flatten}, '{{}}')"),
        };
        (FieldMode::Repeated, expr)
    } else {
        (FieldMode::Nullable, render(&src))
    };
    Ok(MappedColumn {
        field: BqField {
            name: col.name.clone(),
            field_type: bq_type,
            mode,
        },
        select_expr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, base: &str, is_array: bool) -> PgColumn {
        PgColumn {
            name: name.into(),
            formatted: base.into(),
            sql_type: base.into(),
            base_type: base.into(),
            typtype: "b".into(),
            is_array,
            numeric_precision: None,
            numeric_scale: None,
        }
    }

    #[test]
    fn maps_common_types() {
        let m = map_column(&col("id", "int8", false)).unwrap();
        assert_eq!(m.field.field_type, BqType::Int64);
        assert_eq!(m.select_expr, "(t.\"id\")::text");
        let m = map_column(&col("tags", "text", true)).unwrap();
        assert_eq!(m.field.mode, FieldMode::Repeated);
        assert!(m
            .select_expr
            .contains("ELSE coalesce(array_remove(t.\"tags\", NULL)::text[], '{}')"));
        assert_eq!(
            map_column(&col("at", "timestamptz", false))
                .unwrap()
                .field
                .field_type,
            BqType::Timestamp
        );
        assert_eq!(
            map_column(&col("doc", "jsonb", false))
                .unwrap()
                .field
                .field_type,
            BqType::Json
        );
    }

    #[test]
    fn numeric_width_picks_numeric_or_bignumeric() {
        assert_eq!(numeric_type(Some(12), Some(2)), BqType::Numeric);
        assert_eq!(numeric_type(Some(38), Some(9)), BqType::Numeric);
        assert_eq!(numeric_type(Some(40), Some(2)), BqType::BigNumeric);
        assert_eq!(numeric_type(Some(20), Some(12)), BqType::BigNumeric);
        assert_eq!(numeric_type(None, None), BqType::BigNumeric);
    }

    #[test]
    fn unsupported_type_names_the_column() {
        let mut c = col("shape", "polygon", false);
        c.formatted = "polygon".into();
        let err = map_column(&c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column \"shape\" has type polygon which has no BigQuery mapping; exclude the column or change its type"
        );
    }

    #[test]
    fn rejects_reserved_and_bad_names() {
        assert!(matches!(
            map_column(&col("_op", "text", false)),
            Err(MappingError::ReservedColumnName { .. })
        ));
        assert!(matches!(
            map_column(&col("first name", "text", false)),
            Err(MappingError::BadColumnName { .. })
        ));
    }

    #[test]
    fn enums_and_ranges_become_strings() {
        let mut c = col("kind", "message_type", false);
        c.typtype = "e".into();
        assert_eq!(map_column(&c).unwrap().field.field_type, BqType::String);
    }
}
