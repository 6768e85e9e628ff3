//! Chaos: the real binary (two coordinators, three workers) syncs four tenants' out-of-order
//! writes to three tables, one with a composite key, while workers are killed and frozen, the
//! leading coordinator is killed, Redis and Postgres restart, a fifth of insertAll calls fail
//! (some after the rows landed, some landing them twice) and compaction runs on a short window.
//! It ends with `verify` clean, every `_latest` equal to Postgres row for row and no row in a
//! dataset that is not its tenant's; the longest pause in progress after each fault is printed
//! and bounded. `chaos_grpc.rs` runs the same schedule with the workers writing through the
//! Storage Write API, a share of its gRPC calls failing instead.
//!
//! Postgres and Redis are the test's own (`tenantsync_tests::chaos`): restarting the shared
//! ones would break every other test running at the same time.

use chrono::Utc;
use rand::Rng;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tenantsync_store::{ControlPlane, SourceReader};
use tenantsync_tests::chaos::{self, ControlWatch, FaultProxy, PgCluster, RedisServer};
use tenantsync_tests::grpc_faults::{FaultPlan, GrpcFaultProxy};
use tenantsync_tests::interleave::{bq_pairs_by, pg_pairs};
use tenantsync_tests::{scalar_i64, Proc, TestEnv};

const TENANTS: [i64; 4] = [1, 2, 3, 4];
const WRITERS: u64 = 2;
/// The workers' lease: a frozen worker is stopped for longer than this.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// The workers' BigQuery request timeout; the proxy's slow answers come a second after it. It
/// also bounds compaction's DELETE, which takes seconds on the local BigQuery of a busy
/// machine: shorter, and compactions time out and retry, holding their tasks.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Superseded versions synced longer ago than this are compacted, every 20 s per task: copies
/// written at the start of the run are compacted while it goes on. More often (4 s) kept the
/// local BigQuery busy with DELETEs and the tasks behind.
const COMPACT_WINDOW_S: u64 = 10;
const COMPACT_EVERY_S: u64 = 20;
const SLICE_MAX_S: u64 = 5;
/// Every fault must be followed by an acknowledged insert and a commit within this long (the
/// issue: a Redis blip should cost seconds; a fault here costs about a lease TTL or a
/// reconnect).
const PAUSE_LIMIT: Duration = Duration::from_secs(30);
/// And by progress of every task within this long. Even with no fault, the last of twelve
/// tasks takes 15–30 s to move on a busy 2-core machine (a slow answer costs its task 11 s,
/// compaction holds it for seconds); a scheduler stopped by a Redis restart costs two minutes.
const MOVED_LIMIT: Duration = Duration::from_secs(60);
/// How long the schedule waits for progress after a fault before it moves on regardless; long
/// enough that a pause well past `PAUSE_LIMIT` is measured whole, not mixed with the next
/// fault's.
const SETTLE_LIMIT: Duration = Duration::from_secs(150);
/// Faults start at least this far apart.
const FAULT_GAP: Duration = Duration::from_secs(6);

/// Composite keys `(flow_id, contact_id)` of `answers` packed into one number for comparison;
/// contact ids are below 10^7, flow ids below 5.
const ANSWER_KEY_PG: &str = "flow_id::bigint * 1000000000000 + contact_id";
const ANSWER_KEY_BQ: &str = "flow_id * 1000000000000 + contact_id";

const SCHEMA: &str = "
CREATE TABLE people (
    id bigserial PRIMARY KEY,
    organization_id bigint NOT NULL,
    name text,
    v int NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz);
