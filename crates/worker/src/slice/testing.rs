//! Fakes for the unit tests of the send logic (`send.rs`), and for nothing else: an in-memory
//! [`Sink`] and an in-memory [`SendControl`]. The sink models only what the send path reacts
//! to: per-row errors with insertAll's `invalid`/`stopped` answer, requests refused as a whole
//! (413 over a row count, 400 for a poisoned row), and scripted failures of any class. It
//! keeps no schema, serves no views or queries, and knows nothing of BigQuery's own limits;
//! the end-to-end tests (`tests/tests/`) cover the real client against the local BigQuery.

use super::payload::payload;
use super::send::SendControl;
use crate::WorkerError;
use chrono::Utc;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tenantsync_bigquery::schema::SchemaChange;
use tenantsync_bigquery::{BqError, InsertOutcome, RowError, Sink, TableDef};
use tenantsync_core::{Payload, Tenant};
use tenantsync_store::control::dead_letters::NewDeadLetter;
use tenantsync_store::control::tasks::TaskId;
use tenantsync_store::{SourceRow, StoreError};

/// A row the fake sink refuses on its own (`invalid`, the others of its request `stopped`).
pub(crate) const INVALID: &str = r#""bad":true"#;
/// A row that makes the fake sink refuse its whole request (400, no row named).
pub(crate) const POISON: &str = r#""poison":true"#;

#[derive(Default)]
pub(crate) struct MemorySink {
    state: Mutex<SinkState>,
}

#[derive(Default)]
struct SinkState {
    /// Answers given before anything else, one per append, in order.
    scripted: VecDeque<Result<InsertOutcome, BqError>>,
    /// Appends of more rows than this are refused as a whole with a 413.
    max_rows: Option<usize>,
    /// Every append fails with this error (made afresh each time).
    always: Option<fn() -> BqError>,
    /// The rows written, in order.
    written: Vec<String>,
    /// How many rows each append asked to write, written or not.
    appends: Vec<usize>,
    /// `ensure_dataset` and `ensure_table` calls.
    ensured: usize,
}

impl MemorySink {
    /// Answer the next appends with `answers`, in order, before behaving as usual.
    pub(crate) fn script(&self, answers: impl IntoIterator<Item = Result<InsertOutcome, BqError>>) {
        self.state.lock().unwrap().scripted.extend(answers);
    }

    pub(crate) fn refuse_over(&self, rows: usize) {
        self.state.lock().unwrap().max_rows = Some(rows);
    }

    pub(crate) fn fail_always(&self, e: fn() -> BqError) {
        self.state.lock().unwrap().always = Some(e);
    }

    pub(crate) fn written(&self) -> Vec<String> {
        self.state.lock().unwrap().written.clone()
    }

    pub(crate) fn appends(&self) -> Vec<usize> {
        self.state.lock().unwrap().appends.clone()
    }

    pub(crate) fn ensured(&self) -> usize {
        self.state.lock().unwrap().ensured
    }

    fn answer(&self, rows: &[&Payload]) -> Result<InsertOutcome, BqError> {
        let rows: Vec<String> = rows.iter().map(|p| p.json_lossy().into_owned()).collect();
        let mut s = self.state.lock().unwrap();
        s.appends.push(rows.len());
        if let Some(answer) = s.scripted.pop_front() {
            return answer;
        }
        if let Some(e) = s.always {
            return Err(e());
        }
        if s.max_rows.is_some_and(|max| rows.len() > max) {
            return Err(BqError::TooLarge(format!(
                "HTTP 413: {} rows in one request",
                rows.len()
            )));
        }
        if rows.iter().any(|r| r.contains(POISON)) {
            return Err(BqError::Invalid("HTTP 400 invalid: bad request".into()));
        }
        if rows.iter().any(|r| r.contains(INVALID)) {
            // insertAll with skipInvalidRows=false: nothing written, every row named.
            let row_errors = rows
                .iter()
                .enumerate()
                .map(|(index, r)| RowError {
                    index,
                    reason: if r.contains(INVALID) {
                        "invalid"
                    } else {
                        "stopped"
                    }
                    .into(),
                    message: if r.contains(INVALID) { "bad value" } else { "" }.into(),
                })
                .collect();
            return Ok(InsertOutcome { row_errors });
        }
        s.written.extend(rows.iter().map(|r| r.to_string()));
        Ok(InsertOutcome::default())
    }
}

impl Sink for MemorySink {
    fn write_api(&self) -> tenantsync_core::WriteApi {
        tenantsync_core::WriteApi::InsertAll
    }

    fn dataset(&self) -> &str {
        "memory"
    }

    async fn ensure_dataset(&self) -> Result<bool, BqError> {
        self.state.lock().unwrap().ensured += 1;
        Ok(false)
    }

    async fn ensure_table(&self, _def: &TableDef<'_>) -> Result<SchemaChange, BqError> {
        self.state.lock().unwrap().ensured += 1;
        Ok(SchemaChange::Unchanged)
    }

    async fn append(
        &self,
        _table: &str,
        _batch_id: &str,
        rows: &[&Payload],
    ) -> Result<InsertOutcome, BqError> {
        self.answer(rows)
    }

    async fn list_batches(
        &self,
        _table: &str,
        _batch_ids: &[String],
        _rows: i64,
    ) -> Result<InsertOutcome, BqError> {
        Ok(InsertOutcome::default())
    }
}

/// The dead-letter table as a list; insert budgets that never make anyone wait.
#[derive(Default)]
pub(crate) struct MemoryControl {
    pub(crate) letters: Mutex<Vec<NewDeadLetter>>,
    /// The dead-letter table is unreachable.
    pub(crate) down: bool,
}

impl SendControl for MemoryControl {
    async fn reserve(&self, _tenant: &Tenant, _rows: usize) -> Result<Duration, WorkerError> {
        Ok(Duration::ZERO)
    }

    async fn dead_letter(
        &self,
        _task: TaskId,
        letters: &[NewDeadLetter],
    ) -> Result<(), WorkerError> {
        if self.down {
            return Err(StoreError::Invalid("control plane unreachable".into()).into());
        }
        self.letters.lock().unwrap().extend(letters.iter().cloned());
        Ok(())
    }
}

/// `n` rows of tenant 1 with their payloads; the rows at `invalid` are refused by the sink on
/// their own, those at `poison` make it refuse their whole request.
pub(crate) fn rows(
    n: usize,
    invalid: &[usize],
    poison: &[usize],
) -> (Vec<SourceRow>, Vec<Payload>) {
    let rows: Vec<SourceRow> = (0..n)
        .map(|i| {
            let mark = if invalid.contains(&i) {
                format!(",{INVALID}")
            } else if poison.contains(&i) {
                format!(",{POISON}")
            } else {
                String::new()
            };
            SourceRow {
                key: vec![i.to_string()],
                cursor: format!("2024-01-01 00:00:{:02}+00", i % 60),
                cursor_ts: Utc::now(),
                tenant: Some("1".into()),
                json: format!(r#"{{"id":{i}{mark},"_op":"insert"}}"#),
                proto: None,
                op: "insert".into(),
                seq: None,
            }
        })
        .collect();
    let payloads = rows
        .iter()
        .map(|r| payload(1, "t", r, "1-1-1", "2024-01-01T00:00:00.000000Z", None).into())
        .collect();
    (rows, payloads)
}
