//! Column policies (issue 16): a column excluded with `tables add --exclude-column` is never
//! read, so it appears in no BigQuery table or view, no dead letter and no log line, and
//! `verify` checks the table without it. The key, cursor, tenant and soft-delete columns cannot
//! be excluded, and a name the table does not have is refused.

use tenantsync_tests::TestEnv;

const SECRET: &str = "zz-secret-email@ngo.example";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excluded_column_appears_in_no_table_view_dead_letter_or_log() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE TABLE people (id bigint PRIMARY KEY, organization_id bigint NOT NULL, name text,
                              email text, phone text, score numeric(12,2),
                              updated_at timestamptz NOT NULL DEFAULT now() - interval '1 minute');
         INSERT INTO people (id, organization_id, name, email, phone, score)
         SELECT g, 1, 'p' || g, '{SECRET}', '+1-555-0100', g * 1.5 FROM generate_series(1, 20) g;
         -- BigQuery's NUMERIC has no NaN: this row is dead-lettered, its email with it if sent.
         UPDATE people SET score = 'NaN' WHERE id = 7;"
    ))
    .execute(env.source_pool())
    .await
    .unwrap();

    // Refused: an excluded key, and a column the table does not have.
    let add = |extra: &[&str]| {
        let mut args = vec!["tables", "add", "people"];
        args.extend(extra);
        env.cli(&args)
    };
    let (ok, out) = add(&["--exclude-column", "id"]);
    assert!(
        !ok && out.contains("\"id\"") && out.contains("cannot be excluded"),
        "{out}"
    );
    let (ok, out) = add(&["--exclude-column", "mail"]);
    assert!(
        !ok && out.contains("\"mail\"") && out.contains("no such column"),
        "{out}"
    );
    let (ok, out) = add(&["--exclude-column", "email", "--exclude-column", "phone"]);
    assert!(ok, "{out}");
    let spec = env.control.tables().await.unwrap().remove(0);
    assert_eq!(spec.exclude_columns, ["email", "phone"]);

    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let (ok, run_out) = env.cli(&["run", "--once"]);
    assert!(ok, "{run_out}");
    assert!(!run_out.contains(SECRET), "an excluded value was logged");

    let bq = env.bq(&tenant).await.unwrap();
    let schema = bq.table_schema("people").await.unwrap().unwrap();
    let names: Vec<&str> = schema.iter().filter_map(|f| f["name"].as_str()).collect();
    assert!(
        names.contains(&"name") && names.contains(&"score"),
        "{names:?}"
    );
    assert!(
        !names.contains(&"email") && !names.contains(&"phone"),
        "{names:?}"
    );
    let rows = bq
        .query(&format!(
            "SELECT TO_JSON_STRING(t) FROM {} t",
            bq.qualified("people_latest")
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 19, "every row but the dead-lettered one");
    for r in &rows {
        let row = tenantsync_tests::cell(r, 0);
        assert!(!row.contains(SECRET) && !row.contains("email"), "{row}");
    }
    let letters = env.control.dead_letters(None, None).await.unwrap();
    assert_eq!(letters.len(), 1, "the NaN score");
    assert_eq!(letters[0].key, ["7"]);
    assert!(
        letters[0].payload.contains("score"),
        "{}",
        letters[0].payload
    );
    assert!(
        !letters[0].payload.contains(SECRET) && !letters[0].payload.contains("phone"),
        "{}",
        letters[0].payload
    );

    // The row fixed at the source syncs; then `verify` compares every row, without the
    // excluded columns, and finds the table equal.
    sqlx::raw_sql("UPDATE people SET score = 1, updated_at = now() WHERE id = 7")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.past_skew().await;
    let (ok, run_out) = env.cli(&["run", "--once"]);
    assert!(ok && !run_out.contains(SECRET), "{run_out}");
    let (ok, out) = env.cli(&["verify"]);
    assert!(ok && out.contains("ok "), "{out}");
    assert!(!out.contains(SECRET), "{out}");
    env.cleanup().await.unwrap();
}

