//! A zero-cost BigQuery for benchmarks: real HTTP on loopback and a real serde_json parse of
//! every insertAll body, but nothing is stored. It counts rows and acknowledges each request
//! with `{"kind":"bigquery#tableDataInsertAllResponse"}`. The other calls a worker makes
//! (dataset get/create, table create/get/patch, view create) get plausible answers from a small
//! in-memory catalog, so the worker proceeds as against BigQuery.
//!
//! Per row it also keeps what insertAll would bill: max(1 KB, the size of the row's JSON).
//!
//! With lag recording on, the sink keeps `(_source_ts, acknowledged at)` per row: the
//! freshness benchmark's measurement of source commit → insertAll acknowledgement.

use crate::http::{serve, Handler, Request, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The insertAll body, parsed for what the sink needs; serde_json still reads (and validates)
/// every other byte of it while skipping the fields nobody asked for.
#[derive(Deserialize)]
struct InsertAll<'a> {
    #[serde(borrow, default)]
    rows: Vec<InsertRow<'a>>,
}

#[derive(Deserialize)]
struct InsertRow<'a> {
    #[serde(rename = "insertId", borrow, default)]
    insert_id: Option<Cow<'a, str>>,
    /// The row's JSON as sent (validated, not parsed further): its size is what insertAll
    /// bills, and its `_source_ts` is read only when lag is recorded.
    #[serde(borrow)]
    json: &'a RawValue,
}

#[derive(Deserialize)]
struct RowJson<'a> {
    #[serde(rename = "_source_ts", borrow, default)]
    source_ts: Option<Cow<'a, str>>,
}

/// insertAll bills every row as at least 1 KB.
pub const INSERT_ALL_MIN_ROW_BYTES: u64 = 1024;

/// What the sink has seen since it started or was last reset.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinkStats {
    pub requests: u64,
    pub rows: u64,
    pub bytes: u64,
    /// Bytes of the rows' `json` objects, and what insertAll bills for them: each row as
    /// max(1 KB, its JSON size).
    pub row_json_bytes: u64,
    pub billable_bytes: u64,
    /// Bodies that were not valid insertAll JSON (answered 400).
    pub bad_requests: u64,
    /// Calls other than insertAll (dataset, table, view).
    pub other_calls: u64,
    /// First and last insertAll acknowledgement.
    pub first_ack: Option<Instant>,
    pub last_ack: Option<Instant>,
}

/// One row's lag sample: its insertId, its `_source_ts` and when the sink acknowledged it, both
/// in microseconds since the Unix epoch.
#[derive(Debug, Clone)]
pub struct LagSample {
    pub insert_id: String,
    pub source_us: i64,
    pub ack_us: i64,
}

#[derive(Default)]
struct State {
    requests: AtomicU64,
    rows: AtomicU64,
    bytes: AtomicU64,
    row_json_bytes: AtomicU64,
    billable_bytes: AtomicU64,
    bad: AtomicU64,
    other: AtomicU64,
    window: Mutex<(Option<Instant>, Option<Instant>)>,
    record_lag: AtomicBool,
    lag: Mutex<Vec<LagSample>>,
    /// Tables and views by `projects/…/datasets/…/tables/…` path.
    tables: Mutex<HashMap<String, Value>>,
}

pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64
}

/// `2024-01-01T00:00:00.123456Z` (what the worker's `_source_ts` looks like) in µs since epoch.
fn parse_ts_us(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_micros())
}

fn error(status: u16, reason: &str, message: &str) -> Response {
    Response::json(
        status,
        &json!({"error": {"code": status, "message": message, "status": reason,
                          "errors": [{"reason": reason, "message": message}]}}),
    )
}

impl Sink {
    /// Serve on an ephemeral loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(State::default());
        let s = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let s = s.clone();
            Box::pin(async move { handle(&s, req) })
        });
        let (addr, task) = serve(handler).await;
        Self { addr, state, task }
    }

    /// `host:port`, what `BIGQUERY_EMULATOR_HOST` names.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://host:port`, the `api_endpoint` of Google's Python client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> SinkStats {
        let s = &self.state;
        let (first_ack, last_ack) = *s.window.lock().unwrap();
        SinkStats {
            requests: s.requests.load(Ordering::Relaxed),
            rows: s.rows.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            row_json_bytes: s.row_json_bytes.load(Ordering::Relaxed),
            billable_bytes: s.billable_bytes.load(Ordering::Relaxed),
            bad_requests: s.bad.load(Ordering::Relaxed),
            other_calls: s.other.load(Ordering::Relaxed),
            first_ack,
            last_ack,
        }
    }

    /// Zero the counters (between the pipelines of one run).
    pub fn reset(&self) {
        let s = &self.state;
        for c in [
            &s.requests,
            &s.rows,
            &s.bytes,
            &s.row_json_bytes,
            &s.billable_bytes,
            &s.bad,
            &s.other,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        *s.window.lock().unwrap() = (None, None);
        s.lag.lock().unwrap().clear();
    }

    /// Keep a lag sample per row from now on.
    pub fn record_lag(&self, on: bool) {
        self.state.record_lag.store(on, Ordering::Relaxed);
    }

    /// The lag samples recorded so far (taken out of the sink).
    pub fn take_lag(&self) -> Vec<LagSample> {
        std::mem::take(&mut *self.state.lag.lock().unwrap())
    }
}

