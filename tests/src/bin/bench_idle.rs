//! Idle-scale benchmark of the coordinator tick (issues 3 and 8): tick time and Postgres
//! statements per tick with many idle tenants (default 10,000 tenants × 10 tables).
//!
//! It runs the real [`Scheduler::tick`] against fresh databases (see [`TestEnv`]): 10 source
//! tables holding old rows for every tenant, tenants and their sync state inserted with
//! set-based SQL (onboarding 10,000 tenants through the BigQuery emulator would take long and
//! measure nothing of interest here), every task caught up and idle. Phases:
//!
//! - `cold`: the first tick of a leadership (loads plans and change-detection start).
//! - `idle`: nothing changes, nothing is due.
//! - `writes`: between ticks a few tenants write one row each; a simulated worker drains the
//!   queue after every tick (pops the tasks from Redis and records them as caught up with one
//!   set-based UPDATE that has the effect of `claim` + `commit`; no BigQuery, no source read).
//! - `recheck`: no writes, but every task's next run is spread over the worker's idle re-check
//!   period (300 s), the steady state of a long-running deployment; the simulated worker drains.
//!
//! Figures per tick: wall time, `TickReport.queries`, and independently of the report the
//! transactions Postgres counted in `pg_stat_database` for the two databases (in autocommit one
//! statement is one transaction), minus the statements this harness issued itself. When
//! `pg_stat_statements` is loaded (`shared_preload_libraries`), its call counts are shown too.
//! Then each statement of the tick is timed on its own. Benchmarks print figures; nothing here
//! asserts on time.
//!
//! Settings (environment): `BENCH_TENANTS` (10000), `BENCH_TABLES` (10), `BENCH_ROWS_PER_TENANT`
//! (3 per table), `BENCH_IDLE_TICKS` (50), `BENCH_WRITE_TICKS` (50), `BENCH_WRITERS` (20 per
//! tick), `BENCH_RECHECK_TICKS` (50), `BENCH_SETTLE_SECS` (11: Postgres 15 backends flush their
//! statistics within 10 s of going idle), `BENCH_PACE_MS` (sleep between ticks; the
//! coordinator's 250 ms), `BENCH_KEEP=1` keeps the databases (for EXPLAIN), `BENCH_TRACE=1`
//! prints every statement with its client-side time to stderr, `BENCH_CONTROL_SYNC_COMMIT=off`
//! runs the coordinator's control-plane sessions with that `synchronous_commit` (an experiment
//! on what commits cost the tick).

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use std::future::Future;
use std::time::{Duration, Instant};
use tenantsync_coordinator::{CoordinatorConfig, Deps, Scheduler, TickReport};
use tenantsync_store::SlicePlan;
use tenantsync_tests::TestEnv;

