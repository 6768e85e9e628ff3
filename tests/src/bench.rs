//! What the throughput and freshness benchmarks share: settings from the environment, the
//! release `tenantsync` binary, and CPU and memory figures read from `/proc` (per process, for
//! the Postgres backends serving one test's databases, and for the whole machine).

use crate::TestEnv;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
        _ => Ok(default),
    }
}

pub fn env_flag(name: &str, default: bool) -> bool {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim() == "1",
        _ => default,
    }
}

/// The `q` quantile (nearest rank) of sorted values.
pub fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The `tenantsync` binary built next to this benchmark (`cargo build --release -p tenantsync`;
/// `make bench` does).
pub fn release_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("benchmark executable has no directory")?
        .join("tenantsync");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing; run `cargo build --release -p tenantsync` (make bench does)",
        bin.display()
    );
    Ok(bin)
}

/// `tenantsync <args>` on the test's databases and Redis prefix, BigQuery at `bq_host`.
/// Output goes to `log`.
pub fn tenantsync(
    env: &TestEnv,
    bq_host: &str,
    args: &[&str],
    extra: &[(String, String)],
    log: &std::path::Path,
) -> Result<Child> {
    let file = std::fs::File::create(log)?;
    let mut cmd = Command::new(release_binary()?);
    cmd.args(args)
        .env("DATABASE_URL", &env.control_url)
        .env("SOURCE_DATABASE_URL", &env.source_url)
        .env("REDIS_URL", &env.redis_url)
        .env("TENANTSYNC_REDIS_PREFIX", format!("tstest:{}", env.id))
        .env("BIGQUERY_EMULATOR_HOST", bq_host)
        .env(
            "TENANTSYNC_MASTER_KEY",
            secrecy::ExposeSecret::expose_secret(&env.master_key_b64),
        )
        .env("TENANTSYNC_LOG_FORMAT", "json")
        .env("TENANTSYNC_METRICS_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Ok(cmd.spawn()?)
}

/// The wide-ish source table, shaped like the demo `messages` table plus a numeric, a float and a
/// jsonb column; used by the throughput and freshness benchmarks.
pub fn wide_table_sql(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (
            id           bigserial PRIMARY KEY,
            organization_id bigint NOT NULL,
            contact_id   bigint,
            body         text,
            kind         text NOT NULL,
            direction    text NOT NULL,
            is_read      boolean NOT NULL,
            tags         text[],
            media_ids    bigint[],
            amount       numeric(12, 2),
            score        double precision,
            attrs        jsonb,
            sent_at      timestamptz,
            inserted_at  timestamptz NOT NULL DEFAULT now(),
            updated_at   timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX {name}_sync ON {name} (organization_id, updated_at, id);
        CREATE INDEX {name}_updated ON {name} (updated_at);"
    )
}

/// Fill `table` (made by [`wide_table_sql`]) with `rows` rows spread over `tenants`
/// organizations: cursor values over the hour that ended an hour ago, every row its own
/// instant; one row in three was updated after its insert (so `_op` is sometimes 'update').
pub async fn fill_wide_table(
    pool: &sqlx::PgPool,
    table: &str,
    tenants: i64,
    rows: i64,
) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO {table} (organization_id, contact_id, body, kind, direction, is_read, tags,
                              media_ids, amount, score, attrs, sent_at, inserted_at, updated_at)
         SELECT 1 + g % $1,
                CASE WHEN g % 5 = 0 THEN NULL ELSE g % 100000 END,
                'message ' || g || ' ' || md5(g::text),
                (ARRAY['text', 'image', 'audio', 'video'])[1 + g % 4],
                CASE WHEN g % 2 = 0 THEN 'inbound' ELSE 'outbound' END,
                g % 3 = 0,
                CASE WHEN g % 4 = 0 THEN NULL ELSE ARRAY['tag' || g % 7, 'vip'] END,
                CASE WHEN g % 7 = 0 THEN ARRAY[g, g + 1] END,
                CASE WHEN g % 6 = 0 THEN NULL ELSE (g % 100000) / 100.0 END,
                CASE WHEN g % 9 = 0 THEN NULL ELSE (g % 1000) / 7.0 END,
                CASE WHEN g % 8 = 0 THEN NULL
                     ELSE jsonb_build_object('flow', 'registration', 'step', g % 12,
                                             'answers', jsonb_build_array(g % 3, 'yes')) END,
                ts - interval '1 second',
                ts - CASE WHEN g % 3 = 0 THEN interval '1 minute' ELSE interval '0' END,
                ts
         FROM generate_series(1, $2) g,
              LATERAL (SELECT now() - interval '2 hours'
                              + (g::float8 / $2) * interval '1 hour' AS ts) t"
    ))
    .bind(tenants)
    .bind(rows)
    .execute(pool)
    .await?;
    Ok(())
}