fn handle(s: &State, req: Request) -> Response {
    // Paths look like /bigquery/v2/projects/P/datasets/D[/tables[/T[/insertAll]]][?query]
    let path = req.path.split('?').next().unwrap_or_default();
    let path = path.strip_prefix("/bigquery/v2/").unwrap_or(path);
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["projects", _, "datasets", _, "tables", _, "insertAll"]) => insert_all(s, &req),
        (m, ["projects", p, "datasets", d, rest @ ..]) => {
            s.other.fetch_add(1, Ordering::Relaxed);
            catalog(s, m, p, d, rest, &req)
        }
        ("POST", ["projects", _, "datasets"]) => {
            s.other.fetch_add(1, Ordering::Relaxed);
            let mut v: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            v["kind"] = json!("bigquery#dataset");
            Response::json(200, &v)
        }
        ("POST", ["projects", _, "queries"]) => {
            s.other.fetch_add(1, Ordering::Relaxed);
            Response::json(
                200,
                &json!({"kind": "bigquery#queryResponse", "jobComplete": true, "rows": []}),
            )
        }
        _ => error(404, "notFound", &format!("sink: no route for {path}")),
    }
}

fn insert_all(s: &State, req: &Request) -> Response {
    let parsed: InsertAll = match serde_json::from_slice(&req.body) {
        Ok(p) => p,
        Err(e) => {
            s.bad.fetch_add(1, Ordering::Relaxed);
            return error(
                400,
                "invalid",
                &format!("sink: unreadable insertAll body: {e}"),
            );
        }
    };
    let n = parsed.rows.len() as u64;
    let ack_us = now_us();
    if s.record_lag.load(Ordering::Relaxed) {
        let samples: Vec<LagSample> = parsed
            .rows
            .iter()
            .filter_map(|r| {
                let json: RowJson = serde_json::from_str(r.json.get()).ok()?;
                let source_us = json.source_ts.as_deref().and_then(parse_ts_us)?;
                Some(LagSample {
                    insert_id: r.insert_id.as_deref().unwrap_or_default().to_string(),
                    source_us,
                    ack_us,
                })
            })
            .collect();
        s.lag.lock().unwrap().extend(samples);
    }
    let (mut json_bytes, mut billable) = (0u64, 0u64);
    for r in &parsed.rows {
        let len = r.json.get().len() as u64;
        json_bytes += len;
        billable += len.max(INSERT_ALL_MIN_ROW_BYTES);
    }
    s.row_json_bytes.fetch_add(json_bytes, Ordering::Relaxed);
    s.billable_bytes.fetch_add(billable, Ordering::Relaxed);
    s.rows.fetch_add(n, Ordering::Relaxed);
    s.bytes.fetch_add(req.body.len() as u64, Ordering::Relaxed);
    s.requests.fetch_add(1, Ordering::Relaxed);
    {
        let now = Instant::now();
        let mut w = s.window.lock().unwrap();
        w.0.get_or_insert(now);
        w.1 = Some(now);
    }
    Response::json(200, &json!({"kind": "bigquery#tableDataInsertAllResponse"}))
}

/// Datasets always exist; tables and views live in a map so a second create is a 409 and a get
/// answers with the stored schema, as BigQuery does.
fn catalog(s: &State, method: &str, p: &str, d: &str, rest: &[&str], req: &Request) -> Response {
    let dataset = || {
        json!({"kind": "bigquery#dataset", "id": format!("{p}:{d}"),
                            "datasetReference": {"projectId": p, "datasetId": d}})
    };
    let body = || serde_json::from_slice::<Value>(&req.body).unwrap_or_default();
    match (method, rest) {
        ("GET", []) => Response::json(200, &dataset()),
        ("DELETE", []) => {
            let prefix = format!("{p}/{d}/");
            s.tables
                .lock()
                .unwrap()
                .retain(|k, _| !k.starts_with(&prefix));
            Response::json(200, &json!({}))
        }
        ("POST", ["tables"]) => {
            let mut v = body();
            let Some(t) = v["tableReference"]["tableId"].as_str().map(str::to_string) else {
                return error(400, "invalid", "sink: table without tableReference.tableId");
            };
            let mut tables = s.tables.lock().unwrap();
            let key = format!("{p}/{d}/{t}");
            if tables.contains_key(&key) {
                return error(
                    409,
                    "duplicate",
                    &format!("Already Exists: Table {p}:{d}.{t}"),
                );
            }
            v["kind"] = json!("bigquery#table");
            v["id"] = json!(format!("{p}:{d}.{t}"));
            tables.insert(key, v.clone());
            Response::json(200, &v)
        }
        ("GET", ["tables", t]) => match s.tables.lock().unwrap().get(&format!("{p}/{d}/{t}")) {
            Some(v) => Response::json(200, v),
            None => error(404, "notFound", &format!("Not found: Table {p}:{d}.{t}")),
        },
        ("PATCH", ["tables", t]) => {
            let mut tables = s.tables.lock().unwrap();
            let Some(v) = tables.get_mut(&format!("{p}/{d}/{t}")) else {
                return error(404, "notFound", &format!("Not found: Table {p}:{d}.{t}"));
            };
            if let Value::Object(patch) = body() {
                for (k, x) in patch {
                    v[k] = x;
                }
            }
            Response::json(200, v)
        }
        ("DELETE", ["tables", t]) => {
            s.tables.lock().unwrap().remove(&format!("{p}/{d}/{t}"));
            Response::json(200, &json!({}))
        }
        _ => error(404, "notFound", "sink: unsupported call"),
    }
}
