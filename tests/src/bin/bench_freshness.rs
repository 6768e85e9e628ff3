//! Freshness benchmark (issue 8): lag from source commit to insertAll acknowledgement with
//! `BENCH_TENANTS` (1,000) tenants × `BENCH_TABLES` (4) tables and `BENCH_RATE` (1,000) rows/s
//! of writes for `BENCH_SECONDS` (60), through the real pool: `tenantsync coordinator` and
//! `BENCH_WORKERS` × `tenantsync worker` (release binaries, separate processes, default
//! settings), BigQuery being the zero-cost sink ([`tenantsync_tests::sink`]). The local
//! BigQuery emulator cannot hold 1,000 datasets at this speed (about 3–4k rows/s in total, and
//! seconds per dataset/table create), so it would measure itself, not tenantsync.
//!
//! Lag per row = the sink's acknowledgement time − the row's `_source_ts` (its `updated_at`,
//! set by `DEFAULT now()`, the start of the writer's single-statement transaction, which
//! commits within a millisecond). Only rows written after `BENCH_WARMUP_SECS` (10) count. A
//! row sent twice (a retry) counts with its first acknowledgement. Rows not acknowledged
//! `BENCH_DRAIN_SECS` (60) after the writes ended are reported as missing.
//!
//! Setup: the tables (same wide-ish shape as the throughput benchmark) get
//! `BENCH_SEED_ROWS` (2) old rows per tenant each, then `VACUUM ANALYZE`; tables and tenants are
//! registered through `onboard` (tenants against the sink); the coordinator and workers start
//! and sync the seed until every task is caught up; then the writes start. Writers are
//! `BENCH_WRITERS` (8) connections, each inserting one row per transaction into a random
//! (tenant, table) on a fixed schedule (a late writer catches up at once, so the rate holds).
//!
//! Other settings: `BENCH_CONCURRENCY` (worker `TENANTSYNC_CONCURRENCY`; default 32, the worker's),
//! `BENCH_INTERVAL_MS` (each table's `--interval-ms`, 1000 like `tables add`),
//! `BENCH_VACUUM_SECS` (30: `VACUUM ANALYZE` of the control plane's busy tables this often
//! during the writes, standing in for autovacuum, which is off on the development server; 0 =
//! never; the whole control plane is analyzed once after setup either way),
//! `BENCH_KEEP=1`. `TENANTSYNC_*` variables in the environment reach the processes unchanged
//! (e.g. `TENANTSYNC_TICK_MS`, `TENANTSYNC_CURSOR_SKEW_MS`).

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tenantsync_core::Mode;
use tenantsync_store::control::NewTableSpec;
use tenantsync_tests::bench::{self, env_flag, env_num, pct, Meter};
use tenantsync_tests::sink::Sink;
use tenantsync_tests::TestEnv;
use tenantsync_worker::onboard;

struct Params {
    tenants: i64,
    tables: usize,
    rate: f64,
    seconds: f64,
    warmup: f64,
    drain: f64,
    workers: usize,
    concurrency: usize,
    writers: usize,
    seed_rows: i64,
    interval_ms: i32,
    vacuum_secs: f64,
    keep: bool,
}

impl Params {
    fn from_env() -> Result<Self> {
        Ok(Self {
            tenants: env_num("BENCH_TENANTS", 1000)?,
            tables: env_num("BENCH_TABLES", 4)?,
            rate: env_num("BENCH_RATE", 1000.0)?,
            seconds: env_num("BENCH_SECONDS", 60.0)?,
            warmup: env_num("BENCH_WARMUP_SECS", 10.0)?,
            drain: env_num("BENCH_DRAIN_SECS", 60.0)?,
            workers: env_num("BENCH_WORKERS", 1)?,
            concurrency: env_num("BENCH_CONCURRENCY", 32)?,
            writers: env_num("BENCH_WRITERS", 8)?,
            seed_rows: env_num("BENCH_SEED_ROWS", 2)?,
            interval_ms: env_num("BENCH_INTERVAL_MS", 1000)?,
            vacuum_secs: env_num("BENCH_VACUUM_SECS", 30.0)?,
            keep: env_flag("BENCH_KEEP", false),
        })
    }
}

fn table_name(i: usize) -> String {
    format!("bench_f{i}")
}

const COLUMNS: &str =
    "organization_id, contact_id, body, kind, direction, is_read, tags, media_ids,
                       amount, score, attrs, sent_at";

