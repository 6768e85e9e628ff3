//! Rows given as insertAll JSON (`{"insertId":…,"json":{…}}`), as protobuf messages.
//!
//! A slice's rows come encoded from the binary Postgres values already
//! ([`tenantsync_core::proto`]); JSON rows reach this sink when a row's value failed that
//! encoding (this encoder then refuses it naming the column: a dead letter), when a dead
//! letter is retried, and when `verify` repairs rows. Every value is checked against its
//! column's type and BigQuery's ranges here too, before anything is sent: a pending stream's
//! rows are only validated at its commit by the local BigQuery, which then drops the whole
//! batch while answering success, so a bad value must never reach a stream.

use crate::sink::RowError;
use base64::Engine;
use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime};
use prost::encoding::{bool as pbool, bytes as pbytes, double, int32, int64, string};
use prost_types::DescriptorProto;
use serde_json::Value;
use std::collections::HashMap;
use tenantsync_core::mapping::{BqField, BqType, FieldMode};
use tenantsync_core::proto::{self, check_decimal, ProtoSchema, DATE_DAYS, TIMESTAMP_MICROS};
use tenantsync_core::Payload;

#[derive(Debug, Clone)]
struct Column {
    tag: u32,
    field_type: BqType,
    repeated: bool,
}

/// The descriptor of one table's rows, and the encoder of its rows.
#[derive(Debug, Clone)]
pub struct RowEncoder {
    descriptor: DescriptorProto,
    /// By lowercased name: BigQuery column names are case-insensitive.
    columns: HashMap<String, Column>,
}

/// A JSON payload's row, borrowed from its text.
#[derive(serde::Deserialize)]
struct JsonRow<'a> {
    #[serde(borrow)]
    json: HashMap<&'a str, Value>,
}