/// `tables update --exclude-column` on a table already synced: the column leaves every
/// tenant's versions table, `<t>_current` and `<t>_latest` at the next slice, open dead
/// letters lose its values at once, later slices never send it, and `verify` agrees.
/// `--include-column` lets it back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluding_a_synced_column_drops_it_everywhere() {
    let env = TestEnv::new().await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE TABLE people (id bigint PRIMARY KEY, organization_id bigint NOT NULL, name text,
                              email text, score numeric(12,2),
                              updated_at timestamptz NOT NULL DEFAULT now() - interval '1 minute');
         INSERT INTO people (id, organization_id, name, email, score)
         SELECT g, 1, 'p' || g, '{SECRET}', g FROM generate_series(1, 12) g;
         UPDATE people SET score = 'NaN' WHERE id = 5;"
    ))
    .execute(env.source_pool())
    .await
    .unwrap();
    let (ok, out) = env.cli(&["tables", "add", "people"]);
    assert!(ok, "{out}");
    let tenant = env.add_tenant("org-1", 1).await.unwrap();
    let (ok, out) = env.cli_with(&["run", "--once"], &[("TENANTSYNC_COMPACT_EVERY_S", "0")]);
    assert!(ok, "{out}");
    let bq = env.bq(&tenant).await.unwrap();
    let columns = |table: &'static str| {
        let bq = bq.clone();
        async move {
            let schema = bq.table_schema(table).await.unwrap().unwrap_or_default();
            schema
                .iter()
                .filter_map(|f| f["name"].as_str().map(String::from))
                .collect::<Vec<_>>()
        }
    };
    // Synced with the column, as registered; the merge made `people_current`.
    assert!(columns("people").await.contains(&"email".to_string()));
    assert!(columns("people_current")
        .await
        .contains(&"email".to_string()));
    let letters = env.control.dead_letters(None, None).await.unwrap();
    assert!(
        letters[0].payload.contains(SECRET),
        "the NaN row kept its email"
    );

    // Refused, and nothing changes: a key column, a column the table does not have.
    for (bad, why) in [("id", "cannot be excluded"), ("mail", "no such column")] {
        let (ok, out) = env.cli(&["tables", "update", "people", "--exclude-column", bad]);
        assert!(!ok && out.contains(why), "{out}");
    }
    assert!(env.control.tables().await.unwrap()[0]
        .exclude_columns
        .is_empty());

    let (ok, out) = env.cli(&["tables", "update", "people", "--exclude-column", "email"]);
    assert!(ok && out.contains("excluded columns email"), "{out}");
    let letters = env.control.dead_letters(None, None).await.unwrap();
    assert!(
        !letters[0].payload.contains(SECRET) && letters[0].payload.contains("score"),
        "the open dead letter lost the value, not the row: {}",
        letters[0].payload
    );
    // Row 5 fixed at the source too, so `verify` below compares all 12.
    sqlx::raw_sql(
        "UPDATE people SET name = 'changed', updated_at = now() WHERE id = 3;
         UPDATE people SET score = 5, updated_at = now() WHERE id = 5;",
    )
    .execute(env.source_pool())
    .await
    .unwrap();
    env.past_skew().await;
    let (ok, out) = env.cli_with(&["run", "--once"], &[("TENANTSYNC_COMPACT_EVERY_S", "0")]);
    assert!(ok && !out.contains(SECRET), "{out}");
    for table in ["people", "people_current"] {
        let cols = columns(table).await;
        assert!(!cols.contains(&"email".to_string()), "{table}: {cols:?}");
    }
    let rows = bq
        .query(&format!(
            "SELECT TO_JSON_STRING(t) FROM {} t",
            bq.qualified("people_latest")
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 12);
    let all: String = rows.iter().map(|r| tenantsync_tests::cell(r, 0)).collect();
    assert!(!all.contains(SECRET) && all.contains("changed"), "{all}");
    let (ok, out) = env.cli(&["verify"]);
    assert!(ok && out.contains("ok ") && !out.contains(SECRET), "{out}");

    // Let back in: the column is added again and changed rows carry it.
    let (ok, out) = env.cli(&["tables", "update", "people", "--include-column", "email"]);
    assert!(ok && out.contains("excluded columns none"), "{out}");
    sqlx::raw_sql("UPDATE people SET email = 'back@ngo.example', updated_at = now() WHERE id = 4")
        .execute(env.source_pool())
        .await
        .unwrap();
    env.past_skew().await;
    let (ok, out) = env.cli(&["run", "--once"]);
    assert!(ok, "{out}");
    let back = bq
        .query(&format!(
            "SELECT email FROM {} WHERE id = 4",
            bq.qualified("people_latest")
        ))
        .await
        .unwrap();
    assert_eq!(tenantsync_tests::cell(&back[0], 0), "back@ngo.example");
    env.cleanup().await.unwrap();
}
