//! The Storage Write API way of writing a slice (`--write-api storage`).
//!
//! A slice's batch is one pending stream per table schema (usually one): its chunks are
//! appended at explicit offsets, and the stream is finalized (its row count checked against
//! what was appended) and committed when the slice lists its batch. The commit is the
//! visibility point: a slice that dies before it leaves nothing in the table, and an append
//! repeated after its answer was lost finds its offset written (`ALREADY_EXISTS`) instead of
//! writing the rows twice. Nothing goes into `_sync_batches_<table>`: the views show batches whose id
//! starts with `w` as they are, so there is no second step a failure could separate from the
//! commit.
//!
//! CDC-mode rows (they end with `_CHANGE_SEQUENCE_NUMBER`, see [`is_cdc_payload`]) go to the
//! table's default stream instead, with the pseudo-columns in their descriptor: BigQuery
//! applies them by primary key and sequence number, so there is no batch to commit.
//!
//! Tables, views and the dataset are created through the REST client (the Storage Write API
//! has no DDL).

mod encode;
pub mod grpc;

pub use encode::RowEncoder;
pub use grpc::{channel, GOOGLE_STORAGE_URL};

use crate::client::BigQuery;
use crate::error::BqError;
use crate::schema::{table_fields, SchemaChange};
use crate::sink::{InsertOutcome, RowError, Sink, TableDef};
use grpc::{Appended, WriteClient};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tenantsync_core::mapping::{BqField, BqType, FieldMode};
use tenantsync_core::proto::ProtoSchema;
use tenantsync_core::Payload;
use tonic::transport::Channel;

/// A batch's streams: the one being appended to (name, next offset), and the ones finalized
/// because the table's schema changed under them. All are committed together.
#[derive(Debug)]
struct Batch {
    table: String,
    open: Option<(String, i64)>,
    finalized: Vec<String>,
    started: Instant,
    /// Why this batch can never be committed (its stream does not hold what was appended).
    poisoned: Option<String>,
}

/// Batches never committed (their slice failed or died) are forgotten after this long; their
/// pending streams are never committed, so their rows never appear.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// One tenant's dataset, written through the Storage Write API.
pub struct StorageSink {
    rest: Arc<BigQuery>,
    write: WriteClient,
    /// Per table: the row encoder of its current schema.
    encoders: Mutex<HashMap<String, Arc<RowEncoder>>>,
    /// Per batch id: its streams. A batch is one slice, so its appends come one at a time.
    batches: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Batch>>>>,
    /// Tables this sink wrote CDC rows to (default stream; no batch to commit).
    cdc_tables: Mutex<HashSet<String>>,
}

/// Whether a payload is a CDC row: its JSON object ends with the `_CHANGE_SEQUENCE_NUMBER`
/// the worker appends last (so a source value cannot be mistaken for it: anything before the
/// metadata columns is followed by them).
pub fn is_cdc_payload(row: &str) -> bool {
    let Some((_, tail)) = row.rsplit_once(",\"_CHANGE_SEQUENCE_NUMBER\":\"") else {
        return false;
    };
    tail.strip_suffix("\"}}")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_hexdigit() || b == b'/'))
}

/// The layout of the rows' messages, when any row came encoded by the reader (one slice's rows
/// share their plan's layout).
fn message_schema<'a>(rows: &[&'a Payload]) -> Option<&'a Arc<ProtoSchema>> {
    rows.iter().find_map(|r| match r {
        Payload::Proto { schema, .. } => Some(schema),
        Payload::Json(_) => None,
    })
}

/// The encoder cache's key of a table's rows, plain or with CDC pseudo-columns.
fn encoder_key(table: &str, cdc: bool) -> String {
    if cdc {
        format!("{table}\0cdc")
    } else {
        table.to_string()
    }
}

impl StorageSink {
    /// `rest` is the tenant's REST client (its token source is shared); `channel` the
    /// process's channel to the Storage Write endpoint.
    pub fn new(rest: Arc<BigQuery>, channel: Channel) -> Self {
        let write = WriteClient::new(channel, rest.tokens().clone());
        Self {
            rest,
            write,
            encoders: Mutex::default(),
            batches: Mutex::default(),
            cdc_tables: Mutex::default(),
        }
    }