struct Params {
    tenants: i64,
    tables: usize,
    rows_per_tenant: i64,
    idle_ticks: usize,
    write_ticks: usize,
    writers: usize,
    recheck_ticks: usize,
    settle: Duration,
    /// Sleep between ticks (the coordinator's `tick` setting unless `BENCH_PACE_MS` is set).
    pace: Option<Duration>,
    keep: bool,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

impl Params {
    fn from_env() -> Result<Self> {
        Ok(Self {
            tenants: env_num("BENCH_TENANTS", 10_000)?,
            tables: env_num("BENCH_TABLES", 10)?,
            rows_per_tenant: env_num("BENCH_ROWS_PER_TENANT", 3)?,
            idle_ticks: env_num("BENCH_IDLE_TICKS", 50)?,
            write_ticks: env_num("BENCH_WRITE_TICKS", 50)?,
            writers: env_num("BENCH_WRITERS", 20)?,
            recheck_ticks: env_num("BENCH_RECHECK_TICKS", 50)?,
            settle: Duration::from_secs(env_num("BENCH_SETTLE_SECS", 11)?),
            pace: match std::env::var("BENCH_PACE_MS") {
                Ok(_) => Some(Duration::from_millis(env_num("BENCH_PACE_MS", 0)?)),
                Err(_) => None,
            },
            keep: std::env::var("BENCH_KEEP").is_ok_and(|v| v == "1"),
        })
    }
}

fn table_name(i: usize) -> String {
    format!("bench_t{i:02}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `q` quantile (nearest rank) of sorted values.
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

// ------------------------------------------------------------------------- counting statements

/// Statements this harness ran itself (writers, simulated worker), per database, so they can be
/// taken out of Postgres' own counts.
#[derive(Default, Clone, Copy)]
struct Own {
    control: i64,
    source: i64,
    /// pg_stat_statements reads on the control database: transactions, but left out of the
    /// calls by their text.
    meter_reads: i64,
}

/// Per database (control, source): transactions (commits + rollbacks) from `pg_stat_database`,
/// and `pg_stat_statements` calls when that extension is loaded.
#[derive(Clone, Copy)]
struct Counts {
    xact: (i64, i64),
    pgss: Option<(i64, i64)>,
}

struct Meter {
    /// On `DATABASE_URL`'s database (not one of the two measured), so reading adds nothing.
    admin: PgPool,
    /// On the control database (where the extension is created), when `pg_stat_statements`
    /// is loaded. Its reads are left out of the calls by their text.
    pgss: Option<PgPool>,
    control_db: String,
    source_db: String,
    settle: Duration,
}

impl Meter {
    async fn snapshot(&self) -> Result<Counts> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT datname::text, (xact_commit + xact_rollback)::bigint
             FROM pg_stat_database WHERE datname IN ($1, $2)",
        )
        .bind(&self.control_db)
        .bind(&self.source_db)
        .fetch_all(&self.admin)
        .await?;
        let get = |rows: &[(String, i64)], db: &str| {
            rows.iter().find(|(d, _)| d == db).map_or(0, |(_, n)| *n)
        };
        let xact = (get(&rows, &self.control_db), get(&rows, &self.source_db));
        let pgss = match &self.pgss {
            Some(pool) => {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT d.datname::text, sum(s.calls)::bigint
                     FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
                     WHERE d.datname IN ($1, $2) AND s.query NOT ILIKE '%pg_stat_statements%'
                     GROUP BY 1",
                )
                .bind(&self.control_db)
                .bind(&self.source_db)
                .fetch_all(pool)
                .await?;
                Some((get(&rows, &self.control_db), get(&rows, &self.source_db)))
            }
            None => None,
        };
        Ok(Counts { xact, pgss })
    }

    /// Wait until every backend has flushed its statistics, then snapshot.
    async fn settled(&self) -> Result<Counts> {
        tokio::time::sleep(self.settle).await;
        self.snapshot().await
    }
}

type PerDb = (f64, f64);

/// Per tick (control, source): the difference of two snapshots without the harness' own
/// statements.
fn per_tick(before: Counts, after: Counts, own: Own, ticks: usize) -> (PerDb, Option<PerDb>) {
    let n = ticks.max(1) as f64;
    let f = |b: (i64, i64), a: (i64, i64), extra: i64| {
        (
            (a.0 - b.0 - own.control - extra) as f64 / n,
            (a.1 - b.1 - own.source) as f64 / n,
        )
    };
    let pgss = match (before.pgss, after.pgss) {
        (Some(b), Some(a)) => Some(f(b, a, 0)),
        _ => None,
    };
    (f(before.xact, after.xact, own.meter_reads), pgss)
}

// ------------------------------------------------------------------------------------ phases

/// One phase's figures.
struct Phase {
    name: &'static str,
    ticks: Vec<(Duration, TickReport)>,
    xact_per_tick: PerDb,
    pgss_per_tick: Option<PerDb>,
    /// Tasks the simulated worker ran during the phase.
    worked: usize,
    /// Statements the harness issued during the phase (taken out of the counts).
    own: Own,
}

#[derive(Clone, Copy, PartialEq)]
enum Between {
    Nothing,
    Writes,
    Drain,
}

struct Bench<'a> {
    env: &'a TestEnv,
    p: &'a Params,
    cfg: CoordinatorConfig,
    deps: Deps,
    sched: Scheduler,
    meter: Meter,
    rng: StdRng,
}

