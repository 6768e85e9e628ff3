//! Helpers for end-to-end tests against the real Postgres, Redis and local BigQuery that
//! `scripts/dev-env` starts. Each test gets its own control-plane and source databases, its own
//! Redis key prefix and its own dataset names, so tests run in parallel without sharing state.

pub mod bench;
pub mod cdc;
pub mod chaos;
pub mod grpc_faults;
pub mod grpc_sink;
pub mod http;
pub mod interleave;
pub mod sink;

use anyhow::{Context, Result};
use secrecy::SecretString;
use sqlx::PgPool;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tenantsync_bigquery::{BigQuery, Credentials, Endpoint};
use tenantsync_core::crypto::MasterKey;
use tenantsync_core::{Mode, TableSpec, Tenant};
use tenantsync_lease::Leases;
use tenantsync_store::control::tasks::TaskId;
use tenantsync_store::control::NewTableSpec;
use tenantsync_store::{ControlPlane, SourceReader};
use tenantsync_worker::onboard::{self, TenantRequest};
use tenantsync_worker::{Deps, Hooks, NoHooks, RunMode, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// Read `.env` at the workspace root for variables the environment does not set, so plain
/// `cargo test` works after `scripts/dev-env`.
fn load_dotenv() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.env");
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                if !k.starts_with('#') && std::env::var_os(k.trim()).is_none() {
                    std::env::set_var(k.trim(), v.trim());
                }
            }
        }
    }
}

fn var(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set; run scripts/dev-env (make test does)"))
}

/// Everything every test process logs, so a test can scan it for secrets.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(Default::default)
}

#[derive(Clone)]
struct Tee;

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        log_buffer().lock().unwrap().extend_from_slice(buf);
        if std::env::var_os("TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Debug everywhere, so the secret scan sees as much as an operator could turn on.
        let filter = tenantsync_bigquery::SECRET_SAFE_LOG_DIRECTIVES.iter().fold(
            tracing_subscriber::EnvFilter::new("debug,sqlx=warn"),
            |f, d| f.add_directive(d.parse().expect("static directive")),
        );
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(|| Tee)
            .with_ansi(false)
            .try_init();
    });
}

/// One test's world.
pub struct TestEnv {
    pub id: String,
    pub control: ControlPlane,
    pub source: SourceReader,
    pub leases: Leases,
    pub master_key: Arc<MasterKey>,
    pub master_key_b64: SecretString,
    pub endpoint: Endpoint,
    pub project: String,
    pub control_url: String,
    pub source_url: String,
    pub redis_url: String,
    admin_url: String,
    dbs: Vec<String>,
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

impl TestEnv {
    /// Fresh databases (control plane migrated, demo schema installed), a unique Redis prefix,
    /// on the shared Postgres and Redis that `scripts/dev-env` started.
    pub async fn new() -> Result<Self> {
        load_dotenv();
        Self::with_services(&var("DATABASE_URL"), &var("REDIS_URL")).await
    }

    /// Like [`Self::new`], on a Postgres server (`admin_url`: a database on it the test may
    /// create databases from) and a Redis of the test's own: the chaos test restarts them, which
    /// it must not do to the servers every other test shares.
    pub async fn with_services(admin_url: &str, redis_url: &str) -> Result<Self> {
        load_dotenv();
        init_logging();
        tenantsync_bigquery::client::install_crypto_provider();
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let admin_url = admin_url.to_string();
        let admin = tenantsync_store::connect(&admin_url, 1).await?;
        let control_db = format!("tstest_{id}_ctl");
        let source_db = format!("tstest_{id}_src");
        for db in [&control_db, &source_db] {
            sqlx::query(&format!("CREATE DATABASE {db}"))
                .execute(&admin)
                .await?;
        }
        admin.close().await;
        let control_url = with_db(&admin_url, &control_db);
        let source_url = with_db(&admin_url, &source_db);
        // Small pools: parallel tests, each with several processes, share one Postgres.
        let control = ControlPlane::new(tenantsync_store::connect(&control_url, 4).await?);
        tenantsync_store::migrate(control.pool()).await?;
        let source = SourceReader::new(tenantsync_store::connect(&source_url, 4).await?);
        tenantsync_demo::install_schema(source.pool()).await?;
        let redis_url = redis_url.to_string();
        let leases = Leases::connect(&redis_url, &format!("tstest:{id}")).await?;
        let master_key_b64 = MasterKey::generate_base64();
        Ok(Self {
            master_key: Arc::new(MasterKey::from_base64(&master_key_b64)?),
            master_key_b64,
            endpoint: Endpoint::emulator(&var("BIGQUERY_EMULATOR_HOST"))
                .with_storage_emulator(
                    std::env::var("BIGQUERY_STORAGE_EMULATOR_HOST")
                        .ok()
                        .as_deref(),
                )
                .with_token_uri_policy(
                    tenantsync_bigquery::TokenUriPolicy::allowing(TEST_TOKEN_HOSTS)
                        .map_err(anyhow::Error::msg)?,
                ),
            project: std::env::var("BIGQUERY_PROJECT")
                .unwrap_or_else(|_| "tenantsync-local".into()),
            id,
            control,
            source,
            leases,
            control_url,
            source_url,
            redis_url,
            admin_url,
            dbs: vec![control_db, source_db],
        })
    }

