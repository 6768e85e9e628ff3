//! Read-cost benchmark (issue 16): how many rows a `SELECT * FROM <t>_latest` reads after 1,
//! 10 and 100 rounds of updates to the same rows, with the views before `<t>_current` and
//! now, and how many listings `_sync_batches_<t>` holds after 10,000 slices.
//!
//! The local BigQuery reports `totalBytesProcessed: 0` on every query, so bytes cannot be read
//! off it. What is counted instead (`COUNT(*)` over the same predicates, on the local BigQuery)
//! is the rows in the ranges BigQuery's partition and cluster pruning leaves a query:
//! - before: the view read every version of the table and every listing (no partitioning, no
//!   clustering, no filter). A history table held every version; a latest table what the
//!   old compaction kept (each key's newest and every version younger than the window).
//! - now: `<t>_current`, plus the versions synced since the merge point's read-back
//!   (`_synced_at` is the partitioning and first clustering column), plus the table's own
//!   listings committed since then (`_sync_batches_<t>` is partitioned by day of commit).
//!   Block-level pruning reads whole blocks, so on BigQuery it is this plus at most a block
//!   per partition. Before, every listing of the table was read (one per slice so far).
//!
//! Rounds are replayed in the past, one every `BENCH_ROUND_EVERY_S` (3600), each written as
//! `BENCH_SLICES_PER_ROUND` (100) slices of `BENCH_KEYS` (1000) keys in all, into a latest and
//! a history table at once; after each round a merge into `<t>_current` at half the round
//! interval later, then (latest) compaction and for both the pruning of listings, with the SQL and
//! settings of a worker at its defaults (compaction window 3 h, settle window 5 min, slices
//! up to 20 s, clocks 60 s apart).
//! `_latest` is checked against the expected rows after every measured round. 100 rounds of
//! 100 slices make the 10,000 slices. `BENCH_ROUNDS` (100), `BENCH_KEEP=1` keeps the dataset.