impl Bench<'_> {
    /// A phase of `n` ticks between two settled snapshots, paced like the coordinator's loop (a
    /// tick, then `cfg.tick` of sleep, during which the harness does its part).
    async fn phase(&mut self, name: &'static str, n: usize, between: Between) -> Result<Phase> {
        let before = self.meter.settled().await?;
        let mut own = Own::default();
        // The pg_stat_statements read of `before` is a control-database transaction.
        if self.meter.pgss.is_some() {
            own.meter_reads += 1;
        }
        let (ticks, worked) = self.run_ticks(n, between, &mut own).await?;
        let after = self.meter.settled().await?;
        let (xact_per_tick, pgss_per_tick) = per_tick(before, after, own, n);
        Ok(Phase {
            name,
            ticks,
            xact_per_tick,
            pgss_per_tick,
            worked,
            own,
        })
    }

    /// `n` ticks, paced; the harness writes and drains between them as `between` says.
    async fn run_ticks(
        &mut self,
        n: usize,
        between: Between,
        own: &mut Own,
    ) -> Result<(Vec<(Duration, TickReport)>, usize)> {
        let mut ticks = Vec::with_capacity(n);
        let mut worked = 0;
        for _ in 0..n {
            let t0 = Instant::now();
            let r = self.sched.tick(&self.cfg, &self.deps).await?;
            ticks.push((t0.elapsed(), r));
            let t1 = Instant::now();
            if between == Between::Writes {
                self.write(own).await?;
            }
            if between != Between::Nothing {
                worked += self.drain(own).await?;
            }
            let pace = self.p.pace.unwrap_or(self.cfg.tick);
            tokio::time::sleep(pace.saturating_sub(t1.elapsed())).await;
        }
        Ok((ticks, worked))
    }

    /// Ticks outside any phase (before the next phase's settle), so that writes made near the
    /// end of a phase are detected and drained before the next one starts.
    async fn unmeasured(&mut self, n: usize) -> Result<()> {
        self.run_ticks(n, Between::Drain, &mut Own::default())
            .await
            .map(|_| ())
    }

    /// `writers` random tenants insert one row each into a random table, one transaction each.
    async fn write(&mut self, own: &mut Own) -> Result<()> {
        for _ in 0..self.p.writers {
            let org = self.rng.gen_range(1..=self.p.tenants);
            let table = table_name(self.rng.gen_range(0..self.p.tables));
            sqlx::query(&format!(
                "INSERT INTO {table} (organization_id, payload) VALUES ($1, 'bench write')"
            ))
            .bind(org)
            .execute(self.env.source_pool())
            .await?;
            own.source += 1;
        }
        Ok(())
    }

    /// A worker without BigQuery: pop every queued task and record it as run and caught up to
    /// the horizon, all in one statement with the effect of `ControlPlane::claim` + `commit`
    /// for a caught-up slice (so the harness keeps the coordinator's pace however many tasks
    /// are due; a real pool spreads this over its workers).
    async fn drain(&mut self, own: &mut Own) -> Result<usize> {
        let horizon = self.env.source.horizon(self.cfg.cursor_skew).await?;
        own.source += 1;
        let (mut tenants, mut tables) = (Vec::new(), Vec::new());
        while let Some((tenant, table)) = self
            .env
            .leases
            .dequeue(self.cfg.shards, (tenants.len() as u32) % self.cfg.shards)
            .await?
        {
            tenants.push(tenant);
            tables.push(table);
        }
        if tenants.is_empty() {
            return Ok(0);
        }
        sqlx::query(
            "UPDATE sync_state s SET
                 fencing_token = s.fencing_token + 1,
                 synced_through = GREATEST(s.synced_through, $1),
                 rows_synced = s.rows_synced + 1,
                 next_run_at = now() + CASE WHEN s.changed_until > GREATEST(s.synced_through, $1)
                                            THEN interval '100 milliseconds'
                                            ELSE interval '300 seconds' END,
                 last_success_at = now(), last_error = NULL, consecutive_failures = 0
             FROM unnest($2::bigint[], $3::bigint[]) AS t(tenant_id, table_id)
             WHERE s.tenant_id = t.tenant_id AND s.table_id = t.table_id",
        )
        .bind(horizon)
        .bind(&tenants)
        .bind(&tables)
        .execute(self.env.control.pool())
        .await?;
        own.control += 1;
        Ok(tenants.len())
    }
}

// --------------------------------------------------------------------------------------- setup

