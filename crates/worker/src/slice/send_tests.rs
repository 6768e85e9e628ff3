//! The send path against the in-memory sink: bisection, dead letters, `stopped` rows, retries.

use super::send::SendCtx;
use super::testing::{rows, MemoryControl, MemorySink};
use super::NoHooks;
use crate::WorkerError;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tenantsync_bigquery::{BqError, InsertOutcome, RowError, TableDef};
use tenantsync_core::chunk::{Limits, ENVELOPE_BYTES};
use tenantsync_core::retry::RetryPolicy;
use tenantsync_core::{Capture, Mode, Payload, TableSpec, Tenant, TenantStatus};
use tenantsync_store::control::tasks::TaskId;
use tenantsync_store::SourceRow;
use tokio_util::sync::CancellationToken;

const ATTEMPTS: u32 = 4;

/// One page of rows and everything a send of it needs.
struct Fixture {
    sink: MemorySink,
    control: MemoryControl,
    tenant: Tenant,
    spec: TableSpec,
    rows: Vec<SourceRow>,
    payloads: Vec<Payload>,
    keys: Vec<String>,
    lost: CancellationToken,
    shutdown: CancellationToken,
}

impl Fixture {
    fn new(n: usize, invalid: &[usize], poison: &[usize]) -> Self {
        let (rows, payloads) = rows(n, invalid, poison);
        Self {
            sink: MemorySink::default(),
            control: MemoryControl::default(),
            tenant: Tenant {
                id: 1,
                slug: "t1".into(),
                organization_id: "1".into(),
                bq_project: "p".into(),
                bq_dataset: "d".into(),
                bq_location: None,
                impersonate: None,
                status: TenantStatus::Active,
                has_credentials: false,
                max_requests_per_s: None,
                max_rows_per_s: None,
            },
            spec: TableSpec {
                id: 1,
                source_schema: "public".into(),
                source_table: "t".into(),
                key_columns: vec!["id".into()],
                cursor_column: "updated_at".into(),
                tenant_column: "organization_id".into(),
                mode: Mode::Latest,
                enabled: true,
                sync_interval_ms: 1000,
                slice_rows: 5000,
                soft_delete_column: None,
                capture: Capture::Cursor,
                write_api: None,
                max_staleness_s: tenantsync_core::model::DEFAULT_MAX_STALENESS_S,
                exclude_columns: Vec::new(),
                hash_columns: Vec::new(),
            },
            rows,
            payloads,
            keys: vec!["id".into()],
            lost: CancellationToken::new(),
            shutdown: CancellationToken::new(),
        }
    }

    fn cx(&self) -> SendCtx<'_, MemorySink, MemoryControl> {
        SendCtx {
            sink: &self.sink,
            control: &self.control,
            def: TableDef {
                table: "t",
                fields: &[],
                keys: &self.keys,
                mode: Mode::Latest,
                max_staleness_s: 900,
                excluded: &[],
                hashed: &[],
                read_back: std::time::Duration::from_secs(60),
            },
            batch_id: "1-1-1",
            tenant: &self.tenant,
            spec: &self.spec,
            task: TaskId {
                tenant_id: 1,
                table_id: 1,
            },
            rows: &self.rows,
            payloads: &self.payloads,
            // Waits of at most a millisecond: the tests count attempts, not time.
            policy: RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(1), ATTEMPTS),
            lost: &self.lost,
            shutdown: &self.shutdown,
        }
    }

    /// Send every row as one chunk.
    async fn send_all(&self) -> Result<usize, WorkerError> {
        let items: Vec<usize> = (0..self.rows.len()).collect();
        self.cx().send_chunk(&items).await
    }

    /// The keys of the dead-lettered rows.
    fn dead_keys(&self) -> Vec<String> {
        let letters = self.control.letters.lock().unwrap();
        letters.iter().map(|l| l.key[0].clone()).collect()
    }

    /// Every written row once, and no other.
    fn assert_written_once(&self, expected: usize) {
        let written = self.sink.written();
        let distinct: HashSet<&String> = written.iter().collect();
        assert_eq!(written.len(), expected, "rows written");
        assert_eq!(distinct.len(), expected, "a row was written twice");
    }
}