    /// The REST client this sink was built on.
    pub fn rest(&self) -> &Arc<BigQuery> {
        &self.rest
    }

    fn table_path(&self, table: &str) -> String {
        format!(
            "projects/{}/datasets/{}/tables/{table}",
            self.rest.project(),
            self.rest.dataset()
        )
    }

    /// The encoder of `table`'s current schema: cached, or built from the table's schema as
    /// BigQuery has it (a process that did not create the table).
    async fn encoder(&self, table: &str, cdc: bool) -> Result<Arc<RowEncoder>, BqError> {
        let key = encoder_key(table, cdc);
        if let Some(e) = self.encoders.lock().expect("encoders").get(&key) {
            return Ok(e.clone());
        }
        let schema = self
            .rest
            .table_schema(table)
            .await?
            .ok_or_else(|| BqError::NotFound(format!("table {table}")))?;
        let fields: Vec<BqField> = schema.iter().filter_map(field_of).collect();
        let e = Arc::new(if cdc {
            RowEncoder::with_cdc(&fields)
        } else {
            RowEncoder::new(&fields)
        });
        self.set_encoder(&key, e.clone());
        Ok(e)
    }

    fn set_encoder(&self, table: &str, e: Arc<RowEncoder>) {
        self.encoders
            .lock()
            .expect("encoders")
            .insert(table.to_string(), e);
    }

    /// The batch's state, made at its first append (when abandoned ones are dropped: not on
    /// every append).
    fn batch(&self, table: &str, batch_id: &str) -> Arc<tokio::sync::Mutex<Batch>> {
        let mut batches = self.batches.lock().expect("batches");
        if let Some(b) = batches.get(batch_id) {
            return b.clone();
        }
        batches.retain(|_, b| {
            b.try_lock()
                .map_or(true, |b| b.started.elapsed() < ABANDONED_AFTER)
        });
        let b = Arc::new(tokio::sync::Mutex::new(Batch {
            table: table.to_string(),
            open: None,
            finalized: Vec::new(),
            started: Instant::now(),
            poisoned: None,
        }));
        batches.insert(batch_id.to_string(), b.clone());
        b
    }

    /// The table's schema changed: the open streams of its batches were created for the old
    /// one, so they are finalized and new appends go to new streams (committed with them).
    async fn schema_changed(&self, table: &str) -> Result<(), BqError> {
        let batches: Vec<_> = self
            .batches
            .lock()
            .expect("batches")
            .values()
            .cloned()
            .collect();
        for b in batches {
            let mut b = b.lock().await;
            if b.table != table {
                continue;
            }
            if let Some((name, _)) = b.open.take() {
                self.write.finalize(&name).await?;
                b.finalized.push(name);
            }
        }
        Ok(())
    }

    /// CDC rows go to the table's default stream, no offset: BigQuery applies them by key and
    /// sequence number, so a repeated append (its answer lost) writes rows that change nothing.
    async fn append_default(
        &self,
        table: &str,
        enc: &RowEncoder,
        rows: Vec<Vec<u8>>,
    ) -> Result<InsertOutcome, BqError> {
        self.cdc_tables
            .lock()
            .expect("cdc tables")
            .insert(table.to_string());
        let stream = format!("{}/streams/_default", self.table_path(table));
        match self
            .write
            .append(&stream, None, enc.descriptor(), rows)
            .await?
        {
            Appended::Ok | Appended::AlreadyWritten => Ok(InsertOutcome::default()),
            Appended::RowErrors(errors) => Ok(row_errors(errors)),
        }
    }

