//! Every retry of the worker under the one policy (`tenantsync_core::retry`): BigQuery calls
//! within a slice, failed slices of `run --once`, and the scheduler's backoff of a failing task.

use crate::{Worker, WorkerConfig, WorkerError};
use std::future::Future;
use std::time::Duration;
use tenantsync_bigquery::{BqError, Retry};
use tenantsync_core::retry::RetryPolicy;
use tenantsync_core::Tenant;
use tracing::warn;

/// The scheduler's wait before the next slice of a task that failed `n` times in a row: 2ⁿ s
/// up to 5 minutes, never given up (an operator sees the task failing in `status`). The
/// ceiling, not a draw: the wait is stored as the task's next run and shown as such, and the
/// coordinator's queueing spreads the tasks that come due together.
pub(crate) const TASK_BACKOFF: RetryPolicy =
    RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(300), u32::MAX);

/// Backoff before the next slice of a task that failed `failures` times in a row.
pub(crate) fn task_backoff(failures: i32) -> Duration {
    TASK_BACKOFF.ceiling(failures.max(0) as u32)
}

impl WorkerConfig {
    /// Retries within a slice, and of a failed slice in `run --once`: `max_attempts` attempts,
    /// no wait over `max_backoff`. The base is the error class's (`BqError::retry`) for
    /// BigQuery calls, 1 s for a whole slice.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new(Duration::from_secs(1), self.max_backoff, self.max_attempts)
    }
}

/// A draw from `policy` after `failures` failed attempts (see [`RetryPolicy::backoff`]).
pub(crate) fn backoff(policy: &RetryPolicy, failures: u32) -> Option<Duration> {
    policy.backoff(failures, &mut rand::thread_rng())
}

/// The wait before calling BigQuery again after the call failed with `e`, `failures` times in
/// all: what the error class says a wait can fix, with its own base. `None`: give up.
pub(crate) fn bq_backoff(policy: &RetryPolicy, failures: u32, e: &BqError) -> Option<Duration> {
    match e.retry() {
        Retry::After(base) => backoff(&policy.with_base(base), failures),
        Retry::AfterFix | Retry::Never | Retry::PauseTenant => None,
    }
}

/// Run an idempotent BigQuery call (dataset, table, view, query, batch listing), retrying what
/// the error classification says a wait can fix, like insertAll. Without this a single 503 on
/// a table create failed the slice and sent the task into its backoff. Errors other than
/// BigQuery's are returned at once, as they are.
pub(crate) async fn retry_bq<T, Fut>(
    policy: RetryPolicy,
    what: &'static str,
    tenant: &Tenant,
    mut call: impl FnMut() -> Fut,
) -> Result<T, WorkerError>
where
    Fut: Future<Output = Result<T, WorkerError>>,
{
    let mut failures = 0u32;
    loop {
        let e = match call().await {
            Ok(v) => return Ok(v),
            Err(WorkerError::BigQuery(e)) => e,
            Err(other) => return Err(other),
        };
        failures += 1;
        let Some(wait) = bq_backoff(&policy, failures, &e) else {
            return Err(e.into());
        };
        warn!(tenant = %tenant.slug, what, attempt = failures, error = %e, "bigquery call failed; retrying");
        tokio::time::sleep(wait).await;
    }
}

impl Worker {
    /// [`retry_bq`] under this worker's policy.
    pub(crate) async fn retry_bq<T, Fut>(
        &self,
        what: &'static str,
        tenant: &Tenant,
        call: impl FnMut() -> Fut,
    ) -> Result<T, WorkerError>
    where
        Fut: Future<Output = Result<T, WorkerError>>,
    {
        retry_bq(self.cfg.retry_policy(), what, tenant, call).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_backoff_doubles_to_five_minutes() {
        let secs: Vec<u64> = [0, 1, 2, 8, 9, 100]
            .into_iter()
            .map(|n| task_backoff(n).as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 256, 300, 300]);
        assert_eq!(task_backoff(-3), Duration::from_secs(1));
    }

    #[test]
    fn bigquery_errors_wait_by_their_class() {
        let p = RetryPolicy::new(Duration::from_secs(1), Duration::from_millis(700), 3);
        let transient = BqError::Transient("503".into());
        for _ in 0..50 {
            let w = bq_backoff(&p, 1, &transient).expect("retried");
            assert!(w <= Duration::from_millis(700));
        }
        assert_eq!(bq_backoff(&p, 3, &transient), None, "attempts used up");
        assert_eq!(bq_backoff(&p, 1, &BqError::Invalid("bad".into())), None);
        assert_eq!(
            bq_backoff(&p, 1, &BqError::CredentialsRejected("401".into())),
            None
        );
        // Fixed by the caller (a bisection, a recreated table), not by waiting.
        assert_eq!(bq_backoff(&p, 1, &BqError::NotFound("404".into())), None);
    }
}
