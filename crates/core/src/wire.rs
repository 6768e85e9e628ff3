//! Postgres binary wire values → the JSON insertAll accepts.
//!
//! The slice reader selects the source columns themselves (no per-row JSON built by Postgres)
//! and gets them in the binary format of the extended protocol; this module turns each value
//! into its JSON text. Rendering JSON in Postgres (`json_build_object` over per-column casts)
//! cost 11–16 µs of backend CPU per row in the throughput benchmark, most of a row's cost; the
//! binary values cost Postgres a few µs and render here in about one.
//!
//! The shapes follow what Postgres' own JSON rendering gave before, so BigQuery sees the same
//! values: `int8` and `numeric` as strings (a JSON number goes through f64 somewhere on the
//! way), non-finite floats as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, timestamps in
//! ISO 8601 with the fraction's trailing zeros dropped, `bytea` as one line of base64, `json`
//! and `jsonb` as a string holding the document. Arrays are flattened in storage order with
//! NULL elements dropped (BigQuery arrays hold no NULL). Types with no binary decoder here are
//! cast to `text` in the SQL ([`crate::mapping`]) and arrive as [`Wire::Text`].

use base64::Engine;
use thiserror::Error;

/// How one column's binary value is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Int2,
    Int4,
    /// Rendered as a JSON string.
    Int8,
    /// `oid` (unsigned 32 bits), as a JSON string like `int8`.
    Oid,
    Float4,
    Float8,
    /// Rendered as a JSON string of the decimal text Postgres would print.
    Numeric,
    Bool,
    /// UTF-8 text: `text`, `varchar`, `bpchar`, `name`, and every expression cast to `text`.
    Text,
    Uuid,
    Bytea,
    Date,
    Time,
    /// `timestamp without time zone` (BigQuery DATETIME).
    Timestamp,
    /// `timestamp with time zone`, rendered in UTC.
    Timestamptz,
    Json,
    Jsonb,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    #[error("malformed binary {wire:?} value ({len} bytes)")]
    Malformed { wire: Wire, len: usize },
    #[error("malformed binary array of {wire:?}")]
    MalformedArray { wire: Wire },
    #[error("{wire:?} value is not valid UTF-8")]
    NotUtf8 { wire: Wire },
}

type Result<T> = std::result::Result<T, WireError>;

/// Days from 0001-01-01 (chrono's day 1 of the common era) to 2000-01-01, Postgres' epoch.
const PG_EPOCH_DAYS_FROM_CE: i32 = 730_120;
/// Postgres' epoch (2000-01-01) in days and in microseconds after the Unix epoch.
pub(crate) const PG_EPOCH_UNIX_DAYS: i64 = 10_957;
pub(crate) const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
pub(crate) const USECS_PER_DAY: i64 = 86_400_000_000;

/// Append the JSON of one value. `None` is SQL NULL: `null` for a scalar, `[]` for an array
/// (BigQuery's REPEATED fields have no NULL).
pub fn render(wire: Wire, array: bool, value: Option<&[u8]>, out: &mut String) -> Result<()> {
    match (value, array) {
        (None, false) => out.push_str("null"),
        (None, true) => out.push_str("[]"),
        (Some(v), false) => scalar(wire, v, out)?,
        (Some(v), true) => render_array(wire, v, out)?,
    }
    Ok(())
}

/// A binary array (`array_send`): ndim, has-null flag, element oid, (length, lower bound) per
/// dimension, then every element as (length or -1 for NULL, bytes). Any dimension count
/// flattens to one JSON array in storage order, as the unnest-based rendering did.
fn render_array(wire: Wire, v: &[u8], out: &mut String) -> Result<()> {
    out.push('[');
    for (i, e) in array_elements(wire, v)?.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        scalar(wire, e, out)?;
    }
    out.push(']');
    Ok(())
}

/// The non-NULL elements of a binary array, in storage order, every dimension flattened.
pub fn array_elements(wire: Wire, v: &[u8]) -> Result<Vec<&[u8]>> {
    let bad = || WireError::MalformedArray { wire };
    let mut r = Reader(v);
    let ndim = r.i32().ok_or_else(bad)?;
    r.take(8).ok_or_else(bad)?; // has-null flag, element oid
    if !(0..=6).contains(&ndim) {
        return Err(bad());
    }
    let mut count: i64 = if ndim == 0 { 0 } else { 1 };
    for _ in 0..ndim {
        let len = r.i32().ok_or_else(bad)?;
        r.take(4).ok_or_else(bad)?;
        count = count.checked_mul(i64::from(len.max(0))).ok_or_else(bad)?;
    }
    // Each element takes at least its 4-byte length: a count beyond that is a malformed value,
    // not an allocation to make.
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(r.0.len() / 4));
    for _ in 0..count {
        let len = r.i32().ok_or_else(bad)?;
        if len < 0 {
            continue;
        }
        out.push(r.take(len as usize).ok_or_else(bad)?);
    }
    Ok(out)
}

