//! Rows as the Storage Write API takes them: one protobuf message per row, described by a
//! proto2 descriptor built from the table's schema, encoded straight from the binary Postgres
//! values the slice reader gets (no JSON on the way).
//!
//! Every value is checked against its column's BigQuery type and range as it is encoded: a
//! pending stream's rows are only validated at its commit by the local BigQuery, which then
//! drops the whole batch while answering success, so a bad value must never reach a stream.
//! A value that does not pass is not encoded: the reader sends that row as JSON instead, and
//! the sink's JSON encoder refuses it with the column named (a dead letter, with its key).
//!
//! Field numbers follow the table's columns: the source columns in order (1…n), then the
//! metadata columns, then, in CDC mode, `_CHANGE_TYPE` and `_CHANGE_SEQUENCE_NUMBER`.

use crate::cdc;
use crate::mapping::{metadata_fields, BqField, BqType, FieldMode};
use crate::wire::{self, Wire, PG_EPOCH_UNIX_DAYS, PG_EPOCH_UNIX_MICROS, USECS_PER_DAY};
use base64::Engine;
use prost::encoding::{
    bool as pbool, bytes as pbytes, decode_key, decode_varint, double, encode_key, encode_varint,
    int32, int64, string, WireType,
};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto};
use serde_json::{Map, Value};

/// BigQuery's DATE range in days since 1970-01-01 (0001-01-01 ..= 9999-12-31).
pub const DATE_DAYS: std::ops::RangeInclusive<i64> = -719_162..=2_932_896;
/// BigQuery's TIMESTAMP (and DATETIME) range in microseconds since the epoch.
pub const TIMESTAMP_MICROS: std::ops::RangeInclusive<i64> =
    -62_135_596_800_000_000..=253_402_300_799_999_999;
/// The Unix epoch (1970-01-01) in days from 0001-01-01 as chrono counts them (day 1).
pub const UNIX_EPOCH_DAYS_FROM_CE: i32 = 719_163;

/// The protobuf type each BigQuery type is sent as (the preferred one where there is a choice;
/// text for NUMERIC, DATETIME, TIME and JSON, whose literals BigQuery parses).
pub fn proto_type(t: BqType) -> Type {
    match t {
        BqType::Int64 | BqType::Timestamp => Type::Int64,
        BqType::Float64 => Type::Double,
        BqType::Bool => Type::Bool,
        BqType::Bytes => Type::Bytes,
        BqType::Date => Type::Int32,
        BqType::String
        | BqType::Numeric
        | BqType::BigNumeric
        | BqType::Time
        | BqType::DateTime
        | BqType::Json => Type::String,
    }
}

/// The descriptor of a row of `fields`, field `i` numbered `i + 1`.
pub fn descriptor(fields: &[BqField]) -> DescriptorProto {
    let field = fields
        .iter()
        .enumerate()
        .map(|(i, f)| FieldDescriptorProto {
            name: Some(f.name.clone()),
            number: Some(i as i32 + 1),
            label: Some(if f.mode == FieldMode::Repeated {
                Label::Repeated
            } else {
                Label::Optional
            } as i32),
            r#type: Some(proto_type(f.field_type) as i32),
            ..Default::default()
        })
        .collect();
    DescriptorProto {
        name: Some("Row".into()),
        field,
        ..Default::default()
    }
}

/// CDC's pseudo-columns (STRING), which BigQuery reads from the default stream's rows and
/// does not store.
pub fn cdc_fields() -> Vec<BqField> {
    [cdc::CHANGE_TYPE, cdc::CHANGE_SEQUENCE_NUMBER]
        .into_iter()
        .map(|name| BqField {
            name: name.to_string(),
            field_type: BqType::String,
            mode: FieldMode::Nullable,
        })
        .collect()
}

/// The message layout of one table's rows as a slice writes them: its source columns, the
/// metadata columns, and in CDC mode the pseudo-columns. Built once per slice plan.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtoSchema {
    fields: Vec<BqField>,
    source_len: usize,
    cdc: bool,
    descriptor: DescriptorProto,
}

