//! The end of a slice: [`ControlPlane::finish_slices`] and the parameters of
//! `queries/finish_slice.sql`, declared once in [`finish_params!`].

use super::tasks::{task_from_row, Claim, Commit, Finish, FinishRequest, Progress, RunRecord};
use super::ControlPlane;
use crate::error::{Result, StoreError};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, Postgres};
use sqlx::query::Query;
use sqlx::Row;
use std::sync::LazyLock;
use std::time::Duration;

/// Declares the per-task parameters of the finish statement, one line each: its name (the
/// column of the statement's `p` relation), its Rust and Postgres types, and how it is taken
/// from a [`FinishRequest`]. The statement's `unnest(...) AS p(...)`, the arrays and their
/// binding all come from this one list, so adding a field to the commit is a line here and its
/// use in `finish_slice.sql`.
macro_rules! finish_params {
    ($($name:ident: $rust:ty as $pg:literal = |$r:ident| $value:expr;)*) => {
        /// The parameters as columns: one array per field, one element per request.
        #[derive(Debug)]
        struct FinishParams {
            $($name: Vec<$rust>,)*
        }

        impl FinishParams {
            /// (name, Postgres type) of each parameter, in binding order.
            const COLUMNS: &'static [(&'static str, &'static str)] =
                &[$((stringify!($name), $pg)),*];

            fn of(reqs: &[FinishRequest]) -> Self {
                let mut p = Self {
                    $($name: Vec::with_capacity(reqs.len()),)*
                };
                for req in reqs {
                    $(
                        let $r = req;
                        p.$name.push($value);
                    )*
                }
                p
            }

            fn bind(self, q: Query<'_, Postgres, PgArguments>) -> Query<'_, Postgres, PgArguments> {
                $(let q = q.bind(self.$name);)*
                q
            }
        }
    };
}

finish_params! {
    tenant_id: i64 as "bigint" = |r| r.claim.task.tenant_id;
    table_id: i64 as "bigint" = |r| r.claim.task.table_id;
    token: i64 as "bigint" = |r| r.claim.fencing_token;
    wm_cursor: Option<String> as "text" =
        |r| r.progress.watermark.as_ref().and_then(|w| w.cursor.clone());
    // A JSON array: keys of different tasks cannot share one two-dimensional text array.
    wm_key: Option<serde_json::Value> as "jsonb" =
        |r| r.progress.watermark.as_ref().map(|w| serde_json::json!(w.key));
    synced_through: Option<DateTime<Utc>> as "timestamptz" = |r| r.progress.synced_through;
    rows: i64 as "bigint" = |r| r.progress.rows;
    next_run_ms: f64 as "float8" = |r| interval_ms(r.progress.next_run_in);
    error: Option<String> as "text" = |r| r.progress.error.clone();
    rerun_ms: Option<f64> as "float8" = |r| r.progress.rerun_if_changed_in.map(interval_ms);
    batches: Option<i64> as "bigint" = |r| r.progress.batches_visible_through;
    compact_s: Option<f64> as "float8" = |r| r.compact_every.map(|d| d.as_secs_f64());
    worker: String as "text" = |r| r.run.worker.clone();
    started_at: DateTime<Utc> as "timestamptz" = |r| r.run.started_at;
    duration_ms: i32 as "int" =
        |r| i32::try_from(r.run.duration.as_millis()).unwrap_or(i32::MAX);
    run_rows: i32 as "int" = |r| i32::try_from(r.run.rows).unwrap_or(i32::MAX);
    outcome: &'static str as "text" = |r| r.run.outcome;
}

fn interval_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `finish_slice.sql` with its `{params}` replaced by `unnest($1::bigint[], …) AS p(tenant_id,
/// …)` from [`FinishParams::COLUMNS`]. Built once: the text is the prepared statement's key.
static FINISH_SQL: LazyLock<String> = LazyLock::new(|| {
    let arrays: Vec<String> = FinishParams::COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("${}::{ty}[]", i + 1))
        .collect();
    let names: Vec<&str> = FinishParams::COLUMNS.iter().map(|(n, _)| *n).collect();
    let params = format!("unnest({}) AS p({})", arrays.join(", "), names.join(", "));
    include_str!("../queries/finish_slice.sql").replace("{params}", &params)
});

impl ControlPlane {
    /// The end of a slice in one statement and transaction: the progress, conditional on the
    /// fencing token (the watermark only moves forward: callers pass the last acknowledged row
    /// of a slice read after the claimed one); the task's compaction turn when `compact_every`
    /// is given and the turn is due; and the run log entry (`run.outcome`, or `fenced` when the
    /// progress was refused).
    pub async fn finish_slice(
        &self,
        claim: &Claim,
        p: &Progress,
        run: &RunRecord,
        compact_every: Option<Duration>,
    ) -> Result<Finish> {
        let req = FinishRequest {
            claim: claim.clone(),
            progress: p.clone(),
            run: run.clone(),
            compact_every,
        };
        Ok(self.finish_slices(std::slice::from_ref(&req)).await?[0])
    }

