//! The chaos run of `chaos.rs` (worker kills and freezes, a leader kill, Redis and Postgres
//! restarts, compaction on a short window) with the workers writing through the Storage Write
//! API: pending streams per slice, about a fifth of the appends, stream creations, finalizes
//! and commits failing at a gRPC fault proxy (UNAVAILABLE, RESOURCE_EXHAUSTED, or the answer
//! dropped after the local BigQuery did the work). It must end the same way: `verify` clean,
//! every `_latest` equal to Postgres, no foreign row. A module of its own, so `scripts/run-tests`
//! gives it a fresh local BigQuery and never runs it beside the insertAll run (named so that
//! neither the `chaos::` nor the `storage::` filter selects it).

use crate::chaos::{run, Writes};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_through_storage_write_ends_with_verify_clean_and_latest_equal_to_postgres() {
    run(Writes::Storage).await;
}
