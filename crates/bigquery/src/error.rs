//! BigQuery failures, classified by what the caller should do next (docs/architecture.md, "A slice's life", step 5).

use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BqError {
    /// The key itself is malformed: nothing was sent anywhere.
    #[error("bad credentials: {0}")]
    BadCredentials(String),
    /// 401, 403 accessDenied, invalid_grant: the tenant must be paused until its key is fixed.
    #[error("credentials rejected: {0}")]
    CredentialsRejected(String),
    /// 403 rateLimitExceeded / 429: back off for seconds.
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// 403 quotaExceeded: back off for minutes.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// 404: the dataset or table is gone; ensure it and retry.
    #[error("not found: {0}")]
    NotFound(String),
    /// 409: exists already.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// 400/413 request too large: split the chunk.
    #[error("request too large: {0}")]
    TooLarge(String),
    /// 5xx, timeouts, connection resets.
    #[error("transient failure: {0}")]
    Transient(String),
    /// Any other 4xx: retrying the same request will fail the same way.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The BigQuery table's schema cannot take the source's (a column changed type).
    #[error("schema incompatible: {0}")]
    SchemaIncompatible(String),
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retry after roughly this long (callers add jitter).
    After(Duration),
    /// Fix something first (ensure the table, split the chunk), then retry at once.
    AfterFix,
    /// Retrying will not help; stop and report.
    Never,
    /// Credentials do not work: pause the tenant.
    PauseTenant,
}

impl BqError {
    pub fn retry(&self) -> Retry {
        match self {
            Self::Transient(_) => Retry::After(Duration::from_millis(500)),
            Self::RateLimited(_) => Retry::After(Duration::from_secs(2)),
            Self::QuotaExceeded(_) => Retry::After(Duration::from_secs(120)),
            Self::NotFound(_) | Self::TooLarge(_) => Retry::AfterFix,
            Self::BadCredentials(_) | Self::CredentialsRejected(_) => Retry::PauseTenant,
            Self::AlreadyExists(_) | Self::Invalid(_) | Self::SchemaIncompatible(_) => Retry::Never,
        }
    }

    /// Classify an HTTP error answer from the API. `body` is the JSON error document (or
    /// whatever a proxy sent instead).
    pub fn from_response(status: u16, body: &str) -> Self {
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let err = &v["error"];
        let reason = err["errors"][0]["reason"]
            .as_str()
            .or_else(|| err["status"].as_str())
            .unwrap_or("")
            .to_string();
        let message = err["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| body.chars().take(200).collect());
        let text = if reason.is_empty() {
            format!("HTTP {status}: {message}")
        } else {
            format!("HTTP {status} {reason}: {message}")
        };
        match (status, reason.as_str()) {
            (401, _) => Self::CredentialsRejected(text),
            (403, "rateLimitExceeded") | (429, _) => Self::RateLimited(text),
            (403, "quotaExceeded") => Self::QuotaExceeded(text),
            (403, _) => Self::CredentialsRejected(text),
            (404, _) => Self::NotFound(text),
            (409, _) => Self::AlreadyExists(text),
            (413, _) => Self::TooLarge(text),
            (400, _) if message.to_ascii_lowercase().contains("too large") => Self::TooLarge(text),
            // The local emulator (DuckLake) answers a write-write conflict between concurrent
            // requests on one dataset with 400 "Failed to commit DuckLake transaction"; the
            // same request succeeds when sent again. BigQuery itself has no such answer.
            (400, _) if message.contains("Failed to commit DuckLake transaction") => {
                Self::Transient(text)
            }
            (408, _) | (500..=599, _) => Self::Transient(text),
            _ => Self::Invalid(text),
        }
    }
}

impl From<reqwest::Error> for BqError {
    fn from(e: reqwest::Error) -> Self {
        // Timeouts, refused and reset connections: all worth a retry. The URL is left out of the
        // message; it is not secret, but it is noise in every log line.
        Self::Transient(e.without_url().to_string())
    }
}

impl BqError {
    /// Bounded label value for metrics (`tenantsync_bigquery_insert_requests_total{outcome}`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::RateLimited(_) => "rate_limited",
            Self::QuotaExceeded(_) => "quota_exceeded",
            Self::Transient(_) => "transient",
            Self::TooLarge(_) => "too_large",
            Self::NotFound(_) => "not_found",
            Self::BadCredentials(_) | Self::CredentialsRejected(_) => "credentials",
            Self::AlreadyExists(_) | Self::Invalid(_) | Self::SchemaIncompatible(_) => "invalid",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(reason: &str, msg: &str) -> String {
        serde_json::json!({"error": {"code": 403, "message": msg, "errors": [{"reason": reason}]}})
            .to_string()
    }

    #[test]
    fn classifies_as_designed() {
        assert_eq!(
            BqError::from_response(403, &body("rateLimitExceeded", "slow")).retry(),
            Retry::After(Duration::from_secs(2))
        );
        assert_eq!(
            BqError::from_response(403, &body("quotaExceeded", "q")).retry(),
            Retry::After(Duration::from_secs(120))
        );
        assert_eq!(
            BqError::from_response(403, &body("accessDenied", "no")).retry(),
            Retry::PauseTenant
        );
        assert_eq!(BqError::from_response(401, "").retry(), Retry::PauseTenant);
        assert_eq!(
            BqError::from_response(429, "").retry(),
            Retry::After(Duration::from_secs(2))
        );
        assert_eq!(BqError::from_response(404, "").retry(), Retry::AfterFix);
        assert_eq!(
            BqError::from_response(
                400,
                &body(
                    "invalid",
                    "Request payload size exceeds the limit: too large"
                )
            )
            .retry(),
            Retry::AfterFix
        );
        assert_eq!(
            BqError::from_response(503, "<html>").retry(),
            Retry::After(Duration::from_millis(500))
        );
        assert_eq!(
            BqError::from_response(400, &body("invalid", "bad")).retry(),
            Retry::Never
        );
    }
}