    /// Append `rows` to the batch's open stream at its next offset.
    async fn append_pending(
        &self,
        table: &str,
        batch_id: &str,
        enc: &RowEncoder,
        rows: Vec<Vec<u8>>,
    ) -> Result<InsertOutcome, BqError> {
        let batch = self.batch(table, batch_id);
        let mut b = batch.lock().await;
        if b.open.is_none() {
            let name = self.write.create_pending(&self.table_path(table)).await?;
            b.open = Some((name, 0));
        }
        let (name, offset) = b.open.clone().expect("opened above");
        let n = rows.len() as i64;
        match self
            .write
            .append(&name, Some(offset), enc.descriptor(), rows)
            .await?
        {
            Appended::Ok | Appended::AlreadyWritten => {
                b.open = Some((name, offset + n));
                Ok(InsertOutcome::default())
            }
            Appended::RowErrors(errors) => Ok(row_errors(errors)),
        }
    }

    /// Finalize and commit the batch's streams, checking that each holds what was appended,
    /// then forget the batch. Safe to repeat after any failure: the batch's state changes only
    /// once a step is done, and a commit whose answer was lost is recognised by the streams'
    /// commit times.
    async fn commit_batch(&self, table: &str, batch_id: &str, rows: i64) -> Result<(), BqError> {
        let found = self.batches.lock().expect("batches").get(batch_id).cloned();
        let Some(batch) = found else {
            if rows > 0 {
                // Never expected: listing the batch would move the watermark past rows that
                // no stream holds.
                return Err(BqError::Invalid(format!(
                    "batch {batch_id} has {rows} rows but no stream in this process; not listed"
                )));
            }
            return Ok(()); // every row of the slice was dead-lettered: nothing appended
        };
        let mut b = batch.lock().await;
        // Transient for the task: its next slice sends the rows again in a new stream.
        if let Some(reason) = &b.poisoned {
            return Err(BqError::Transient(reason.clone()));
        }
        if let Some((name, appended)) = b.open.clone() {
            let count = self.write.finalize(&name).await?;
            if count != appended {
                // An append was lost or doubled: commit nothing; the slice fails and its rows
                // are sent again in a new batch.
                let reason = format!(
                    "stream of batch {batch_id} holds {count} rows where {appended} were appended; not committed"
                );
                b.poisoned = Some(reason.clone());
                return Err(BqError::Transient(reason));
            }
            b.open = None;
            b.finalized.push(name);
        }
        if !b.finalized.is_empty() {
            let path = self.table_path(table);
            if let Err(e) = self.write.commit(&path, b.finalized.clone()).await {
                if !self.write.all_committed(&b.finalized).await {
                    return Err(e);
                }
            }
        }
        drop(b);
        self.batches.lock().expect("batches").remove(batch_id);
        Ok(())
    }
}

/// The emulator and Google both number refused rows by their index in the request.
fn row_errors(errors: Vec<grpc::pb::RowError>) -> InsertOutcome {
    InsertOutcome {
        row_errors: errors
            .into_iter()
            .map(|e| RowError {
                index: e.index.max(0) as usize,
                reason: "invalid".into(),
                message: e.message,
            })
            .collect(),
    }
}

/// A REST schema field as tenantsync's field (legacy type names included).
fn field_of(v: &Value) -> Option<BqField> {
    Some(BqField {
        name: v["name"].as_str()?.to_string(),
        field_type: BqType::parse(v["type"].as_str()?)?,
        mode: match v["mode"].as_str() {
            Some("REPEATED") => FieldMode::Repeated,
            Some("REQUIRED") => FieldMode::Required,
            _ => FieldMode::Nullable,
        },
    })
}

impl Sink for StorageSink {
    fn dataset(&self) -> &str {
        self.rest.dataset()
    }

    fn write_api(&self) -> tenantsync_core::WriteApi {
        tenantsync_core::WriteApi::Storage
    }

    async fn ensure_dataset(&self) -> Result<bool, BqError> {
        self.rest.ensure_dataset().await
    }

    async fn ensure_table(&self, def: &TableDef<'_>) -> Result<SchemaChange, BqError> {
        let change = Sink::ensure_table(&*self.rest, def).await?;
        let fields = table_fields(def.fields);
        self.set_encoder(def.table, Arc::new(RowEncoder::new(&fields)));
        self.set_encoder(
            &encoder_key(def.table, true),
            Arc::new(RowEncoder::with_cdc(&fields)),
        );
        if change != SchemaChange::Unchanged {
            self.schema_changed(def.table).await?;
        }
        Ok(change)
    }