    pub fn source_pool(&self) -> &PgPool {
        self.source.pool()
    }

    /// A dataset name unique to this test (the emulator's insertId cache outlives drops).
    pub fn dataset(&self, name: &str) -> String {
        format!("t{}_{}", self.id, name.replace('-', "_"))
    }

    /// Worker settings for tests: short skew and lease so tests do not wait long.
    pub fn worker_config(&self) -> WorkerConfig {
        let mut c = WorkerConfig::new(format!("test-{}", self.id), self.endpoint.clone());
        c.cursor_skew = TEST_CURSOR_SKEW;
        // Tests write and then sync at once, with no coordinator to say what changed: a
        // horizon kept from the previous run (200 ms by default) would hide those writes
        // until the next run, and the test would see a slice with nothing in it.
        c.horizon_reuse = Duration::ZERO;
        c.lease_ttl = Duration::from_secs(5);
        c.request_timeout = Duration::from_secs(20);
        c.concurrency = 4;
        // `TENANTSYNC_WRITE_API=storage scripts/run-tests …` runs the same properties through
        // the Storage Write API (scripts/run-tests does so for the modules that prove them).
        if let Ok(w) = std::env::var("TENANTSYNC_WRITE_API") {
            c.write_api = w.parse().expect("TENANTSYNC_WRITE_API");
        }
        c
    }

    /// The write method this run's workers use by default (`TENANTSYNC_WRITE_API`).
    pub fn write_api(&self) -> tenantsync_core::WriteApi {
        self.worker_config().write_api
    }

    pub fn deps(&self) -> Deps {
        Deps {
            control: self.control.clone(),
            source: self.source.clone(),
            leases: self.leases.clone(),
            master_key: self.master_key.clone(),
        }
    }

    pub fn worker(&self) -> Arc<Worker> {
        self.worker_with(self.worker_config(), Arc::new(NoHooks))
    }

    pub fn worker_with(&self, cfg: WorkerConfig, hooks: Arc<dyn Hooks>) -> Arc<Worker> {
        Arc::new(Worker::with_hooks(cfg, self.deps(), hooks))
    }

    /// Register every demo table (organizations keyed by its own id).
    pub async fn add_demo_tables(&self) -> Result<Vec<TableSpec>> {
        let mut out = Vec::new();
        for (table, tenant_column) in tenantsync_demo::TABLES {
            out.push(self.add_table(table, tenant_column).await?);
        }
        Ok(out)
    }

    /// Switch a registered table's mode (as stored; no CLI checks).
    pub async fn set_mode(&self, spec: &TableSpec, mode: Mode) -> Result<()> {
        sqlx::query("UPDATE table_specs SET mode = $2 WHERE id = $1")
            .bind(spec.id)
            .bind(mode.as_str())
            .execute(self.control.pool())
            .await?;
        Ok(())
    }

    pub async fn add_table(&self, table: &str, tenant_column: &str) -> Result<TableSpec> {
        Ok(onboard::add_table(
            &self.control,
            &self.source,
            NewTableSpec {
                source_schema: "public".into(),
                source_table: table.into(),
                key_columns: vec![],
                cursor_column: "updated_at".into(),
                tenant_column: tenant_column.into(),
                mode: Mode::Latest,
                sync_interval_ms: 100,
                slice_rows: 5000,
                soft_delete_column: None,
                capture: Default::default(),
                exclude_columns: Vec::new(),
                hash_columns: Vec::new(),
            },
        )
        .await?)
    }