use anyhow::{ensure, Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;
use std::time::{Duration, Instant};
use tenantsync_bigquery::listings::{forget_listings_sql, listings_table, settle_listings};
use tenantsync_bigquery::schema::{
    compact_sql, current_table, merge_current_at, read_from, visible_within,
};
use tenantsync_bigquery::{BigQuery, Credentials, Endpoint, Sink, TableDef};
use tenantsync_core::mapping::{BqField, BqType, FieldMode};
use tenantsync_core::Mode;
use tenantsync_tests::bench::{env_flag, env_num};
use tenantsync_tests::scalar_i64;

const LATEST: &str = "lat";
const HISTORY: &str = "hist";
const WINDOW: Duration = Duration::from_secs(3 * 3600);

struct Params {
    keys: i64,
    rounds: i64,
    slices: i64,
    every: i64,
    keep: bool,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

async fn count(bq: &BigQuery, table: &str, filter: &str) -> Result<i64> {
    let sql = format!("SELECT COUNT(*) FROM {} {filter}", bq.qualified(table));
    Ok(scalar_i64(&bq.query(&sql).await?))
}

/// One round: every key updated once, in `slices` batches, each listed 10 s after its rows.
async fn write_round(bq: &BigQuery, p: &Params, r: i64, at: DateTime<Utc>) -> Result<()> {
    let op = if r == 1 { "insert" } else { "update" };
    for table in [LATEST, HISTORY] {
        let rows: Vec<String> = (1..=p.keys)
            .map(|id| {
                let version = format!("{table}-{r}-{id}");
                json!({"insertId": version, "json": {
                    "id": id, "v": r, "note": format!("round {r}"),
                    "_op": op, "_source_ts": ts(at), "_synced_at": ts(at),
                    "_batch_id": format!("b{r}-{}", id % p.slices), "_version_id": version}})
                .to_string()
            })
            .collect();
        for chunk in rows.chunks(500) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let out = bq.insert_all(table, &refs).await?;
            ensure!(
                out.row_errors.is_empty(),
                "rows refused: {:?}",
                out.row_errors.first()
            );
        }
        let listed = at + chrono::Duration::seconds(10);
        let listings: Vec<String> = (0..p.slices)
            .map(|j| {
                json!({"insertId": format!("{table}-b{r}-{j}"), "json": {
                    "batch_id": format!("b{r}-{j}"),
                    "committed_at": ts(listed), "rows": p.keys / p.slices}})
                .to_string()
            })
            .collect();
        let refs: Vec<&str> = listings.iter().map(String::as_str).collect();
        bq.insert_all(&listings_table(table), &refs).await?;
    }
    Ok(())
}

/// What one table's `_latest` reads now and did before, after a merge at `point`.
struct Reads {
    before: i64,
    now: i64,
    merge_read: i64,
    listings: i64,
}

async fn reads(
    bq: &BigQuery,
    table: &str,
    at: (i64, DateTime<Utc>),
    back: Duration,
    merge_since: Option<DateTime<Utc>>,
) -> Result<Reads> {
    let (slices_so_far, point) = at;
    let since = read_from(point, back);
    let listings = count(bq, &listings_table(table), "").await?;
    let current = count(bq, &current_table(table), "").await?;
    let recent = count(
        bq,
        table,
        &format!("WHERE _synced_at >= TIMESTAMP('{}')", ts(since)),
    )
    .await?;
    let recent_listings = count(
        bq,
        &listings_table(table),
        &format!("WHERE committed_at >= TIMESTAMP('{}')", ts(since)),
    )
    .await?;
    // Before: a history table held every version; a latest table what the old compaction
    // kept. The history table has every version, so both are counted from it.
    let young = chrono::Duration::from_std(WINDOW)?;
    let old_filter = match table {
        HISTORY => String::new(),
        _ => format!(
            "WHERE _synced_at >= TIMESTAMP('{}') OR _version_id IN (SELECT _version_id FROM {})",
            ts(point - young),
            bq.qualified(&current_table(HISTORY))
        ),
    };
    let versions_before = count(bq, HISTORY, &old_filter).await?;
    let merge_read = match merge_since {
        None => count(bq, table, "").await?,
        Some(s) => {
            count(
                bq,
                table,
                &format!("WHERE _synced_at >= TIMESTAMP('{}')", ts(s)),
            )
            .await?
        }
    } + current;
    Ok(Reads {
        // Listings were never pruned before: one per slice so far.
        before: versions_before + slices_so_far,
        now: current + recent + recent_listings,
        merge_read,
        listings,
    })
}

async fn check_latest(bq: &BigQuery, table: &str, p: &Params, r: i64) -> Result<()> {
    let sql = format!(
        "SELECT COUNT(*), SUM(v), COUNT(DISTINCT id) FROM {}",
        bq.qualified(&format!("{table}_latest"))
    );
    let row = bq.query(&sql).await?;
    let n = |i: usize| row[0][i].as_str().and_then(|s| s.parse::<i64>().ok());
    ensure!(
        (n(0), n(1), n(2)) == (Some(p.keys), Some(p.keys * r), Some(p.keys)),
        "{table}_latest after round {r}: {:?}",
        row[0]
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    tenantsync_bigquery::client::install_crypto_provider();
    let p = Params {
        keys: env_num("BENCH_KEYS", 1000)?,
        rounds: env_num("BENCH_ROUNDS", 100)?,
        slices: env_num("BENCH_SLICES_PER_ROUND", 100)?,
        every: env_num("BENCH_ROUND_EVERY_S", 3600)?,
        keep: env_flag("BENCH_KEEP", false),
    };
    let host = std::env::var("BIGQUERY_EMULATOR_HOST").context("BIGQUERY_EMULATOR_HOST")?;
    let project = std::env::var("BIGQUERY_PROJECT").unwrap_or_else(|_| "tenantsync-local".into());
    let dataset = format!("bench_read_{}", std::process::id());
    let bq = BigQuery::new(
        &Endpoint::emulator(&host),
        &project,
        &dataset,
        &Credentials::Emulator,
        Duration::from_secs(120),
    )
    .await?;
    bq.ensure_dataset().await?;
    let field = |name: &str, field_type| BqField {
        name: name.into(),
        field_type,
        mode: FieldMode::Nullable,
    };
    let fields = [
        field("id", BqType::Int64),
        field("v", BqType::Int64),
        field("note", BqType::String),
    ];
    let keys = vec!["id".to_string()];
    // A worker at its defaults.
    let back =
        visible_within(Duration::from_secs(300), Duration::from_secs(20)) + Duration::from_secs(60);
    for (table, mode) in [(LATEST, Mode::Latest), (HISTORY, Mode::History)] {
        let def = TableDef {
            table,
            fields: &fields,
            keys: &keys,
            mode,
            max_staleness_s: 0,
            excluded: &[],
            hashed: &[],
            read_back: back,
        };
        Sink::ensure_table(&bq, &def).await?;
    }
    // Far enough back that the last round is past the streaming-buffer window too.
    let base = Utc::now() - chrono::Duration::seconds((p.rounds + 5) * p.every);
    let t0 = Instant::now();
    println!(
        "read cost: {} keys, {} rounds of updates one every {} s, {} slices a round; rows read \
         by SELECT * FROM <t>_latest",
        p.keys, p.rounds, p.every, p.slices
    );
    println!("| table | after round | before | now | the merge read | listings stored |");
    println!("|---|---|---|---|---|---|");
    for r in 1..=p.rounds {
        let at = base + chrono::Duration::seconds(r * p.every);
        write_round(&bq, &p, r, at).await?;
        let point = at + chrono::Duration::seconds(p.every / 2);
        let mut merges = Vec::new();
        for table in [LATEST, HISTORY] {
            let merged = merge_current_at(&bq, table, &keys, back, point).await?;
            merges.push(merged.read_since);
        }
        let settled = read_from(point, back);
        bq.query(&compact_sql(&bq, LATEST, WINDOW.as_secs(), settled))
            .await?;
        // The worker's listing point: the read-back, and past the window at the point.
        let listed_before = settled.min(point - chrono::Duration::from_std(WINDOW)?);
        for (table, unlisted_too) in [(LATEST, false), (HISTORY, true)] {
            settle_listings(&bq, table, listed_before, unlisted_too).await?;
            bq.query(&forget_listings_sql(&bq, table, listed_before))
                .await?;
        }
        if [1, 10, p.rounds].contains(&r) || r % 25 == 0 {
            for (table, since) in [LATEST, HISTORY].into_iter().zip(merges) {
                check_latest(&bq, table, &p, r).await?;
                let x = reads(&bq, table, (r * p.slices, point), back, since).await?;
                println!(
                    "| {table} | {r} | {} | {} | {} | {} |",
                    x.before, x.now, x.merge_read, x.listings
                );
            }
        }
    }
    println!(
        "listings after {} slices per table: {} in {}, {} in {}; {:.0} s",
        p.rounds * p.slices,
        count(&bq, &listings_table(HISTORY), "").await?,
        listings_table(HISTORY),
        count(&bq, &listings_table(LATEST), "").await?,
        listings_table(LATEST),
        t0.elapsed().as_secs_f64()
    );
    if !p.keep {
        bq.delete_dataset().await?;
    }
    Ok(())
}