/// Source tables with old rows for every tenant; set-based.
async fn create_source(env: &TestEnv, p: &Params, old: DateTime<Utc>) -> Result<()> {
    let pool = env.source_pool();
    for i in 0..p.tables {
        let t = table_name(i);
        sqlx::query(&format!(
            "CREATE TABLE {t} (
                 id bigserial PRIMARY KEY,
                 organization_id bigint NOT NULL,
                 payload text,
                 updated_at timestamptz NOT NULL DEFAULT now())"
        ))
        .execute(pool)
        .await?;
        // Old rows: each tenant's rows spread over the hour before `old`, in time order (as
        // they would have been written).
        sqlx::query(&format!(
            "INSERT INTO {t} (organization_id, payload, updated_at)
             SELECT o, 'row ' || r || ' of organization ' || o || ': ' || md5(o::text || '/' || r),
                    $3::timestamptz - (random() * interval '1 hour')
             FROM generate_series(1, $1::bigint) o, generate_series(1, $2::bigint) r
             ORDER BY 3"
        ))
        .bind(p.tenants)
        .bind(p.rows_per_tenant)
        .bind(old)
        .execute(pool)
        .await?;
        sqlx::query(&format!("CREATE INDEX {t}_updated_at ON {t} (updated_at)"))
            .execute(pool)
            .await?;
        sqlx::query(&format!(
            "CREATE INDEX {t}_tenant ON {t} (organization_id, updated_at, id)"
        ))
        .execute(pool)
        .await?;
        sqlx::query(&format!("VACUUM ANALYZE {t}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Tables through onboarding (catalog checks included), tenants and sync state set-based, every
/// task caught up past the old rows and not due for an hour.
async fn register(env: &TestEnv, p: &Params, caught_up: DateTime<Utc>) -> Result<()> {
    for i in 0..p.tables {
        env.add_table(&table_name(i), "organization_id")
            .await
            .with_context(|| format!("registering {}", table_name(i)))?;
    }
    let pool = env.control.pool();
    sqlx::query(
        "INSERT INTO tenants (slug, organization_id, bq_project, bq_dataset)
         SELECT 'bench-' || g, g::text, 'tenantsync-local', 'bench_' || g
         FROM generate_series(1, $1::bigint) g ORDER BY g",
    )
    .bind(p.tenants)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO sync_state (tenant_id, table_id, watermark_cursor, watermark_key,
                                 synced_through, fencing_token, rows_synced, last_success_at,
                                 next_run_at, changed_until)
         SELECT tn.id, ts.id, ($1::timestamptz - interval '1 hour')::text, ARRAY['0'],
                $1, 1, $2, $1, now() + interval '1 hour', NULL
         FROM tenants tn CROSS JOIN table_specs ts
         ORDER BY tn.id, ts.id",
    )
    .bind(caught_up)
    .bind(p.rows_per_tenant)
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE tenants, table_specs, sync_state")
        .execute(pool)
        .await?;
    Ok(())
}

// ----------------------------------------------------------------------------------- reporting

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb as f64 / 1048576.0));
    format!("{cpus} CPUs ({model}), {mem} RAM")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn postgres_info(admin: &PgPool) -> Result<(String, String)> {
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(admin)
        .await?;
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings
         WHERE name IN ('shared_buffers', 'synchronous_commit', 'fsync', 'autovacuum',
                        'shared_preload_libraries', 'plan_cache_mode')
         ORDER BY name",
    )
    .fetch_all(admin)
    .await?;
    let s = settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((version, s))
}