    /// Onboard organization `org` as tenant `<slug>` in emulator mode (no key).
    pub async fn add_tenant(&self, slug: &str, org: i64) -> Result<Tenant> {
        Ok(onboard::add_tenant(
            &self.control,
            &self.source,
            &self.master_key,
            &self.endpoint,
            TenantRequest {
                slug: slug.into(),
                organization_id: org.to_string(),
                project: self.project.clone(),
                dataset: self.dataset(slug),
                location: None,
                credentials: None,
                impersonate: None,
            },
        )
        .await?)
    }

    /// A BigQuery client on a tenant's dataset, for assertions.
    pub async fn bq(&self, tenant: &Tenant) -> Result<BigQuery> {
        Ok(BigQuery::new(
            &self.endpoint,
            &tenant.bq_project,
            &tenant.bq_dataset,
            &Credentials::Emulator,
            Duration::from_secs(60),
        )
        .await?)
    }

    /// Sync until everything committed so far is in BigQuery; fails if any task failed.
    /// `run --once` in this process. Bounded by [`SYNC_ONCE_LIMIT`]: a run that does not finish
    /// fails the test with each task's state and last error, instead of hanging the suite.
    /// Wait until rows written just now are below the read horizon (now − the cursor skew
    /// of `worker_config`). A slice started sooner rightly leaves them for the next run, and
    /// a test expecting them would fail whenever its set-up ran fast.
    pub async fn past_skew(&self) {
        tokio::time::sleep(TEST_CURSOR_SKEW * 2).await;
    }

    pub async fn sync_once(&self, worker: &Arc<Worker>) -> Result<tenantsync_worker::RunSummary> {
        self.past_skew().await;
        let shutdown = CancellationToken::new();
        let run = tenantsync_worker::run(worker.clone(), RunMode::Once, shutdown.clone());
        let s = match tokio::time::timeout(SYNC_ONCE_LIMIT, run).await {
            Ok(s) => s?,
            Err(_) => {
                shutdown.cancel();
                anyhow::bail!(
                    "run --once did not finish within {SYNC_ONCE_LIMIT:?}; tasks:\n{}",
                    self.task_states().await?.join("\n")
                );
            }
        };
        anyhow::ensure!(s.failed.is_empty(), "tasks failed: {:?}", s.failed);
        Ok(s)
    }

    /// One line per task: ids, progress, schedule and last error (for failure messages).
    pub async fn task_states(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT concat_ws(' ', s.tenant_id, s.table_id, 'synced', s.synced_through,
                              'failures', s.consecutive_failures, 'next', s.next_run_at,
                              'err', s.last_error)
             FROM sync_state s ORDER BY 1",
        )
        .fetch_all(self.control.pool())
        .await?)
    }

    pub async fn task(&self, tenant: &Tenant, table: &TableSpec) -> TaskId {
        TaskId {
            tenant_id: tenant.id,
            table_id: table.id,
        }
    }

    /// Drop this test's databases and datasets. Best effort: leftovers are removed by the next
    /// `make test` (see `scripts/test-cleanup`).
    pub async fn cleanup(self) -> Result<()> {
        for t in self.control.tenants().await.unwrap_or_default() {
            if let Ok(bq) = self.bq(&t).await {
                let _ = bq.delete_dataset().await;
            }
        }
        self.control.pool().close().await;
        self.source.pool().close().await;
        let admin = tenantsync_store::connect(&self.admin_url, 1).await?;
        for db in &self.dbs {
            sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .execute(&admin)
                .await
                .with_context(|| format!("dropping {db}"))?;
        }
        Ok(())
    }
}

/// First column of the first row of a BigQuery result as i64 (COUNT(*) and friends).
pub fn scalar_i64(rows: &[Vec<serde_json::Value>]) -> i64 {
    rows.first()
        .and_then(|r| r.first())
        .and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_i64().map(|n| n.to_string()))
        })
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a scalar integer result: {rows:?}"))
}

/// Rows of a table (or view) of a tenant's dataset matching `filter` (`WHERE …`, or empty).
pub async fn count_rows(bq: &BigQuery, table: &str, filter: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {} {filter}", bq.qualified(table));
    scalar_i64(&bq.query(&sql).await.unwrap())
}

