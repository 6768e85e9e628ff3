//! SQLSTATE → error mapping, in one place, with whether a retry can help.

use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The server is down, restarting or unreachable: wait and retry.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("{0}")]
    NotFound(String),
    /// A unique constraint: the thing exists already.
    #[error("{0}")]
    Conflict(String),
    /// Input the schema refuses (check constraint, bad cast, unknown column…).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Mapping(#[from] tenantsync_core::mapping::MappingError),
    /// Source columns that would meet in BigQuery (a reserved name, or a case-only twin).
    #[error(transparent)]
    Names(#[from] tenantsync_core::names::NameError),
    /// A slice plan was built from other columns than the source table has now: build it again.
    #[error("the columns of {0} changed since its slice plan was built")]
    CatalogChanged(String),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether the same call may succeed later without anyone changing anything.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::CatalogChanged(_) => true,
            Self::Database(sqlx::Error::Database(db)) => {
                // 40001 serialization failure, 40P01 deadlock, 55P03 lock not available.
                matches!(db.code().as_deref(), Some("40001" | "40P01" | "55P03"))
            }
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(e),
            sqlx::Error::RowNotFound => Self::NotFound("no such row".into()),
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                match code.as_str() {
                    "23505" => Self::Conflict(db.message().to_string()),
                    // class 08 connection exception, 57P0x shutdown / cannot connect now
                    c if c.starts_with("08") || c.starts_with("57P") => Self::Unavailable(e),
                    c if c.starts_with("22") || c.starts_with("23") || c.starts_with("42") => {
                        Self::Invalid(db.message().to_string())
                    }
                    _ => Self::Database(e),
                }
            }
            _ => Self::Database(e),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
