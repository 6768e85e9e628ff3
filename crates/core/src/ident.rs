//! Identifier checks. Table and column names end up inside SQL text (quoted) and BigQuery
//! resource paths, so they are validated once where they enter the system.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentError {
    #[error("{what} {value:?} is not a valid name: use 1 to {max} letters, digits or underscores, not starting with a digit")]
    Invalid {
        what: &'static str,
        value: String,
        max: usize,
    },
    #[error("tenant slug {value:?} is not valid: use 1 to 63 lower-case letters, digits, '_' or '-', starting with a letter or digit")]
    Slug { value: String },
}

fn check(what: &'static str, value: &str, max: usize, extra: &[char]) -> Result<(), IdentError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && !value.starts_with(|c: char| c.is_ascii_digit())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c));
    if ok {
        Ok(())
    } else {
        Err(IdentError::Invalid {
            what,
            value: value.to_string(),
            max,
        })
    }
}

/// A Postgres identifier we are willing to quote into SQL. Stricter than Postgres on purpose:
/// the same name becomes a BigQuery column or table name, which only allows `[A-Za-z0-9_]`.
pub fn sql_ident(what: &'static str, value: &str) -> Result<(), IdentError> {
    check(what, value, 63, &[])
}

/// A tenant slug, as the control plane's check constraint allows it (`[a-z0-9][a-z0-9_-]{0,62}`).
/// Checked before onboarding calls BigQuery, so a refused slug leaves nothing behind.
pub fn tenant_slug(value: &str) -> Result<(), IdentError> {
    let ok = (1..=63).contains(&value.len())
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdentError::Slug {
            value: value.to_string(),
        })
    }
}

/// A BigQuery dataset id.
pub fn dataset_id(value: &str) -> Result<(), IdentError> {
    check("dataset", value, 1024, &[])
}

/// A GCP project id (lowercase letters, digits, hyphens; we also accept the emulator's names).
pub fn project_id(value: &str) -> Result<(), IdentError> {
    check("project", value, 100, &['-', '.', ':'])
}

/// Quote an identifier for Postgres. Callers have validated it with [`sql_ident`]; quoting still
/// doubles quotes so this stays safe on its own.
pub fn quote_pg(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_rejects_injection() {
        assert!(sql_ident("table", "flow_results").is_ok());
        assert!(sql_ident("table", "1abc").is_err());
        assert!(sql_ident("table", "a\"; drop table x; --").is_err());
        assert!(sql_ident("table", "").is_err());
        assert!(dataset_id("org_1_data").is_ok());
        assert!(project_id("my-project-123").is_ok());
        assert_eq!(quote_pg("a\"b"), "\"a\"\"b\"");
        assert!(tenant_slug("ngo-42_a").is_ok());
        assert!(tenant_slug("0ngo").is_ok());
        for bad in [
            "",
            "-ngo",
            "_ngo",
            "Ngo",
            "ngo a",
            "ngo/a",
            "ngö",
            &"a".repeat(64),
        ] {
            assert!(tenant_slug(bad).is_err(), "{bad:?}");
        }
    }
}