impl RowEncoder {
    /// From the table's full schema (source columns and metadata columns).
    pub fn new(fields: &[BqField]) -> Self {
        let columns = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let col = Column {
                    tag: i as u32 + 1,
                    field_type: f.field_type,
                    repeated: f.mode == FieldMode::Repeated,
                };
                (f.name.to_ascii_lowercase(), col)
            })
            .collect();
        Self {
            descriptor: proto::descriptor(fields),
            columns,
        }
    }

    /// For a CDC table: its schema plus the pseudo-columns `_CHANGE_TYPE` and
    /// `_CHANGE_SEQUENCE_NUMBER` (STRING), which BigQuery reads from the default stream's rows
    /// and does not store.
    pub fn with_cdc(fields: &[BqField]) -> Self {
        let mut all = fields.to_vec();
        for f in proto::cdc_fields() {
            if !all.iter().any(|a| a.name.eq_ignore_ascii_case(&f.name)) {
                all.push(f);
            }
        }
        Self::new(&all)
    }

    /// The encoder of rows in a reader's message layout: its messages go as they are, and
    /// JSON rows next to them are encoded with the same field numbers.
    pub fn of_schema(schema: &ProtoSchema) -> Self {
        Self::new(schema.fields())
    }

    pub fn descriptor(&self) -> &DescriptorProto {
        &self.descriptor
    }

    /// Every row as a protobuf message: messages as they are (in this encoder's layout: see
    /// [`Self::of_schema`]), JSON rows encoded; or which rows cannot be.
    pub fn encode_payloads(&self, rows: &[&Payload]) -> Result<Vec<Vec<u8>>, Vec<RowError>> {
        let mut out = Vec::with_capacity(rows.len());
        let mut errors = Vec::new();
        for (index, r) in rows.iter().enumerate() {
            let encoded = match r {
                Payload::Proto { bytes, .. } => Ok(bytes.clone()),
                Payload::Json(json) => self.encode(json),
            };
            match encoded {
                Ok(b) => out.push(b),
                Err(message) => errors.push(RowError {
                    index,
                    reason: "invalid".into(),
                    message,
                }),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// One payload as a protobuf message.
    pub fn encode(&self, payload: &str) -> Result<Vec<u8>, String> {
        let p: JsonRow<'_> =
            serde_json::from_str(payload).map_err(|e| format!("row is not a JSON object: {e}"))?;
        let mut buf = Vec::with_capacity(payload.len());
        for (name, v) in &p.json {
            let col = self
                .columns
                .get(&name.to_ascii_lowercase())
                .ok_or_else(|| format!("no such field: {name}"))?;
            let bad = |e: String| format!("field {name}: {e}");
            match (v, col.repeated) {
                (Value::Null, _) => {}
                (Value::Array(items), true) => {
                    for item in items.iter().filter(|v| !v.is_null()) {
                        encode_value(col, item, &mut buf).map_err(bad)?;
                    }
                }
                (_, true) => return Err(bad("an array is expected".into())),
                (v, false) => encode_value(col, v, &mut buf).map_err(bad)?,
            }
        }
        Ok(buf)
    }
}

fn encode_value(col: &Column, v: &Value, buf: &mut Vec<u8>) -> Result<(), String> {
    let tag = col.tag;
    match col.field_type {
        BqType::Int64 => int64::encode(tag, &as_i64(v)?, buf),
        BqType::Float64 => double::encode(tag, &as_f64(v)?, buf),
        BqType::Bool => match v {
            Value::Bool(b) => pbool::encode(tag, b, buf),
            _ => return Err(format!("{v} is not a BOOL")),
        },
        BqType::Bytes => {
            let s = v
                .as_str()
                .ok_or_else(|| format!("{v} is not base64 BYTES"))?;
            let b = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|_| format!("{s:?} is not base64 BYTES"))?;
            pbytes::encode(tag, &b, buf)
        }
        BqType::Timestamp => int64::encode(tag, &timestamp_micros(text(v)?)?, buf),
        BqType::Date => int32::encode(tag, &date_days(text(v)?)?, buf),
        BqType::Numeric => string::encode(tag, &decimal(text(v)?, 29, 9, "NUMERIC")?, buf),
        BqType::BigNumeric => string::encode(tag, &decimal(text(v)?, 38, 38, "BIGNUMERIC")?, buf),
        BqType::Time => {
            let s = text(v)?;
            NaiveTime::parse_from_str(s, "%H:%M:%S%.f")
                .map_err(|_| format!("{s:?} is not a TIME"))?;
            string::encode(tag, &s.to_string(), buf)
        }
        BqType::DateTime => {
            let s = text(v)?;
            let dt =
                NaiveDateTime::parse_from_str(&s.replacen(' ', "T", 1), "%Y-%m-%dT%H:%M:%S%.f")
                    .map_err(|_| format!("{s:?} is not a DATETIME"))?;
            if !(1..=9999).contains(&dt.year()) {
                return Err(format!("{s:?} is outside DATETIME's range"));
            }
            string::encode(tag, &s.to_string(), buf)
        }
        BqType::String => string::encode(tag, &text(v)?.to_string(), buf),
        BqType::Json => match v {
            Value::String(s) => string::encode(tag, s, buf),
            other => string::encode(tag, &other.to_string(), buf),
        },
    }
    Ok(())
}

/// A JSON string, or a number's text.
fn text(v: &Value) -> Result<&str, String> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(format!("{v} is not text")),
    }
}

fn as_i64(v: &Value) -> Result<i64, String> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("{v} is not an INT64"))
}

fn as_f64(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            s => s.parse().ok(),
        },
        _ => None,
    }
    .ok_or_else(|| format!("{v} is not a FLOAT64"))
}

/// Microseconds since the epoch of an RFC 3339 timestamp (`T` or a space between date and
/// time), within BigQuery's range.
fn timestamp_micros(s: &str) -> Result<i64, String> {
    let t = chrono::DateTime::parse_from_rfc3339(&s.replacen(' ', "T", 1))
        .map_err(|_| format!("{s:?} is not a TIMESTAMP"))?;
    let us = t.timestamp_micros();
    if TIMESTAMP_MICROS.contains(&us) {
        Ok(us)
    } else {
        Err(format!("{s:?} is outside TIMESTAMP's range"))
    }
}

/// Days since 1970-01-01 of `YYYY-MM-DD`, within BigQuery's range.
fn date_days(s: &str) -> Result<i32, String> {
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| format!("{s:?} is not a DATE"))?;
    let days = i64::from(d.num_days_from_ce() - proto::UNIX_EPOCH_DAYS_FROM_CE);
    if DATE_DAYS.contains(&days) {
        Ok(days as i32)
    } else {
        Err(format!("{s:?} is outside DATE's range"))
    }
}