fn stopped(rows: usize) -> Result<InsertOutcome, BqError> {
    Ok(InsertOutcome {
        row_errors: (0..rows)
            .map(|index| RowError {
                index,
                reason: "stopped".into(),
                message: String::new(),
            })
            .collect(),
    })
}

#[tokio::test]
async fn one_invalid_row_among_500_is_dead_lettered_and_499_are_sent() {
    let f = Fixture::new(500, &[137], &[]);
    assert_eq!(f.send_all().await.unwrap(), 1);
    f.assert_written_once(499);
    assert_eq!(f.dead_keys(), ["137"]);
    let letters = f.control.letters.lock().unwrap();
    assert_eq!(letters[0].reason, "invalid: bad value");
    assert_eq!(
        Payload::Json(letters[0].payload.clone()),
        f.payloads[137],
        "the row as it was sent"
    );
    // The refused request, then the 499 stopped rows once more.
    assert_eq!(f.sink.appends(), [500, 499]);
}

#[tokio::test]
async fn stopped_rows_are_sent_again_with_the_schema_repaired_first() {
    // Every row stopped and none blamed: nothing to dead-letter, so the table is ensured again
    // (a column dropped behind our back looks like this) and the rows sent again.
    let f = Fixture::new(10, &[], &[]);
    f.sink.script([stopped(10)]);
    assert_eq!(f.send_all().await.unwrap(), 0);
    f.assert_written_once(10);
    assert!(f.dead_keys().is_empty());
    assert_eq!(f.sink.appends(), [10, 10]);
    assert_eq!(f.sink.ensured(), 2, "dataset and table ensured once");
}

#[tokio::test]
async fn rows_stopped_again_and_again_stop_at_the_policy_cap() {
    let f = Fixture::new(3, &[], &[]);
    f.sink.script((0..10).map(|_| stopped(3)));
    let e = f.send_all().await.unwrap_err();
    assert!(
        matches!(e, WorkerError::BigQuery(BqError::Transient(_))),
        "{e}"
    );
    assert_eq!(f.sink.appends().len(), ATTEMPTS as usize);
    assert!(f.sink.written().is_empty());
}

#[tokio::test]
async fn a_request_too_large_is_split_until_it_fits() {
    let f = Fixture::new(500, &[], &[]);
    f.sink.refuse_over(100);
    assert_eq!(f.send_all().await.unwrap(), 0);
    f.assert_written_once(500);
    assert!(f.dead_keys().is_empty());
    let appends = f.sink.appends();
    // 500 → 250 → 125 → 62 + 63: three 413s on the way down each branch.
    assert_eq!(&appends[..3], [500, 250, 125]);
    assert_eq!(appends.iter().filter(|n| **n > 100).count(), 7);
    assert_eq!(appends.iter().filter(|n| **n <= 100).count(), 8);
}

#[tokio::test]
async fn a_request_refused_whole_is_bisected_down_to_its_row() {
    let f = Fixture::new(64, &[], &[41]);
    assert_eq!(f.send_all().await.unwrap(), 1);
    f.assert_written_once(63);
    assert_eq!(f.dead_keys(), ["41"]);
    let letters = f.control.letters.lock().unwrap();
    assert!(letters[0].reason.starts_with("invalid request: HTTP 400"));
    // 64, 32 + 32, 16 + 16, 8 + 8, 4 + 4, 2 + 2, 1 + 1: one refused request per level.
    assert_eq!(f.sink.appends().len(), 1 + 2 * 6);
}

#[tokio::test]
async fn transient_failures_are_retried_until_they_clear() {
    let f = Fixture::new(20, &[], &[]);
    f.sink.script([
        Err(BqError::Transient("HTTP 503".into())),
        Err(BqError::RateLimited("HTTP 429".into())),
    ]);
    assert_eq!(f.send_all().await.unwrap(), 0);
    f.assert_written_once(20);
    assert_eq!(f.sink.appends(), [20, 20, 20]);
}

