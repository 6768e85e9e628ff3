//! Metrics the worker records. Names follow `tenantsync_<subsystem>_<name>_<unit>[_total]`;
//! tenant and table labels only on counters, never on the histogram (docs/metrics.md).

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use tenantsync_core::WriteApi;

pub const SYNC_ROWS: &str = "tenantsync_sync_rows_total";
pub const SYNC_SLICES: &str = "tenantsync_sync_slices_total";
pub const INSERT_REQUESTS: &str = "tenantsync_bigquery_insert_requests_total";
pub const INSERT_DURATION: &str = "tenantsync_bigquery_insert_duration_seconds";
pub const LEASE_ACQUIRED: &str = "tenantsync_lease_acquired_total";
pub const LEASE_LOST: &str = "tenantsync_lease_lost_total";
pub const LEASE_EXPIRED: &str = "tenantsync_lease_expired_total";
/// Only ever increases, but recorded as a gauge: the `metrics` crate's counters are integers
/// and waits are fractions of a second. `rate()` works on it as on a counter.
pub const RATELIMIT_WAIT: &str = "tenantsync_ratelimit_wait_seconds_total";

/// Tasks per claim or commit statement (see `batcher.rs`).
pub const CONTROL_BATCH: &str = "tenantsync_control_batch_tasks";

pub const DEAD_LETTERED: &str = "tenantsync_sync_dead_lettered_rows_total";

pub const SLICE_OUTCOMES: [&str; 4] = ["ok", "partial", "failed", "fenced"];
pub const INSERT_OUTCOMES: [&str; 8] = [
    "ok",
    "rate_limited",
    "quota_exceeded",
    "transient",
    "too_large",
    "not_found",
    "credentials",
    "invalid",
];

/// Describe every metric and create each bounded series at zero, so dashboards and alerts see
/// data from the first scrape instead of "no data" until the first event.
pub fn describe() {
    describe_counter!(
        SYNC_ROWS,
        Unit::Count,
        "Rows acknowledged by BigQuery, per tenant and table"
    );
    describe_counter!(
        DEAD_LETTERED,
        Unit::Count,
        "Rows written to the dead-letter table instead of BigQuery"
    );
    describe_counter!(SYNC_SLICES, Unit::Count, "Slices run, by outcome");
    describe_counter!(
        INSERT_REQUESTS,
        Unit::Count,
        "Append requests (insertAll, or Storage Write AppendRows), by write method and outcome"
    );
    describe_histogram!(
        INSERT_DURATION,
        Unit::Seconds,
        "Append request latency, by write method"
    );
    describe_histogram!(
        CONTROL_BATCH,
        Unit::Count,
        "Slices whose claim or commit went in one control-plane statement"
    );
    describe_counter!(LEASE_ACQUIRED, Unit::Count, "Task leases taken");
    describe_counter!(
        LEASE_LOST,
        Unit::Count,
        "Task leases lost while working (renewal refused)"
    );
    describe_counter!(
        LEASE_EXPIRED,
        Unit::Count,
        "Slices whose commit was refused because a newer claim superseded them"
    );
    describe_gauge!(
        RATELIMIT_WAIT,
        Unit::Seconds,
        "Time spent waiting for the insertAll rate limiter"
    );
    for o in SLICE_OUTCOMES {
        counter!(SYNC_SLICES, "outcome" => o).absolute(0);
    }
    for o in INSERT_OUTCOMES {
        for m in WriteApi::ALL {
            counter!(INSERT_REQUESTS, "outcome" => o, "method" => m.as_str()).absolute(0);
        }
    }
    counter!(LEASE_ACQUIRED).absolute(0);
    counter!(LEASE_LOST).absolute(0);
    counter!(LEASE_EXPIRED).absolute(0);
}

/// Create a task's per-tenant series at 0 when this process first works on it, so dashboards
/// and alerts see 0 (not "no data") until the first row, wait or dead letter.
pub(crate) fn task_seen(tenant: &str, table: &str) {
    counter!(SYNC_ROWS, "tenant" => tenant.to_string(), "table" => table.to_string()).increment(0);
    counter!(DEAD_LETTERED, "tenant" => tenant.to_string(), "table" => table.to_string())
        .increment(0);
    gauge!(RATELIMIT_WAIT, "tenant" => tenant.to_string()).increment(0.0);
}

pub(crate) fn rows(tenant: &str, table: &str, n: u64) {
    counter!(SYNC_ROWS, "tenant" => tenant.to_string(), "table" => table.to_string()).increment(n);
}

pub(crate) fn slice(outcome: &'static str) {
    counter!(SYNC_SLICES, "outcome" => outcome).increment(1);
}

/// One append request (insertAll or AppendRows): `method` is the write method's name.
pub(crate) fn insert(method: &'static str, outcome: &'static str, seconds: f64) {
    counter!(INSERT_REQUESTS, "outcome" => outcome, "method" => method).increment(1);
    histogram!(INSERT_DURATION, "method" => method).record(seconds);
}

pub(crate) fn statement_batch(tasks: usize) {
    histogram!(CONTROL_BATCH).record(tasks as f64);
}

pub(crate) fn ratelimit_wait(tenant: &str, wait: std::time::Duration) {
    gauge!(RATELIMIT_WAIT, "tenant" => tenant.to_string()).increment(wait.as_secs_f64());
}

pub(crate) fn dead_lettered(tenant: &str, table: &str, n: u64) {
    counter!(DEAD_LETTERED, "tenant" => tenant.to_string(), "table" => table.to_string())
        .increment(n);
}

pub(crate) fn lease_acquired() {
    counter!(LEASE_ACQUIRED).increment(1);
}

pub(crate) fn lease_lost() {
    counter!(LEASE_LOST).increment(1);
}

pub(crate) fn lease_expired() {
    counter!(LEASE_EXPIRED).increment(1);
}
