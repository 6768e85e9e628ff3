//! Onboarding through the real binary (issue 13, items 5, 8, 9 and 10): one tenant per
//! organization, organization ids that fit every tenant column, key files whose `token_uri`
//! names anything but an allowed token endpoint, every local check before any BigQuery call,
//! and the admin roles' configuration and output.

use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::RsaPrivateKey;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tenantsync_store::control::NewTenant;
use tenantsync_store::StoreError;
use tenantsync_tests::http::{serve, Request, Response};
use tenantsync_tests::{Proc, TestEnv};

/// Exit code (None: killed after `limit`), stdout, stderr. A command that hangs fails the test
/// instead of the suite.
fn run_limited(mut cmd: Command, limit: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tenantsync");
    let t0 = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    (
        code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tenant add` with this test's project; Some(key file) or emulator mode.
fn tenant_add(
    env: &TestEnv,
    slug: &str,
    org: &str,
    dataset: &str,
    key_file: Option<&std::path::Path>,
    extra: &[(&str, &str)],
) -> (Option<i32>, String) {
    let mut args = vec![
        "tenant",
        "add",
        slug,
        "--organization-id",
        org,
        "--project",
        &env.project,
        "--dataset",
        dataset,
    ];
    if let Some(k) = key_file {
        args.extend(["--credentials-file", k.to_str().unwrap()]);
    }
    let mut cmd = env.command(&args);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let (code, out, err) = run_limited(cmd, Duration::from_secs(60));
    (code, format!("{out}{err}"))
}

async fn dataset_exists(env: &TestEnv, dataset: &str) -> bool {
    let url = format!(
        "{}/bigquery/v2/projects/{}/datasets/{dataset}",
        env.emulator_url(),
        env.project
    );
    let status = reqwest::Client::new()
        .get(url)
        .bearer_auth("emulator-token")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert!(status == 200 || status == 404, "dataset lookup: {status}");
    status == 200
}

async fn slugs(env: &TestEnv) -> Vec<String> {
    env.control
        .tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.slug)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_per_organization_with_ids_that_fit_every_tenant_column() {
    let env = TestEnv::new().await.unwrap();
    env.add_demo_tables().await.unwrap();
    let (code, out) = tenant_add(&env, "ngo-a", "1", &env.dataset("a"), None, &[]);
    assert_eq!(code, Some(0), "{out}");

    // A second tenant for organization 1 would receive ngo-a's rows in its own dataset.
    let (code, out) = tenant_add(&env, "ngo-b", "1", &env.dataset("b"), None, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("organization 1 is already onboarded as tenant ngo-a"),
        "{out}"
    );
    assert!(!dataset_exists(&env, &env.dataset("b")).await);

    // Ids the tenant columns (bigint) cannot hold, or hold under another text.
    for (org, why) in [
        ("abc", "not an integer"),
        ("99999999999999999999", "out of range"),
        ("042", "write it as \"42\""),
        ("+7", "write it as \"7\""),
    ] {
        let (code, out) = tenant_add(&env, "ngo-x", org, &env.dataset("x"), None, &[]);
        assert_eq!(code, Some(1), "{org}: {out}");
        assert!(
            out.contains(why) && out.contains("tenant column") && out.contains("(bigint)"),
            "{org}: {out}"
        );
    }
    assert!(!dataset_exists(&env, &env.dataset("x")).await);
    assert_eq!(slugs(&env).await, ["ngo-a"]);

    // Two onboardings racing past the check: the control plane's unique index decides, and
    // the loser is told which tenant has the organization.
    let err = env
        .control
        .add_tenant(
            &NewTenant {
                slug: "ngo-race".into(),
                organization_id: "1".into(),
                bq_project: env.project.clone(),
                bq_dataset: env.dataset("race"),
                bq_location: None,
                impersonate: None,
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("tenant ngo-a")),
        "{err}"
    );

    // A removed tenant frees its organization.
    let (ok, out) = env.cli(&["tenant", "remove", "ngo-a", "--keep-data"]);
    assert!(ok, "{out}");
    let (code, out) = tenant_add(&env, "ngo-b", "1", &env.dataset("b"), None, &[]);
    assert_eq!(code, Some(0), "{out}");
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_add_refuses_a_tenant_column_an_onboarded_organization_does_not_fit() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE notes (id bigint PRIMARY KEY, org text NOT NULL,
                             updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TYPE org_code AS ENUM ('abc', 'def');
         CREATE TABLE badges (id bigint PRIMARY KEY, org org_code NOT NULL,
                              updated_at timestamptz NOT NULL DEFAULT now());",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    // No table yet: nothing to check the ids against.
    for (slug, org) in [("ngo-x", "abc"), ("ngo-y", "042")] {
        let (code, out) = tenant_add(&env, slug, org, &env.dataset(slug), None, &[]);
        assert_eq!(code, Some(0), "{out}");
    }
    let (ok, out) = env.cli(&["tables", "add", "contacts"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("tenant ngo-x's organization id \"abc\"") && out.contains("not an integer"),
        "{out}"
    );
    // A text column fits any id.
    let (ok, out) = env.cli(&["tables", "add", "notes", "--tenant-column", "org"]);
    assert!(ok, "{out}");
    // Types the check leaves to Postgres: an enum without '042'.
    let (ok, out) = env.cli(&["tables", "add", "badges", "--tenant-column", "org"]);
    assert!(
        !ok && out.contains("tenant ngo-y's organization id \"042\""),
        "{out}"
    );
    let registered: Vec<String> = env
        .control
        .tables()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.source_table)
        .collect();
    assert_eq!(registered, ["notes"]);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tenant_add_leaves_no_dataset_behind() {
    let env = TestEnv::new().await.unwrap();
    for slug in ["Bad Slug", "ngo/a", "_ngo", "ngö"] {
        let ds = env.dataset("bad");
        let (code, out) = tenant_add(&env, slug, "7", &ds, None, &[]);
        assert_eq!(code, Some(1), "{slug}: {out}");
        assert!(out.contains("slug"), "{slug}: {out}");
        assert!(!dataset_exists(&env, &ds).await, "{slug}: dataset created");
    }
    let (code, out) = tenant_add(&env, "ngo-a", "1", &env.dataset("a"), None, &[]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = tenant_add(&env, "ngo-a", "2", &env.dataset("a2"), None, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("tenant \"ngo-a\" exists already"), "{out}");
    assert!(!dataset_exists(&env, &env.dataset("a2")).await);
    // Another tenant's dataset is refused before it is touched, too.
    let (code, out) = tenant_add(&env, "ngo-c", "3", &env.dataset("a"), None, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("belongs to tenant ngo-a"), "{out}");
    assert_eq!(slugs(&env).await, ["ngo-a"]);
    env.cleanup().await.unwrap();
}

fn key_file(env: &TestEnv, pem: &str, token_uri: &str, n: usize) -> std::path::PathBuf {
    let json = serde_json::json!({
        "type": "service_account", "project_id": "ngo-a", "private_key_id": "0123456789abcdef",
        "private_key": pem, "client_email": "sync@ngo-a.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": token_uri,
    });
    let path = std::env::temp_dir().join(format!("tstest-{}-key-{n}.json", env.id));
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

/// The address `tenantsync admin-api` logged it listens on (it binds port 0).
async fn api_addr(env: &TestEnv, p: &Proc) -> String {
    format!("http://{}", env.logged_addr(p, "serving admin api").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_uri_that_is_not_an_allowed_token_endpoint_is_refused_by_name_and_never_fetched() {
    let env = TestEnv::new().await.unwrap();
    let fetched = Arc::new(AtomicUsize::new(0));
    let f = fetched.clone();
    let (token_addr, _t) = serve(Arc::new(move |_req: Request| {
        f.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Response::json(400, &serde_json::json!({"error": "invalid_grant"})) })
    }))
    .await;
    let port = token_addr.port();
    let pem = RsaPrivateKey::new(&mut rand::thread_rng(), 2048)
        .unwrap()
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string();
    let marker = pem.lines().nth(5).unwrap().to_string();
    let ds = env.dataset("a");
    // With the test setting (127.0.0.1 allowed), or Google's only (the allow-list cleared).
    let google_only = [("TENANTSYNC_TOKEN_URI_ALLOW_HOSTS", "")];
    let cases: Vec<(String, bool, &str)> = vec![
        ("not a url".into(), false, "not an absolute URL"),
        ("/token".into(), false, "not an absolute URL"),
        (
            format!("http://127.0.0.1:{port}/token"),
            true,
            "TENANTSYNC_TOKEN_URI_ALLOW_HOSTS",
        ),
        (
            "http://169.254.169.254/computeMetadata/v1/token".into(),
            false,
            "not Google's token endpoint",
        ),
        (
            format!("https://oauth2.googleapis.com@127.0.0.1:{port}/token"),
            false,
            "user name",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/token"),
            false,
            "not Google's token endpoint",
        ),
        ("file:///etc/passwd".into(), false, "scheme"),
    ];
    let mut outputs = Vec::new();
    for (n, (uri, clear_allow_list, why)) in cases.iter().enumerate() {
        let key = key_file(&env, &pem, uri, n);
        let extra: &[(&str, &str)] = if *clear_allow_list { &google_only } else { &[] };
        let (code, out) = tenant_add(&env, "ngo-a", "1", &ds, Some(&key), extra);
        // A refusal (exit 1), not a panic (101) or a hang.
        assert_eq!(code, Some(1), "{uri}: {out}");
        assert!(
            out.contains("token_uri") && out.contains(why),
            "{uri}: {out}"
        );
        assert!(!dataset_exists(&env, &ds).await, "{uri}: dataset created");
        outputs.push(out);
    }
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        0,
        "a refused token endpoint was fetched"
    );
    assert!(slugs(&env).await.is_empty());

    // The admin API answers the same refusal for a new key instead of dropping the connection.
    let (code, out) = tenant_add(&env, "ngo-a", "1", &ds, None, &[]);
    assert_eq!(code, Some(0), "{out}");
    let created = env.command(&["tokens", "create", "ops"]).output().unwrap();
    assert!(created.status.success());
    let token = String::from_utf8(created.stdout)
        .unwrap()
        .trim()
        .to_string();
    let api = env.spawn(
        "api",
        &["admin-api"],
        &[("TENANTSYNC_ADMIN_ADDR", "127.0.0.1:0")],
    );
    let base = api_addr(&env, &api).await;
    for (uri, why) in [
        ("not a url".to_string(), "not an absolute URL"),
        (
            "http://169.254.169.254/token".to_string(),
            "not Google's token endpoint",
        ),
    ] {
        let body = std::fs::read_to_string(key_file(&env, &pem, &uri, 99)).unwrap();
        let resp = reqwest::Client::new()
            .put(format!("{base}/v1/tenants/ngo-a/credentials"))
            .bearer_auth(&token)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{uri}: no answer from the admin API: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 422, "{uri}: {text}");
        assert!(
            text.contains("token_uri") && text.contains(why),
            "{uri}: {text}"
        );
        outputs.push(text);
    }
    assert_eq!(fetched.load(Ordering::SeqCst), 0);
    assert!(!env.control.tenant("ngo-a").await.unwrap().has_credentials);
    for out in &outputs {
        assert!(
            !out.contains(&marker) && !out.contains("BEGIN PRIVATE KEY"),
            "a private key in an output"
        );
    }
    drop(api);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_a_malformed_master_key_by_name() {
    let env = TestEnv::new().await.unwrap();
    for bad in ["c2hvcnQ=", "not base64 at all!"] {
        let mut cmd = env.command(&["admin-api"]);
        cmd.env("TENANTSYNC_MASTER_KEY", bad)
            .env("TENANTSYNC_ADMIN_ADDR", "127.0.0.1:0");
        let (code, _, err) = run_limited(cmd, Duration::from_secs(20));
        assert_eq!(code, Some(1), "admin-api with a bad master key: {err}");
        assert!(err.contains("TENANTSYNC_MASTER_KEY"), "{err}");
        assert!(!err.contains(bad), "the key's value in the error");
    }
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_is_one_document() {
    let env = TestEnv::new().await.unwrap();
    env.add_demo_tables().await.unwrap();
    env.add_tenant("ngo-a", 1).await.unwrap();
    let out = env.command(&["status", "--json"]).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("status --json is not one JSON document ({e}):\n{stdout}"));
    let tasks = v["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), tenantsync_demo::TABLES.len(), "{v}");
    assert!(tasks.iter().all(|t| t["tenant"] == "ngo-a"), "{v}");
    assert!(
        v["pool"]["workers"].is_array() && v["pool"]["queue_depth"].is_array(),
        "{v}"
    );
    env.cleanup().await.unwrap();
}