CREATE INDEX ON people (organization_id, updated_at);
CREATE TABLE notes (
    id bigserial PRIMARY KEY,
    organization_id bigint NOT NULL,
    body text,
    v int NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON notes (organization_id, updated_at);
CREATE TABLE answers (
    flow_id int NOT NULL,
    contact_id bigint NOT NULL,
    organization_id bigint NOT NULL,
    v int NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz,
    PRIMARY KEY (flow_id, contact_id));
CREATE INDEX ON answers (organization_id, updated_at);
INSERT INTO people (organization_id, name, v, updated_at)
    SELECT 1 + g % 4, 'seed', g, now() - interval '1 hour' FROM generate_series(1, 600) g;
INSERT INTO notes (organization_id, body, v, updated_at)
    SELECT 1 + g % 4, 'seed', g, now() - interval '1 hour' FROM generate_series(1, 800) g;
INSERT INTO answers (flow_id, contact_id, organization_id, v, updated_at)
    SELECT g % 5, (1 + g % 4) * 1000000 + g % 300, 1 + g % 4, g, now() - interval '1 hour'
    FROM generate_series(1, 400) g ON CONFLICT DO NOTHING;
";

/// One statement on organization `$1` with value `$2`. `updated_at = now()` is the
/// transaction's start, so the writers' out-of-order commits put older cursors behind newer
/// ones. Deletes are soft (cursor capture cannot see hard deletes); some are undone.
fn pick(rng: &mut rand::rngs::StdRng) -> String {
    match rng.gen_range(0..14) {
        0..=2 => "INSERT INTO people (organization_id, name, v) VALUES ($1, 'new', $2)",
        3..=4 => {
            "UPDATE people SET v = $2, name = 'updated', updated_at = now()
             WHERE id = (SELECT id FROM people WHERE organization_id = $1
                         ORDER BY random() LIMIT 1)"
        }
        5 => {
            "UPDATE people SET deleted_at = now(), updated_at = now(), v = $2
             WHERE id = (SELECT id FROM people WHERE organization_id = $1
                         AND deleted_at IS NULL ORDER BY random() LIMIT 1)"
        }
        6 => {
            "UPDATE people SET deleted_at = NULL, updated_at = now(), v = $2
             WHERE id = (SELECT id FROM people WHERE organization_id = $1
                         AND deleted_at IS NOT NULL ORDER BY random() LIMIT 1)"
        }
        7..=8 => "INSERT INTO notes (organization_id, body, v) VALUES ($1, 'new', $2)",
        9 => {
            "UPDATE notes SET v = $2, body = 'edited', updated_at = now()
             WHERE id = (SELECT id FROM notes WHERE organization_id = $1
                         ORDER BY random() LIMIT 1)"
        }
        10..=12 => {
            // Insert or update a composite key of the tenant (its contact ids are
            // org * 10^6 + 0..300), undeleting it if it was deleted.
            "INSERT INTO answers (flow_id, contact_id, organization_id, v)
             VALUES ($2 % 5, $1 * 1000000 + $2 % 300, $1, $2)
             ON CONFLICT (flow_id, contact_id)
             DO UPDATE SET v = excluded.v, updated_at = now(), deleted_at = NULL"
        }
        _ => {
            "UPDATE answers SET deleted_at = now(), updated_at = now(), v = $2
             WHERE (flow_id, contact_id) = (SELECT flow_id, contact_id FROM answers
                    WHERE organization_id = $1 AND deleted_at IS NULL ORDER BY random() LIMIT 1)"
        }
    }
    .to_string()
}

/// The faults, in order, at least [`FAULT_GAP`] apart and each after progress resumed from the
/// previous one (so each pause is the fault's own). Worker slots are 0–2.
enum Chaos {
    /// Nothing: the same measures on a quiet moment, for comparison.
    Baseline,
    /// kill -9, and a replacement started at once (a restarting pod).
    KillWorker(usize),
    /// SIGSTOP past the lease, then SIGCONT: it wakes up mid-slice holding an expired lease.
    FreezeWorker(usize),
    KillLeader,
    /// Down for 2.5 s, back with no keys (no persistence).
    RestartRedis,
    RestartPostgres,
}

const SCHEDULE: [Chaos; 12] = [
    Chaos::Baseline,
    Chaos::KillWorker(0),
    Chaos::FreezeWorker(1),
    Chaos::KillLeader,
    Chaos::KillWorker(2),
    Chaos::RestartRedis,
    Chaos::KillWorker(1),
    Chaos::RestartPostgres,
    Chaos::KillWorker(0),
    Chaos::FreezeWorker(2),
    Chaos::KillWorker(1),
    Chaos::RestartRedis,
];

/// One fault as applied: when it started, when the system could work again (the end of an
/// outage; the start for a kill), and how long the service was down.
struct FaultRecord {
    name: String,
    at: Instant,
    recovered: Instant,
    /// `recovered` on the clock of the control plane's timestamps.
    recovered_wall: chrono::DateTime<Utc>,
    down: Duration,
}

/// The processes under test. A replaced process gets a new name (as a pod would), so each
/// incarnation has its own log and its own worker id in the run log.
struct Fleet {
    worker_vars: Vec<(&'static str, String)>,
    coordinator_vars: Vec<(&'static str, String)>,
    workers: Vec<Proc>,
    coordinators: Vec<Proc>,
    spawned: usize,
}

impl Fleet {
    fn spawn_worker(&mut self, env: &TestEnv, slot: usize) {
        self.spawn(env, "worker", slot);
    }

    fn spawn_coordinator(&mut self, env: &TestEnv, slot: usize) {
        self.spawn(env, "coordinator", slot);
    }

    /// Start `tenantsync <role>` in `slot` of that role's processes (replacing a dead one),
    /// named by the role's initial, the slot and a running number.
    fn spawn(&mut self, env: &TestEnv, role: &str, slot: usize) {
        self.spawned += 1;
        let (vars, procs) = match role {
            "worker" => (&self.worker_vars, &mut self.workers),
            _ => (&self.coordinator_vars, &mut self.coordinators),
        };
        let name = format!("{}{slot}-{}", &role[..1], self.spawned);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let p = env.spawn(&name, &[role], &vars);
        if slot < procs.len() {
            procs[slot] = p;
        } else {
            procs.push(p);
        }
    }

    fn kill_worker(&mut self, env: &TestEnv, slot: usize) -> String {
        let name = self.workers[slot].name.clone();
        self.workers[slot].signal("-9");
        self.spawn_worker(env, slot);
        format!("kill -9 worker {name}")
    }
}

/// The leader's id straight from Redis: the test's own client would go through the same
/// reconnect logic the test is measuring.
fn leader(redis: &RedisServer, env: &TestEnv) -> Option<String> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "GET"])
        .arg(format!("tstest:{}:leader", env.id))
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Wait until, after the fault's recovery, an insertAll was acknowledged (that write method
/// only), a watermark committed and every task moved forward, or `limit` passed. The first two
/// alone are not enough: work already queued or in flight produces them while scheduling is
/// down.
async fn wait_progress(
    inserts: Option<&chaos::Events>,
    watch: &ControlWatch,
    f: &FaultRecord,
    limit: Duration,
) {
    let t = f.recovered;
    while (inserts.is_some_and(|i| i.first_after(t).is_none())
        || watch.commits.first_after(t).is_none()
        || watch.all_moved(t).is_none())
        && t.elapsed() < limit
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

/// How the workers write their rows, and where the write faults are injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writes {
    /// insertAll, a fifth of its calls failing at the HTTP fault proxy.
    InsertAll,
    /// The Storage Write API (pending streams), about a fifth of its appends, stream creations,
    /// finalizes and commits failing at the gRPC fault proxy (UNAVAILABLE, RESOURCE_EXHAUSTED,
    /// or the answer dropped after the emulator did the work).
    Storage,
}

/// The Storage Write faults, cyclic per method (see [`GrpcFaultProxy`]): one call in ten of
/// each kind. A slice makes four kinds of call, so about a third of the slices meet a fault;
/// denser plans (a fifth to a quarter of each kind) left the slowest task 53 s of the 60 s
/// `MOVED_LIMIT` on a loaded machine.
const GRPC_FAULTS: FaultPlan = FaultPlan {
    appends: "pass,pass,pass,pass,unavailable,pass,pass,pass,pass,pass,\
              pass,pass,pass,pass,drop_after,pass,pass,pass,pass,pass,\
              pass,pass,pass,pass,exhausted,pass,pass,pass,pass,pass",
    creates: "pass,pass,pass,pass,pass,pass,pass,pass,pass,unavailable",
    finalizes: "pass,pass,pass,pass,pass,pass,drop_after,pass,pass,pass",
    commits: "pass,pass,pass,unavailable,pass,pass,pass,pass,pass,pass,\
              pass,pass,pass,pass,pass,pass,pass,drop_after,pass,pass",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_ends_with_verify_clean_and_latest_equal_to_postgres() {
    run(Writes::InsertAll).await;
}

/// The chaos run with the workers writing by `writes`.
pub(crate) async fn run(writes: Writes) {
    let t_start = Instant::now();
    let pg = PgCluster::start().unwrap();
    let mut redis = RedisServer::start().unwrap();
    let mut env = TestEnv::with_services(&pg.url("postgres"), &redis.url())
        .await
        .unwrap();
    println!(
        "chaos {}: own Postgres on port {}, own Redis on port {}; process logs in {}/tstest-{}-*.log",
        env.id,
        pg.port,
        redis.port,
        std::env::temp_dir().display(),
        env.id
    );
    sqlx::raw_sql(SCHEMA)
        .execute(env.source_pool())
        .await
        .unwrap();
    let mut specs = Vec::new();
    for table in ["people", "notes", "answers"] {
        let spec = env.add_table(table, "organization_id").await.unwrap();
        let spec = match table {
            "people" | "answers" => tenantsync_worker::onboard::set_soft_delete(
                &env.control,
                &env.source,
                spec,
                Some("deleted_at"),
            )
            .await
            .unwrap(),
            _ => spec,
        };
        specs.push(spec);
    }
    assert_eq!(
        specs[2].key_columns,
        ["flow_id", "contact_id"],
        "answers is the composite-key table"
    );
    let mut tenants = Vec::new();
    for org in TENANTS {
        tenants.push(env.add_tenant(&format!("org-{org}"), org).await.unwrap());
    }

    let seed: u64 = rand::thread_rng().gen();
    println!("seed {seed}");
    let proxy = FaultProxy::start(env.emulator_url(), seed, 20, REQUEST_TIMEOUT).await;
    let grpc = (writes == Writes::Storage).then(|| {
        let host = std::env::var("BIGQUERY_STORAGE_EMULATOR_HOST")
            .expect("BIGQUERY_STORAGE_EMULATOR_HOST (scripts/dev-env test writes it)");
        GrpcFaultProxy::start(&host, &GRPC_FAULTS)
    });
    // insertAll acknowledgements count as progress on that path; on the other, the watermark
    // commits (each after its batch's commit) are the progress measure.
    let inserts = (writes == Writes::InsertAll).then_some(&*proxy.inserts);
    let stop_watch = tokio_util::sync::CancellationToken::new();
    let (watch, watcher) = chaos::watch_control(&env.control_url, stop_watch.clone())
        .await
        .unwrap();
    let common = [
        ("TENANTSYNC_LEASE_TTL_MS", LEASE_TTL.as_millis().to_string()),
        ("TENANTSYNC_LEADER_TTL_MS", "2000".to_string()),
        ("TENANTSYNC_CONCURRENCY", "4".to_string()),
    ];
    let mut worker_vars = common.to_vec();
    worker_vars.extend([
        ("BIGQUERY_EMULATOR_HOST", format!("http://{}", proxy.addr)),
        (
            "TENANTSYNC_REQUEST_TIMEOUT_MS",
            REQUEST_TIMEOUT.as_millis().to_string(),
        ),
        ("TENANTSYNC_CHUNK_ROWS", "100".to_string()),
        ("TENANTSYNC_MAX_ATTEMPTS", "10".to_string()),
        ("TENANTSYNC_COMPACT_WINDOW_S", COMPACT_WINDOW_S.to_string()),
        ("TENANTSYNC_COMPACT_EVERY_S", COMPACT_EVERY_S.to_string()),
        // Merges into `<table>_current` run at every compaction turn, mid-run, and read
        // back the window plus a slice's length (one machine: no clock allowance).
        ("TENANTSYNC_SLICE_MAX_MS", SLICE_MAX_S.to_string() + "000"),
        ("TENANTSYNC_SETTLE_S", COMPACT_WINDOW_S.to_string()),
        ("TENANTSYNC_CLOCK_SKEW_S", "0".to_string()),
    ]);
    if let Some(g) = &grpc {
        worker_vars.extend([
            ("TENANTSYNC_WRITE_API", "storage".to_string()),
            ("BIGQUERY_STORAGE_EMULATOR_HOST", g.host.clone()),
        ]);
    }
    let mut fleet = Fleet {
        worker_vars,
        coordinator_vars: common.to_vec(),
        workers: Vec::new(),
        coordinators: Vec::new(),
        spawned: 0,
    };
    fleet.spawn_coordinator(&env, 0);
    fleet.spawn_coordinator(&env, 1);
    for slot in 0..3 {
        fleet.spawn_worker(&env, slot);
    }

    // Traffic and faults start once the seed rows are in: the pauses then measure a pool at
    // work, not table creation.
    let t_backfill = Instant::now();
    env.wait_synced_through(Utc::now(), Duration::from_secs(180))
        .await
        .unwrap();
    println!("backfill: {} s", secs(t_backfill.elapsed()));
    let writer_pool = tenantsync_store::connect(&env.source_url, WRITERS as u32 + 1)
        .await
        .unwrap();
    let stop_writers = tokio_util::sync::CancellationToken::new();
    let writers = tokio::spawn({
        let (pool, stop) = (writer_pool.clone(), stop_writers.clone());
        async move { chaos::writers(&pool, &TENANTS, WRITERS, seed, stop, pick).await }
    });
    tokio::time::sleep(FAULT_GAP).await;

    // The schedule: a worker killed every few faults, frozen workers, the leader killed,
    // Redis restarted twice, Postgres once.
    let mut faults: Vec<FaultRecord> = Vec::new();
    let t_chaos = Instant::now();
    for step in SCHEDULE {
        let at = Instant::now();
        let (name, recovered, down) = match step {
            Chaos::Baseline => ("none (baseline)".to_string(), at, Duration::ZERO),
            Chaos::KillWorker(slot) => (fleet.kill_worker(&env, slot), at, Duration::ZERO),
            Chaos::FreezeWorker(slot) => {
                let w = &fleet.workers[slot];
                let frozen = LEASE_TTL + Duration::from_secs(2);
                w.signal("-STOP");
                tokio::time::sleep(frozen).await;
                w.signal("-CONT");
                let name = format!("SIGSTOP worker {} for {} s", w.name, secs(frozen));
                (name, at, Duration::ZERO)
            }
            Chaos::KillLeader => {
                let leader = leader(&redis, &env);
                let slot = fleet
                    .coordinators
                    .iter()
                    .position(|c| {
                        leader.as_deref().and_then(|l| l.split(':').next()) == Some(c.name.as_str())
                    })
                    .unwrap_or(0);
                let name = format!(
                    "kill -9 coordinator {} (leader {})",
                    fleet.coordinators[slot].name,
                    leader.as_deref().unwrap_or("unknown")
                );
                fleet.coordinators[slot].signal("-9");
                fleet.spawn_coordinator(&env, slot);
                (name, at, Duration::ZERO)
            }
            Chaos::RestartRedis => {
                let down = tokio::task::block_in_place(|| {
                    redis.restart(Duration::from_millis(2500)).unwrap()
                });
                ("restart Redis (empty)".to_string(), Instant::now(), down)
            }
            Chaos::RestartPostgres => {
                let down = tokio::task::block_in_place(|| pg.restart().unwrap());
                ("restart Postgres (fast)".to_string(), Instant::now(), down)
            }
        };
        let f = FaultRecord {
            name,
            at,
            recovered,
            recovered_wall: Utc::now() - (Instant::now() - recovered),
            down,
        };
        wait_progress(inserts, &watch, &f, SETTLE_LIMIT).await;
        faults.push(f);
        let next = at + FAULT_GAP;
        if Instant::now() < next {
            tokio::time::sleep(next - Instant::now()).await;
        }
    }
    let chaos_time = t_chaos.elapsed();
    // This process's own pools lost their connections in the Postgres restart, and each dead
    // one would fail its next statement once.
    env.control = ControlPlane::new(
        tenantsync_store::connect(&env.control_url, 4)
            .await
            .unwrap(),
    );
    env.source = SourceReader::new(tenantsync_store::connect(&env.source_url, 4).await.unwrap());
    stop_writers.cancel();
    let written = writers.await.unwrap();
    writer_pool.close().await;

    // Drain: every task confirmed past the last write, faults still on.
    let t_drain = Instant::now();
    let drained = env
        .wait_synced_through(Utc::now(), Duration::from_secs(180))
        .await;
    let drain_time = t_drain.elapsed();
    let drained_at = Instant::now();
    stop_watch.cancel();
    let _ = watcher.await;
    println!(
        "writers: {} transactions committed ({} statements), {} rolled back, {} failed",
        written.committed, written.statements, written.rolled_back, written.errors
    );
    println!(
        "chaos {} s, drain {} s ({writes:?}), insertAll calls: {:?}",
        secs(chaos_time),
        secs(drain_time),
        proxy.counts()
    );
    let mut problems = Vec::new();
    if let Some(g) = &grpc {
        let counts = g.counts();
        println!("Storage Write calls by fault: {counts:?}");
        for fault in [
            "AppendRows:unavailable",
            "AppendRows:drop_after",
            "CreateWriteStream:unavailable",
            "BatchCommitWriteStreams:drop_after",
        ] {
            if counts.get(fault).copied().unwrap_or(0) == 0 {
                problems.push(format!("{fault} was never injected: {counts:?}"));
            }
        }
    }

    // Pauses, from a fault: insert, commit: until the next acknowledged insertAll and the next
    // watermark commit after the system could work again. moved: until every task had made
    // progress since then; a task that stopped shows here whatever the others do. Shown, not
    // bounded: the slowest task's lag at the fault, and when every task was confirmed through
    // the recovery (that lag included; the local BigQuery on a busy machine sets it).
    println!(
        "{:<48} {:>6} {:>6} {:>8} {:>8} {:>7} {:>7} {:>9}",
        "fault", "at s", "down s", "insert s", "commit s", "moved s", "lag s", "caught up"
    );
    for f in &faults {
        let insert = inserts.map(|i| i.first_after(f.recovered).map(|t| t - f.at));
        let commit = watch.commits.first_after(f.recovered).map(|t| t - f.at);
        let moved = watch.all_moved(f.recovered).map(|t| t - f.at);
        let caught_up = watch.caught_up(f.recovered_wall).map(|t| t - f.at);
        let show = |d: Option<Duration>| d.map_or("never".to_string(), secs);
        println!(
            "{:<48} {:>6} {:>6} {:>8} {:>8} {:>7} {:>7} {:>9}",
            f.name,
            secs(f.at - t_chaos),
            secs(f.down),
            insert.map_or("-".to_string(), show),
            show(commit),
            show(moved),
            show(watch.lag_at(f.at)),
            show(caught_up)
        );
        for (what, d, limit) in [
            ("insert", insert.unwrap_or(commit), PAUSE_LIMIT),
            ("commit", commit, PAUSE_LIMIT),
            ("every task moved", moved, MOVED_LIMIT),
        ] {
            if d.is_none_or(|d| d >= limit) {
                problems.push(format!(
                    "after {}: {what} after {} s (limit {} s)",
                    f.name,
                    show(d),
                    secs(limit)
                ));
            }
        }
    }
    drop(fleet);
    if let Err(e) = drained {
        problems.push(format!("no drain after the writers stopped: {e:#}"));
    }

    // What compaction and the duplicate faults left in the base tables, then a last compaction
    // once every copy is older than the window: whatever duplicates exist, it must not remove
    // a key's newest version.
    let compactions = log_lines(&env, "compacted superseded versions");
    println!(
        "compactions by workers during the run: {compactions}, failed: {}",
        log_lines(&env, "periodic compaction/merge failed")
    );
    if compactions == 0 {
        problems.push("no compaction ran during the run".into());
    }
    let mut doubled = 0;
    for t in &tenants {
        let bq = env.bq(t).await.unwrap();
        for spec in &specs {
            let base = bq.qualified(&spec.bq_table());
            let latest = bq.qualified(&format!("{}_latest", spec.bq_table()));
            doubled += scalar_i64(
                &bq.query(&format!(
                    "SELECT COUNT(*) FROM {latest} WHERE _version_id IN \
                     (SELECT _version_id FROM {base} GROUP BY _version_id HAVING COUNT(*) > 1)"
                ))
                .await
                .unwrap(),
            );
        }
    }
    // Keys compaction already removed are not in `_latest` to be counted: the comparison below
    // names those.
    println!(
        "keys in _latest whose newest version is stored twice (before the last compaction): \
         {doubled}"
    );
    // The last compaction reads back as far as the workers' merges did; everything written
    // before the drain is older than that by then.
    let mut cfg = env.worker_config();
    cfg.compact_window = Duration::from_secs(COMPACT_WINDOW_S);
    cfg.settle_window = Duration::from_secs(COMPACT_WINDOW_S);
    cfg.slice_max_duration = Duration::from_secs(SLICE_MAX_S);
    cfg.clock_skew = Duration::ZERO;
    let wait = Duration::from_secs(COMPACT_WINDOW_S + SLICE_MAX_S + 1)
        .saturating_sub(drained_at.elapsed());
    tokio::time::sleep(wait).await;
    let compactor = env.worker_with(cfg, std::sync::Arc::new(tenantsync_worker::NoHooks));
    for t in &tenants {
        for spec in &specs {
            compactor.compact(t, spec).await.unwrap();
        }
    }

    // The end state: verify clean, `_latest` equal to Postgres row for row, no foreign row.
    let (ok, out) = env.cli(&["verify"]);
    let oks = out.lines().filter(|l| l.starts_with("ok ")).count();
    if !ok || oks != tenants.len() * specs.len() {
        problems.push(format!("verify ({oks} tables ok):\n{out}"));
    }
    let mut rows = (0usize, 0i64);
    for (t, org) in tenants.iter().zip(TENANTS) {
        let bq = env.bq(t).await.unwrap();
        for (table, pg_sql, key) in [
            (
                "people",
                "SELECT id, v FROM people WHERE organization_id = $1 AND deleted_at IS NULL"
                    .to_string(),
                "id",
            ),
            (
                "notes",
                "SELECT id, v FROM notes WHERE organization_id = $1".to_string(),
                "id",
            ),
            (
                "answers",
                format!(
                    "SELECT {ANSWER_KEY_PG}, v FROM answers
                     WHERE organization_id = $1 AND deleted_at IS NULL"
                ),
                ANSWER_KEY_BQ,
            ),
        ] {
            let want = pg_pairs(env.source_pool(), &pg_sql, org).await.unwrap();
            match bq_pairs_by(&bq, key, &format!("{table}_latest")).await {
                Ok(got) if got == want => rows.0 += got.len(),
                Ok(got) => {
                    // Which missing keys had their newest version landed twice (by the
                    // proxy's no-dedup fault): issue 13's compaction bug removes exactly those.
                    let twice: BTreeSet<(i64, i64)> = proxy
                        .landed_twice(&t.bq_dataset, table)
                        .iter()
                        .map(|row| {
                            let key = if table == "answers" {
                                json_i64(&row["flow_id"]) * 1_000_000_000_000
                                    + json_i64(&row["contact_id"])
                            } else {
                                json_i64(&row["id"])
                            };
                            (key, json_i64(&row["v"]))
                        })
                        .collect();
                    let newest_twice = want
                        .iter()
                        .filter(|(k, v)| !got.contains_key(k) && twice.contains(&(**k, **v)))
                        .count();
                    let missing = want.keys().filter(|k| !got.contains_key(k)).count();
                    let extra = got.keys().filter(|k| !want.contains_key(k)).count();
                    let stale = want
                        .iter()
                        .filter(|(k, v)| got.get(k).is_some_and(|g| g != *v))
                        .count();
                    problems.push(format!(
                        "{} {table}_latest differs from Postgres: {missing} keys missing \
                         ({newest_twice} of them with their newest version landed twice), \
                         {extra} extra, {stale} with another value (of {} rows)",
                        t.slug,
                        want.len()
                    ));
                }
                Err(e) => problems.push(format!("{} {table}_latest: {e:#}", t.slug)),
            }
            let spec = specs.iter().find(|s| s.source_table == table).unwrap();
            let base = bq.qualified(&spec.bq_table());
            let foreign = scalar_i64(
                &bq.query(&format!(
                    "SELECT COUNT(*) FROM {base} WHERE organization_id <> {org}"
                ))
                .await
                .unwrap(),
            );
            rows.1 += scalar_i64(
                &bq.query(&format!("SELECT COUNT(*) FROM {base}"))
                    .await
                    .unwrap(),
            );
            if foreign > 0 {
                problems.push(format!(
                    "{} {table}: {foreign} rows of another tenant",
                    t.slug
                ));
            }
        }
    }
    let runs: Vec<(String, i64)> =
        sqlx::query_as("SELECT outcome, count(*) FROM sync_runs GROUP BY 1 ORDER BY 1")
            .fetch_all(env.control.pool())
            .await
            .unwrap();
    println!(
        "end: {} live rows in _latest equal to Postgres, {} rows in the base tables, slices {runs:?}, \
         test {} s",
        rows.0,
        rows.1,
        secs(t_start.elapsed())
    );
    assert!(problems.is_empty(), "chaos found:\n{}", problems.join("\n"));
    env.cleanup().await.unwrap();
}

/// An integer cell of an insertAll row (int64 values are sent as strings or numbers).
fn json_i64(v: &serde_json::Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(i64::MIN)
}

/// Lines of this test's worker logs that contain `needle`.
fn log_lines(env: &TestEnv, needle: &str) -> usize {
    let prefix = format!("tstest-{}-w", env.id);
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(needle))
                .count()
        })
        .sum()
}
