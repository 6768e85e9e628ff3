//! Organization ids against the tenant column's type.
//!
//! A tenant's organization id is stored as text and compared two ways: cast to the column's
//! type when a slice reads the tenant's rows (`tn = $1::text::bigint`), and as the column's
//! text form when change detection maps changed rows to tenants (`tn::text = organization_id`)
//! and in the per-row isolation check. Both agree only when the stored id is exactly the text
//! Postgres prints for the value. `042` in a bigint column reads the right rows but no change is
//! ever attributed to it, so the tenant never syncs; `abc` fails every slice.
//!
//! So an id must be in the column type's canonical text form. A non-canonical form is refused,
//! with the canonical form in the message, rather than rewritten: `042` may be meant as text
//! (a zero-padded code in a text column of another table), and silently storing `42` would make
//! the operator's input and the control plane disagree.

use crate::mapping::PgColumn;
use thiserror::Error;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum OrgIdError {
    #[error("it is not an integer")]
    NotInteger,
    #[error("it is out of range ({min} to {max})")]
    OutOfRange { min: i64, max: i64 },
    #[error("it is not a UUID")]
    NotUuid,
    /// The value is valid but Postgres prints it otherwise, so text comparisons would miss it.
    #[error("it is not in canonical form; write it as {canonical:?}")]
    NotCanonical { canonical: String },
    #[error("an array tenant column cannot identify one organization")]
    Array,
}

/// What the pure check could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrgIdCheck {
    /// The id is the canonical text of a value of this type.
    Fits,
    /// A type this check does not model (numeric, enums, …): ask the database to cast the id
    /// and print it back (see `SourceReader::canonical_text`).
    AskDatabase,
}

/// Check `value` against a tenant column's type.
pub fn check(column: &PgColumn, value: &str) -> Result<OrgIdCheck, OrgIdError> {
    if column.is_array {
        return Err(OrgIdError::Array);
    }
    match column.base_type.as_str() {
        "int2" => integer(value, i16::MIN.into(), i16::MAX.into()),
        "int4" => integer(value, i32::MIN.into(), i32::MAX.into()),
        "int8" => integer(value, i64::MIN, i64::MAX),
        "uuid" => uuid(value),
        // Text types print what they hold (bpchar drops trailing blanks, which ids never keep:
        // they are trimmed on the way in).
        "text" | "varchar" | "bpchar" => Ok(OrgIdCheck::Fits),
        _ => Ok(OrgIdCheck::AskDatabase),
    }
}

fn integer(value: &str, min: i64, max: i64) -> Result<OrgIdCheck, OrgIdError> {
    let (negative, digits) = match value.as_bytes().first() {
        Some(b'-') => (true, &value[1..]),
        Some(b'+') => (false, &value[1..]),
        _ => (false, value),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OrgIdError::NotInteger);
    }
    // Parsed as i128 so that "out of range" is told apart from "not a number" for every width;
    // more digits than i128 holds are out of range too.
    let out_of_range = OrgIdError::OutOfRange { min, max };
    let magnitude: i128 = digits.parse().map_err(|_| out_of_range.clone())?;
    let n = if negative { -magnitude } else { magnitude };
    if n < i128::from(min) || n > i128::from(max) {
        return Err(out_of_range);
    }
    let canonical = n.to_string();
    if canonical != value {
        return Err(OrgIdError::NotCanonical { canonical });
    }
    Ok(OrgIdCheck::Fits)
}

fn uuid(value: &str) -> Result<OrgIdCheck, OrgIdError> {
    // Postgres accepts braces, no hyphens and upper case, and prints lower-case 8-4-4-4-12.
    let hex: String = value
        .trim_start_matches('{')
        .trim_end_matches('}')
        .chars()
        .filter(|c| *c != '-')
        .collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(OrgIdError::NotUuid);
    }
    let h = hex.to_ascii_lowercase();
    let canonical = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    if canonical != value {
        return Err(OrgIdError::NotCanonical { canonical });
    }
    Ok(OrgIdCheck::Fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(base_type: &str) -> PgColumn {
        PgColumn {
            name: "organization_id".into(),
            formatted: base_type.into(),
            sql_type: base_type.into(),
            base_type: base_type.into(),
            typtype: "b".into(),
            is_array: false,
            numeric_precision: None,
            numeric_scale: None,
        }
    }

    #[test]
    fn integers_must_be_canonical_and_in_range() {
        let c = col("int8");
        assert_eq!(check(&c, "42"), Ok(OrgIdCheck::Fits));
        assert_eq!(check(&c, "-7"), Ok(OrgIdCheck::Fits));
        assert_eq!(check(&c, "9223372036854775807"), Ok(OrgIdCheck::Fits));
        assert_eq!(check(&c, "abc"), Err(OrgIdError::NotInteger));
        assert_eq!(check(&c, "4 2"), Err(OrgIdError::NotInteger));
        assert_eq!(check(&c, "1e3"), Err(OrgIdError::NotInteger));
        assert_eq!(check(&c, "-"), Err(OrgIdError::NotInteger));
        assert_eq!(check(&c, "-+42"), Err(OrgIdError::NotInteger));
        assert!(matches!(
            check(&c, "9223372036854775808"),
            Err(OrgIdError::OutOfRange { .. })
        ));
        assert!(matches!(
            check(&c, "99999999999999999999999999999999999999999"),
            Err(OrgIdError::OutOfRange { .. })
        ));
        let canonical = |v| {
            Err(OrgIdError::NotCanonical {
                canonical: String::from(v),
            })
        };
        assert_eq!(check(&c, "042"), canonical("42"));
        assert_eq!(check(&c, "+42"), canonical("42"));
        assert_eq!(check(&c, "-0"), canonical("0"));
        assert!(matches!(
            check(&col("int4"), "2147483648"),
            Err(OrgIdError::OutOfRange { .. })
        ));
        assert_eq!(check(&col("int4"), "2147483647"), Ok(OrgIdCheck::Fits));
        assert!(matches!(
            check(&col("int2"), "40000"),
            Err(OrgIdError::OutOfRange { .. })
        ));
    }

    #[test]
    fn uuids_must_be_lower_case_hyphenated() {
        let c = col("uuid");
        let u = "0b7e6a2c-1f3d-4c5e-8a9b-0c1d2e3f4a5b";
        assert_eq!(check(&c, u), Ok(OrgIdCheck::Fits));
        assert_eq!(
            check(&c, &u.to_uppercase()),
            Err(OrgIdError::NotCanonical {
                canonical: u.into()
            })
        );
        assert_eq!(
            check(&c, &u.replace('-', "")),
            Err(OrgIdError::NotCanonical {
                canonical: u.into()
            })
        );
        assert_eq!(check(&c, "42"), Err(OrgIdError::NotUuid));
        assert_eq!(check(&c, &u.replace('a', "g")), Err(OrgIdError::NotUuid));
    }

    #[test]
    fn text_fits_other_types_go_to_the_database_arrays_never_fit() {
        assert_eq!(check(&col("text"), "042"), Ok(OrgIdCheck::Fits));
        assert_eq!(check(&col("varchar"), "abc"), Ok(OrgIdCheck::Fits));
        assert_eq!(check(&col("numeric"), "1.50"), Ok(OrgIdCheck::AskDatabase));
        let mut a = col("int8");
        a.is_array = true;
        assert_eq!(check(&a, "42"), Err(OrgIdError::Array));
    }
}
