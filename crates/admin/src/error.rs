//! Admin errors, each with the HTTP status the API answers with.

use tenantsync_bigquery::BqError;
use tenantsync_store::StoreError;
use tenantsync_worker::WorkerError;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (bad name, malformed or insufficient key…).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    /// Something this deployment needs is missing or down (database, Redis, master key).
    #[error("{0}")]
    Unavailable(String),
    /// BigQuery failed for a reason that is not the caller's input.
    #[error("{0}")]
    Upstream(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AdminError {
    /// HTTP status for the API.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::Invalid(_) => 422,
            Self::Conflict(_) => 409,
            Self::Unavailable(_) => 503,
            Self::Upstream(_) => 502,
            Self::Internal(_) => 500,
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => Self::NotFound(m),
            StoreError::Conflict(m) => Self::Conflict(m),
            StoreError::Invalid(m) => Self::Invalid(m),
            StoreError::Mapping(m) => Self::Invalid(m.to_string()),
            e if e.is_retriable() => Self::Unavailable(e.to_string()),
            StoreError::Unavailable(e) => Self::Unavailable(format!("database unavailable: {e}")),
            e => Self::Internal(e.to_string()),
        }
    }
}

impl From<WorkerError> for AdminError {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Store(e) => e.into(),
            WorkerError::Config(m) => Self::Invalid(m),
            // A key that does not parse, is refused, or cannot reach the dataset is the
            // caller's input: 422 with what is wrong. Transient trouble upstream is 502.
            WorkerError::BigQuery(e) => match e {
                BqError::RateLimited(_)
                | BqError::QuotaExceeded(_)
                | BqError::Transient(_)
                | BqError::TooLarge(_) => Self::Upstream(e.to_string()),
                e => Self::Invalid(e.to_string()),
            },
            WorkerError::Crypto(e) => Self::Unavailable(e.to_string()),
            WorkerError::Lease(e) => Self::Unavailable(e.to_string()),
            e => Self::Internal(e.to_string()),
        }
    }
}