/// Field numbers of the columns a slice adds to each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaTags {
    pub op: u32,
    pub source_ts: u32,
    pub synced_at: u32,
    pub batch_id: u32,
    pub version_id: u32,
    /// CDC mode only.
    pub change_type: Option<u32>,
    pub change_sequence_number: Option<u32>,
}

impl ProtoSchema {
    /// For a table whose source columns map to `source` (in the reader's column order).
    pub fn new(source: &[BqField], cdc: bool) -> Self {
        let mut fields = source.to_vec();
        fields.extend(metadata_fields());
        if cdc {
            fields.extend(cdc_fields());
        }
        Self {
            descriptor: descriptor(&fields),
            fields,
            source_len: source.len(),
            cdc,
        }
    }

    pub fn descriptor(&self) -> &DescriptorProto {
        &self.descriptor
    }

    /// Every field, numbered from 1 in this order.
    pub fn fields(&self) -> &[BqField] {
        &self.fields
    }

    /// Whether rows of this layout carry CDC's pseudo-columns (they go to the default stream).
    pub fn is_cdc(&self) -> bool {
        self.cdc
    }

    /// The field number of source column `i`.
    pub fn source_tag(&self, i: usize) -> u32 {
        debug_assert!(i < self.source_len);
        i as u32 + 1
    }

    /// The source column `i`'s BigQuery type.
    pub fn source_type(&self, i: usize) -> BqType {
        self.fields[i].field_type
    }

    pub fn meta_tags(&self) -> MetaTags {
        let n = self.source_len as u32;
        MetaTags {
            op: n + 1,
            source_ts: n + 2,
            synced_at: n + 3,
            batch_id: n + 4,
            version_id: n + 5,
            change_type: self.cdc.then_some(n + 6),
            change_sequence_number: self.cdc.then_some(n + 7),
        }
    }

    /// The row's message as the JSON object insertAll would have taken (for a dead letter, or
    /// for insertAll when a table's write method changed under a slice), and its
    /// `_version_id`.
    pub fn to_json(&self, mut msg: &[u8]) -> Result<(Map<String, Value>, String), String> {
        let mut obj = Map::new();
        let bad = |e: prost::DecodeError| format!("undecodable row message: {e}");
        while !msg.is_empty() {
            let (tag, wt) = decode_key(&mut msg).map_err(bad)?;
            let f = tag
                .checked_sub(1)
                .and_then(|i| self.fields.get(i as usize))
                .ok_or_else(|| format!("row message has field {tag}, not in its schema"))?;
            let v = decode_value(f.field_type, wt, &mut msg)?;
            if f.mode == FieldMode::Repeated {
                let arr = obj.entry(f.name.clone()).or_insert(Value::Array(vec![]));
                if let Value::Array(a) = arr {
                    a.push(v);
                }
            } else {
                obj.insert(f.name.clone(), v);
            }
        }
        let version = obj
            .get(crate::mapping::META_VERSION_ID)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Ok((obj, version))
    }
}

