//! Helpers of the chaos test (`tests/chaos.rs`): a Postgres cluster and a Redis of the test's
//! own (it restarts them, which it must not do to the servers every other test shares), a proxy
//! in front of the local BigQuery that fails insertAll calls the ways networks and BigQuery do,
//! writers that outlive a Postgres restart, and a record of when progress was seen.

use crate::http::{forward, serve, Request, Response};
use crate::interleave::PickSql;
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Postgres refuses to run as root: as root, its programs run as the `postgres` user.
fn postgres_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The newest installed server's bin directory (`/usr/lib/postgresql/<major>/bin`).
fn postgres_bin() -> Result<PathBuf> {
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql (scripts/dev-env installs Postgres)")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    majors.sort();
    let major = majors
        .last()
        .context("no Postgres under /usr/lib/postgresql")?;
    Ok(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")))
}

/// A throw-away Postgres cluster on a loopback port, its socket and data in a temp directory.
/// Stopped and removed when dropped.
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl PgCluster {
    pub fn start() -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("tstest-chaos-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut chown = Command::new("chown");
        chown.arg("postgres:").arg(&dir);
        if is_root() {
            run(chown, "chown postgres: <temp dir>")?;
        }
        let pg = Self {
            bin: postgres_bin()?,
            port: free_port(),
            dir,
        };
        let mut initdb = postgres_command(&pg.bin.join("initdb"));
        initdb
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(pg.dir.join("data"));
        run(initdb, "initdb")?;
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    /// A URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut c = postgres_command(&self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.dir.join("data")).args(args);
        c
    }

    fn pg_ctl_start(&self) -> Result<()> {
        // Durability does not matter here; a restart is a clean shutdown (fast mode) anyway.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=100 -c shared_buffers=32MB",
            self.port,
            self.dir.display()
        );
        let mut c = self.pg_ctl(&["-w", "-t", "60", "-o", &opts, "-l"]);
        c.arg(self.dir.join("server.log")).arg("start");
        run(c, "pg_ctl start")
    }

    /// Fast shutdown (clients are disconnected, in-flight transactions roll back), then start
    /// again. Returns how long the server was unavailable.
    pub fn restart(&self) -> Result<Duration> {
        let t0 = Instant::now();
        run(self.pg_ctl(&["-m", "fast", "-w", "stop"]), "pg_ctl stop")?;
        self.pg_ctl_start()?;
        Ok(t0.elapsed())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` on a loopback port with no persistence: a restart loses every key, as a
/// Redis without a volume does. Killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Result<Self> {
        let mut r = Self {
            port: free_port(),
            child: None,
        };
        r.spawn()?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("redis-server did not listen on {} within 20 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill the server, keep it down for `down`, start it again (empty). Returns the time it
    /// was unreachable.
    pub fn restart(&mut self, down: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        self.kill();
        std::thread::sleep(down);
        self.spawn()?;
        Ok(t0.elapsed())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Instants at which something happened (an acknowledged insertAll, a watermark commit).
#[derive(Default)]
pub struct Events(Mutex<Vec<Instant>>);

impl Events {
    pub fn record(&self) {
        self.0.lock().unwrap().push(Instant::now());
    }

    /// The first event at or after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Instant> {
        self.0.lock().unwrap().iter().copied().find(|e| *e >= t)
    }
}

/// What the proxy does to one insertAll call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    None,
    RateLimited,
    ServerError,
    Unavailable,
    /// Forwarded; the answer comes after the client gave up.
    Slow,
    /// The connection drops before anything is forwarded.
    DropBefore,
    /// Forwarded, then the connection drops: the rows landed, the client cannot know it.
    DropAfter,
    /// Like `DropAfter`, and BigQuery's insertId de-duplication does not catch the retry: it is
    /// best effort, for about a minute. The proxy sends the rows without their insertIds, so
    /// the retry lands a second copy of the same versions, as a resend after the window does.
    DropAfterNoDedup,
}

const FAULTS: [Fault; 7] = [
    Fault::RateLimited,
    Fault::ServerError,
    Fault::Unavailable,
    Fault::Slow,
    Fault::DropBefore,
    Fault::DropAfter,
    Fault::DropAfterNoDedup,
];

fn error(status: u16, reason: &str) -> Response {
    Response::json(
        status,
        &serde_json::json!({"error": {"code": status, "message": format!("injected {reason}"),
                                      "errors": [{"reason": reason}]}}),
    )
}

/// The request with its rows' insertIds removed, and the rows (their `json` objects).
fn without_insert_ids(req: &Request) -> (Request, Vec<serde_json::Value>) {
    let mut body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let mut sent = Vec::new();
    if let Some(rows) = body.get_mut("rows").and_then(|r| r.as_array_mut()) {
        for row in rows {
            if let Some(row) = row.as_object_mut() {
                row.remove("insertId");
                sent.extend(row.get("json").cloned());
            }
        }
    }
    let req = Request {
        body: body.to_string().into_bytes(),
        ..req.clone()
    };
    (req, sent)
}

/// A proxy in front of the local BigQuery: a share of insertAll calls meets a [`Fault`], every
/// other call is forwarded as is.
pub struct FaultProxy {
    pub addr: SocketAddr,
    /// insertAll calls forwarded and answered, without a fault.
    pub inserts: Arc<Events>,
    /// (request path, row) of every row the proxy landed without its insertId.
    twice: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
    counts: Arc<Mutex<BTreeMap<Fault, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// `fault_percent` of insertAll calls fail, the kinds drawn evenly; `client_timeout` is the
    /// workers' request timeout (a slow answer comes a second after it).
    pub async fn start(
        upstream: String,
        seed: u64,
        fault_percent: u32,
        client_timeout: Duration,
    ) -> Self {
        let inserts = Arc::new(Events::default());
        let counts: Arc<Mutex<BTreeMap<Fault, usize>>> = Arc::default();
        let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)));
        let http = reqwest::Client::new();
        let twice: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
        let (ins, cnt, tw) = (inserts.clone(), counts.clone(), twice.clone());
        let (addr, task) = serve(Arc::new(move |req: Request| {
            let (ins, cnt, tw) = (ins.clone(), cnt.clone(), tw.clone());
            let (http, upstream) = (http.clone(), upstream.clone());
            let fault = if req.path.contains("/insertAll") {
                let mut rng = rng.lock().unwrap();
                if rng.gen_range(0..100) < fault_percent {
                    FAULTS[rng.gen_range(0..FAULTS.len())]
                } else {
                    Fault::None
                }
            } else {
                Fault::None
            };
            Box::pin(async move {
                if req.path.contains("/insertAll") {
                    *cnt.lock().unwrap().entry(fault).or_default() += 1;
                }
                match fault {
                    Fault::RateLimited => error(429, "rateLimitExceeded"),
                    Fault::ServerError => error(500, "backendError"),
                    Fault::Unavailable => error(503, "backendError"),
                    Fault::Slow => {
                        let r = forward(&http, &upstream, &req).await;
                        tokio::time::sleep(client_timeout + Duration::from_secs(1)).await;
                        r
                    }
                    Fault::DropBefore => Response::drop_connection(),
                    Fault::DropAfter => {
                        let _ = forward(&http, &upstream, &req).await;
                        Response::drop_connection()
                    }
                    Fault::DropAfterNoDedup => {
                        let (stripped, rows) = without_insert_ids(&req);
                        let r = forward(&http, &upstream, &stripped).await;
                        if r.status == 200 {
                            let mut tw = tw.lock().unwrap();
                            tw.extend(rows.into_iter().map(|row| (req.path.clone(), row)));
                        }
                        Response::drop_connection()
                    }
                    Fault::None => {
                        let r = forward(&http, &upstream, &req).await;
                        if req.path.contains("/insertAll") && r.status == 200 {
                            ins.record();
                        }
                        r
                    }
                }
            })
        }))
        .await;
        Self {
            addr,
            inserts,
            twice,
            counts,
            task,
        }
    }

    /// Rows landed without their insertId (so a retry landed them again) into table `table`
    /// of dataset `dataset`.
    pub fn landed_twice(&self, dataset: &str, table: &str) -> Vec<serde_json::Value> {
        let path = format!("/datasets/{dataset}/tables/{table}/insertAll");
        self.twice
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.contains(&path))
            .map(|(_, row)| row.clone())
            .collect()
    }

    /// insertAll calls per fault kind so far (`None`: forwarded untouched).
    pub fn counts(&self) -> BTreeMap<Fault, usize> {
        self.counts.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A task's confirmed point (`None` until its first commit).
type Synced = Option<chrono::DateTime<chrono::Utc>>;

/// What the control plane showed over time, polled every 100 ms by [`watch_control`].
#[derive(Default)]
pub struct ControlWatch {
    /// Watermark commits: each time the rows confirmed in BigQuery (the sum of
    /// `sync_state.rows_synced`) grew.
    pub commits: Events,
    /// (when, the point every task was confirmed through) samples.
    synced: Mutex<Vec<(Instant, chrono::DateTime<chrono::Utc>)>>,
    /// (when, each task's confirmed point, in task order) samples.
    tasks: Mutex<Vec<(Instant, Vec<Synced>)>>,
}

impl ControlWatch {
    /// When every task had been confirmed further than it was at `t`: each one made progress
    /// since (however far behind it is).
    pub fn all_moved(&self, t: Instant) -> Option<Instant> {
        let tasks = self.tasks.lock().unwrap();
        let (_, base) = tasks.iter().rev().find(|(seen, _)| *seen <= t)?;
        tasks
            .iter()
            .filter(|(seen, now)| *seen > t && now.len() == base.len())
            .find(|(_, now)| now.iter().zip(base).all(|(n, b)| n > b))
            .map(|(seen, _)| *seen)
    }

    /// How far behind the slowest task was at `at` (now minus its confirmed point).
    pub fn lag_at(&self, at: Instant) -> Option<Duration> {
        let synced = self.synced.lock().unwrap();
        let (seen, through) = synced.iter().rev().find(|(seen, _)| *seen <= at)?;
        let now = chrono::Utc::now() - chrono::Duration::from_std(seen.elapsed()).ok()?;
        (now - *through).to_std().ok()
    }

    /// When every task was first seen confirmed through `t`.
    pub fn caught_up(&self, t: chrono::DateTime<chrono::Utc>) -> Option<Instant> {
        self.synced
            .lock()
            .unwrap()
            .iter()
            .find(|(_, through)| *through >= t)
            .map(|(at, _)| *at)
    }
}

/// Poll the control plane until `stop`, with a pool of its own. Errors (Postgres restarting)
/// are skipped; the next poll tries again.
pub async fn watch_control(
    control_url: &str,
    stop: CancellationToken,
) -> Result<(Arc<ControlWatch>, tokio::task::JoinHandle<()>)> {
    let control =
        tenantsync_store::ControlPlane::new(tenantsync_store::connect(control_url, 1).await?);
    let watch = Arc::new(ControlWatch::default());
    let w = watch.clone();
    let task = tokio::spawn(async move {
        let mut last = 0i64;
        while !stop.is_cancelled() {
            let rows: Result<i64, _> =
                sqlx::query_scalar("SELECT coalesce(sum(rows_synced), 0)::bigint FROM sync_state")
                    .fetch_one(control.pool())
                    .await;
            if let Ok(rows) = rows {
                if rows > last {
                    w.commits.record();
                    last = rows;
                }
            }
            let per_task: Result<Vec<Synced>, _> = sqlx::query_scalar(
                "SELECT effective_synced_through(s, cs) FROM sync_state s
                     LEFT JOIN change_scans cs ON cs.table_id = s.table_id
                     ORDER BY s.tenant_id, s.table_id",
            )
            .fetch_all(control.pool())
            .await;
            if let Ok(per_task) = per_task {
                w.tasks.lock().unwrap().push((Instant::now(), per_task));
            }
            if let Ok(Some(through)) = control.oldest_synced_through().await {
                w.synced.lock().unwrap().push((Instant::now(), through));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        control.pool().close().await;
    });
    Ok((watch, task))
}

/// What [`writers`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    pub committed: u64,
    pub rolled_back: u64,
    /// Statements in committed transactions.
    pub statements: u64,
    /// Transactions that failed (Postgres restarting, deadlocks between the writers).
    pub errors: u64,
}

/// Like [`crate::interleave::random_writers`] (transactions of 1–5 statements from `pick`,
/// held open 0–400 ms so they commit out of order, one in ten rolled back) until `stop`, but a
/// failed transaction is counted and the writer goes on: Postgres restarts under them.
pub async fn writers(
    pool: &PgPool,
    tenants: &[i64],
    writers: u64,
    seed: u64,
    stop: CancellationToken,
    pick: PickSql,
) -> WriterStats {
    let tasks: Vec<_> = (0..writers)
        .map(|i| {
            let (pool, tenants, stop) = (pool.clone(), tenants.to_vec(), stop.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + i);
                let mut s = WriterStats::default();
                while !stop.is_cancelled() {
                    let n = rng.gen_range(1..=5);
                    let hold = Duration::from_millis(rng.gen_range(0..400));
                    let rollback = rng.gen_range(0..10) == 0;
                    let statements: Vec<(String, i64, i32)> = (0..n)
                        .map(|_| {
                            let org = tenants[rng.gen_range(0..tenants.len())];
                            (pick(&mut rng), org, rng.gen_range(0..1_000_000))
                        })
                        .collect();
                    let done: Result<(), sqlx::Error> = async {
                        let mut tx = pool.begin().await?;
                        for (sql, org, v) in &statements {
                            sqlx::query(sql).bind(org).bind(v).execute(&mut *tx).await?;
                        }
                        tokio::time::sleep(hold).await;
                        if rollback {
                            tx.rollback().await
                        } else {
                            tx.commit().await
                        }
                    }
                    .await;
                    match done {
                        Ok(()) if rollback => s.rolled_back += 1,
                        Ok(()) => {
                            s.committed += 1;
                            s.statements += n;
                        }
                        Err(_) => {
                            s.errors += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                s
            })
        })
        .collect();
    let mut total = WriterStats::default();
    for t in tasks {
        let s = t.await.expect("writer task");
        total.committed += s.committed;
        total.rolled_back += s.rolled_back;
        total.statements += s.statements;
        total.errors += s.errors;
    }
    total
}