fn scalar(wire: Wire, v: &[u8], out: &mut String) -> Result<()> {
    let bad = || WireError::Malformed { wire, len: v.len() };
    match wire {
        Wire::Int2 => {
            let n = i16::from_be_bytes(v.try_into().map_err(|_| bad())?);
            out.push_str(itoa::Buffer::new().format(n));
        }
        Wire::Int4 => {
            let n = i32::from_be_bytes(v.try_into().map_err(|_| bad())?);
            out.push_str(itoa::Buffer::new().format(n));
        }
        // Strings: the text form, which has nothing to escape.
        Wire::Int8 | Wire::Oid | Wire::Numeric | Wire::Uuid | Wire::Date => {
            out.push('"');
            pg_text(wire, v, out)?;
            out.push('"');
        }
        Wire::Float4 => {
            let f = f32::from_be_bytes(v.try_into().map_err(|_| bad())?);
            match f.is_finite() {
                true => out.push_str(ryu::Buffer::new().format_finite(f)),
                false => non_finite(f64::from(f), out),
            }
        }
        Wire::Float8 => {
            let f = f64::from_be_bytes(v.try_into().map_err(|_| bad())?);
            match f.is_finite() {
                true => out.push_str(ryu::Buffer::new().format_finite(f)),
                false => non_finite(f, out),
            }
        }
        Wire::Bool => match v {
            [0] => out.push_str("false"),
            [_] => out.push_str("true"),
            _ => return Err(bad()),
        },
        Wire::Text | Wire::Json => string(std::str::from_utf8(v).map_err(|_| not_utf8(wire))?, out),
        Wire::Jsonb => match v.split_first() {
            // Version 1 is the only binary jsonb format: the document as text follows.
            Some((1, doc)) => string(std::str::from_utf8(doc).map_err(|_| not_utf8(wire))?, out),
            _ => return Err(bad()),
        },
        Wire::Bytea => {
            out.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(v, out);
            out.push('"');
        }
        Wire::Time => {
            let us = i64::from_be_bytes(v.try_into().map_err(|_| bad())?);
            out.push('"');
            time(us, out);
            out.push('"');
        }
        Wire::Timestamp | Wire::Timestamptz => {
            let us = i64::from_be_bytes(v.try_into().map_err(|_| bad())?);
            let tz = if wire == Wire::Timestamptz {
                "+00:00"
            } else {
                ""
            };
            out.push('"');
            timestamp(us, 'T', tz, out).ok_or_else(bad)?;
            out.push('"');
        }
    }
    Ok(())
}

/// Whether [`pg_text`] gives the text form of values decoded with `wire`.
pub fn has_pg_text(wire: Wire) -> bool {
    matches!(
        wire,
        Wire::Int2
            | Wire::Int4
            | Wire::Int8
            | Wire::Oid
            | Wire::Numeric
            | Wire::Text
            | Wire::Uuid
            | Wire::Date
            | Wire::Timestamp
            | Wire::Timestamptz
    )
}

