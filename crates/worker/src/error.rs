use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] tenantsync_store::StoreError),
    #[error(transparent)]
    Lease(#[from] tenantsync_lease::LeaseError),
    #[error(transparent)]
    BigQuery(#[from] tenantsync_bigquery::BqError),
    #[error(transparent)]
    Crypto(#[from] tenantsync_core::crypto::CryptoError),
    /// A row of another tenant reached the send path: the SQL filter failed. Nothing of the
    /// slice is sent.
    #[error("tenant isolation check failed: {0}")]
    Isolation(String),
    #[error("{0}")]
    Config(String),
}

impl WorkerError {
    /// Whether waiting and retrying the task may succeed without an operator.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retriable(),
            Self::Lease(e) => e.is_retriable(),
            Self::BigQuery(e) => matches!(
                e.retry(),
                tenantsync_bigquery::Retry::After(_) | tenantsync_bigquery::Retry::AfterFix
            ),
            _ => false,
        }
    }
}