/// A decimal literal within `int_digits` and `frac_digits` digits, as it is.
fn decimal(s: &str, int_digits: usize, frac_digits: usize, name: &str) -> Result<String, String> {
    check_decimal(s, int_digits, frac_digits, name).map(|()| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn f(name: &str, t: BqType, mode: FieldMode) -> BqField {
        BqField {
            name: name.into(),
            field_type: t,
            mode,
        }
    }

    /// A message with the same tags, decoded by prost, to check the bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Decoded {
        #[prost(int64, optional, tag = "1")]
        id: Option<i64>,
        #[prost(string, optional, tag = "2")]
        name: Option<String>,
        #[prost(int64, optional, tag = "3")]
        ts: Option<i64>,
        #[prost(int32, optional, tag = "4")]
        day: Option<i32>,
        #[prost(double, repeated, packed = "false", tag = "5")]
        scores: Vec<f64>,
        #[prost(bytes = "vec", optional, tag = "6")]
        blob: Option<Vec<u8>>,
    }

    fn encoder() -> RowEncoder {
        RowEncoder::new(&[
            f("id", BqType::Int64, FieldMode::Required),
            f("name", BqType::String, FieldMode::Nullable),
            f("ts", BqType::Timestamp, FieldMode::Nullable),
            f("day", BqType::Date, FieldMode::Nullable),
            f("scores", BqType::Float64, FieldMode::Repeated),
            f("blob", BqType::Bytes, FieldMode::Nullable),
            f("n", BqType::Numeric, FieldMode::Nullable),
            f("t", BqType::Time, FieldMode::Nullable),
        ])
    }

    #[test]
    fn encodes_values_as_the_descriptor_says() {
        let row = r#"{"insertId":"x","json":{"ID":"7","name":"a","ts":"1970-01-01T00:00:01.5+00:00",
            "day":"1970-01-03","scores":[1.5,null,"NaN"],"blob":"AQI=","n":null}}"#;
        let d = Decoded::decode(encoder().encode(row).unwrap().as_slice()).unwrap();
        assert_eq!(d.id, Some(7));
        assert_eq!(d.name.as_deref(), Some("a"));
        assert_eq!(d.ts, Some(1_500_000));
        assert_eq!(d.day, Some(2));
        assert_eq!(d.scores.len(), 2);
        assert!(d.scores[1].is_nan());
        assert_eq!(d.blob, Some(vec![1, 2]));
        let desc = encoder();
        let desc = desc.descriptor();
        assert_eq!(desc.field.len(), 8);
        assert_eq!(
            desc.field[4].label,
            Some(prost_types::field_descriptor_proto::Label::Repeated as i32)
        );
    }

    #[test]
    fn refuses_what_bigquery_would_refuse_naming_the_field() {
        let e = encoder();
        for (json, needle) in [
            (r#"{"id":"x"}"#, "field id"),
            (r#"{"nope":1}"#, "no such field: nope"),
            (r#"{"ts":"infinity"}"#, "TIMESTAMP"),
            (r#"{"ts":"0044-03-15T00:00:00+00:00 BC"}"#, "TIMESTAMP"),
            (r#"{"day":"10000-01-01"}"#, "DATE"),
            (r#"{"n":"NaN"}"#, "NUMERIC"),
            (r#"{"n":"123456789012345678901234567890"}"#, "precision"),
            (r#"{"t":"24:00:00"}"#, "TIME"),
            (r#"{"scores":1}"#, "array"),
            (r#"{"blob":"@@"}"#, "base64"),
        ] {
            let err = e
                .encode(&format!(r#"{{"insertId":"x","json":{json}}}"#))
                .unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
        let rows =
            [r#"{"json":{"id":"1"}}"#, r#"{"json":{"id":"z"}}"#].map(|r| Payload::Json(r.into()));
        let errs = e.encode_payloads(&[&rows[0], &rows[1]]).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].index, 1);
        assert_eq!(errs[0].reason, "invalid");
    }
}
