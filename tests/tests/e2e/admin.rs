//! Admin surface (issue 7) through the real binary: tenant show/pause/resume/remove, per-tenant
//! table switches, the audit log, and the admin HTTP API's bearer-token auth. Every output,
//! response and log line of the suite is scanned for the secrets it handled.

use tenantsync_core::TenantStatus;
use tenantsync_tests::{captured_logs, scalar_i64, Proc, TestEnv};

/// The address `tenantsync admin-api` logged it listens on (it binds port 0).
async fn api_addr(env: &TestEnv, p: &Proc) -> String {
    format!("http://{}", env.logged_addr(p, "serving admin api").await)
}

fn read_log(env: &TestEnv, p: &Proc) -> String {
    std::fs::read_to_string(std::env::temp_dir().join(format!("tstest-{}-{}.log", env.id, p.name)))
        .unwrap_or_default()
}

/// `tokens create <name>` through the binary; the token is the last stdout line.
fn create_token(env: &TestEnv, name: &str) -> String {
    let out = env
        .command(&["tokens", "create", name])
        .output()
        .expect("run tenantsync");
    assert!(
        out.status.success(),
        "tokens create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("tsk_") && token.len() > 40, "not a token");
    token
}

/// Fail if any text holds any secret; says where, never what.
fn assert_no_secrets(texts: &[(&str, &str)], secrets: &[(&str, &str)]) {
    for (where_, text) in texts {
        for (what, secret) in secrets {
            assert!(!secret.is_empty());
            assert!(!text.contains(secret), "{what} found in {where_}");
        }
    }
}

/// Rows in a BigQuery table or view; Err when it does not exist.
async fn count(
    bq: &tenantsync_bigquery::BigQuery,
    table: &str,
) -> Result<i64, tenantsync_bigquery::BqError> {
    let sql = format!("SELECT COUNT(*) FROM {}", bq.qualified(table));
    bq.query(&sql).await.map(|r| scalar_i64(&r))
}

async fn audit_actions(env: &TestEnv) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT actor, action, target FROM audit_log ORDER BY id")
        .fetch_all(env.control.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_and_table_commands_change_state_and_are_audited() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1, 2, 3], 30)
        .await
        .unwrap();
    let contacts = env.add_table("contacts", "organization_id").await.unwrap();
    let flows = env.add_table("flows", "organization_id").await.unwrap();
    let a = env.add_tenant("ngo-a", 1).await.unwrap();
    let b = env.add_tenant("ngo-b", 2).await.unwrap();
    let c = env.add_tenant("ngo-c", 3).await.unwrap();
    let mut outputs = Vec::new();
    let mut cli = |args: &[&str]| {
        let (ok, out) = env.cli_with(args, &[("USER", "alice")]);
        outputs.push(out.clone());
        (ok, out)
    };

    // Before any sync: progress 0 % of the tenant's 30 contacts, nothing synced.
    let (ok, out) = cli(&["tenant", "show", "ngo-a", "--json"]);
    assert!(ok, "{out}");
    let show: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(show["slug"], "ngo-a");
    let tables = show["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 2);
    let t = tables.iter().find(|t| t["table"] == "contacts").unwrap();
    assert_eq!(t["progress"]["source_rows"], 30, "{t}");
    assert_eq!(t["progress"]["remaining_rows"], 30);
    assert_eq!(t["progress"]["percent"], 0.0);
    assert_eq!(t["enabled"], true);
    assert!(t["watermark"].is_null() && t["lag_seconds"].is_null());
    let (ok, out) = cli(&["tenant", "show", "nobody"]);
    assert!(
        !ok && out.contains("no tenant with slug \"nobody\""),
        "{out}"
    );

    // flows is switched off for ngo-a only: not scheduled for it, still for the others.
    let (ok, out) = cli(&["tables", "disable", "flows", "--tenant", "ngo-a"]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&["tables", "disable", "nope", "--tenant", "ngo-a"]);
    assert!(
        !ok && out.contains("no registered table public.nope"),
        "{out}"
    );
    let tasks = env.control.schedulable_tasks().await.unwrap();
    let has = |tenant: i64, table: i64| {
        tasks
            .iter()
            .any(|t| t.tenant_id == tenant && t.table_id == table)
    };
    assert!(!has(a.id, flows.id) && has(a.id, contacts.id) && has(b.id, flows.id));
    let due = env.control.due_tasks(100).await.unwrap();
    assert!(!due
        .iter()
        .any(|t| t.tenant_id == a.id && t.table_id == flows.id));
    // A copy queued before the switch cannot be claimed.
    let claim = env.control.claim(env.task(&a, &flows).await).await;
    assert!(claim.is_err(), "a disabled task was claimed");

    // ngo-c is paused: nothing of it is scheduled.
    let (ok, out) = cli(&["tenant", "pause", "ngo-c", "--reason", "invoice overdue"]);
    assert!(ok && out.contains("paused"), "{out}");
    assert_eq!(
        env.control.tenant_by_id(c.id).await.unwrap().status,
        TenantStatus::Paused
    );
    let worker = env.worker();
    env.sync_once(&worker).await.unwrap();
    let bq_a = env.bq(&a).await.unwrap();
    assert_eq!(count(&bq_a, "contacts_latest").await.unwrap(), 30);
    assert!(
        count(&bq_a, "flows_latest").await.is_err(),
        "flows reached ngo-a's dataset while disabled for it"
    );
    let bq_b = env.bq(&b).await.unwrap();
    assert_eq!(count(&bq_b, "flows_latest").await.unwrap(), 3);
    let bq_c = env.bq(&c).await.unwrap();
    assert!(
        count(&bq_c, "contacts_latest").await.is_err(),
        "paused tenant synced"
    );

    // Switched on again and resumed: both catch up on the next run.
    let (ok, out) = cli(&["tables", "enable", "flows", "--tenant", "ngo-a"]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&["tenant", "resume", "ngo-c"]);
    assert!(ok && out.contains("active"), "{out}");
    env.sync_once(&worker).await.unwrap();
    assert_eq!(count(&bq_a, "flows_latest").await.unwrap(), 3);
    assert_eq!(count(&bq_c, "contacts_latest").await.unwrap(), 30);

    // Caught up: 100 %, lag and watermark shown, in the table and JSON forms of status.
    let (ok, out) = cli(&["status", "--tenant", "ngo-a", "--json"]);
    assert!(ok, "{out}");
    // One document: the tasks, and the pool (workers, leader, queues). Logs follow on stderr.
    let doc: serde_json::Value = serde_json::Deserializer::from_str(&out)
        .into_iter::<serde_json::Value>()
        .next()
        .unwrap()
        .unwrap();
    let rows = doc["tasks"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r["tenant"], "ngo-a");
        assert_eq!(r["progress"]["percent"], 100.0, "{r}");
        assert_eq!(r["progress"]["eta_seconds"], 0.0, "{r}");
        assert!(
            r["watermark"].is_string() && r["lag_seconds"].is_number(),
            "{r}"
        );
    }
    let (ok, out) = cli(&["status"]);
    assert!(
        ok && out.contains("PROGRESS") && out.contains("100.0% (30/30)"),
        "{out}"
    );

    // remove never guesses what happens to the data: no terminal and no flag is an error.
    let (ok, out) = cli(&["tenant", "remove", "ngo-b"]);
    assert!(
        !ok && out.contains("--keep-data or --drop-data"),
        "remove without a choice: {out}"
    );
    assert!(env.control.tenant("ngo-b").await.is_ok(), "removed anyway");
    let (ok, out) = cli(&["tenant", "remove", "ngo-b", "--keep-data", "--drop-data"]);
    assert!(!ok && out.contains("cannot be used with"), "{out}");

    let (ok, out) = cli(&["tenant", "remove", "ngo-b", "--keep-data"]);
    assert!(ok && out.contains("kept"), "{out}");
    assert!(env.control.tenant("ngo-b").await.is_err());
    assert_eq!(
        count(&bq_b, "contacts_latest").await.unwrap(),
        30,
        "--keep-data must leave the dataset"
    );
    let (ok, out) = cli(&["tenant", "remove", "ngo-c", "--drop-data"]);
    assert!(ok && out.contains("dropped"), "{out}");
    assert!(env.control.tenant("ngo-c").await.is_err());
    assert!(
        count(&bq_c, "contacts_latest").await.is_err(),
        "--drop-data must delete the dataset"
    );
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync_state WHERE tenant_id IN ($1, $2)")
            .bind(b.id)
            .bind(c.id)
            .fetch_one(env.control.pool())
            .await
            .unwrap();
    assert_eq!(left, 0);

    // Every change above is in the audit log, under the operator's name.
    let audit = audit_actions(&env).await;
    let actions: Vec<&str> = audit.iter().map(|a| a.1.as_str()).collect();
    assert_eq!(
        actions,
        [
            "table.disable",
            "tenant.pause",
            "table.enable",
            "tenant.resume",
            "tenant.remove",
            "tenant.remove"
        ],
        "{audit:?}"
    );
    assert!(audit.iter().all(|a| a.0 == "cli:alice"), "{audit:?}");
    let (ok, out) = cli(&["audit", "--json"]);
    assert!(ok && out.contains("\"data\": \"drop\""), "{out}");

    let key = secrecy::ExposeSecret::expose_secret(&env.master_key_b64).to_string();
    let logs = captured_logs();
    let all = outputs.join("\n");
    assert_no_secrets(
        &[("cli output", &all), ("test logs", &logs)],
        &[("master key", &key)],
    );
    bq_b.delete_dataset().await.unwrap();
    env.cleanup().await.unwrap();
}

