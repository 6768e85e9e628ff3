//! Postgres → BigQuery type mapping.
//!
//! Each column maps to a BigQuery field, the SQL expression the slice reader selects for it and
//! the [`Wire`] decoder that turns the selected value (binary format) into the JSON insertAll
//! accepts for the field (see [`crate::wire`]). Most types are selected as they are; types
//! without a decoder here are cast to `text` in the SQL. A column whose type has no mapping is
//! an error that names the column and its type.

use crate::ident::quote_pg;
use crate::wire::Wire;
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

/// A source column with its BigQuery field, the SQL expression that selects it and how its
/// value is decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedColumn {
    pub field: BqField,
    /// SQL expression over the source row alias `t`: the column itself, or cast to `text`
    /// (`text[]` for arrays) when `wire` is [`Wire::Text`] for a type that is not text.
    pub select_expr: String,
    /// Decoder of the selected value (of each element, for an array).
    pub wire: Wire,
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

/// How one scalar Postgres type maps: the BigQuery type, the decoder of its binary value, and
/// whether the SQL must cast it to `text` first (types without a decoder in [`crate::wire`];
/// `bpchar` too, whose text form drops the padding, as its JSON rendering always did).
fn scalar(col: &PgColumn) -> Option<(BqType, Wire, bool)> {
    let t = col.base_type.as_str();
    Some(match (t, col.typtype.as_str()) {
        (_, "e") | (_, "r") | (_, "m") => (BqType::String, Wire::Text, true),
        ("int2", _) => (BqType::Int64, Wire::Int2, false),
        ("int4", _) => (BqType::Int64, Wire::Int4, false),
        ("int8", _) => (BqType::Int64, Wire::Int8, false),
        ("oid", _) => (BqType::Int64, Wire::Oid, false),
        ("float4", _) => (BqType::Float64, Wire::Float4, false),
        ("float8", _) => (BqType::Float64, Wire::Float8, false),
        ("numeric", _) => (
            numeric_type(col.numeric_precision, col.numeric_scale),
            Wire::Numeric,
            false,
        ),
        ("bool", _) => (BqType::Bool, Wire::Bool, false),
        ("text" | "varchar" | "name", _) => (BqType::String, Wire::Text, false),
        ("uuid", _) => (BqType::String, Wire::Uuid, false),
        (
            "bpchar" | "citext" | "inet" | "cidr" | "macaddr" | "macaddr8" | "money" | "interval"
            | "timetz" | "bit" | "varbit" | "xml" | "char",
            _,
        ) => (BqType::String, Wire::Text, true),
        ("bytea", _) => (BqType::Bytes, Wire::Bytea, false),
        ("date", _) => (BqType::Date, Wire::Date, false),
        ("time", _) => (BqType::Time, Wire::Time, false),
        ("timestamp", _) => (BqType::DateTime, Wire::Timestamp, false),
        ("timestamptz", _) => (BqType::Timestamp, Wire::Timestamptz, false),
        ("json", _) => (BqType::Json, Wire::Json, false),
        ("jsonb", _) => (BqType::Json, Wire::Jsonb, false),
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
    let (bq_type, wire, cast) = scalar(col).ok_or_else(|| MappingError::UnsupportedType {
        column: col.name.clone(),
        pg_type: col.formatted.clone(),
    })?;
    let src = format!("t.{}", quote_pg(&col.name));
    let select_expr = match (cast, col.is_array) {
        (false, _) => src,
        (true, false) => format!("({src})::text"),
        (true, true) => format!("({src})::text[]"),
    };
    let mode = if col.is_array {
        FieldMode::Repeated
    } else {
        FieldMode::Nullable
    };
    Ok(MappedColumn {
        field: BqField {
            name: col.name.clone(),
            field_type: bq_type,
            mode,
        },
        select_expr,
        wire,
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
        assert_eq!((m.select_expr.as_str(), m.wire), ("t.\"id\"", Wire::Int8));
        let m = map_column(&col("tags", "text", true)).unwrap();
        assert_eq!(m.field.mode, FieldMode::Repeated);
        assert_eq!((m.select_expr.as_str(), m.wire), ("t.\"tags\"", Wire::Text));
        let m = map_column(&col("nets", "inet", true)).unwrap();
        assert_eq!(m.select_expr, "(t.\"nets\")::text[]");
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
        let m = map_column(&c).unwrap();
        assert_eq!(m.field.field_type, BqType::String);
        assert_eq!(
            (m.select_expr.as_str(), m.wire),
            ("(t.\"kind\")::text", Wire::Text)
        );
    }
}
