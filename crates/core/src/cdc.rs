//! BigQuery's change data capture (CDC mode): the pseudo-columns a row carries, and the rules
//! BigQuery applies to them, written down so the tests can apply them to what a worker sends.
//!
//! BigQuery's documented semantics (Storage Write API, "Stream table updates with change data
//! capture"): a table has a `PRIMARY KEY (...) NOT ENFORCED`; every row written to its default
//! stream carries `_CHANGE_TYPE` (`UPSERT` or `DELETE`) and, optionally,
//! `_CHANGE_SEQUENCE_NUMBER`: up to four `/`-separated sections of up to 16 hex digits each,
//! compared section by section as unsigned numbers. Per primary key the row with the greatest
//! sequence number wins; if it is a `DELETE` the key is gone.

use std::cmp::Ordering;

/// The pseudo-column naming a row's change.
pub const CHANGE_TYPE: &str = "_CHANGE_TYPE";
/// The pseudo-column ordering a key's changes.
pub const CHANGE_SEQUENCE_NUMBER: &str = "_CHANGE_SEQUENCE_NUMBER";

/// What a row does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Upsert,
    Delete,
}

impl ChangeType {
    /// From the row's `_op` metadata column: `delete` (a changelog delete, a soft-deleted row,
    /// or the old key of a key change) deletes, `insert` and `update` upsert.
    pub fn from_op(op: &str) -> Self {
        if op == "delete" {
            Self::Delete
        } else {
            Self::Upsert
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upsert => "UPSERT",
            Self::Delete => "DELETE",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "UPSERT" => Some(Self::Upsert),
            "DELETE" => Some(Self::Delete),
            _ => None,
        }
    }
}

/// An `i64` as an unsigned section in the same order (the sign bit flipped): times before
/// 1970 still sort before later ones.
pub fn ordered_u64(v: i64) -> u64 {
    (v as u64) ^ (1 << 63)
}

/// `_CHANGE_SEQUENCE_NUMBER` of `sections` (one to four): upper-case hex, no padding,
/// `/`-separated.
pub fn sequence_number(sections: &[u64]) -> String {
    assert!(
        (1..=4).contains(&sections.len()),
        "a sequence number has one to four sections"
    );
    sections
        .iter()
        .map(|s| format!("{s:X}"))
        .collect::<Vec<_>>()
        .join("/")
}

/// The sequence number of a row version.
///
/// - Cursor capture: `[cursor time in µs, 0]`. A key's versions are told apart only by its
///   cursor time (what the `_latest` view orders by too); two reads of a key at one cursor time
///   are the same version.
/// - Changelog capture: `[change time in µs, change seq]`. The change's `seq` (an identity the
///   trigger draws while the writing transaction holds the row's lock) orders a key's changes
///   exactly, even where transaction ids do not (a transaction that began earlier can change
///   the row after a later one committed); the change time first keeps the order across a
///   reinstalled changelog (whose seq starts again at 1) and against repair rows (no seq,
///   read at `clock_timestamp()`).
pub fn version_sections(time_micros: i64, seq: Option<i64>) -> [u64; 2] {
    [ordered_u64(time_micros), seq.map_or(0, ordered_u64)]
}

/// Parse a sequence number into its sections (`None`: not BigQuery's format).
pub fn parse_sequence_number(s: &str) -> Option<Vec<u64>> {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    parts
        .into_iter()
        .map(|p| {
            if p.is_empty() || p.len() > 16 {
                None
            } else {
                u64::from_str_radix(p, 16).ok()
            }
        })
        .collect()
}

/// BigQuery's order of two sequence numbers: section by section; a number that is a prefix of
/// another sorts first.
pub fn compare_sequence_numbers(a: &str, b: &str) -> Option<Ordering> {
    Some(parse_sequence_number(a)?.cmp(&parse_sequence_number(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_hex_and_slash_separated() {
        assert_eq!(sequence_number(&[0xFFF, 0xB]), "FFF/B");
        assert_eq!(sequence_number(&[u64::MAX]), "FFFFFFFFFFFFFFFF");
        assert_eq!(
            parse_sequence_number("FFF/b"),
            Some(vec![0xFFF, 0xB]),
            "hex is read in either case"
        );
        assert_eq!(parse_sequence_number("1/2/3/4/5"), None);
        assert_eq!(parse_sequence_number("1//2"), None);
        assert_eq!(parse_sequence_number("10000000000000000"), None);
    }

    #[test]
    fn order_is_numeric_per_section_not_textual() {
        // As text "A" > "10"; as numbers 0xA < 0x10.
        assert_eq!(compare_sequence_numbers("A", "10"), Some(Ordering::Less));
        assert_eq!(
            compare_sequence_numbers("1/FF", "2/0"),
            Some(Ordering::Less)
        );
        assert_eq!(
            compare_sequence_numbers("2/1", "2/0"),
            Some(Ordering::Greater)
        );
        assert_eq!(compare_sequence_numbers("2", "2/0"), Some(Ordering::Less));
    }

    #[test]
    fn version_order_follows_time_then_seq_including_before_1970() {
        let enc = |t, s| sequence_number(&version_sections(t, s));
        let versions = [
            enc(-62_135_596_800_000_000, None), // 0001-01-01
            enc(-1, None),
            enc(0, None),
            enc(0, Some(1)),
            enc(0, Some(2)),
            enc(1, Some(0)),
            enc(1_700_000_000_000_000, Some(5)),
            enc(1_700_000_000_000_000, Some(i64::MAX)),
            enc(i64::MAX, None),
        ];
        for w in versions.windows(2) {
            assert_eq!(
                compare_sequence_numbers(&w[0], &w[1]),
                Some(Ordering::Less),
                "{} < {}",
                w[0],
                w[1]
            );
        }
        // Every number BigQuery can take: two sections of at most 16 hex digits.
        for v in &versions {
            assert!(
                parse_sequence_number(v).is_some_and(|s| s.len() == 2),
                "{v}"
            );
        }
    }

    #[test]
    fn change_type_from_op() {
        assert_eq!(ChangeType::from_op("insert"), ChangeType::Upsert);
        assert_eq!(ChangeType::from_op("update"), ChangeType::Upsert);
        assert_eq!(ChangeType::from_op("delete"), ChangeType::Delete);
        assert_eq!(ChangeType::from_op("delete").as_str(), "DELETE");
        assert_eq!(ChangeType::parse("UPSERT"), Some(ChangeType::Upsert));
        assert_eq!(ChangeType::parse("upsert"), None);
    }
}