fn decode_value(t: BqType, wt: WireType, msg: &mut &[u8]) -> Result<Value, String> {
    let bad = |e: prost::DecodeError| format!("undecodable {} value: {e}", t.as_str());
    let expect = |want: WireType| {
        (wt == want)
            .then_some(())
            .ok_or_else(|| format!("{} value sent as {wt:?}", t.as_str()))
    };
    Ok(match t {
        BqType::Int64 => {
            expect(WireType::Varint)?;
            Value::String((decode_varint(msg).map_err(bad)? as i64).to_string())
        }
        BqType::Timestamp => {
            expect(WireType::Varint)?;
            let us = decode_varint(msg).map_err(bad)? as i64;
            let t = chrono::DateTime::from_timestamp_micros(us)
                .ok_or_else(|| format!("TIMESTAMP {us} µs is out of range"))?;
            Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        }
        BqType::Date => {
            expect(WireType::Varint)?;
            let days = decode_varint(msg).map_err(bad)? as i32;
            let d = chrono::NaiveDate::from_num_days_from_ce_opt(days + UNIX_EPOCH_DAYS_FROM_CE)
                .ok_or_else(|| format!("DATE {days} is out of range"))?;
            Value::String(d.format("%Y-%m-%d").to_string())
        }
        BqType::Bool => {
            expect(WireType::Varint)?;
            Value::Bool(decode_varint(msg).map_err(bad)? != 0)
        }
        BqType::Float64 => {
            expect(WireType::SixtyFourBit)?;
            let mut f = 0f64;
            double::merge(wt, &mut f, msg, Default::default()).map_err(bad)?;
            serde_json::Number::from_f64(f)
                .map_or_else(|| Value::String(non_finite(f).into()), Value::Number)
        }
        BqType::Bytes => {
            expect(WireType::LengthDelimited)?;
            let mut b = Vec::new();
            pbytes::merge(wt, &mut b, msg, Default::default()).map_err(bad)?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        _ => {
            expect(WireType::LengthDelimited)?;
            let mut s = String::new();
            string::merge(wt, &mut s, msg, Default::default()).map_err(bad)?;
            Value::String(s)
        }
    })
}

fn non_finite(f: f64) -> &'static str {
    match f {
        f if f.is_nan() => "NaN",
        f if f > 0.0 => "Infinity",
        _ => "-Infinity",
    }
}

/// Append field `tag` of BigQuery type `bq` from a non-NULL binary Postgres value decoded with
/// `wire` (every non-NULL element of it, for an array). An error names what is wrong with the
/// value, not the column (the caller knows it).
pub fn encode_binary(
    tag: u32,
    bq: BqType,
    wire: Wire,
    array: bool,
    v: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    if !array {
        return encode_scalar(tag, bq, wire, v, buf);
    }
    for e in wire::array_elements(wire, v).map_err(|e| e.to_string())? {
        encode_scalar(tag, bq, wire, e, buf)?;
    }
    Ok(())
}

fn be<const N: usize>(v: &[u8], wire: Wire) -> Result<[u8; N], String> {
    v.try_into()
        .map_err(|_| format!("malformed binary {wire:?} value ({} bytes)", v.len()))
}

fn utf8(v: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(v).map_err(|_| "value is not valid UTF-8".to_string())
}

