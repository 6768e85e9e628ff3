#![doc = include_str!("../README.md")]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DemoError {
    #[error("demo database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// The tables of the demo schema with their tenant columns (organizations is its own tenant).
pub const TABLES: [(&str, &str); 5] = [
    ("organizations", "id"),
    ("contacts", "organization_id"),
    ("flows", "organization_id"),
    ("messages", "organization_id"),
    ("flow_results", "organization_id"),
];

/// Create the demo schema (idempotent).
pub async fn install_schema(pool: &PgPool) -> Result<(), DemoError> {
    sqlx::raw_sql(include_str!("sql/schema.sql"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Create organizations `ids` (if missing) with a few flows and contacts each.
pub async fn seed(pool: &PgPool, ids: &[i64], contacts_per_org: i64) -> Result<(), DemoError> {
    for &id in ids {
        let mut tx = pool.begin().await?;
        let created = sqlx::query(
            "INSERT INTO organizations (id, name, shortcode, settings)
             VALUES ($1, 'NGO ' || $1, 'ngo' || $1, jsonb_build_object('timezone', 'Asia/Kolkata', 'bsp', 'gupshup'))
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if created == 1 {
            sqlx::query(
                "INSERT INTO flows (organization_id, name, keywords, definition)
                 SELECT $1, f.name, f.kw, jsonb_build_object('nodes', g, 'entry', 'start')
                 FROM (VALUES ('Registration', ARRAY['hi','register']),
                              ('Survey', ARRAY['survey']),
                              ('Help', ARRAY['help','menu'])) AS f(name, kw),
                      generate_series(3, 3) g",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            insert_contacts(&mut tx, id, contacts_per_org).await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

/// Insert `n` messages per organization in bulk: a backlog for the sync to work through.
pub async fn backfill(pool: &PgPool, orgs: &[i64], n: i64) -> Result<u64, DemoError> {
    let done = sqlx::query(
        "INSERT INTO messages (organization_id, contact_id, body, type, direction, is_read, media_ids, sent_at)
         SELECT o, NULL, 'backfill message ' || g || ' ' || md5(g::text),
                (CASE WHEN g % 10 = 0 THEN 'image' ELSE 'text' END)::message_type,
                CASE WHEN g % 2 = 0 THEN 'inbound' ELSE 'outbound' END,
                g % 3 = 0,
                CASE WHEN g % 7 = 0 THEN ARRAY[g::bigint, g::bigint + 1] END,
                now() - interval '1 day'
         FROM unnest($1::bigint[]) o, generate_series(1, $2) g",
    )
    .bind(orgs)
    .bind(n)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

async fn insert_contacts(
    conn: &mut sqlx::PgConnection,
    org: i64,
    n: i64,
) -> Result<Vec<i64>, DemoError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO contacts (organization_id, name, phone, language, optin_status, optin_time,
                               fields, tags, balance)
         SELECT $1,
                CASE WHEN random() < 0.1 THEN NULL ELSE 'Contact ' || g END,
                '+91' || (9000000000 + floor(random() * 999999999))::bigint,
                (ARRAY['en','hi','ta','mr'])[1 + floor(random() * 4)::int],
                random() < 0.7,
                CASE WHEN random() < 0.7 THEN now() - random() * interval '30 days' END,
                jsonb_build_object('age_group', (ARRAY['18-25','26-40','40+'])[1 + floor(random() * 3)::int],
                                   'visits', floor(random() * 10)::int),
                CASE WHEN random() < 0.5 THEN ARRAY['beneficiary'] ELSE ARRAY['beneficiary','volunteer'] END,
                round((random() * 1000)::numeric, 2)
         FROM generate_series(1, $2) g
         RETURNING id",
    )
    .bind(org)
    .bind(n)
    .fetch_all(conn)
    .await?)
}

/// Writes a realistic mix of inserts and updates across organizations.
pub struct Generator {
    pool: PgPool,
    orgs: Vec<i64>,
    contacts: HashMap<i64, Vec<i64>>,
    flows: HashMap<i64, Vec<i64>>,
    rng: StdRng,
    /// Operations written so far.
    pub written: u64,
}

impl Generator {
    /// A generator over existing organizations `orgs` (seeded with [`seed`]).
    pub async fn new(pool: PgPool, orgs: Vec<i64>, seed: u64) -> Result<Self, DemoError> {
        let mut contacts: HashMap<i64, Vec<i64>> = HashMap::new();
        let mut flows: HashMap<i64, Vec<i64>> = HashMap::new();
        for r in
            sqlx::query("SELECT organization_id, id FROM contacts WHERE organization_id = ANY($1)")
                .bind(&orgs)
                .fetch_all(&pool)
                .await?
        {
            contacts.entry(r.get(0)).or_default().push(r.get(1));
        }
        for r in
            sqlx::query("SELECT organization_id, id FROM flows WHERE organization_id = ANY($1)")
                .bind(&orgs)
                .fetch_all(&pool)
                .await?
        {
            flows.entry(r.get(0)).or_default().push(r.get(1));
        }
        Ok(Self {
            pool,
            orgs,
            contacts,
            flows,
            rng: StdRng::seed_from_u64(seed),
            written: 0,
        })
    }

    /// Write about `n` row changes in one transaction, spread over random organizations.
    pub async fn step(&mut self, n: usize) -> Result<(), DemoError> {
        let mut tx = self.pool.begin().await?;
        let mut left = n;
        while left > 0 {
            let org = self.orgs[self.rng.gen_range(0..self.orgs.len())];
            let k = left.min(self.rng.gen_range(1..=20));
            left -= k;
            let contacts = self.contacts.entry(org).or_default();
            let pick = |rng: &mut StdRng, v: &Vec<i64>| {
                v.get(rng.gen_range(0..v.len().max(1)))
                    .copied()
                    .unwrap_or(0)
            };
            match self.rng.gen_range(0..100) {
                0..=44 => {
                    let contact = pick(&mut self.rng, contacts);
                    sqlx::query(
                        "INSERT INTO messages (organization_id, contact_id, body, type, direction, is_read, media_ids, sent_at)
                         SELECT $1, $2,
                                CASE WHEN random() < 0.05 THEN NULL ELSE 'message ' || g || ' ' || md5(random()::text) END,
                                (CASE WHEN random() < 0.9 THEN 'text' ELSE 'image' END)::message_type,
                                CASE WHEN g % 2 = 0 THEN 'inbound' ELSE 'outbound' END,
                                random() < 0.5,
                                CASE WHEN random() < 0.1 THEN ARRAY[floor(random() * 1e6)::bigint] END,
                                now()
                         FROM generate_series(1, $3) g",
                    )
                    .bind(org)
                    .bind(contact)
                    .bind(k as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                45..=59 => {
                    let ids = insert_contacts(&mut tx, org, k as i64).await?;
                    contacts.extend(ids);
                }
                60..=79 => {
                    let ids: Vec<i64> = (0..k).map(|_| pick(&mut self.rng, contacts)).collect();
                    sqlx::query(
                        "UPDATE contacts SET last_message_at = now(),
                                fields = fields || jsonb_build_object('visits', floor(random() * 100)::int),
                                balance = CASE WHEN random() < 0.1 THEN NULL ELSE round((random() * 1000)::numeric, 2) END
                         WHERE id = ANY($1) AND organization_id = $2",
                    )
                    .bind(&ids)
                    .bind(org)
                    .execute(&mut *tx)
                    .await?;
                }
                80..=94 => {
                    let flow = self
                        .flows
                        .get(&org)
                        .map(|f| pick(&mut self.rng, f))
                        .unwrap_or(0);
                    let contact = pick(&mut self.rng, contacts);
                    sqlx::query(
                        "INSERT INTO flow_results (organization_id, flow_id, contact_id, results, score, completed)
                         SELECT $1, $2, $3, jsonb_build_object('q1', (ARRAY['yes','no'])[1 + floor(random() * 2)::int],
                                                               'rating', floor(random() * 5)::int + 1),
                                CASE WHEN random() < 0.2 THEN NULL ELSE random() * 100 END,
                                random() < 0.6
                         FROM generate_series(1, $4) g",
                    )
                    .bind(org)
                    .bind(flow)
                    .bind(contact)
                    .bind(k as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                _ => {
                    sqlx::query(
                        "UPDATE flows SET version = version + 1,
                                definition = jsonb_set(coalesce(definition, '{}'), '{nodes}', to_jsonb(floor(random() * 20)::int))
                         WHERE organization_id = $1 AND id = (SELECT id FROM flows WHERE organization_id = $1 ORDER BY random() LIMIT 1)",
                    )
                    .bind(org)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            self.written += k as u64;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Write about `rate` changes per second until `duration` passes or `stop` resolves.
    pub async fn run_for(
        &mut self,
        rate: f64,
        duration: Option<Duration>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), DemoError> {
        let tick = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut owed = 0.0f64;
        tokio::pin!(stop);
        loop {
            if duration.is_some_and(|d| t0.elapsed() >= d) {
                return Ok(());
            }
            owed += rate * tick.as_secs_f64();
            let n = owed.floor() as usize;
            if n > 0 {
                owed -= n as f64;
                self.step(n).await?;
            }
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }
}
