//! Random interleavings for the change-semantics tests (`changes.rs`, `changelog.rs`): writers
//! whose transactions commit out of order, and the row-for-row comparison of a BigQuery view
//! with Postgres afterwards.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tenantsync_bigquery::BigQuery;

/// Picks one statement: `$1` is a random tenant's organization id, `$2` a random int.
pub type PickSql = fn(&mut rand::rngs::StdRng) -> String;

/// `writers` connections run transactions of 1–5 statements from `pick` on random tenants for
/// `run_for`. Each holds its transaction open 0–400 ms, so later-started ones often commit
/// first, and about one in ten rolls back. Returns the statements run.
pub async fn random_writers(
    pool: &PgPool,
    tenants: &[i64],
    writers: u64,
    seed: u64,
    run_for: Duration,
    pick: PickSql,
) -> Result<u64> {
    let until = Instant::now() + run_for;
    let tasks: Vec<_> = (0..writers)
        .map(|i| {
            let (pool, tenants) = (pool.clone(), tenants.to_vec());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + i);
                let mut ops = 0u64;
                while Instant::now() < until {
                    let mut tx = pool.begin().await?;
                    for _ in 0..rng.gen_range(1..=5) {
                        let org = tenants[rng.gen_range(0..tenants.len())];
                        let v: i32 = rng.gen_range(0..1_000_000);
                        let sql = pick(&mut rng);
                        sqlx::query(&sql)
                            .bind(org)
                            .bind(v)
                            .execute(&mut *tx)
                            .await?;
                        ops += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
                    if rng.gen_range(0..10) == 0 {
                        tx.rollback().await?;
                    } else {
                        tx.commit().await?;
                    }
                }
                anyhow::Ok(ops)
            })
        })
        .collect();
    let mut ops = 0;
    for t in tasks {
        ops += t.await??;
    }
    Ok(ops)
}

fn as_i64(v: &serde_json::Value) -> i64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or(v.as_i64())
        .unwrap_or(i64::MIN)
}

/// `(id, v)` pairs of a query with two integer columns, in Postgres.
pub async fn pg_pairs(pool: &PgPool, sql: &str, org: i64) -> Result<BTreeMap<i64, i64>> {
    Ok(sqlx::query_as::<_, (i64, i32)>(sql)
        .bind(org)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(id, v)| (id, i64::from(v)))
        .collect())
}

/// `SELECT id, v FROM <view>` in BigQuery as a map; fails if a key appears twice.
pub async fn bq_pairs(bq: &BigQuery, view: &str) -> Result<BTreeMap<i64, i64>> {
    bq_pairs_by(bq, "id", view).await
}

/// Like [`bq_pairs`], keyed by an integer expression of the view's columns: a composite key
/// packed into one number, compared with the same packing on the Postgres side.
pub async fn bq_pairs_by(bq: &BigQuery, key: &str, view: &str) -> Result<BTreeMap<i64, i64>> {
    let rows = bq
        .query(&format!("SELECT {key}, v FROM {}", bq.qualified(view)))
        .await?;
    let map: BTreeMap<i64, i64> = rows
        .iter()
        .map(|r| (as_i64(&r[0]), as_i64(&r[1])))
        .collect();
    anyhow::ensure!(map.len() == rows.len(), "a key appears twice in {view}");
    Ok(map)
}

/// The real binary (`tenantsync run`) syncs while four [`random_writers`] run for 12 s; then
/// wait up to `wait` for every task to be confirmed past the writes. Returns the statements run.
pub async fn sync_while_writing(
    env: &crate::TestEnv,
    tenants: &[i64],
    seed: u64,
    pick: PickSql,
    wait: Duration,
) -> Result<u64> {
    sync_while_writing_with(env, tenants, seed, pick, wait, &[]).await
}

/// [`sync_while_writing`] with extra settings for `tenantsync run`.
pub async fn sync_while_writing_with(
    env: &crate::TestEnv,
    tenants: &[i64],
    seed: u64,
    pick: PickSql,
    wait: Duration,
    vars: &[(&str, &str)],
) -> Result<u64> {
    let mut run = env.spawn("run", &["run"], vars);
    let ops = random_writers(
        env.source_pool(),
        tenants,
        4,
        seed,
        Duration::from_secs(12),
        pick,
    )
    .await?;
    env.wait_synced_through(chrono::Utc::now(), wait).await?;
    // A graceful stop: a slice that just committed still deletes the changes it sent
    // (changelog capture) before the process exits, so the caller can count what is left.
    run.stop(Duration::from_secs(30));
    Ok(ops)
}