#[tokio::test]
async fn retries_stop_at_the_policy_cap() {
    let f = Fixture::new(20, &[], &[]);
    f.sink
        .fail_always(|| BqError::Transient("HTTP 503: backend error".into()));
    let e = f.send_all().await.unwrap_err();
    assert!(
        matches!(e, WorkerError::BigQuery(BqError::Transient(_))),
        "{e}"
    );
    assert_eq!(f.sink.appends().len(), ATTEMPTS as usize);
    assert!(
        f.dead_keys().is_empty(),
        "a failure is no reason to dead-letter"
    );
}

#[tokio::test]
async fn errors_a_wait_cannot_fix_are_not_retried() {
    let f = Fixture::new(5, &[], &[]);
    f.sink
        .fail_always(|| BqError::CredentialsRejected("HTTP 401".into()));
    let e = f.send_all().await.unwrap_err();
    assert!(
        matches!(e, WorkerError::BigQuery(BqError::CredentialsRejected(_))),
        "{e}"
    );
    assert_eq!(f.sink.appends(), [5]);
}

#[tokio::test]
async fn a_table_deleted_behind_our_back_is_recreated() {
    let f = Fixture::new(5, &[], &[]);
    f.sink.script([Err(BqError::NotFound("HTTP 404".into()))]);
    assert_eq!(f.send_all().await.unwrap(), 0);
    f.assert_written_once(5);
    assert_eq!(f.sink.ensured(), 2);
}

#[tokio::test]
async fn a_dead_letter_that_cannot_be_stored_keeps_its_error() {
    let mut f = Fixture::new(5, &[2], &[]);
    f.control.down = true;
    let e = f.send_all().await.unwrap_err();
    // The control plane's failure, not a BigQuery one: the slice stops short of the row.
    assert!(matches!(e, WorkerError::Store(_)), "{e:?}");
    assert!(f.sink.written().is_empty());
}

#[tokio::test]
async fn a_page_is_sent_in_chunks_and_handled_up_to_its_end() {
    let f = Fixture::new(250, &[120], &[]);
    let limits = Limits {
        max_rows: 100,
        ..Limits::default()
    };
    let far = Instant::now() + Duration::from_secs(60);
    let page = f
        .cx()
        .send_page(limits, far, &NoHooks)
        .await
        .unwrap()
        .expect("no crash hook");
    assert_eq!((page.handled, page.dead), (250, 1));
    assert!(page.error.is_none());
    f.assert_written_once(249);
    // Three chunks; the second has the invalid row and is sent again without it.
    assert_eq!(f.sink.appends(), [100, 100, 99, 50]);
}

#[tokio::test]
async fn a_row_over_the_request_limit_is_dead_lettered_unsent() {
    let mut f = Fixture::new(3, &[], &[]);
    let limits = Limits {
        max_rows: 500,
        // Room for a request of one row as made, not for one 200 bytes longer.
        max_bytes: f.payloads[0].len() + ENVELOPE_BYTES + 100,
    };
    if let Payload::Json(p) = &mut f.payloads[1] {
        p.push_str(&" ".repeat(200));
    }
    let far = Instant::now() + Duration::from_secs(60);
    let page = f
        .cx()
        .send_page(limits, far, &NoHooks)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((page.handled, page.dead), (3, 1));
    assert_eq!(f.dead_keys(), ["1"]);
    let letters = f.control.letters.lock().unwrap();
    assert!(
        letters[0].reason.contains("over the"),
        "{}",
        letters[0].reason
    );
    f.assert_written_once(2);
    assert!(f.sink.appends().iter().all(|n| *n == 1));
}

#[tokio::test]
async fn a_lost_lease_stops_the_page_before_its_next_chunk() {
    let f = Fixture::new(30, &[], &[]);
    f.lost.cancel();
    let limits = Limits {
        max_rows: 10,
        ..Limits::default()
    };
    let far = Instant::now() + Duration::from_secs(60);
    let page = f
        .cx()
        .send_page(limits, far, &NoHooks)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page.handled, 0);
    assert!(matches!(page.error, Some(WorkerError::LeaseLost)));
    assert!(f.sink.appends().is_empty());
}
