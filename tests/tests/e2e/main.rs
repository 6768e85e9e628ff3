//! The end-to-end suite as one test binary: one compile and one link for all of it instead of
//! one per file (measured in docs/benchmarks.md, "End-to-end test build"). Each module is one
//! former test file; `scripts/run-tests` runs them one module at a time (`-- <module>::`), each
//! on a fresh local BigQuery.

mod admin;
mod admin_fuzz;
mod batches;
mod cdc;
mod changelog;
mod changes;
mod chaos;
mod chaos_grpc;
mod column_policies;
mod compaction;
mod credentials;
mod dead_letters;
mod faults;
mod hostile_rows;
mod impersonation;
mod key_rotation;
mod listings;
mod location;
mod names;
mod observability;
mod onboarding;
mod pool;
mod prometheus;
mod ratelimit;
mod schema;
mod storage;
mod sync;
mod types;
mod verify;
