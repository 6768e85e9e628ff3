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
    /// The slice's lease was lost (taken over, or not renewable): it stops before its next
    /// request, and its commit will be refused if another worker has claimed the task since.
    #[error("lease lost; stopping before the next request")]
    LeaseLost,
    /// Shutdown began while the slice waited for a rate-limit slot.
    #[error("shutting down while rate limited")]
    ShuttingDown,
    /// A bug, not a condition of the world: a slice or task-pop task panicked.
    #[error("internal task failed: {0}")]
    Internal(#[from] tokio::task::JoinError),
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
            // Another worker or a later slice carries on.
            Self::LeaseLost | Self::ShuttingDown => true,
            Self::Crypto(_) | Self::Isolation(_) | Self::Config(_) | Self::Internal(_) => false,
        }
    }
}
