//! The seam between a worker's slice and a tenant's dataset: what a slice asks of BigQuery,
//! whatever the write method. The insertAll client ([`crate::BigQuery`]) implements it; a
//! BigQuery Storage Write API client can too: its appends also answer per-row errors, or fail
//! as a whole with an error that [`BqError`] classifies (retry after a wait, fix and retry,
//! give up, pause the tenant).

use crate::error::BqError;
use crate::schema::SchemaChange;
use crate::{BigQuery, StorageSink};
use std::future::Future;
use std::sync::Arc;
use tenantsync_core::mapping::BqField;
use tenantsync_core::{Mode, Payload, WriteApi};

/// A refused row of an append. `reason` is BigQuery's: `invalid` (or another cause) for the
/// offending rows, `stopped` for rows that were fine but not written because others in their
/// request were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// The row's position in the append's `rows`.
    pub index: usize,
    pub reason: String,
    pub message: String,
}

impl RowError {
    /// The row was not at fault: send it again.
    pub fn is_stopped(&self) -> bool {
        self.reason == "stopped"
    }
}

/// What an append that reached BigQuery did. With no row errors every row is written; with
/// any, none is: the rows not named as at fault (named `stopped` by insertAll, or not named at
/// all by a write method that only lists the offenders) must be sent again.
#[derive(Debug, Clone, Default)]
pub struct InsertOutcome {
    pub row_errors: Vec<RowError>,
}

/// One synced table as a sink keeps it: the table of row versions (source columns plus the
/// metadata columns the sink adds) and how it is read (`<table>_latest`, or `<table>_final`
/// in merge mode).
#[derive(Debug, Clone, Copy)]
pub struct TableDef<'a> {
    pub table: &'a str,
    /// The source columns, mapped.
    pub fields: &'a [BqField],
    pub keys: &'a [String],
    pub mode: Mode,
    /// CDC mode: the table's `max_staleness` in seconds.
    pub max_staleness_s: i32,
    /// Columns the table's policy keeps out of BigQuery: dropped where an earlier policy let
    /// them in (`tables update --exclude-column`).
    pub excluded: &'a [String],
    /// Columns sent only as `<name>_hmac`: a plain column of the name (synced before the
    /// policy) is dropped like an excluded one.
    pub hashed: &'a [String],
    /// How far before a merge point versions are still read (the worker's read-back): a view
    /// written for a schema change is narrowed to `<table>_current`'s point with it.
    pub read_back: std::time::Duration,
}

/// One tenant's dataset, as a slice writes to it.
///
/// A row is a [`Payload`]: the text `{"insertId":"…","json":{…}}` (what insertAll sends as it
/// is, and what the dead-letter table keeps), or a protobuf message encoded from the binary
/// Postgres values for the Storage Write API. Either sink takes either form (the other one is
/// converted), so a table whose write method changed under a slice still syncs. Every method
/// is idempotent, so a caller may repeat one whose answer it did not get.
pub trait Sink: Send + Sync {
    /// The dataset's name, for log lines.
    fn dataset(&self) -> &str;

    /// How this sink writes (a label of the append metrics).
    fn write_api(&self) -> WriteApi;

    /// Create the dataset when missing. Returns whether it was created.
    fn ensure_dataset(&self) -> impl Future<Output = Result<bool, BqError>> + Send;

    /// Make the table take `def`'s columns (create it, or add the ones it lacks; a column whose
    /// type changed is `SchemaIncompatible`), make its view or merged table match, and create
    /// the table's batch listing (`_sync_batches_<table>`) when missing. The dataset must exist.
    fn ensure_table(
        &self,
        def: &TableDef<'_>,
    ) -> impl Future<Output = Result<SchemaChange, BqError>> + Send;

    /// Write `rows` to `table` in one request, as part of the slice's batch `batch_id`:
    /// either every row is written, or the answer says which rows were refused (none is
    /// written then), or the request failed as a whole. A write method may keep the batch's
    /// rows invisible until [`Sink::list_batches`] names it.
    fn append(
        &self,
        table: &str,
        batch_id: &str,
        rows: &[&Payload],
    ) -> impl Future<Output = Result<InsertOutcome, BqError>> + Send;

    /// List `batch_ids` in `_sync_batches_<table>` as committed batches of `table`, the last one (the
    /// slice's own, whose appended rows a write method commits first) with `rows` rows: from
    /// then on the views show their rows. Listing a batch twice changes nothing.
    fn list_batches(
        &self,
        table: &str,
        batch_ids: &[String],
        rows: i64,
    ) -> impl Future<Output = Result<InsertOutcome, BqError>> + Send;
}

/// A table's sink, by its write method: what a slice holds.
#[derive(Clone)]
pub enum WriteSink {
    InsertAll(Arc<BigQuery>),
    Storage(Arc<StorageSink>),
}

impl Sink for WriteSink {
    fn write_api(&self) -> WriteApi {
        match self {
            Self::InsertAll(_) => WriteApi::InsertAll,
            Self::Storage(_) => WriteApi::Storage,
        }
    }

    fn dataset(&self) -> &str {
        match self {
            Self::InsertAll(s) => Sink::dataset(&**s),
            Self::Storage(s) => Sink::dataset(&**s),
        }
    }

    async fn ensure_dataset(&self) -> Result<bool, BqError> {
        match self {
            Self::InsertAll(s) => Sink::ensure_dataset(&**s).await,
            Self::Storage(s) => s.ensure_dataset().await,
        }
    }

    async fn ensure_table(&self, def: &TableDef<'_>) -> Result<SchemaChange, BqError> {
        match self {
            Self::InsertAll(s) => Sink::ensure_table(&**s, def).await,
            Self::Storage(s) => s.ensure_table(def).await,
        }
    }

    async fn append(
        &self,
        table: &str,
        batch_id: &str,
        rows: &[&Payload],
    ) -> Result<InsertOutcome, BqError> {
        match self {
            Self::InsertAll(s) => s.append(table, batch_id, rows).await,
            Self::Storage(s) => s.append(table, batch_id, rows).await,
        }
    }

    async fn list_batches(
        &self,
        table: &str,
        batch_ids: &[String],
        rows: i64,
    ) -> Result<InsertOutcome, BqError> {
        match self {
            Self::InsertAll(s) => s.list_batches(table, batch_ids, rows).await,
            Self::Storage(s) => s.list_batches(table, batch_ids, rows).await,
        }
    }
}