fn print_phases(phases: &[Phase], tick: Duration) {
    println!();
    println!(
        "Ticks (paced: tick, then {} ms sleep; wall time of Scheduler::tick; \
         queries = TickReport.queries; xacts = pg_stat_database commits+rollbacks per tick, \
         harness statements taken out)",
        tick.as_millis()
    );
    println!(
        "| phase | ticks | p50 ms | p95 ms | max ms | mean ms | queries/tick mean (min–max) | \
         xacts/tick control | xacts/tick source | due/tick mean (max) | queued/tick mean (max) | \
         changed tasks/tick | worker tasks |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for ph in phases {
        let t = sorted(ph.ticks.iter().map(|(d, _)| ms(*d)).collect());
        let q: Vec<f64> = ph.ticks.iter().map(|(_, r)| f64::from(r.queries)).collect();
        let due: Vec<f64> = ph.ticks.iter().map(|(_, r)| r.due as f64).collect();
        let queued: Vec<f64> = ph.ticks.iter().map(|(_, r)| r.queued as f64).collect();
        let changed: Vec<f64> = ph
            .ticks
            .iter()
            .map(|(_, r)| r.changed_tasks as f64)
            .collect();
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} ({:.0}–{:.0}) | {:.1} | {:.1} | \
             {:.1} ({:.0}) | {:.1} ({:.0}) | {:.1} | {} |",
            ph.name,
            ph.ticks.len(),
            pct(&t, 0.5),
            pct(&t, 0.95),
            max(&t),
            mean(&t),
            mean(&q),
            min(&q),
            max(&q),
            ph.xact_per_tick.0,
            ph.xact_per_tick.1,
            mean(&due),
            max(&due),
            mean(&queued),
            max(&queued),
            mean(&changed),
            ph.worked,
        );
    }
    if phases.iter().any(|p| p.pgss_per_tick.is_some()) {
        println!();
        println!("pg_stat_statements calls per tick (harness statements taken out):");
        for ph in phases {
            if let Some((c, s)) = ph.pgss_per_tick {
                println!("  {:8} control {c:.1}  source {s:.1}", ph.name);
            }
        }
    }
    println!();
    println!("Harness statements taken out of the counts (writers, simulated worker):");
    for ph in phases {
        println!(
            "  {:8} control {}  source {}",
            ph.name, ph.own.control, ph.own.source
        );
    }
}

/// Time `f` `n` times.
async fn timed<F, Fut, T>(n: usize, mut f: F) -> Result<Vec<f64>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        f(i).await?;
        v.push(ms(t0.elapsed()));
    }
    Ok(sorted(v))
}

