#![doc = include_str!("../README.md")]

pub mod auth;
pub mod client;
pub mod error;
pub mod final_merge;
pub mod impersonation;
pub mod listings;
pub mod schema;
pub mod sink;
pub mod storage;

pub use auth::{Credentials, ServiceAccount, TokenUriPolicy};
pub use client::{BigQuery, Endpoint};
pub use error::{BqError, Retry};
pub use impersonation::Impersonator;
pub use sink::{InsertOutcome, RowError, Sink, TableDef, WriteSink};
pub use storage::StorageSink;

/// Log directives every subscriber must add last: yup-oauth2 prints token responses and cached
/// tokens at `debug`, and the HTTP stack can print headers at `trace`. Clamping them keeps
/// access tokens out of logs at any level an operator picks.
pub const SECRET_SAFE_LOG_DIRECTIVES: [&str; 6] = [
    "yup_oauth2=warn",
    "hyper=info",
    "hyper_util=info",
    "reqwest=info",
    "h2=info",
    "rustls=info",
];