/// Append what `value::text` prints in a session with DateStyle ISO and TimeZone UTC (the
/// worker's sessions), for the types [`has_pg_text`] accepts: the reader builds a row's key,
/// cursor and tenant texts from the values it selects anyway instead of asking Postgres to
/// print them a second time. The texts equal Postgres' (`tests/tests/e2e/types.rs`), so they cast
/// back to the column's type exactly (watermarks) and compare with the tenant's organization
/// id as before.
pub fn pg_text(wire: Wire, v: &[u8], out: &mut String) -> Result<()> {
    let bad = || WireError::Malformed { wire, len: v.len() };
    let mut b = itoa::Buffer::new();
    match wire {
        Wire::Int2 => out.push_str(b.format(i16::from_be_bytes(v.try_into().map_err(|_| bad())?))),
        Wire::Int4 => out.push_str(b.format(i32::from_be_bytes(v.try_into().map_err(|_| bad())?))),
        Wire::Int8 => out.push_str(b.format(i64::from_be_bytes(v.try_into().map_err(|_| bad())?))),
        Wire::Oid => out.push_str(b.format(u32::from_be_bytes(v.try_into().map_err(|_| bad())?))),
        Wire::Numeric => numeric(v, out).ok_or_else(bad)?,
        Wire::Text => out.push_str(std::str::from_utf8(v).map_err(|_| not_utf8(wire))?),
        Wire::Uuid => {
            let b: [u8; 16] = v.try_into().map_err(|_| bad())?;
            let mut h = [0u8; 32];
            hex::encode_to_slice(b, &mut h).map_err(|_| bad())?;
            for (i, range) in [0..8, 8..12, 12..16, 16..20, 20..32]
                .into_iter()
                .enumerate()
            {
                if i > 0 {
                    out.push('-');
                }
                out.extend(h[range].iter().map(|&c| char::from(c)));
            }
        }
        Wire::Date => match i32::from_be_bytes(v.try_into().map_err(|_| bad())?) {
            i32::MAX => out.push_str("infinity"),
            i32::MIN => out.push_str("-infinity"),
            d => {
                if date(d, out).ok_or_else(bad)? {
                    out.push_str(" BC");
                }
            }
        },
        Wire::Timestamp | Wire::Timestamptz => {
            let us = i64::from_be_bytes(v.try_into().map_err(|_| bad())?);
            let tz = if wire == Wire::Timestamptz { "+00" } else { "" };
            timestamp(us, ' ', tz, out).ok_or_else(bad)?;
        }
        _ => return Err(bad()),
    }
    Ok(())
}

fn not_utf8(wire: Wire) -> WireError {
    WireError::NotUtf8 { wire }
}

/// NaN and the infinities as the strings Postgres' JSON rendering uses (and insertAll accepts
/// for FLOAT64); a JSON number cannot hold them.
fn non_finite(f: f64, out: &mut String) {
    out.push_str(match f {
        f if f.is_nan() => "\"NaN\"",
        f if f > 0.0 => "\"Infinity\"",
        _ => "\"-Infinity\"",
    });
}

/// A JSON string literal: quotes, and escapes for `"`, `\` and control characters.
pub fn string(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        // Only ASCII bytes stop the scan, so `start..i` is always on character boundaries.
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `numeric_send`: ndigits, weight, sign, dscale, then base-10000 digits; printed like
/// `numeric_out` (all `dscale` fractional digits, no exponent).
pub(crate) fn numeric(v: &[u8], out: &mut String) -> Option<()> {
    let mut r = Reader(v);
    let ndigits = r.i16()?;
    let weight = i32::from(r.i16()?);
    let sign = r.u16()?;
    let dscale = i32::from(r.u16()?);
    match sign {
        0xC000 => {
            out.push_str("NaN");
            return Some(());
        }
        0xD000 => {
            out.push_str("Infinity");
            return Some(());
        }
        0xF000 => {
            out.push_str("-Infinity");
            return Some(());
        }
        0x0000 | 0x4000 => {}
        _ => return None,
    }
    // The digits stay in the buffer: a value is read once.
    let digits = r.take(usize::try_from(ndigits).ok()? * 2)?;
    let digit = |i: i32| -> u16 {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(2 * i..2 * i + 2))
            .map_or(0, |d| u16::from_be_bytes([d[0], d[1]]))
    };
    if (0..i32::from(ndigits)).any(|i| digit(i) >= 10000) {
        return None;
    }
    if sign == 0x4000 && ndigits > 0 {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        out.push_str(itoa::Buffer::new().format(digit(0)));
        for i in 1..=weight {
            push_padded(out, i64::from(digit(i)), 4);
        }
    }
    if dscale > 0 {
        out.push('.');
        let (mut left, mut i) = (dscale, weight + 1);
        while left > 0 {
            let d = digit(i);
            for p in [1000, 100, 10, 1].into_iter().take(left.min(4) as usize) {
                out.push(char::from(b'0' + (d / p % 10) as u8));
            }
            left -= 4;
            i += 1;
        }
    }
    Some(())
}

fn push_padded(out: &mut String, n: i64, width: usize) {
    let mut b = itoa::Buffer::new();
    let s = b.format(n);
    for _ in s.len()..width {
        out.push('0');
    }
    out.push_str(s);
}

/// `YYYY-MM-DD` of a day count since 2000-01-01. Returns whether the date is BC (Postgres then
/// prints the year counted back from 1 BC and appends ` BC`).
fn date(days: i32, out: &mut String) -> Option<bool> {
    let d = chrono::NaiveDate::from_num_days_from_ce_opt(days.checked_add(PG_EPOCH_DAYS_FROM_CE)?)?;
    use chrono::Datelike;
    let bc = d.year() <= 0;
    let year = if bc { 1 - d.year() } else { d.year() };
    push_padded(out, i64::from(year), 4);
    out.push('-');
    push_padded(out, i64::from(d.month()), 2);
    out.push('-');
    push_padded(out, i64::from(d.day()), 2);
    Some(bc)
}