/// Each statement of a tick on its own (after the phases, so its writes disturb nothing).
async fn breakdown(b: &mut Bench<'_>) -> Result<()> {
    let env = b.env;
    let cfg = &b.cfg;
    // The coordinator's control plane (its pool may carry BENCH_CONTROL_SYNC_COMMIT).
    let control = &b.deps.control;
    let specs = control.tables().await?;
    let mut plans: Vec<(i64, SlicePlan)> = Vec::new();
    for s in &specs {
        let cols = env
            .source
            .columns(&s.source_schema, &s.source_table)
            .await?;
        plans.push((s.id, SlicePlan::build(s, &cols)?));
    }
    let mut rows: Vec<(String, usize, Vec<f64>, String)> = Vec::new();
    let mut add = |name: &str, v: Vec<f64>, per_tick: &str| {
        rows.push((name.to_string(), v.len(), v, per_tick.to_string()));
    };
    let tables = plans.len();
    let per_table = format!("{tables} (1 per table)");

    add(
        "horizon (source, pg_stat_activity)",
        timed(50, |_| async {
            Ok(env.source.horizon(cfg.cursor_skew).await?)
        })
        .await?,
        "1",
    );
    let h = env.source.horizon(cfg.cursor_skew).await?;
    let window = cfg.tick + Duration::from_millis(10);
    let since = h - chrono::Duration::from_std(window)?;
    add(
        "changed_tenants, one tick's window (source)",
        timed(5 * tables, |i| {
            let plan = &plans[i % tables].1;
            async move { Ok(env.source.changed_tenants(plan, since, h).await?) }
        })
        .await?,
        &per_table,
    );
    let from = DateTime::from_timestamp(-62_135_596_800, 0).expect("year 1 is representable");
    let v = timed(tables, |i| {
        let plan = &plans[i % tables].1;
        async move { Ok(env.source.changed_tenants(plan, from, h).await?) }
    })
    .await?;
    let changed_rows = env
        .source
        .changed_tenants(&plans[0].1, from, h)
        .await?
        .len();
    add(
        &format!("changed_tenants, whole table (new table/leader; {changed_rows} tenants)"),
        v,
        "0 (only when coverage restarts at 0001-01-01)",
    );
    add(
        "record_scan (control, upsert + commit)",
        timed(5 * tables, |i| {
            let table = plans[i % tables].0;
            async move { Ok(control.record_scan(table, since, h, false).await?) }
        })
        .await?,
        &per_table,
    );
    add(
        "due_tasks(2000) (control)",
        timed(50, |_| async {
            Ok(control.due_tasks(cfg.max_enqueue).await?)
        })
        .await?,
        "1",
    );
    let orgs: Vec<Vec<String>> = (0..5 * tables)
        .map(|_| {
            (0..b.p.writers)
                .map(|_| b.rng.gen_range(1..=b.p.tenants).to_string())
                .collect()
        })
        .collect();
    add(
        &format!("mark_changed, {} tenants (control)", b.p.writers),
        timed(5 * tables, |i| {
            let table = plans[i % tables].0;
            let orgs = &orgs[i];
            async move { Ok(control.mark_changed(table, orgs, h).await?) }
        })
        .await?,
        "0–1 per table (when it changed)",
    );
    add(
        "change_detection_start (control)",
        timed(10, |_| async {
            Ok(control.change_detection_start().await?)
        })
        .await?,
        "1 per leadership",
    );
    add(
        "tables (control)",
        timed(10, |_| async { Ok(control.tables().await?) }).await?,
        "1 per 30 s",
    );
    add(
        "columns (source, 2 statements)",
        timed(5 * tables, |i| {
            let s = &specs[i % tables];
            async move {
                Ok(env
                    .source
                    .columns(&s.source_schema, &s.source_table)
                    .await?)
            }
        })
        .await?,
        "1 per table per 30 s",
    );
    add(
        "status (control; the coordinator loop's metrics refresh)",
        timed(3, |_| async { Ok(control.status().await?) }).await?,
        "not in tick: 1 per 5 s in coordinator::run",
    );
    let pairs: Vec<(i64, i64)> = (0..cfg.max_enqueue)
        .map(|i| (i % b.p.tenants + 1, plans[i as usize % tables].0))
        .collect();
    add(
        &format!("leases.leased, {} tasks (Redis MGET)", pairs.len()),
        timed(10, |_| async { Ok(env.leases.leased(&pairs).await?) }).await?,
        "1 when anything is due",
    );

    println!();
    println!("Statements of a tick, each timed on its own (client wall time, ms):");
    println!("| statement | calls | p50 | p95 | max | per tick |");
    println!("|---|---:|---:|---:|---:|---|");
    for (name, n, v, per) in &rows {
        let max = v.last().copied().unwrap_or(f64::NAN);
        println!(
            "| {name} | {n} | {:.2} | {:.2} | {:.2} | {per} |",
            pct(v, 0.5),
            pct(v, 0.95),
            max
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------- main

async fn run(env: &TestEnv, p: &Params) -> Result<()> {
    let admin = tenantsync_store::connect(
        &std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?,
        1,
    )
    .await?;
    let (pg_version, pg_settings) = postgres_info(&admin).await?;
    let control_db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(env.control.pool())
        .await?;
    let source_db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(env.source_pool())
        .await?;
    let pgss = if pg_settings.contains("pg_stat_statements") {
        let pool = tenantsync_store::connect(&env.control_url, 1).await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&pool)
            .await?;
        Some(pool)
    } else {
        None
    };

    println!("bench_idle: coordinator tick at idle scale");
    println!("machine:   {}", machine());
    println!("postgres:  {pg_version} ({pg_settings})");
    println!("load avg:  {} (at start)", loadavg());
    println!(
        "scale:     {} tenants × {} tables = {} tasks; {} old rows per tenant per table ({} source rows)",
        p.tenants,
        p.tables,
        p.tenants * p.tables as i64,
        p.rows_per_tenant,
        p.tenants * p.tables as i64 * p.rows_per_tenant
    );
    println!(
        "counting:  pg_stat_database xacts{}",
        if pgss.is_some() {
            " and pg_stat_statements calls"
        } else {
            " (pg_stat_statements is not in shared_preload_libraries)"
        }
    );
    println!("databases: {control_db} (control), {source_db} (source)");

    let t0 = Instant::now();
    // Old rows end an hour ago; tasks are confirmed up to a minute ago, past all of them.
    let now = Utc::now();
    create_source(env, p, now - chrono::Duration::hours(1)).await?;
    let t_source = t0.elapsed();
    let t1 = Instant::now();
    register(env, p, now - chrono::Duration::minutes(1)).await?;
    println!(
        "setup:     source tables {:.1} s, tenants and sync state {:.1} s",
        t_source.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );

    let cfg = CoordinatorConfig::new("bench");
    // An experiment on what commits cost the tick: the coordinator's control-plane sessions
    // with another synchronous_commit (e.g. off).
    let control = match std::env::var("BENCH_CONTROL_SYNC_COMMIT") {
        Ok(v) => {
            anyhow::ensure!(
                ["on", "off", "local", "remote_write", "remote_apply"].contains(&v.as_str()),
                "BENCH_CONTROL_SYNC_COMMIT={v:?} is not a synchronous_commit value"
            );
            sqlx::query(&format!(
                "ALTER DATABASE {} SET synchronous_commit = {v}",
                control_db
            ))
            .execute(&admin)
            .await?;
            println!("variant:   coordinator's control-plane sessions use synchronous_commit={v}");
            tenantsync_store::ControlPlane::new(
                tenantsync_store::connect(&env.control_url, 8).await?,
            )
        }
        Err(_) => env.control.clone(),
    };
    let deps = Deps {
        control,
        source: env.source.clone(),
        leases: env.leases.clone(),
    };
    let mut b = Bench {
        env,
        p,
        cfg,
        deps,
        sched: Scheduler::default(),
        meter: Meter {
            admin,
            pgss,
            control_db,
            source_db,
            settle: p.settle,
        },
        rng: StdRng::seed_from_u64(8),
    };

    // What the two databases count with no coordinator at all, over one settle interval.
    let quiet0 = b.meter.settled().await?;
    let quiet1 = b.meter.settled().await?;
    println!(
        "noise:     {} control / {} source transactions over {} s with nothing running",
        quiet1.xact.0 - quiet0.xact.0,
        quiet1.xact.1 - quiet0.xact.1,
        p.settle.as_secs()
    );

    let mut phases = vec![b.phase("cold", 1, Between::Nothing).await?];
    phases.push(b.phase("idle", p.idle_ticks, Between::Nothing).await?);
    phases.push(b.phase("writes", p.write_ticks, Between::Writes).await?);
    // The horizon trails by the cursor skew: the last writes are seen a few ticks later.
    b.unmeasured(8).await?;
    // The steady state of a long run: every caught-up task re-checked within 300 s (the
    // worker's idle_recheck), spread evenly from the phase's start on.
    sqlx::query(
        "UPDATE sync_state SET next_run_at = now() + make_interval(secs => $1)
                                             + random() * interval '300 seconds'",
    )
    .bind(p.settle.as_secs_f64())
    .execute(env.control.pool())
    .await?;
    phases.push(b.phase("recheck", p.recheck_ticks, Between::Drain).await?);
    print_phases(&phases, p.pace.unwrap_or(b.cfg.tick));

    breakdown(&mut b).await?;
    println!();
    println!("load avg:  {} (at end)", loadavg());
    // Leave nothing queued in Redis under this run's prefix.
    let mut own = Own::default();
    b.drain(&mut own).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let p = Params::from_env()?;
    anyhow::ensure!(
        p.tenants > 0 && p.tables > 0 && p.rows_per_tenant >= 0,
        "BENCH_TENANTS and BENCH_TABLES must be positive"
    );
    if std::env::var("BENCH_TRACE").is_ok_and(|v| v == "1") {
        // Every statement with its client-side time, to stderr (TestEnv's own logging then
        // stays off: first subscriber wins).
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn,sqlx::query=debug"))
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let env = TestEnv::new().await?;
    let result = run(&env, &p).await;
    if p.keep {
        eprintln!(
            "bench_idle: BENCH_KEEP=1: databases tstest_{0}_ctl and tstest_{0}_src kept \
             (scripts/test-cleanup drops them)",
            env.id
        );
    } else {
        // TestEnv::cleanup deletes every tenant's dataset in the emulator; these tenants have
        // none, so forget them first and let it drop the databases only.
        sqlx::query("DELETE FROM tenants")
            .execute(env.control.pool())
            .await?;
        env.cleanup().await?;
    }
    result
}