    /// [`Self::finish_slice`] for several tasks (each at most once) in one statement and
    /// transaction: one result per request, in order.
    pub async fn finish_slices(&self, reqs: &[FinishRequest]) -> Result<Vec<Finish>> {
        let out = FinishParams::of(reqs)
            .bind(sqlx::query(&FINISH_SQL))
            .fetch_all(self.pool())
            .await?;
        let mut found = std::collections::HashMap::with_capacity(out.len());
        for row in &out {
            let task = task_from_row(row)?;
            let committed: bool = row.try_get("committed")?;
            let finish = Finish {
                commit: if committed {
                    Commit::Committed
                } else {
                    Commit::Fenced
                },
                compact: row.try_get("compact")?,
                first_turn: row.try_get("first_turn")?,
            };
            found.insert(task, finish);
        }
        reqs.iter()
            .map(|r| {
                found.get(&r.claim.task).copied().ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "task {} finished twice in one batch",
                        r.claim.task
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::tasks::{TaskId, Watermark};

    fn squeeze(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn the_statement_numbers_its_parameters_from_the_list() {
        let expected = squeeze(
            "FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::jsonb[],
                $6::timestamptz[], $7::bigint[], $8::float8[], $9::text[], $10::float8[],
                $11::bigint[], $12::float8[], $13::text[], $14::timestamptz[], $15::int[],
                $16::int[], $17::text[])
             AS p(tenant_id, table_id, token, wm_cursor, wm_key, synced_through, rows,
                  next_run_ms, error, rerun_ms, batches, compact_s, worker, started_at,
                  duration_ms, run_rows, outcome)",
        );
        assert!(squeeze(&FINISH_SQL).contains(&expected), "{}", *FINISH_SQL);
        assert!(!FINISH_SQL.contains("{params}"));
        assert!(!FINISH_SQL.contains("$18"));
    }

    #[test]
    fn every_parameter_is_used() {
        for (name, _) in FinishParams::COLUMNS {
            // tenant_id and table_id are also join keys (`USING (tenant_id, table_id)`).
            assert!(
                FINISH_SQL.contains(&format!("p.{name}")),
                "parameter {name} is bound but finish_slice.sql never reads it"
            );
        }
    }

    fn request(tenant_id: i64, watermark: Option<Watermark>, error: Option<&str>) -> FinishRequest {
        let task = TaskId {
            tenant_id,
            table_id: 7,
        };
        FinishRequest {
            claim: Claim {
                task,
                fencing_token: 40 + tenant_id,
                watermark: Watermark::default(),
                synced_through: None,
                schema_hash: None,
                batches_visible_through: 0,
                changed_until: None,
            },
            progress: Progress {
                watermark,
                synced_through: None,
                rows: 10 * tenant_id,
                next_run_in: Duration::from_millis(1500),
                rerun_if_changed_in: (tenant_id == 2).then_some(Duration::from_millis(20)),
                error: error.map(Into::into),
                batches_visible_through: Some(3),
            },
            run: RunRecord {
                task,
                worker: format!("w{tenant_id}"),
                fencing_token: 40 + tenant_id,
                started_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                duration: Duration::from_secs(u64::MAX / 2),
                rows: 10 * tenant_id,
                outcome: "ok",
                error: error.map(Into::into),
            },
            compact_every: (tenant_id == 1).then_some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn each_request_fills_one_element_of_every_array() {
        let wm = Watermark {
            cursor: Some("2024-01-01 00:00:00+00".into()),
            key: vec!["a".into(), "b\"c".into()],
        };
        let p = FinishParams::of(&[request(1, Some(wm), None), request(2, None, Some("boom"))]);
        assert_eq!(p.tenant_id, [1, 2]);
        assert_eq!(p.token, [41, 42]);
        assert_eq!(p.wm_cursor, [Some("2024-01-01 00:00:00+00".into()), None]);
        assert_eq!(p.wm_key, [Some(serde_json::json!(["a", "b\"c"])), None]);
        assert_eq!(p.rows, [10, 20]);
        assert_eq!(p.next_run_ms, [1500.0, 1500.0]);
        assert_eq!(p.rerun_ms, [None, Some(20.0)]);
        assert_eq!(p.error, [None, Some("boom".into())]);
        assert_eq!(p.compact_s, [Some(60.0), None]);
        assert_eq!(p.worker, ["w1", "w2"]);
        // A duration past what the run log's int column holds is saturated, not wrapped.
        assert_eq!(p.duration_ms, [i32::MAX, i32::MAX]);
        assert_eq!(p.outcome, ["ok", "ok"]);
    }
}