/// `HH:MM:SS` and the microseconds without trailing zeros (`.5`, none when 0).
pub(crate) fn time(us: i64, out: &mut String) {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    push_padded(out, secs / 3600, 2);
    out.push(':');
    push_padded(out, secs / 60 % 60, 2);
    out.push(':');
    push_padded(out, secs % 60, 2);
    if frac > 0 {
        out.push('.');
        let (mut f, mut p) = (frac, 100_000);
        while f > 0 {
            out.push(char::from(b'0' + (f / p) as u8));
            f %= p;
            p /= 10;
        }
    }
}

/// `2024-01-31<sep>12:00:00.5<tz>` (the fraction without trailing zeros), ` BC` after BC dates,
/// `infinity`/`-infinity` as is: Postgres' JSON rendering with `T` and `+00:00`, its text
/// output with a space and `+00`.
pub(crate) fn timestamp(us: i64, sep: char, tz: &str, out: &mut String) -> Option<()> {
    match us {
        i64::MAX => out.push_str("infinity"),
        i64::MIN => out.push_str("-infinity"),
        _ => {
            let days = i32::try_from(us.div_euclid(USECS_PER_DAY)).ok()?;
            let bc = date(days, out)?;
            out.push(sep);
            time(us.rem_euclid(USECS_PER_DAY), out);
            out.push_str(tz);
            if bc {
                out.push_str(" BC");
            }
        }
    }
    Some(())
}