fn encode_scalar(
    tag: u32,
    bq: BqType,
    wire: Wire,
    v: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    match (bq, wire) {
        (BqType::Int64, Wire::Int2) => {
            int64::encode(tag, &i16::from_be_bytes(be(v, wire)?).into(), buf)
        }
        (BqType::Int64, Wire::Int4) => {
            int64::encode(tag, &i32::from_be_bytes(be(v, wire)?).into(), buf)
        }
        (BqType::Int64, Wire::Int8) => int64::encode(tag, &i64::from_be_bytes(be(v, wire)?), buf),
        (BqType::Int64, Wire::Oid) => {
            int64::encode(tag, &u32::from_be_bytes(be(v, wire)?).into(), buf)
        }
        (BqType::Float64, Wire::Float4) => {
            double::encode(tag, &f32_as_f64(f32::from_be_bytes(be(v, wire)?)), buf)
        }
        (BqType::Float64, Wire::Float8) => {
            double::encode(tag, &f64::from_be_bytes(be(v, wire)?), buf)
        }
        (BqType::Bool, Wire::Bool) => pbool::encode(tag, &(be::<1>(v, wire)?[0] != 0), buf),
        (BqType::Bytes, Wire::Bytea) => encode_bytes(tag, v, buf),
        (BqType::Numeric | BqType::BigNumeric, Wire::Numeric) => {
            let mut s = String::with_capacity(24);
            wire::numeric(v, &mut s)
                .ok_or_else(|| format!("malformed binary numeric ({} bytes)", v.len()))?;
            let (int, frac, name) = match bq {
                BqType::Numeric => (29, 9, "NUMERIC"),
                _ => (38, 38, "BIGNUMERIC"),
            };
            check_decimal(&s, int, frac, name)?;
            string::encode(tag, &s, buf);
        }
        (BqType::Date, Wire::Date) => {
            let days = i64::from(i32::from_be_bytes(be(v, wire)?)) + PG_EPOCH_UNIX_DAYS;
            if !DATE_DAYS.contains(&days) {
                return Err(format!("{} is outside DATE's range", pg_text(wire, v)));
            }
            int32::encode(tag, &(days as i32), buf);
        }
        (BqType::Timestamp, Wire::Timestamptz) => {
            let us = i64::from_be_bytes(be(v, wire)?).checked_add(PG_EPOCH_UNIX_MICROS);
            match us.filter(|us| TIMESTAMP_MICROS.contains(us)) {
                Some(us) => int64::encode(tag, &us, buf),
                None => return Err(format!("{} is outside TIMESTAMP's range", pg_text(wire, v))),
            }
        }
        (BqType::DateTime, Wire::Timestamp) => {
            let us = i64::from_be_bytes(be(v, wire)?);
            if !us
                .checked_add(PG_EPOCH_UNIX_MICROS)
                .is_some_and(|u| TIMESTAMP_MICROS.contains(&u))
            {
                return Err(format!("{} is outside DATETIME's range", pg_text(wire, v)));
            }
            let mut s = String::with_capacity(26);
            wire::timestamp(us, 'T', "", &mut s).ok_or("malformed binary timestamp")?;
            string::encode(tag, &s, buf);
        }
        (BqType::Time, Wire::Time) => {
            let us = i64::from_be_bytes(be(v, wire)?);
            if !(0..USECS_PER_DAY).contains(&us) {
                // Postgres allows 24:00:00; BigQuery's TIME ends before it.
                return Err("24:00:00 is outside TIME's range".into());
            }
            let mut s = String::with_capacity(15);
            wire::time(us, &mut s);
            string::encode(tag, &s, buf);
        }
        (BqType::String, Wire::Uuid) => string::encode(tag, &pg_text(wire, v), buf),
        (BqType::String | BqType::Json, Wire::Text | Wire::Json) => encode_str(tag, utf8(v)?, buf),
        (BqType::Json, Wire::Jsonb) => match v.split_first() {
            // Version 1 is the only binary jsonb format: the document as text follows.
            Some((1, doc)) => encode_str(tag, utf8(doc)?, buf),
            _ => return Err("malformed binary jsonb value".into()),
        },
        (bq, wire) => {
            return Err(format!(
                "a {wire:?} value cannot be sent as {} here",
                bq.as_str()
            ))
        }
    }
    Ok(())
}

/// A `real` as the double its shortest text reads as (1.1, not 1.100000023841858): what the
/// JSON path sends, so a value is the same in BigQuery whichever way it was written.
fn f32_as_f64(f: f32) -> f64 {
    if !f.is_finite() {
        return f.into();
    }
    ryu::Buffer::new()
        .format_finite(f)
        .parse()
        .unwrap_or(f.into())
}

/// The value as Postgres prints it, for messages (`infinity`, `0044-03-15 BC`).
fn pg_text(wire: Wire, v: &[u8]) -> String {
    let mut s = String::new();
    match wire::pg_text(wire, v, &mut s) {
        Ok(()) => s,
        Err(e) => e.to_string(),
    }
}

/// Append a STRING (or text-typed) field.
pub fn encode_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
    encode_bytes(tag, s.as_bytes(), buf);
}

/// A length-delimited field from a borrowed slice (prost's own encoder wants an owned one).
fn encode_bytes(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(b.len() as u64, buf);
    buf.extend_from_slice(b);
}

/// Append a TIMESTAMP field from microseconds since the Unix epoch.
pub fn encode_micros(tag: u32, us: i64, buf: &mut Vec<u8>) {
    int64::encode(tag, &us, buf);
}

