#![doc = include_str!("../README.md")]

pub mod metrics;

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tenantsync_lease::{Lease, Leases};
use tenantsync_store::control::tasks::TaskId;
use tenantsync_store::{ControlPlane, SlicePlan, SourceReader, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub id: String,
    pub tick: Duration,
    pub leader_ttl: Duration,
    pub shards: u32,
    /// Most tasks queued per tick.
    pub max_enqueue: i64,
    pub cursor_skew: Duration,
    /// Run-log entries (`sync_runs`, one per slice) older than this are deleted by the leader;
    /// None keeps them all. At hundreds of slices a second the log grows by millions of rows
    /// an hour.
    pub run_log_keep: Option<Duration>,
}

impl CoordinatorConfig {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            tick: Duration::from_millis(250),
            leader_ttl: Duration::from_secs(5),
            shards: 8,
            max_enqueue: 2000,
            cursor_skew: Duration::from_millis(1000),
            run_log_keep: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

#[derive(Clone)]
pub struct Deps {
    pub control: ControlPlane,
    pub source: SourceReader,
    pub leases: Leases,
}

/// What one tick did, for logs, tests and the idle-scale benchmark.
#[derive(Debug, Clone, Default)]
pub struct TickReport {
    pub queries: u32,
    pub changed_tasks: u64,
    pub due: usize,
    pub queued: usize,
    /// Tables whose change detection failed this tick (the others were still scanned).
    pub scan_failures: u32,
    pub took: Duration,
}

/// Where change detection starts for a table nothing was confirmed for. (chrono's minimum
/// is outside Postgres' timestamp range.)
fn beginning() -> DateTime<Utc> {
    DateTime::from_timestamp(-62_135_596_800, 0).expect("0001-01-01 is representable")
}

/// How far change detection has covered each table, and which tables' next scan starts a new
/// coverage run. Pure state: [`Scheduler::tick`] asks it what to scan and tells it what was
/// recorded.
#[derive(Debug, Default)]
struct Coverage {
    /// Per table: change detection has covered everything below this instant.
    since: HashMap<i64, DateTime<Utc>>,
    /// Tables whose next scan starts a new coverage run (first scan of this leadership).
    restart: std::collections::HashSet<i64>,
}

/// One scan of a table's changes: `[from, through)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    from: DateTime<Utc>,
    through: DateTime<Utc>,
    /// The scan starts a new coverage run at `from` (see `ControlPlane::record_scan`).
    restart: bool,
}

impl Coverage {
    fn is_empty(&self) -> bool {
        self.since.is_empty()
    }

    /// A new leader: each table starts where the slowest of its tasks is confirmed (None: a
    /// task never synced, so from the beginning), and starts a new coverage run.
    fn start(&mut self, tables: impl IntoIterator<Item = (i64, Option<DateTime<Utc>>)>) {
        for (table, start) in tables {
            self.since.insert(table, start.unwrap_or(beginning()));
            self.restart.insert(table);
        }
    }

    /// What to scan of `table` below `horizon`: nothing when the coverage already reaches it.
    /// A table registered after this leadership began is scanned from the beginning.
    fn window(&mut self, table: i64, horizon: DateTime<Utc>) -> Option<Window> {
        let from = match self.since.get(&table) {
            Some(s) => *s,
            None => {
                self.restart.insert(table);
                beginning()
            }
        };
        (from < horizon).then(|| Window {
            from,
            through: horizon,
            restart: self.restart.contains(&table),
        })
    }

    /// The scan `w` of `table` is recorded: the coverage moves to its end. Until then (a
    /// failed scan is retried next tick) the table's next window starts at the same place and
    /// still starts a new run if this one was to.
    fn covered(&mut self, table: i64, w: &Window) {
        self.restart.remove(&table);
        self.since.insert(table, w.through);
    }
}

/// The due tasks nobody holds a lease on (`leased`, one flag per due task): those to queue. A
/// leased task is running; queueing it again would only make a worker find it taken.
fn to_enqueue(due: &[TaskId], leased: &[bool]) -> Vec<(i64, i64)> {
    due.iter()
        .zip(leased)
        .filter(|(_, l)| !**l)
        .map(|(t, _)| (t.tenant_id, t.table_id))
        .collect()
}