async fn create_source(env: &TestEnv, p: &Params) -> Result<()> {
    let pool = env.source_pool();
    for i in 0..p.tables {
        let t = table_name(i);
        sqlx::raw_sql(&bench::wide_table_sql(&t))
            .execute(pool)
            .await?;
        sqlx::query(&format!(
            "INSERT INTO {t} ({COLUMNS}, inserted_at, updated_at)
             SELECT o, g, 'seed ' || g, 'text', 'inbound', false, ARRAY['seed'], NULL, 1.5, 0.5,
                    '{{\"seed\": true}}', ts, ts, ts
             FROM generate_series(1, $1) o, generate_series(1, $2) g,
                  LATERAL (SELECT now() - interval '1 hour' + g * interval '1 second' AS ts) x"
        ))
        .bind(p.tenants)
        .bind(p.seed_rows)
        .execute(pool)
        .await?;
        sqlx::raw_sql(&format!("VACUUM ANALYZE {t}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

async fn register(env: &TestEnv, p: &Params) -> Result<()> {
    for i in 0..p.tables {
        onboard::add_table(
            &env.control,
            &env.source,
            NewTableSpec {
                source_schema: "public".into(),
                source_table: table_name(i),
                key_columns: vec![],
                cursor_column: "updated_at".into(),
                tenant_column: "organization_id".into(),
                mode: Mode::Latest,
                sync_interval_ms: p.interval_ms,
                slice_rows: 20_000,
                soft_delete_column: None,
                capture: Default::default(),
                exclude_columns: Vec::new(),
                hash_columns: Vec::new(),
            },
        )
        .await?;
    }
    for org in 1..=p.tenants {
        env.add_tenant(&format!("org{org}"), org).await?;
    }
    Ok(())
}

/// Insert one row per transaction at `rate` rows/s in total, spread over `writers` connections,
/// for `seconds`. Returns the number of rows written.
async fn write(env: &TestEnv, p: &Params) -> Result<u64> {
    let pool = tenantsync_store::connect(&env.source_url, p.writers as u32).await?;
    let written = Arc::new(AtomicU64::new(0));
    let total = (p.rate * p.seconds).round() as u64;
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..p.writers as u64 {
        let (pool, written) = (pool.clone(), written.clone());
        let (rate, writers, tenants, tables) = (p.rate, p.writers as u64, p.tenants, p.tables);
        set.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            let mut k = w;
            while k < total {
                let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let org = rng.gen_range(1..=tenants);
                let t = table_name(rng.gen_range(0..tables));
                sqlx::query(&format!(
                    "INSERT INTO {t} ({COLUMNS})
                     VALUES ($1, $2, 'live message ' || $2, 'text', 'outbound', false,
                             ARRAY['live'], ARRAY[$2::bigint], 12.34, 0.25,
                             jsonb_build_object('k', $2::bigint), now())"
                ))
                .bind(org)
                .bind(k as i64)
                .execute(&pool)
                .await?;
                written.fetch_add(1, Ordering::Relaxed);
                k += writers;
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = written.load(Ordering::Relaxed);
    println!(
        "wrote {n} rows in {secs:.1} s ({:.0} rows/s)",
        n as f64 / secs
    );
    pool.close().await;
    Ok(n)
}

fn stop(children: &mut [(String, Child)]) {
    for (_, c) in children.iter() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
    }
    let t0 = Instant::now();
    for (name, c) in children.iter_mut() {
        loop {
            if c.try_wait().ok().flatten().is_some() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(40) {
                eprintln!("{name} did not stop after SIGTERM; killing it");
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let p = Params::from_env()?;
    anyhow::ensure!(
        p.tenants > 0 && p.tables > 0 && p.rate > 0.0 && p.workers > 0,
        "BENCH_TENANTS, BENCH_TABLES, BENCH_RATE and BENCH_WORKERS must be positive"
    );
    bench::release_binary()?;
    let sink = Sink::start().await;
    let mut env = TestEnv::new().await?;
    env.endpoint = tenantsync_bigquery::Endpoint::emulator(&sink.host());
    println!(
        "freshness benchmark: {} tenants × {} tables, {} rows/s for {} s (warm-up {} s), {} worker(s) × concurrency {}; databases tstest_{}_*; sink on {}",
        p.tenants, p.tables, p.rate, p.seconds, p.warmup, p.workers, p.concurrency, env.id, sink.host()
    );
    let mut children = Vec::new();
    let result = run(&env, &sink, &p, &mut children).await;
    stop(&mut children);
    if p.keep {
        println!("kept databases tstest_{}_ctl / _src", env.id);
    } else {
        env.cleanup().await?;
    }
    result
}

async fn run(
    env: &TestEnv,
    sink: &Sink,
    p: &Params,
    children: &mut Vec<(String, Child)>,
) -> Result<()> {
    let t = Instant::now();
    create_source(env, p).await?;
    register(env, p).await?;
    // Autovacuum is off on the shared development server. Without statistics the planner
    // picked, for the coordinator's due-task query, a nested loop that scanned the whole
    // `sync_state_due` index once per tenant: about a second per tick, and most of Postgres'
    // CPU. A deployment's autovacuum analyzes and vacuums the control plane; the benchmark does
    // it here, and every `BENCH_VACUUM_SECS` during the run.
    sqlx::raw_sql("VACUUM ANALYZE")
        .execute(env.control.pool())
        .await?;
    println!(
        "source and control plane ready in {:.1} s ({} seed rows)",
        t.elapsed().as_secs_f64(),
        p.tenants * p.tables as i64 * p.seed_rows
    );

    let admin = tenantsync_store::connect(
        &std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?,
        1,
    )
    .await?;
    let dbs: Vec<String> = [&env.control_url, &env.source_url]
        .iter()
        .filter_map(|u| u.rsplit('/').next().map(str::to_string))
        .collect();
    let meter = Meter::start(admin.clone(), dbs.clone()).await;
    let started = chrono::Utc::now();
    let t = Instant::now();
    let concurrency = p.concurrency.to_string();
    let mut spawn = |name: &str, args: &[&str]| -> Result<()> {
        let log = std::env::temp_dir().join(format!("bench-freshness-{}-{name}.log", env.id));
        let extra = vec![
            ("TENANTSYNC_WORKER_ID".to_string(), name.to_string()),
            ("TENANTSYNC_COORDINATOR_ID".to_string(), name.to_string()),
            ("TENANTSYNC_CONCURRENCY".to_string(), concurrency.clone()),
            ("TENANTSYNC_CONTROL_POOL".to_string(), "4".to_string()),
            ("TENANTSYNC_SOURCE_POOL".to_string(), "4".to_string()),
        ];
        let child = bench::tenantsync(env, &sink.host(), args, &extra, &log)?;
        meter.watch(name, child.id());
        children.push((name.to_string(), child));
        Ok(())
    };
    spawn("coordinator", &["coordinator"])?;
    for i in 0..p.workers {
        spawn(&format!("worker-{i}"), &["worker"])?;
    }
    for pid in bench::pids_named("redis-server") {
        meter.watch_running("redis-server", pid);
    }
    env.wait_synced_through(started, Duration::from_secs(600))
        .await
        .context("initial sync of the seed rows")?;
    let backfill = meter.finish().await;
    println!(
        "initial sync of {} tasks done in {:.1} s ({} insertAll requests, {} other calls)",
        p.tenants * p.tables as i64,
        t.elapsed().as_secs_f64(),
        sink.stats().requests,
        sink.stats().other_calls
    );
    backfill.print_cpu("initial sync");

    // The measured phase.
    let dbs_measured = dbs.clone();
    let meter = Meter::start(admin.clone(), dbs).await;
    for (name, c) in children.iter() {
        meter.watch(name, c.id());
    }
    for pid in bench::pids_named("redis-server") {
        meter.watch_running("redis-server", pid);
    }
    sink.reset();
    sink.record_lag(true);
    let xacts_before = xacts(&admin, &dbs_measured).await?;
    let t_start = chrono::Utc::now();
    let vacuum = (p.vacuum_secs > 0.0).then(|| {
        let (pool, every) = (env.control.pool().clone(), p.vacuum_secs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs_f64(every)).await;
                if let Err(e) = sqlx::raw_sql("VACUUM ANALYZE sync_state, sync_runs")
                    .execute(&pool)
                    .await
                {
                    eprintln!("vacuum failed: {e}");
                }
            }
        })
    });
    let written = write(env, p).await?;
    if let Some(v) = vacuum {
        v.abort();
    }
    let t_end = chrono::Utc::now();
    let writes_meter = meter.finish().await;
    // Backends report their counters after at most a second of idling.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let xacts_after = xacts(&admin, &dbs_measured).await?;
    // Drain: wait until every row written is acknowledged, or give up.
    let t_drain = Instant::now();
    let mut acked: HashMap<String, (i64, i64)> = HashMap::new();
    loop {
        for s in sink.take_lag() {
            acked
                .entry(s.insert_id)
                .and_modify(|e| e.1 = e.1.min(s.ack_us))
                .or_insert((s.source_us, s.ack_us));
        }
        let new_rows = acked
            .values()
            .filter(|(src, _)| *src >= t_start.timestamp_micros())
            .count() as u64;
        if new_rows >= written || t_drain.elapsed().as_secs_f64() > p.drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sink.record_lag(false);
    let stats = sink.stats();

    let from = t_start.timestamp_micros() + (p.warmup * 1e6) as i64;
    let to = t_end.timestamp_micros();
    let mut lags: Vec<f64> = acked
        .values()
        .filter(|(src, _)| (from..=to).contains(src))
        .map(|(src, ack)| (ack - src) as f64 / 1e6)
        .collect();
    lags.sort_by(f64::total_cmp);
    let all_new = acked
        .values()
        .filter(|(src, _)| *src >= t_start.timestamp_micros())
        .count() as u64;
    let (measured_written,): (i64,) = sqlx::query_as(&format!(
        "SELECT count(*) FROM ({}) x",
        (0..p.tables)
            .map(|i| format!(
                "SELECT 1 FROM {} WHERE updated_at >= $1 AND updated_at <= $2",
                table_name(i)
            ))
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    ))
    .bind(chrono::DateTime::from_timestamp_micros(from).unwrap())
    .bind(t_end)
    .fetch_one(env.source_pool())
    .await?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average: {}", load.trim());
    println!(
        "\nrows written {written}, acknowledged {all_new} distinct ({} insertAll requests, {} rows with repeats, {:.1} rows/request)",
        stats.requests,
        stats.rows,
        stats.rows as f64 / stats.requests.max(1) as f64
    );
    println!(
        "after warm-up: {} rows written, {} acknowledged (missing {})",
        measured_written,
        lags.len(),
        measured_written - lags.len() as i64
    );
    println!(
        "lag source commit → insertAll ack: p50 {:.3} s, p90 {:.3} s, p99 {:.3} s, max {:.3} s (target p99 ≤ 5 s)",
        pct(&lags, 0.50),
        pct(&lags, 0.90),
        pct(&lags, 0.99),
        lags.last().copied().unwrap_or(f64::NAN)
    );
    let slices: Vec<(String, i64, f64, f64)> = sqlx::query_as(
        "SELECT worker, count(*), avg(rows)::float8, avg(duration_ms)::float8 FROM sync_runs
         WHERE started_at >= $1 GROUP BY worker ORDER BY worker",
    )
    .bind(t_start)
    .fetch_all(env.control.pool())
    .await?;
    for (w, n, rows, ms) in slices {
        println!("  {w}: {n} slices, {rows:.2} rows/slice, {ms:.1} ms/slice");
    }
    let (window_slices,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM sync_runs WHERE started_at >= $1 AND started_at < $2")
            .bind(t_start)
            .bind(t_end)
            .fetch_one(env.control.pool())
            .await?;
    // Every statement outside a transaction block is a transaction of its own, so these are
    // statements; the source's include the writers' inserts (subtracted) and, like the control
    // plane's, the coordinator's few per tick.
    let ctl = xacts_after[0] - xacts_before[0];
    let src = xacts_after[1] - xacts_before[1] - written as i64;
    println!(
        "  during the writes: {window_slices} slices ({:.0}/s); transactions per slice: control plane {:.2}, source {:.2}",
        window_slices as f64 / ((t_end - t_start).num_milliseconds() as f64 / 1000.0),
        ctl as f64 / window_slices.max(1) as f64,
        src as f64 / window_slices.max(1) as f64
    );
    for (label, _, rss) in &writes_meter.procs {
        println!("  peak RSS {label}: {rss:.1} MB");
    }
    writes_meter.print_cpu("writes");
    Ok(())
}

/// Committed plus rolled-back transactions of each database, in the order given.
async fn xacts(admin: &sqlx::PgPool, dbs: &[String]) -> Result<Vec<i64>> {
    let mut out = Vec::with_capacity(dbs.len());
    for db in dbs {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = $1",
        )
        .bind(db)
        .fetch_one(admin)
        .await?;
        out.push(n);
    }
    Ok(out)
}