/// Every route of the API, with the method and a body that would change something.
fn routes() -> Vec<(&'static str, &'static str, Option<&'static str>)> {
    vec![
        ("GET", "/v1/tenants", None),
        ("GET", "/v1/tenants/ngo-a", None),
        ("DELETE", "/v1/tenants/ngo-a?data=drop", None),
        ("POST", "/v1/tenants/ngo-a/pause", Some(r#"{"reason":"x"}"#)),
        ("POST", "/v1/tenants/ngo-b/resume", None),
        (
            "PUT",
            "/v1/tenants/ngo-a/credentials",
            Some(r#"{"type":"service_account"}"#),
        ),
        ("POST", "/v1/tenants/ngo-a/tables/contacts/disable", None),
        ("POST", "/v1/tenants/ngo-a/tables/flows/enable", None),
        ("GET", "/v1/status", None),
        ("GET", "/v1/runs", None),
        ("GET", "/v1/dlq", None),
        ("GET", "/v1/audit", None),
        ("POST", "/v1/keys/rotate", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_api_refuses_missing_wrong_and_revoked_tokens_and_serves_the_operations() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1, 2], 20)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();
    let flows = env.add_table("flows", "organization_id").await.unwrap();
    let a = env.add_tenant("ngo-a", 1).await.unwrap();
    let b = env.add_tenant("ngo-b", 2).await.unwrap();
    env.sync_once(&env.worker()).await.unwrap();
    // ngo-b paused, flows off for ngo-a: the state the calls below would change.
    env.control
        .set_tenant_status(b.id, TenantStatus::Paused, Some("test"))
        .await
        .unwrap();
    env.control
        .set_task_enabled(env.task(&a, &flows).await, false)
        .await
        .unwrap();
    let token = create_token(&env, "ops-bot");
    let revoked = create_token(&env, "old-bot");
    let (ok, out) = env.cli(&["tokens", "revoke", "old-bot"]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&["tokens", "list", "--json"]);
    assert!(
        ok && out.contains("ops-bot") && !out.contains("tsk_"),
        "{out}"
    );

    let api = env.spawn(
        "api",
        &["admin-api"],
        &[
            ("TENANTSYNC_ADMIN_ADDR", "127.0.0.1:0"),
            ("TENANTSYNC_LOG", "debug"),
        ],
    );
    let base = api_addr(&env, &api).await;
    let http = reqwest::Client::new();
    let mut bodies = Vec::new();

    let snapshot = || async {
        let s: String = sqlx::query_scalar(
            "SELECT concat_ws('|',
                 (SELECT string_agg(slug || ':' || status, ',' ORDER BY slug) FROM tenants),
                 (SELECT string_agg(tenant_id || '/' || table_id || ':' || enabled, ',' ORDER BY 1) FROM sync_state),
                 (SELECT string_agg(encode(nonce, 'hex'), ',') FROM tenant_credentials),
                 (SELECT count(*) FROM audit_log))",
        )
        .fetch_one(env.control.pool())
        .await
        .unwrap();
        s
    };
    let before = snapshot().await;

    // No token, a malformed header, an unknown token, a revoked token: 401 everywhere.
    let bad_headers: Vec<Option<String>> = vec![
        None,
        Some("Basic b3BzOm9wcw==".into()),
        Some("Bearer".into()),
        Some("Bearer tsk_not-a-real-token".into()),
        Some(format!("Bearer {}x", token)),
        Some(format!("Bearer {revoked}")),
        Some(format!("bearer{token}")),
    ];
    for (method, path, body) in routes() {
        for h in &bad_headers {
            let mut req = http.request(method.parse().unwrap(), format!("{base}{path}"));
            if let Some(h) = h {
                req = req.header("authorization", h);
            }
            if let Some(b) = body {
                req = req.header("content-type", "application/json").body(b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            assert!(resp.headers().contains_key("www-authenticate"));
            let text = resp.text().await.unwrap();
            assert_eq!(status, 401, "{method} {path} with a bad token: {text}");
            bodies.push(text);
        }
    }
    assert_eq!(snapshot().await, before, "a refused call changed something");

    // The document is public; everything under /v1 needs the token.
    let doc: serde_json::Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    // With the token: each operation works and is audited under the token's name.
    let call = |method: &'static str, path: String, body: Option<&'static str>| {
        let http = http.clone();
        let token = token.clone();
        let base = base.clone();
        async move {
            let mut req = http
                .request(method.parse().unwrap(), format!("{base}{path}"))
                .bearer_auth(token);
            if let Some(b) = body {
                req = req.header("content-type", "application/json").body(b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap())
        }
    };
    let (s, list) = call("GET", "/v1/tenants".into(), None).await;
    assert_eq!(s, 200, "{list}");
    assert!(list.contains("ngo-a") && list.contains("ngo-b"));
    let (s, show) = call("GET", "/v1/tenants/ngo-a".into(), None).await;
    assert_eq!(s, 200, "{show}");
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    let contacts = show["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "contacts")
        .unwrap()
        .clone();
    assert_eq!(contacts["progress"]["percent"], 100.0, "{contacts}");
    assert_eq!(contacts["rows_synced"], 20);
    let (s, _) = call("GET", "/v1/tenants/nobody".into(), None).await;
    assert_eq!(s, 404);

    let (s, out) = call("POST", "/v1/tenants/ngo-b/resume".into(), None).await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(
        env.control.tenant_by_id(b.id).await.unwrap().status,
        TenantStatus::Active
    );
    let (s, out) = call(
        "POST",
        "/v1/tenants/ngo-a/pause".into(),
        Some(r#"{"reason":"audit"}"#),
    )
    .await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(
        env.control.tenant_by_id(a.id).await.unwrap().status,
        TenantStatus::Paused
    );
    let (s, out) = call("POST", "/v1/tenants/ngo-a/pause".into(), Some("not json")).await;
    assert_eq!(s, 422, "{out}");
    let (s, out) = call("POST", "/v1/tenants/ngo-a/tables/flows/enable".into(), None).await;
    assert_eq!(s, 200, "{out}");
    assert!(
        env.control
            .schedulable_tasks()
            .await
            .unwrap()
            .iter()
            .all(|t| t.tenant_id != a.id),
        "paused tenant scheduled"
    );
    let (s, out) = call("POST", "/v1/tenants/ngo-a/tables/nope/disable".into(), None).await;
    assert_eq!(s, 404, "{out}");

    // A malformed key is refused with what is wrong, and nothing is stored.
    let creds_before = snapshot().await;
    for bad in [
        "not json",
        r#"{"type":"authorized_user","client_id":"x"}"#,
        r#"{"type":"service_account","client_email":"a@b.c","token_uri":"http://127.0.0.1:9/t"}"#,
    ] {
        let (s, out) = call("PUT", "/v1/tenants/ngo-b/credentials".into(), Some(bad)).await;
        assert_eq!(s, 422, "{out}");
        bodies.push(out);
    }
    assert_eq!(snapshot().await, creds_before);

    for path in [
        "/v1/status",
        "/v1/status?tenant=ngo-b",
        "/v1/runs?limit=5",
        "/v1/dlq?all=true",
        "/v1/audit",
    ] {
        let (s, out) = call("GET", path.into(), None).await;
        assert_eq!(s, 200, "{path}: {out}");
        assert!(out.starts_with('['), "{path}: {out}");
        bodies.push(out);
    }
    let (s, out) = call("GET", "/v1/runs?limit=-1".into(), None).await;
    assert_eq!(s, 400, "{out}");
    let (s, out) = call("GET", "/v1/status?tenant=nobody".into(), None).await;
    assert_eq!(s, 404, "{out}");
    let (s, out) = call("POST", "/v1/keys/rotate".into(), None).await;
    assert_eq!(s, 200, "{out}");

    // Removal needs an explicit choice for the dataset.
    let (s, out) = call("DELETE", "/v1/tenants/ngo-b".into(), None).await;
    assert_eq!(s, 422, "{out}");
    assert!(out.contains("data=keep"), "{out}");
    let (s, out) = call("DELETE", "/v1/tenants/ngo-b?data=maybe".into(), None).await;
    assert_eq!(s, 422, "{out}");
    assert!(env.control.tenant("ngo-b").await.is_ok());
    let (s, out) = call("DELETE", "/v1/tenants/ngo-b?data=keep".into(), None).await;
    assert_eq!(s, 200, "{out}");
    assert!(env.control.tenant("ngo-b").await.is_err());

    let audit = audit_actions(&env).await;
    let api_actions: Vec<&str> = audit
        .iter()
        .filter(|a| a.0 == "api:ops-bot")
        .map(|a| a.1.as_str())
        .collect();
    assert_eq!(
        api_actions,
        [
            "tenant.resume",
            "tenant.pause",
            "table.enable",
            "keys.rotate",
            "tenant.remove"
        ],
        "{audit:?}"
    );

    // A token revoked while the API runs is refused from the next call on.
    let (ok, out) = env.cli(&["tokens", "revoke", "ops-bot"]);
    assert!(ok, "{out}");
    let (s, _) = call("GET", "/v1/tenants".into(), None).await;
    assert_eq!(s, 401);

    let log = read_log(&env, &api);
    let logs = captured_logs();
    let key = secrecy::ExposeSecret::expose_secret(&env.master_key_b64).to_string();
    let all = bodies.join("\n");
    let dump: String = sqlx::query_scalar(
        "SELECT concat_ws('\n', (SELECT string_agg(a::text, '\n') FROM audit_log a),
                                (SELECT string_agg(t::text, '\n') FROM api_tokens t))",
    )
    .fetch_one(env.control.pool())
    .await
    .unwrap();
    assert_no_secrets(
        &[
            ("api responses", &all),
            ("api log", &log),
            ("test logs", &logs),
            ("control plane", &dump),
        ],
        &[
            ("api token", &token),
            ("revoked api token", &revoked),
            ("master key", &key),
        ],
    );
    drop(api);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_backfill_progress_and_eta_while_a_backfill_is_under_way() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1], 10)
        .await
        .unwrap();
    // One bulk insert: 12,000 rows sharing one cursor value, the hard case for progress.
    tenantsync_demo::backfill(env.source_pool(), &[1], 12_000)
        .await
        .unwrap();
    let messages = env.add_table("messages", "organization_id").await.unwrap();
    let a = env.add_tenant("ngo-a", 1).await.unwrap();
    let task = env.task(&a, &messages).await;
    env.past_skew().await;
    // One slice (5,000 rows) of the backfill.
    env.worker()
        .try_execute_task(task, &tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let synced: i64 = sqlx::query_scalar(
        "SELECT rows_synced FROM sync_state WHERE tenant_id = $1 AND table_id = $2",
    )
    .bind(a.id)
    .bind(messages.id)
    .fetch_one(env.control.pool())
    .await
    .unwrap();
    assert!(
        synced > 0 && synced < 12_000,
        "one slice synced {synced} rows"
    );

    let (ok, out) = env.cli(&["status", "--tenant", "ngo-a", "--json"]);
    assert!(ok, "{out}");
    let doc: serde_json::Value = serde_json::Deserializer::from_str(&out)
        .into_iter::<serde_json::Value>()
        .next()
        .unwrap()
        .unwrap();
    let p = &doc["tasks"][0]["progress"];
    assert_eq!(p["source_rows"], 12_000, "{p}");
    assert_eq!(p["remaining_rows"], 12_000 - synced, "{p}");
    let percent = p["percent"].as_f64().unwrap();
    let expected = (synced as f64 * 1000.0 / 12_000.0).round() / 10.0;
    assert!((percent - expected).abs() < 0.11, "{percent} vs {expected}");
    assert!(p["rows_per_s"].as_f64().unwrap() > 0.0, "{p}");
    let eta = p["eta_seconds"].as_f64().unwrap();
    assert!(eta > 0.0 && eta < 3600.0, "{p}");
    assert_eq!(p["estimated"], false);
    let (ok, out) = env.cli(&["tenant", "show", "ngo-a"]);
    assert!(ok && out.contains(&format!("{percent:.1}%")), "{out}");
    env.cleanup().await.unwrap();
}