/// Check a plain decimal literal (`-12.5`): at most `int_digits` digits before the point and
/// `frac_digits` after, what NUMERIC (29, 9) and BIGNUMERIC (38, 38) hold. `NaN` and the
/// infinities are refused.
pub fn check_decimal(
    s: &str,
    int_digits: usize,
    frac_digits: usize,
    name: &str,
) -> Result<(), String> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !all_digits(int) || !all_digits(frac) {
        return Err(format!("{s:?} is not a {name}"));
    }
    if int.trim_start_matches('0').len() > int_digits || frac.len() > frac_digits {
        return Err(format!("{s:?} is outside {name}'s precision"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, t: BqType, mode: FieldMode) -> BqField {
        BqField {
            name: name.into(),
            field_type: t,
            mode,
        }
    }

    /// A binary array of int4 `[[1, NULL], [3, 4]]`.
    fn int4_array(items: &[Option<i32>], dims: &[i32]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((dims.len() as i32).to_be_bytes());
        v.extend(1i32.to_be_bytes());
        v.extend(23i32.to_be_bytes());
        for d in dims {
            v.extend(d.to_be_bytes());
            v.extend(1i32.to_be_bytes());
        }
        for i in items {
            match i {
                Some(n) => {
                    v.extend(4i32.to_be_bytes());
                    v.extend(n.to_be_bytes());
                }
                None => v.extend((-1i32).to_be_bytes()),
            }
        }
        v
    }

    fn schema() -> ProtoSchema {
        ProtoSchema::new(
            &[
                f("id", BqType::Int64, FieldMode::Nullable),
                f("at", BqType::Timestamp, FieldMode::Nullable),
                f("day", BqType::Date, FieldMode::Nullable),
                f("nums", BqType::Int64, FieldMode::Repeated),
                f("amount", BqType::Numeric, FieldMode::Nullable),
                f("blob", BqType::Bytes, FieldMode::Nullable),
                f("score", BqType::Float64, FieldMode::Nullable),
                f("doc", BqType::Json, FieldMode::Nullable),
                f("t", BqType::Time, FieldMode::Nullable),
                f("local", BqType::DateTime, FieldMode::Nullable),
            ],
            false,
        )
    }

    fn enc(
        s: &ProtoSchema,
        i: usize,
        wire: Wire,
        array: bool,
        v: &[u8],
    ) -> Result<Vec<u8>, String> {
        let mut buf = Vec::new();
        encode_binary(s.source_tag(i), s.source_type(i), wire, array, v, &mut buf)?;
        Ok(buf)
    }

    #[test]
    fn binary_values_encode_and_read_back_as_their_json() {
        let s = schema();
        let mut row = Vec::new();
        for (i, wire, array, v) in [
            (0, Wire::Int8, false, (-7i64).to_be_bytes().to_vec()),
            // 2000-01-01T00:00:01.5Z
            (
                1,
                Wire::Timestamptz,
                false,
                1_500_000i64.to_be_bytes().to_vec(),
            ),
            (2, Wire::Date, false, (-10_957i32).to_be_bytes().to_vec()),
            (
                3,
                Wire::Int4,
                true,
                int4_array(&[Some(1), None, Some(3), Some(4)], &[2, 2]),
            ),
            // 12.50: ndigits 2, weight 0, sign +, dscale 2, digits 12 5000
            (
                4,
                Wire::Numeric,
                false,
                [0, 2, 0, 0, 0, 0, 0, 2, 0, 12, 0x13, 0x88].to_vec(),
            ),
            (5, Wire::Bytea, false, vec![1, 2, 255]),
            (6, Wire::Float4, false, 1.1f32.to_be_bytes().to_vec()),
            (7, Wire::Jsonb, false, b"\x01{\"a\": 1}".to_vec()),
            (
                8,
                Wire::Time,
                false,
                3_723_000_001i64.to_be_bytes().to_vec(),
            ),
            (9, Wire::Timestamp, false, 0i64.to_be_bytes().to_vec()),
        ] {
            row.extend(enc(&s, i, wire, array, &v).unwrap());
        }
        let m = s.meta_tags();
        encode_str(m.version_id, "v1", &mut row);
        encode_micros(m.synced_at, 0, &mut row);
        let (json, version) = s.to_json(&row).unwrap();
        assert_eq!(version, "v1");
        assert_eq!(
            Value::Object(json),
            serde_json::json!({
                "id": "-7",
                "at": "2000-01-01T00:00:01.500000Z",
                "day": "1970-01-01",
                "nums": ["1", "3", "4"],
                "amount": "12.50",
                "blob": "AQL/",
                "score": 1.1,
                "doc": "{\"a\": 1}",
                "t": "01:02:03.000001",
                "local": "2000-01-01T00:00:00",
                "_version_id": "v1",
                "_synced_at": "1970-01-01T00:00:00.000000Z",
            })
        );
    }

    #[test]
    fn values_bigquery_cannot_hold_are_refused() {
        let s = schema();
        let cases: [(usize, Wire, Vec<u8>, &str); 6] = [
            (
                1,
                Wire::Timestamptz,
                i64::MAX.to_be_bytes().to_vec(),
                "infinity is outside TIMESTAMP",
            ),
            (
                2,
                Wire::Date,
                i32::MIN.to_be_bytes().to_vec(),
                "-infinity is outside DATE",
            ),
            // 0044-03-15 BC
            (
                2,
                Wire::Date,
                (-747_021i32).to_be_bytes().to_vec(),
                "BC is outside DATE",
            ),
            // NaN: sign 0xC000
            (
                4,
                Wire::Numeric,
                [0, 0, 0, 0, 0xC0, 0, 0, 0].to_vec(),
                "\"NaN\" is not a NUMERIC",
            ),
            (
                8,
                Wire::Time,
                USECS_PER_DAY.to_be_bytes().to_vec(),
                "24:00:00",
            ),
            (0, Wire::Text, b"7".to_vec(), "cannot be sent as INT64"),
        ];
        for (i, wire, v, needle) in cases {
            let e = enc(&s, i, wire, false, &v).unwrap_err();
            assert!(e.contains(needle), "{wire:?}: {e}");
        }
        // 10^30: 31 integer digits.
        let big = [0, 1, 0, 7, 0, 0, 0, 0, 0, 100].to_vec();
        assert!(enc(&s, 4, Wire::Numeric, false, &big)
            .unwrap_err()
            .contains("precision"));
    }

    #[test]
    fn metadata_and_cdc_tags_follow_the_source_columns() {
        let plain = ProtoSchema::new(&[f("id", BqType::Int64, FieldMode::Nullable)], false);
        let m = plain.meta_tags();
        assert_eq!((m.op, m.version_id, m.change_type), (2, 6, None));
        let names: Vec<_> = plain
            .descriptor()
            .field
            .iter()
            .map(|f| f.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "id",
                "_op",
                "_source_ts",
                "_synced_at",
                "_batch_id",
                "_version_id"
            ]
        );
        let cdc = ProtoSchema::new(&[f("id", BqType::Int64, FieldMode::Nullable)], true);
        assert_eq!(cdc.meta_tags().change_sequence_number, Some(8));
        assert_eq!(
            cdc.descriptor().field[7].name.as_deref(),
            Some(cdc::CHANGE_SEQUENCE_NUMBER)
        );
        assert!(cdc.is_cdc() && !plain.is_cdc());
    }

    #[test]
    fn decimals_within_precision_pass() {
        assert!(check_decimal("-0.05", 29, 9, "N").is_ok());
        assert!(check_decimal("1.0000000001", 29, 9, "N").is_err());
        assert!(check_decimal("00012", 2, 0, "N").is_ok());
        assert!(check_decimal("-.5", 29, 9, "N").is_err());
    }
}
