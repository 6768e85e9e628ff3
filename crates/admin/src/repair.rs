//! Repair operations: dead letters discarded or sent again, verify-and-repair, resync. They need
//! a worker (the same code path a slice sends through) and write one audit entry each.

use crate::{Admin, AdminError, Result};
use tenantsync_core::{TableSpec, Tenant};
use tenantsync_store::control::dead_letters::DeadLetter;
use tenantsync_worker::verify::Verification;
use tenantsync_worker::Worker;

/// What `retry_dead_letters` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Retried {
    pub retried: usize,
    /// Refused again (still open; the reason is noted on the letter).
    pub refused: usize,
}

impl Admin {
    /// Open dead letters selected by ids, or all of a tenant's. Every named id must be open.
    pub async fn open_dead_letters(
        &self,
        ids: &[i64],
        tenant: Option<&str>,
    ) -> Result<Vec<DeadLetter>> {
        if ids.is_empty() && tenant.is_none() {
            return Err(AdminError::Invalid(
                "name dead-letter ids or a tenant".into(),
            ));
        }
        let open = self.control.dead_letters(tenant, Some("open")).await?;
        let picked: Vec<_> = open
            .into_iter()
            .filter(|d| ids.is_empty() || ids.contains(&d.id))
            .collect();
        if let Some(id) = ids.iter().find(|id| !picked.iter().any(|d| d.id == **id)) {
            return Err(AdminError::NotFound(format!(
                "dead letter {id} does not exist or is not open"
            )));
        }
        Ok(picked)
    }

    /// Close dead letters without sending them.
    pub async fn discard_dead_letters(
        &self,
        actor: &str,
        ids: &[i64],
        tenant: Option<&str>,
    ) -> Result<usize> {
        let picked = self.open_dead_letters(ids, tenant).await?;
        for d in &picked {
            self.control
                .resolve_dead_letter(d.id, "discarded", None)
                .await?;
        }
        let ids: Vec<i64> = picked.iter().map(|d| d.id).collect();
        self.audit(
            actor,
            "dlq.discard",
            tenant,
            serde_json::json!({ "ids": ids }),
        )
        .await?;
        Ok(picked.len())
    }

    /// Send dead letters again through `worker`. A letter refused again stays open with the
    /// new reason noted.
    pub async fn retry_dead_letters(
        &self,
        actor: &str,
        worker: &Worker,
        ids: &[i64],
        tenant: Option<&str>,
    ) -> Result<Retried> {
        let mut r = Retried::default();
        for d in &self.open_dead_letters(ids, tenant).await? {
            match worker.resend_dead_letter(d).await {
                Ok(()) => {
                    self.control
                        .resolve_dead_letter(d.id, "retried", None)
                        .await?;
                    r.retried += 1;
                }
                Err(e) => {
                    self.control
                        .note_dead_letter(d.id, &format!("retry failed: {e}"))
                        .await?;
                    r.refused += 1;
                }
            }
        }
        self.audit(
            actor,
            "dlq.retry",
            tenant,
            serde_json::json!({"retried": r.retried, "refused": r.refused}),
        )
        .await?;
        Ok(r)
    }

    /// Compare a tenant's table with its dataset; with `repair`, send what differs (audited).
    pub async fn verify(
        &self,
        actor: &str,
        worker: &Worker,
        tenant: &Tenant,
        spec: &TableSpec,
        repair: bool,
    ) -> Result<Verification> {
        let v = worker.verify(tenant, spec, repair).await?;
        if let Some(n) = v.repaired_rows.filter(|_| repair) {
            self.audit(
                actor,
                "verify.repair",
                Some(&tenant.slug),
                serde_json::json!({"table": spec.source_table, "rows_sent": n}),
            )
            .await?;
        }
        Ok(v)
    }

    /// Send a key range of a tenant's table again. Returns the rows sent.
    pub async fn resync(
        &self,
        actor: &str,
        worker: &Worker,
        tenant: &Tenant,
        spec: &TableSpec,
        (from, to): (Option<&[String]>, Option<&[String]>),
    ) -> Result<usize> {
        let sent = worker.resync(tenant, spec, from, to).await?;
        self.audit(
            actor,
            "resync",
            Some(&tenant.slug),
            serde_json::json!({"table": spec.source_table, "from": from, "to": to,
                               "rows_sent": sent}),
        )
        .await?;
        Ok(sent)
    }
}