/// Wait for `child` to exit (true: it succeeded); killed, and an error, after `limit`.
pub async fn wait_child(child: &mut Child, limit: Duration) -> Result<bool> {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("process did not finish within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The names of a test's two databases, for [`Meter`].
pub fn env_dbs(env: &TestEnv) -> Vec<String> {
    [&env.control_url, &env.source_url]
        .iter()
        .filter_map(|u| u.rsplit('/').next().map(str::to_string))
        .collect()
}

/// Clock ticks per second of `/proc/*/stat` CPU times.
pub fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds a process has used, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

/// Command name (`comm`) of a process.
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// `VmHWM` (peak resident set) and `VmRSS` of a process in kB.
pub fn memory_kb(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Busy and total jiffies of the whole machine (`/proc/stat`), for utilisation over a window.
pub fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Pids of every process with the given `comm` (e.g. all `postgres` processes: other sessions'
/// too, so the figure shows what the machine's Postgres did, not only for us).
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| comm(pid).as_deref() == Some(name))
        .collect()
}

/// CPU seconds used by processes, accumulated by polling while they live: for each pid, the
/// growth since it was first seen (or all of it, if first seen after the meter started).
#[derive(Default)]
struct CpuTally {
    first: HashMap<u32, f64>,
    last: HashMap<u32, f64>,
}

impl CpuTally {
    fn observe(&mut self, pid: u32, cpu: f64, preexisting: bool) {
        self.first
            .entry(pid)
            .or_insert(if preexisting { cpu } else { 0.0 });
        self.last.insert(pid, cpu);
    }

    fn total(&self) -> f64 {
        self.last
            .iter()
            .map(|(pid, c)| c - self.first.get(pid).copied().unwrap_or(0.0))
            .sum()
    }
}

/// What a [`Meter`] saw over its window.
#[derive(Debug, Clone, Default)]
pub struct MeterReport {
    pub seconds: f64,
    /// Per watched process (by label): CPU seconds in the window and peak RSS (VmHWM) in MB.
    pub procs: Vec<(String, f64, f64)>,
    /// Postgres backends serving the test's databases (client sessions of the workers, the
    /// coordinator, the reference, the harness).
    pub pg_backends_cpu: f64,
    /// Every `postgres` process of the machine (background writers and other sessions too).
    pub pg_all_cpu: f64,
    /// The benchmark process itself (sink, writers, this meter).
    pub harness_cpu: f64,
    /// Machine utilisation over the window, in cores busy.
    pub machine_cores_busy: f64,
}

struct MeterState {
    procs: Vec<(String, u32)>,
    tallies: HashMap<String, CpuTally>,
    hwm_kb: HashMap<String, u64>,
    backends: CpuTally,
    pg_all: CpuTally,
}

/// Polls `/proc` every 100 ms: CPU of watched processes, of the Postgres backends connected to
/// the test's databases, of all `postgres` processes, and peak RSS of the watched processes.
pub struct Meter {
    state: Arc<Mutex<MeterState>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
    t0: Instant,
    self_cpu0: f64,
    machine0: (u64, u64),
}

impl Meter {
    /// Start metering. `admin` is a pool on a database other than the measured ones (reading
    /// `pg_stat_activity` from there adds no backend of ours).
    pub async fn start(admin: sqlx::PgPool, dbs: Vec<String>) -> Self {
        let state = Arc::new(Mutex::new(MeterState {
            procs: Vec::new(),
            tallies: HashMap::new(),
            hwm_kb: HashMap::new(),
            backends: CpuTally::default(),
            pg_all: CpuTally::default(),
        }));
        let stop = tokio_util::sync::CancellationToken::new();
        let (s, st) = (state.clone(), stop.clone());
        let first_round = Arc::new(tokio::sync::Notify::new());
        let notify = first_round.clone();
        let task = tokio::spawn(async move {
            let mut preexisting = true;
            loop {
                let backends: Vec<i32> =
                    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = ANY($1)")
                        .bind(&dbs)
                        .fetch_all(&admin)
                        .await
                        .unwrap_or_default();
                let all = pids_named("postgres");
                {
                    let mut m = s.lock().unwrap();
                    for pid in backends {
                        if let Some(c) = cpu_seconds(pid as u32) {
                            m.backends.observe(pid as u32, c, preexisting);
                        }
                    }
                    for pid in all {
                        if let Some(c) = cpu_seconds(pid) {
                            m.pg_all.observe(pid, c, preexisting);
                        }
                    }
                    let procs = m.procs.clone();
                    for (label, pid) in procs {
                        if let Some(c) = cpu_seconds(pid) {
                            m.tallies
                                .entry(label.clone())
                                .or_default()
                                .observe(pid, c, false);
                        }
                        if let Some((hwm, _)) = memory_kb(pid) {
                            let e = m.hwm_kb.entry(label).or_default();
                            *e = (*e).max(hwm);
                        }
                    }
                }
                if preexisting {
                    notify.notify_one();
                }
                preexisting = false;
                tokio::select! {
                    _ = st.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        first_round.notified().await;
        Self {
            state,
            stop,
            task,
            t0: Instant::now(),
            self_cpu0: cpu_seconds(std::process::id()).unwrap_or(0.0),
            machine0: machine_jiffies(),
        }
    }

    /// Watch a process that ran before the meter started (Redis, say) under `label`: only the
    /// CPU it uses from now on counts. (Counting all of it, as [`Self::watch`] does, once
    /// reported Redis at 1.7 of 2 cores: its CPU since the machine booted.)
    pub fn watch_running(&self, label: &str, pid: u32) {
        if let Some(c) = cpu_seconds(pid) {
            let mut m = self.state.lock().unwrap();
            m.tallies
                .entry(label.to_string())
                .or_default()
                .first
                .insert(pid, c);
        }
        self.watch(label, pid);
    }

    /// Watch a process (started after the meter: all its CPU counts) under `label`.
    pub fn watch(&self, label: &str, pid: u32) {
        self.state
            .lock()
            .unwrap()
            .procs
            .push((label.to_string(), pid));
    }

    pub async fn finish(self) -> MeterReport {
        // One last round happens every 100 ms; wait for it so short-lived backends are seen.
        tokio::time::sleep(Duration::from_millis(150)).await;
        self.stop.cancel();
        let _ = self.task.await;
        let seconds = self.t0.elapsed().as_secs_f64();
        let (b1, t1) = machine_jiffies();
        let (b0, t0) = self.machine0;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let m = self.state.lock().unwrap();
        let mut labels: Vec<&String> = m.tallies.keys().collect();
        labels.sort();
        MeterReport {
            seconds,
            procs: labels
                .into_iter()
                .map(|l| {
                    (
                        l.clone(),
                        m.tallies[l].total(),
                        m.hwm_kb.get(l).copied().unwrap_or(0) as f64 / 1024.0,
                    )
                })
                .collect(),
            pg_backends_cpu: m.backends.total(),
            pg_all_cpu: m.pg_all.total(),
            harness_cpu: cpu_seconds(std::process::id()).unwrap_or(0.0) - self.self_cpu0,
            machine_cores_busy: (b1 - b0) as f64 / (t1 - t0).max(1) as f64 * cores,
        }
    }
}

impl MeterReport {
    /// CPU seconds and peak RSS of the process watched under `label`.
    pub fn proc(&self, label: &str) -> (f64, f64) {
        self.procs
            .iter()
            .filter(|(l, _, _)| l == label)
            .fold((0.0, 0.0), |(c, r), (_, cpu, rss)| (c + cpu, r.max(*rss)))
    }

    /// One line per process: CPU seconds, cores busy on average, share of the machine's busy time.
    pub fn print_cpu(&self, title: &str) {
        let busy = self.machine_cores_busy * self.seconds;
        println!(
            "  CPU over {:.1} s ({title}); machine busy {:.2} of {} cores:",
            self.seconds,
            self.machine_cores_busy,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let line = |name: &str, cpu: f64| {
            println!(
                "    {name:<34} {cpu:>8.1} s  {:>5.2} cores  {:>5.1}% of busy",
                cpu / self.seconds.max(1e-9),
                100.0 * cpu / busy.max(1e-9)
            )
        };
        for (label, cpu, _) in &self.procs {
            line(label, *cpu);
        }
        line("postgres backends (our databases)", self.pg_backends_cpu);
        line("postgres, all processes", self.pg_all_cpu);
        line("benchmark process (sink, harness)", self.harness_cpu);
    }
}