/// A timestamp in microseconds since the Unix epoch from a binary `timestamp`/`timestamptz`.
pub fn unix_micros(v: &[u8]) -> Option<i64> {
    let us = i64::from_be_bytes(v.try_into().ok()?);
    us.checked_add(PG_EPOCH_UNIX_MICROS)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(wire: Wire, v: &[u8]) -> String {
        let mut s = String::new();
        render(wire, false, Some(v), &mut s).unwrap();
        s
    }

    /// `numeric_send` bytes for (weight, sign, dscale, digits).
    fn num(weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((digits.len() as i16).to_be_bytes());
        v.extend(weight.to_be_bytes());
        v.extend(sign.to_be_bytes());
        v.extend(dscale.to_be_bytes());
        for d in digits {
            v.extend(d.to_be_bytes());
        }
        v
    }

    #[test]
    fn integers_and_floats() {
        assert_eq!(r(Wire::Int2, &(-7i16).to_be_bytes()), "-7");
        assert_eq!(r(Wire::Int4, &123456i32.to_be_bytes()), "123456");
        assert_eq!(
            r(Wire::Int8, &i64::MIN.to_be_bytes()),
            "\"-9223372036854775808\""
        );
        assert_eq!(r(Wire::Oid, &u32::MAX.to_be_bytes()), "\"4294967295\"");
        assert_eq!(r(Wire::Float8, &1.5f64.to_be_bytes()), "1.5");
        assert_eq!(r(Wire::Float4, &1.1f32.to_be_bytes()), "1.1");
        assert_eq!(r(Wire::Float8, &f64::NAN.to_be_bytes()), "\"NaN\"");
        assert_eq!(
            r(Wire::Float8, &f64::NEG_INFINITY.to_be_bytes()),
            "\"-Infinity\""
        );
        let big = r(Wire::Float8, &1e300f64.to_be_bytes());
        assert_eq!(big.parse::<f64>().unwrap(), 1e300);
        assert!(matches!(
            render(Wire::Int8, false, Some(&[1, 2, 3]), &mut String::new()),
            Err(WireError::Malformed { len: 3, .. })
        ));
    }

    #[test]
    fn numerics_print_like_numeric_out() {
        // 12345.6700 (dscale 4): weight 1, digits [1, 2345, 6700]
        assert_eq!(
            r(Wire::Numeric, &num(1, 0, 4, &[1, 2345, 6700])),
            "\"12345.6700\""
        );
        // -0.05 (dscale 2): weight -1, digits [500]
        assert_eq!(r(Wire::Numeric, &num(-1, 0x4000, 2, &[500])), "\"-0.05\"");
        // 0.00001 (dscale 5): weight -2, digits [1000]
        assert_eq!(r(Wire::Numeric, &num(-2, 0, 5, &[1000])), "\"0.00001\"");
        // 10000 (dscale 0): weight 1, digits [1] (trailing zero digits are not sent)
        assert_eq!(r(Wire::Numeric, &num(1, 0, 0, &[1])), "\"10000\"");
        assert_eq!(r(Wire::Numeric, &num(0, 0, 2, &[])), "\"0.00\"");
        assert_eq!(r(Wire::Numeric, &num(0, 0xC000, 0, &[])), "\"NaN\"");
        assert_eq!(r(Wire::Numeric, &num(0, 0xF000, 0, &[])), "\"-Infinity\"");
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(r(Wire::Date, &0i32.to_be_bytes()), "\"2000-01-01\"");
        assert_eq!(r(Wire::Date, &(-1i32).to_be_bytes()), "\"1999-12-31\"");
        assert_eq!(r(Wire::Date, &i32::MAX.to_be_bytes()), "\"infinity\"");
        let us: i64 = 86_400_000_000 + 3_723_500_000; // 2000-01-02 01:02:03.5
        assert_eq!(
            r(Wire::Timestamptz, &us.to_be_bytes()),
            "\"2000-01-02T01:02:03.5+00:00\""
        );
        assert_eq!(
            r(Wire::Timestamp, &(-1i64).to_be_bytes()),
            "\"1999-12-31T23:59:59.999999\""
        );
        assert_eq!(
            r(Wire::Time, &3_723_000_000i64.to_be_bytes()),
            "\"01:02:03\""
        );
        assert_eq!(unix_micros(&0i64.to_be_bytes()), Some(946_684_800_000_000));
    }

    #[test]
    fn text_forms_match_postgres_output() {
        let t = |wire, v: &[u8]| {
            let mut s = String::new();
            pg_text(wire, v, &mut s).unwrap();
            s
        };
        assert_eq!(t(Wire::Int8, &42i64.to_be_bytes()), "42");
        let us: i64 = 86_400_000_000 + 3_723_500_000;
        assert_eq!(
            t(Wire::Timestamptz, &us.to_be_bytes()),
            "2000-01-02 01:02:03.5+00"
        );
        assert_eq!(
            t(Wire::Timestamp, &0i64.to_be_bytes()),
            "2000-01-01 00:00:00"
        );
        assert!(has_pg_text(Wire::Uuid) && !has_pg_text(Wire::Float8));
        assert!(pg_text(Wire::Float8, &[0; 8], &mut String::new()).is_err());
    }

    #[test]
    fn strings_escape_what_json_needs() {
        assert_eq!(
            r(Wire::Text, "a\"b\\c\nd\u{1}é".as_bytes()),
            "\"a\\\"b\\\\c\\nd\\u0001é\""
        );
        assert_eq!(r(Wire::Jsonb, b"\x01{\"a\": 1}"), "\"{\\\"a\\\": 1}\"");
        assert_eq!(r(Wire::Bytea, &[0, 255, 10]), "\"AP8K\"");
        let mut uuid = [0u8; 16];
        uuid[15] = 1;
        assert_eq!(
            r(Wire::Uuid, &uuid),
            "\"00000000-0000-0000-0000-000000000001\""
        );
        assert!(matches!(
            render(Wire::Text, false, Some(&[0xff]), &mut String::new()),
            Err(WireError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn arrays_flatten_and_drop_nulls() {
        // int4[][] {{1,NULL},{3,4}}
        let mut v = Vec::new();
        v.extend(2i32.to_be_bytes());
        v.extend(1i32.to_be_bytes());
        v.extend(23u32.to_be_bytes());
        for _ in 0..2 {
            v.extend(2i32.to_be_bytes());
            v.extend(1i32.to_be_bytes());
        }
        for e in [Some(1i32), None, Some(3), Some(4)] {
            match e {
                Some(n) => {
                    v.extend(4i32.to_be_bytes());
                    v.extend(n.to_be_bytes());
                }
                None => v.extend((-1i32).to_be_bytes()),
            }
        }
        let mut s = String::new();
        render(Wire::Int4, true, Some(&v), &mut s).unwrap();
        assert_eq!(s, "[1,3,4]");
        let mut s = String::new();
        render(Wire::Int4, true, None, &mut s).unwrap();
        assert_eq!(s, "[]");
        let empty = [0u8; 12];
        let mut s = String::new();
        render(Wire::Int4, true, Some(&empty), &mut s).unwrap();
        assert_eq!(s, "[]");
        assert!(render(Wire::Int4, true, Some(&v[..30]), &mut String::new()).is_err());
    }
}
