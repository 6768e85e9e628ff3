//! Dataset locations (issue 16): `tenant add --location` creates the dataset there (the
//! deployment's `TENANTSYNC_BQ_LOCATION` otherwise), the location is checked before anything
//! is created, an existing dataset elsewhere is refused naming both locations and nothing is
//! saved, `tenant update --location` records the location of a tenant onboarded before, and a
//! tenant with a location syncs.

use tenantsync_tests::{scalar_i64, TestEnv};

/// The dataset's location as the local BigQuery reports it, None when there is no dataset.
async fn dataset_location(env: &TestEnv, dataset: &str) -> Option<String> {
    let url = format!(
        "{}/bigquery/v2/projects/{}/datasets/{dataset}",
        env.emulator_url(),
        env.project
    );
    let resp = reqwest::Client::new()
        .get(url)
        .bearer_auth("emulator-token")
        .send()
        .await
        .unwrap();
    match resp.status().as_u16() {
        404 => None,
        200 => {
            let v: serde_json::Value = resp.json().await.unwrap();
            Some(v["location"].as_str().unwrap_or_default().to_string())
        }
        s => panic!("dataset lookup: {s}"),
    }
}

/// `tenant add SLUG` for organization `org` into `dataset`, with `args` and `vars` added.
fn add(
    env: &TestEnv,
    slug: &str,
    org: &str,
    dataset: &str,
    args: &[&str],
    vars: &[(&str, &str)],
) -> (bool, String) {
    let mut all = vec!["tenant", "add", slug, "--organization-id", org];
    all.extend(["--project", &env.project, "--dataset", dataset]);
    all.extend(args);
    env.cli_with(&all, vars)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_are_created_in_their_location_and_one_elsewhere_is_refused_by_name() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, organization_id bigint NOT NULL, v int,
                             updated_at timestamptz NOT NULL DEFAULT now() - interval '1 minute');
         INSERT INTO items (id, organization_id, v) SELECT g, 1 + g % 3, g FROM generate_series(1, 30) g;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.add_table("items", "organization_id").await.unwrap();

    // --location EU: the dataset is created there, and the tenant records it.
    let eu = env.dataset("eu");
    let (ok, out) = add(&env, "ngo-eu", "1", &eu, &["--location", "eu"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{eu} in EU")), "{out}");
    assert_eq!(dataset_location(&env, &eu).await.as_deref(), Some("EU"));
    let t_eu = env.control.tenant("ngo-eu").await.unwrap();
    assert_eq!(t_eu.bq_location.as_deref(), Some("EU"));

    // No --location: the deployment's setting.
    let west = env.dataset("west");
    let (ok, out) = add(
        &env,
        "ngo-w",
        "2",
        &west,
        &[],
        &[("TENANTSYNC_BQ_LOCATION", "europe-west1")],
    );
    assert!(ok, "{out}");
    assert_eq!(
        dataset_location(&env, &west).await.as_deref(),
        Some("europe-west1")
    );

    // Not a location: refused by name before BigQuery is called.
    let mars = env.dataset("mars");
    let (ok, out) = add(
        &env,
        "ngo-m",
        "3",
        &mars,
        &["--location", "mars-north"],
        &[],
    );
    assert!(
        !ok && out.contains("\"mars-north\" is not a BigQuery location"),
        "{out}"
    );
    assert_eq!(dataset_location(&env, &mars).await, None);
    let (ok, out) = add(
        &env,
        "ngo-m",
        "3",
        &mars,
        &[],
        &[("TENANTSYNC_BQ_LOCATION", "moon")],
    );
    assert!(
        !ok && out.contains("TENANTSYNC_BQ_LOCATION") && out.contains("\"moon\""),
        "{out}"
    );

    // A dataset that exists in the US already: refused naming it and both locations; the
    // tenant is not saved and the dataset is left as it was.
    let us = env.dataset("us");
    let (ok, out) = add(&env, "ngo-us", "3", &us, &["--location", "US"], &[]);
    assert!(ok, "{out}");
    let (ok, out) = env.cli(&["tenant", "remove", "ngo-us", "--keep-data"]);
    assert!(ok, "{out}");
    let (ok, out) = add(&env, "ngo-x", "3", &us, &["--location", "EU"], &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "dataset {}.{us} exists in location US, not EU",
            env.project
        )),
        "{out}"
    );
    assert!(
        env.control.tenant("ngo-x").await.is_err(),
        "a refused tenant was saved"
    );
    assert_eq!(dataset_location(&env, &us).await.as_deref(), Some("US"));

    // `tenant update --location`: a dataset cannot move, so another location is refused and
    // nothing changes; a tenant onboarded without one gets its dataset's own recorded.
    let (ok, out) = env.cli(&["tenant", "update", "ngo-eu", "--location", "US"]);
    assert!(
        !ok && out.contains("exists in location EU, not US"),
        "{out}"
    );
    let t = env.control.tenant("ngo-eu").await.unwrap();
    assert_eq!(t.bq_location.as_deref(), Some("EU"));
    let legacy = env.add_tenant("ngo-old", 3).await.unwrap();
    assert_eq!(legacy.bq_location, None);
    let (ok, out) = env.cli(&["tenant", "update", "ngo-old", "--location", "us"]);
    assert!(ok && out.contains("is in US"), "{out}");
    let t = env.control.tenant("ngo-old").await.unwrap();
    assert_eq!(t.bq_location.as_deref(), Some("US"));

    // Tenants with a location sync like any other.
    let summary = env.sync_once(&env.worker()).await.unwrap();
    assert!(summary.failed.is_empty(), "{:?}", summary.failed);
    for (slug, want) in [("ngo-eu", 10), ("ngo-w", 10), ("ngo-old", 10)] {
        let t = env.control.tenant(slug).await.unwrap();
        let bq = env.bq(&t).await.unwrap();
        let n = scalar_i64(
            &bq.query(&format!(
                "SELECT COUNT(*) FROM {}",
                bq.qualified("items_latest")
            ))
            .await
            .unwrap(),
        );
        assert_eq!(n, want, "{slug}");
    }
    env.cleanup().await.unwrap();
}