/// Scheduling state a leader keeps between ticks.
#[derive(Default)]
pub struct Scheduler {
    coverage: Coverage,
    plans: HashMap<i64, SlicePlan>,
    plans_at: Option<Instant>,
    /// Tables whose last change detection failed (logged once per failing spell).
    scan_failing: std::collections::HashSet<i64>,
    /// When stale `queued` marks were last swept (see `Leases::sweep_queued`).
    swept_at: Option<Instant>,
}

/// How often the leader clears `queued` marks that lost their task (a worker that died between
/// a blocking pop and clearing the mark). Such a task waits this long at most to be queued
/// again; the sweep reads every queue, so not every tick.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

impl Scheduler {
    /// One tick: detect changes, then queue due tasks. Call only while leading.
    pub async fn tick(
        &mut self,
        cfg: &CoordinatorConfig,
        deps: &Deps,
    ) -> Result<TickReport, TickError> {
        let t0 = Instant::now();
        let mut r = TickReport::default();
        if self
            .plans_at
            .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
        {
            self.plans.clear();
            let specs = deps.control.tables().await?;
            r.queries += 1;
            for spec in specs {
                if !spec.enabled {
                    continue;
                }
                match deps
                    .source
                    .columns(&spec.source_schema, &spec.source_table)
                    .await
                {
                    Ok(cols) => match SlicePlan::build(&spec, &cols) {
                        Ok(p) => {
                            metrics::scan_registered(&p.table);
                            self.plans.insert(spec.id, p);
                        }
                        // The worker records this error on the task; here it only means no
                        // change detection for the table.
                        Err(e) => {
                            debug!(table = %spec.source_table, error = %e, "no change detection")
                        }
                    },
                    Err(e) => debug!(table = %spec.source_table, error = %e, "no change detection"),
                }
                r.queries += 2;
            }
            if self.coverage.is_empty() {
                self.coverage
                    .start(deps.control.change_detection_start().await?);
                r.queries += 1;
            }
            self.plans_at = Some(Instant::now());
        }

        let horizon = deps.source.horizon(cfg.cursor_skew).await?;
        r.queries += 1;
        let plans = std::mem::take(&mut self.plans);
        for (table_id, plan) in &plans {
            // One table's failure (a source row the query cannot decode, a dropped table, a
            // permission revoked) must not stop change detection of every other table: it is
            // counted and logged, its coverage stays where it was, and the next tick retries.
            match self
                .scan_table(*table_id, plan, horizon, deps, &mut r)
                .await
            {
                Ok(()) => {
                    if self.scan_failing.remove(table_id) {
                        info!(table = %plan.table, "change detection recovered");
                    }
                }
                Err(e) => {
                    r.scan_failures += 1;
                    metrics::scan_failed(&plan.table);
                    if self.scan_failing.insert(*table_id) {
                        warn!(table = %plan.table, error = %e, "change detection failed; other tables go on, this one is retried every tick");
                    }
                }
            }
        }
        self.plans = plans;

        let due = deps.control.due_tasks(cfg.max_enqueue).await?;
        r.queries += 1;
        r.due = due.len();
        let pairs: Vec<(i64, i64)> = due.iter().map(|t| (t.tenant_id, t.table_id)).collect();
        let leased = deps.leases.leased(&pairs).await?;
        let free = to_enqueue(&due, &leased);
        if self.swept_at.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
            let forgot = deps.leases.sweep_queued(cfg.shards).await?;
            if forgot > 0 {
                warn!(
                    tasks = forgot,
                    "queued marks without a queued task cleared; those tasks are queued again"
                );
            }
            self.swept_at = Some(Instant::now());
        }
        r.queued = deps.leases.enqueue(&free, cfg.shards).await?;
        r.took = t0.elapsed();
        Ok(r)
    }

    /// Change detection of one table: tenants with rows in `[since, horizon)` are marked
    /// changed, then the table's coverage moves to `horizon`.
    async fn scan_table(
        &mut self,
        table_id: i64,
        plan: &SlicePlan,
        horizon: DateTime<Utc>,
        deps: &Deps,
        r: &mut TickReport,
    ) -> Result<(), TickError> {
        let Some(w) = self.coverage.window(table_id, horizon) else {
            return Ok(());
        };
        let changed = deps.source.changed_tenants(plan, w.from, w.through).await?;
        r.queries += 1;
        if !changed.is_empty() {
            r.changed_tasks += deps
                .control
                .mark_changed(table_id, &changed, w.through)
                .await?;
            r.queries += 1;
        }
        // Only after the changes are marked: a reader must never see the coverage extended
        // over a change whose task is not yet known to have one.
        deps.control
            .record_scan(table_id, w.from, w.through, w.restart)
            .await?;
        r.queries += 1;
        self.coverage.covered(table_id, &w);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TickError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lease(#[from] tenantsync_lease::LeaseError),
}

/// Whether this coordinator's ticks work, for `/readyz`: a coordinator whose every tick fails
/// schedules nothing, and must not look healthy while it does.
#[derive(Debug, Default)]
pub struct Health {
    failing_since: std::sync::Mutex<Option<Instant>>,
}

impl Health {
    /// Ticks failing longer than this make the coordinator unready.
    pub const UNREADY_AFTER: Duration = Duration::from_secs(15);

    /// Record a tick's outcome; true when it changed whether ticks are failing.
    fn set(&self, failing: bool) -> bool {
        let mut f = self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
        match (failing, f.is_some()) {
            (true, false) => *f = Some(Instant::now()),
            (false, true) => *f = None,
            _ => return false,
        }
        true
    }

    /// How long every tick has been failing, if the last one failed.
    pub fn failing_for(&self) -> Option<Duration> {
        let f = self.failing_since.lock().unwrap_or_else(|p| p.into_inner());
        f.map(|t| t.elapsed())
    }

    /// An explanation when ticks have failed for longer than [`Self::UNREADY_AFTER`].
    pub fn unready(&self) -> Option<String> {
        self.failing_for()
            .filter(|d| *d > Self::UNREADY_AFTER)
            .map(|d| format!("coordinator ticks failing for {} s", d.as_secs()))
    }
}

/// Run as a coordinator until `shutdown`: campaign for leadership, and tick while leading.
/// Outages of Redis or Postgres are waited out, logged once per state change.
pub async fn run(cfg: CoordinatorConfig, deps: Deps, shutdown: CancellationToken) {
    run_with_health(cfg, deps, std::sync::Arc::default(), shutdown).await
}

/// [`run`], reporting whether ticks work to `health` (served by `/readyz`).
pub async fn run_with_health(
    cfg: CoordinatorConfig,
    deps: Deps,
    health: std::sync::Arc<Health>,
    shutdown: CancellationToken,
) {
    let mut lease: Option<Lease> = None;
    let mut sched = Scheduler::default();
    // Gauges are refreshed on their own task: reading every task's state takes ~0.4 s at
    // 100,000 tasks and must not delay a tick.
    let refresher = {
        let (deps, stop, shards) = (deps.clone(), shutdown.clone(), cfg.shards);
        tokio::spawn(async move {
            let mut refresher = metrics::Refresher::default();
            while !stop.is_cancelled() {
                if let Err(e) = refresher.refresh(&deps, shards).await {
                    debug!(error = %e, "metrics refresh failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.cancelled() => {}
                }
            }
        })
    };
    let leading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let janitor = cfg.run_log_keep.map(|keep| {
        let (deps, stop, leading) = (deps.clone(), shutdown.clone(), leading.clone());
        tokio::spawn(prune_run_log(deps, keep, leading, stop))
    });
    while !shutdown.is_cancelled() {
        let step = async {
            match &lease {
                None => {
                    if let Some(l) = deps.leases.acquire_leader(&cfg.id, cfg.leader_ttl).await? {
                        info!(coordinator = %cfg.id, "became leader");
                        lease = Some(l);
                        sched = Scheduler::default();
                    }
                }
                Some(l) => {
                    if !deps.leases.renew(l).await? {
                        warn!(coordinator = %cfg.id, "lost leadership");
                        lease = None;
                    }
                }
            }
            metrics::leader(lease.is_some());
            leading.store(lease.is_some(), std::sync::atomic::Ordering::Relaxed);
            if lease.is_some() {
                let r = sched.tick(&cfg, &deps).await?;
                if r.queued > 0 || r.changed_tasks > 0 {
                    debug!(
                        queued = r.queued,
                        due = r.due,
                        changed = r.changed_tasks,
                        queries = r.queries,
                        took_ms = r.took.as_millis() as u64,
                        "tick"
                    );
                }
            }
            Ok::<(), TickError>(())
        };
        match step.await {
            Ok(()) => {
                if health.set(false) {
                    info!("coordinator recovered");
                }
            }
            Err(e) => {
                metrics::tick_failed();
                if health.set(true) {
                    warn!(error = %e, "coordinator tick failed; retrying");
                }
                // Start change detection again from the control plane after an outage.
                sched = Scheduler::default();
            }
        }
        let wait = if health.failing_for().is_some() {
            cfg.tick * 4
        } else {
            cfg.tick
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    refresher.abort();
    if let Some(j) = janitor {
        j.abort();
    }
    metrics::leader(false);
    if let Some(l) = lease {
        // Hand over at once instead of making the standby wait for the TTL.
        let _ = deps.leases.release(&l).await;
        info!(coordinator = %cfg.id, "released leadership");
    }
}

/// While this coordinator leads: delete run-log entries older than `keep`, once a minute, in
/// batches of 10,000 (at most 100,000 a round, so a long backlog is worked off over a few
/// rounds instead of in one long statement).
async fn prune_run_log(
    deps: Deps,
    keep: Duration,
    leading: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
) {
    const BATCH: i64 = 10_000;
    let mut last: Option<Instant> = None;
    while !stop.is_cancelled() {
        let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due && leading.load(std::sync::atomic::Ordering::Relaxed) {
            last = Some(Instant::now());
            let mut removed = 0u64;
            for _ in 0..10 {
                match deps.control.prune_runs(keep, BATCH).await {
                    Ok(n) => {
                        removed += n;
                        if n < BATCH as u64 {
                            break;
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "run log pruning failed");
                        break;
                    }
                }
            }
            if removed > 0 {
                debug!(removed, "run log pruned");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn a_new_leader_scans_each_table_from_its_slowest_task_in_a_new_run() {
        let mut c = Coverage::default();
        assert!(c.is_empty());
        c.start([(1, Some(at(10))), (2, None)]);
        assert!(!c.is_empty());
        let w = c.window(1, at(20)).unwrap();
        assert_eq!(
            w,
            Window {
                from: at(10),
                through: at(20),
                restart: true
            }
        );
        // A task that never synced: everything is a change.
        assert_eq!(c.window(2, at(20)).unwrap().from, beginning());
        c.covered(1, &w);
        // The next scan continues the run where the last one ended.
        assert_eq!(
            c.window(1, at(30)),
            Some(Window {
                from: at(20),
                through: at(30),
                restart: false
            })
        );
    }

    #[test]
    fn nothing_is_scanned_until_the_horizon_passes_the_coverage() {
        let mut c = Coverage::default();
        c.start([(1, Some(at(10)))]);
        assert_eq!(c.window(1, at(10)), None);
        assert_eq!(c.window(1, at(5)), None);
        let w = c.window(1, at(11)).unwrap();
        c.covered(1, &w);
        // A horizon that went back (another Postgres clock after a failover) scans nothing.
        assert_eq!(c.window(1, at(9)), None);
    }

    #[test]
    fn a_failed_scan_is_retried_from_the_same_place_in_the_same_run() {
        let mut c = Coverage::default();
        c.start([(1, Some(at(10)))]);
        let w = c.window(1, at(20)).unwrap();
        // Not recorded (its statement failed): the next window is wider, and still restarts.
        assert_eq!(
            c.window(1, at(25)),
            Some(Window {
                from: at(10),
                through: at(25),
                restart: true
            })
        );
        assert!(w.restart);
    }

    #[test]
    fn a_table_registered_during_a_leadership_starts_from_the_beginning() {
        let mut c = Coverage::default();
        c.start([(1, Some(at(10)))]);
        let w = c.window(7, at(20)).unwrap();
        assert_eq!((w.from, w.restart), (beginning(), true));
        c.covered(7, &w);
        assert_eq!(
            c.window(7, at(21)).map(|w| (w.from, w.restart)),
            Some((at(20), false))
        );
    }

    #[test]
    fn only_due_tasks_nobody_leases_are_queued() {
        let t = |tenant_id, table_id| TaskId {
            tenant_id,
            table_id,
        };
        let due = [t(1, 1), t(1, 2), t(2, 1), t(3, 3)];
        assert_eq!(
            to_enqueue(&due, &[false, true, false, true]),
            [(1, 1), (2, 1)]
        );
        assert!(to_enqueue(&due, &[true; 4]).is_empty());
        assert_eq!(to_enqueue(&due, &[false; 4]).len(), 4);
    }
}