/// Cell `i` of a row as a string (NULL as "NULL").
pub fn cell(row: &[serde_json::Value], i: usize) -> String {
    match &row[i] {
        serde_json::Value::Null => "NULL".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The `tenantsync` binary next to the test executables (`make test` builds it first).
pub fn binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("tenantsync");
    assert!(
        bin.exists(),
        "{} is missing; run `cargo build -p tenantsync` (make test does)",
        bin.display()
    );
    bin
}

/// A `tenantsync` process started by a test; killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: std::process::Child,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send a signal (`-9`, `-STOP`, `-CONT`, `-TERM`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(sig)
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {} failed", self.name);
    }

    /// Stop the process the way an operator does (SIGTERM: it finishes its slices in flight,
    /// including what follows their commit) and wait for it to exit; killed after `limit`.
    pub fn stop(&mut self, limit: Duration) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let t0 = std::time::Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestEnv {
    /// Start `tenantsync <args>` against this test's databases, Redis prefix and emulator.
    /// Its log goes to `$TMPDIR/tstest-<id>-<name>.log` (shown on failure by the caller).
    pub fn spawn(&self, name: &str, args: &[&str], extra: &[(&str, &str)]) -> Proc {
        let log = std::env::temp_dir().join(format!("tstest-{}-{name}.log", self.id));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = self.command(args);
        cmd.env("TENANTSYNC_WORKER_ID", name)
            .env("TENANTSYNC_COORDINATOR_ID", name)
            .env("TENANTSYNC_CURSOR_SKEW_MS", "50")
            .env("TENANTSYNC_TICK_MS", "100")
            .env("TENANTSYNC_METRICS_ADDR", "127.0.0.1:0")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Proc {
            name: name.into(),
            child: cmd.spawn().expect("start tenantsync"),
        }
    }

    /// The address a spawned process logged it serves `/metrics` on (it binds port 0).
    pub async fn metrics_addr(&self, p: &Proc) -> String {
        self.logged_addr(p, "serving /metrics").await
    }

    /// The `addr` field of the first log line of `p` containing `marker` (a listener bound
    /// to port 0 logs where it listens); fails the test after 30 s.
    pub async fn logged_addr(&self, p: &Proc, marker: &str) -> String {
        let log = std::env::temp_dir().join(format!("tstest-{}-{}.log", self.id, p.name));
        let t0 = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(marker)) {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                return v["fields"]["addr"].as_str().unwrap().to_string();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{} never logged {marker:?}:\n{text}",
                p.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The JSON log lines a spawned process wrote so far.
    pub fn json_logs(&self, p: &Proc) -> Vec<serde_json::Value> {
        let log = std::env::temp_dir().join(format!("tstest-{}-{}.log", self.id, p.name));
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait until every schedulable task is confirmed up to `t`, or fail after `timeout`.
    pub async fn wait_synced_through(
        &self,
        t: chrono::DateTime<chrono::Utc>,
        timeout: Duration,
    ) -> Result<()> {
        let t0 = std::time::Instant::now();
        loop {
            let oldest = self.control.oldest_synced_through().await?;
            if oldest.is_some_and(|o| o >= t) {
                return Ok(());
            }
            if t0.elapsed() >= timeout {
                let state: Vec<String> = sqlx::query_scalar(
                    "SELECT concat_ws(' ', s.tenant_id, s.table_id, 'synced', s.synced_through, 'changed', s.changed_until,
                                      'next', s.next_run_at, 'scan', cs.scanned_from, cs.scanned_through, 'err', s.last_error)
                     FROM sync_state s LEFT JOIN change_scans cs USING (table_id)
                     WHERE effective_synced_through(s, cs) IS NULL OR effective_synced_through(s, cs) < $1",
                )
                .bind(t)
                .fetch_all(self.control.pool())
                .await?;
                anyhow::bail!(
                    "not synced through {t} after {timeout:?} (oldest: {oldest:?}); behind:\n{}",
                    state.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Who holds a task's lease (the worker name part of the holder).
    pub async fn lease_holder(&self, task: TaskId) -> Option<String> {
        self.leases
            .holder(task.tenant_id, task.table_id)
            .await
            .ok()
            .flatten()
            .map(|h| h.split(':').next().unwrap_or_default().to_string())
    }
}

/// Token endpoints tests may use (`TENANTSYNC_TOKEN_URI_ALLOW_HOSTS` of every test process and
/// spawned binary): the local token endpoints of the real service-account path. Tests of the
/// refusal clear it.
pub const TEST_TOKEN_HOSTS: &str = "127.0.0.1";

/// The longest a test lets `run --once` take. The slowest test needs about 30 s; the margin
/// covers a loaded machine.
/// The cursor skew allowance of test workers (`TestEnv::worker_config`).
pub const TEST_CURSOR_SKEW: Duration = Duration::from_millis(50);

pub const SYNC_ONCE_LIMIT: Duration = Duration::from_secs(240);

impl TestEnv {
    /// Base URL of the emulator this test uses (what `BIGQUERY_EMULATOR_HOST` names, as a URL):
    /// where proxies in front of it forward to.
    pub fn emulator_url(&self) -> String {
        self.endpoint
            .base_url
            .trim_end_matches("/bigquery/v2")
            .to_string()
    }

    /// `tenantsync <args>` set up for this test's databases, Redis prefix, emulator and key.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(binary());
        cmd.args(args)
            .env("DATABASE_URL", &self.control_url)
            .env("SOURCE_DATABASE_URL", &self.source_url)
            .env("REDIS_URL", &self.redis_url)
            .env("TENANTSYNC_REDIS_PREFIX", format!("tstest:{}", self.id))
            .env("BIGQUERY_EMULATOR_HOST", self.emulator_url())
            .env(
                "TENANTSYNC_MASTER_KEY",
                secrecy::ExposeSecret::expose_secret(&self.master_key_b64),
            )
            .env("TENANTSYNC_LOG_FORMAT", "json")
            .env("TENANTSYNC_TOKEN_URI_ALLOW_HOSTS", TEST_TOKEN_HOSTS)
            .env("TENANTSYNC_CONTROL_POOL", "3")
            .env("TENANTSYNC_SOURCE_POOL", "3")
            // The local BigQuery commits one write per dataset at a time and refuses the
            // others ("Failed to commit DuckLake transaction", retried as transient): the
            // default 32 slices per process would only add refusals and retry waits here.
            .env("TENANTSYNC_CONCURRENCY", "8");
        cmd
    }

    /// Run a one-shot command; (success, stdout+stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        self.cli_with(args, &[])
    }

    /// Like [`Self::cli`], with extra environment variables (later ones win).
    pub fn cli_with(&self, args: &[&str], extra: &[(&str, &str)]) -> (bool, String) {
        let mut cmd = self.command(args);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run tenantsync");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// A worker hook that crashes the first slice to reach `point`, once per worker.
pub struct CrashOnceAt {
    point: tenantsync_worker::CrashPoint,
    done: std::sync::atomic::AtomicBool,
}

impl CrashOnceAt {
    pub fn new(point: tenantsync_worker::CrashPoint) -> Arc<Self> {
        Arc::new(Self {
            point,
            done: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl tenantsync_worker::Hooks for CrashOnceAt {
    fn crash(&self, _task: TaskId, at: tenantsync_worker::CrashPoint) -> bool {
        at == self.point && !self.done.swap(true, std::sync::atomic::Ordering::SeqCst)
    }
}

/// Fail if any of `texts` (what, text) holds any of `secrets` (name, value) or a PEM private
/// key. The message names both, never the value.
pub fn assert_no_secrets(texts: &[(&str, &str)], secrets: &[(&str, &str)]) {
    for (what, text) in texts {
        for (secret, value) in secrets {
            assert!(!text.contains(value), "{secret} found in {what}");
        }
        assert!(
            !text.contains("BEGIN PRIVATE KEY"),
            "a private key found in {what}"
        );
    }
}

impl TestEnv {
    /// `tenantsync tenant add <slug> --organization-id <org>` with this test's project, the
    /// dataset named after the slug, and the key in `key_file`; extra environment as
    /// [`Self::cli_with`].
    pub fn cli_tenant_add(
        &self,
        slug: &str,
        org: i64,
        key_file: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> (bool, String) {
        self.cli_with(
            &[
                "tenant",
                "add",
                slug,
                "--organization-id",
                &org.to_string(),
                "--project",
                &self.project,
                "--dataset",
                &self.dataset(&slug.replace('-', "_")),
                "--credentials-file",
                key_file.to_str().expect("key file path is UTF-8"),
            ],
            extra,
        )
    }
}