    /// Rows encoded by the reader go as they are, in their own layout; JSON rows (a value the
    /// reader could not encode, dead-letter retries, repairs) are encoded here, which refuses
    /// what BigQuery would (a row error naming the column, before anything is sent).
    async fn append(
        &self,
        table: &str,
        batch_id: &str,
        rows: &[&Payload],
    ) -> Result<InsertOutcome, BqError> {
        let (enc, cdc) = match message_schema(rows) {
            Some(schema) => (Arc::new(RowEncoder::of_schema(schema)), schema.is_cdc()),
            None => {
                let cdc = rows
                    .first()
                    .is_some_and(|r| matches!(r, Payload::Json(j) if is_cdc_payload(j)));
                (self.encoder(table, cdc).await?, cdc)
            }
        };
        match enc.encode_payloads(rows) {
            Ok(encoded) if cdc => self.append_default(table, &enc, encoded).await,
            Ok(encoded) => self.append_pending(table, batch_id, &enc, encoded).await,
            Err(row_errors) => Ok(InsertOutcome { row_errors }),
        }
    }

    /// Commit the slice's batch (the last of `batch_ids`; earlier ones were never written
    /// through this sink). Nothing is listed in `_sync_batches_<table>`: the views show Storage Write
    /// batches by their id's prefix, so the commit is the one step that makes rows visible.
    async fn list_batches(
        &self,
        table: &str,
        batch_ids: &[String],
        rows: i64,
    ) -> Result<InsertOutcome, BqError> {
        if self.cdc_tables.lock().expect("cdc tables").contains(table) {
            // CDC rows were applied as they were appended: nothing to commit or list.
            return Ok(InsertOutcome::default());
        }
        if let Some(current) = batch_ids.last() {
            self.commit_batch(table, current, rows).await?;
        }
        Ok(InsertOutcome::default())
    }
}

#[cfg(test)]
mod cdc_tests {
    use super::*;

    #[test]
    fn cdc_payloads_are_told_by_their_last_column() {
        let cdc = r#"{"insertId":"x","json":{"id":1,"_version_id":"x","_CHANGE_TYPE":"DELETE","_CHANGE_SEQUENCE_NUMBER":"80000000000000AB/8000000000000001"}}"#;
        assert!(is_cdc_payload(cdc));
        // A source value spelling the column is not the column: it is not last.
        let plain = r#"{"insertId":"x","json":{"note":",\"_CHANGE_SEQUENCE_NUMBER\":\"1\"}}","_version_id":"x"}}"#;
        assert!(!is_cdc_payload(plain));
        assert!(!is_cdc_payload(r#"{"insertId":"x","json":{"id":1}}"#));
    }

    #[test]
    fn cdc_encoder_carries_the_pseudo_columns() {
        let fields = [BqField {
            name: "id".into(),
            field_type: BqType::Int64,
            mode: FieldMode::Required,
        }];
        let e = RowEncoder::with_cdc(&fields);
        let names: Vec<_> = e
            .descriptor()
            .field
            .iter()
            .filter_map(|f| f.name.clone())
            .collect();
        assert_eq!(names, ["id", "_CHANGE_TYPE", "_CHANGE_SEQUENCE_NUMBER"]);
        let row = r#"{"insertId":"x","json":{"id":"7","_CHANGE_TYPE":"UPSERT","_CHANGE_SEQUENCE_NUMBER":"A/0"}}"#;
        assert!(e.encode(row).is_ok());
        assert!(RowEncoder::new(&fields).encode(row).is_err());
    }

    #[test]
    fn cdc_table_resource_has_primary_key_and_interval_staleness() {
        let r = crate::client::cdc_table_resource(&["a".into(), "b".into()], 3725);
        assert_eq!(
            r["tableConstraints"]["primaryKey"]["columns"],
            serde_json::json!(["a", "b"])
        );
        assert_eq!(r["maxStaleness"], "0-0 0 1:2:5");
    }
}
