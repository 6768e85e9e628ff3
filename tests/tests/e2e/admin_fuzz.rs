//! schemathesis against the admin API's own OpenAPI document: no request it generates gets a
//! 5xx. Runs `scripts/api-fuzz`, which installs pinned schemathesis into `.dev/api-venv` on a
//! fresh machine (it needs PyPI once).

use std::time::Duration;
use tenantsync_tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_no_server_errors() {
    let env = TestEnv::new().await.unwrap();
    tenantsync_demo::seed(env.source_pool(), &[1, 2], 20)
        .await
        .unwrap();
    env.add_table("contacts", "organization_id").await.unwrap();
    env.add_table("flows", "organization_id").await.unwrap();
    env.add_tenant("ngo-a", 1).await.unwrap();
    env.add_tenant("ngo-b", 2).await.unwrap();
    env.sync_once(&env.worker()).await.unwrap();

    let out = env.command(&["tokens", "create", "fuzz"]).output().unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let api = env.spawn(
        "api",
        &["admin-api"],
        &[("TENANTSYNC_ADMIN_ADDR", "127.0.0.1:0")],
    );
    let log_path = std::env::temp_dir().join(format!("tstest-{}-api.log", env.id));
    let t0 = std::time::Instant::now();
    let addr = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("serving admin api")) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            break v["fields"]["addr"].as_str().unwrap().to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "api did not start:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/api-fuzz");
    let out = tokio::process::Command::new(script)
        .arg(format!("http://{addr}"))
        .env("TENANTSYNC_API_TOKEN", &token)
        .env("API_FUZZ_SEED", "7")
        .output()
        .await
        .expect("run scripts/api-fuzz");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let key = secrecy::ExposeSecret::expose_secret(&env.master_key_b64).to_string();
    for (what, text) in [("schemathesis output", &report), ("api log", &log)] {
        assert!(!text.contains(&token), "api token found in {what}");
        assert!(!text.contains(&key), "master key found in {what}");
    }
    assert!(
        out.status.success(),
        "schemathesis found failures (or could not run):\n{report}"
    );
    assert!(report.contains("passed"), "{report}");
    // The run was authenticated (a run that only ever got 401 would prove nothing): the token
    // was used, and the example slug's tenant was acted on under the token's name.
    let used: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_used_at FROM api_tokens WHERE name = 'fuzz'")
            .fetch_one(env.control.pool())
            .await
            .unwrap();
    assert!(used.is_some(), "schemathesis never presented the token");
    let actions: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT action FROM audit_log WHERE actor = 'api:fuzz'")
            .fetch_all(env.control.pool())
            .await
            .unwrap();
    assert!(
        !actions.is_empty(),
        "no authenticated change reached the API"
    );
    assert!(!log.contains("panicked"), "the api panicked:\n{log}");
    drop(api);
    env.cleanup().await.unwrap();
}
