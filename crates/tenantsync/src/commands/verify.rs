//! `tenantsync verify [--repair]` and `tenantsync resync`.

use super::{admin_of, worker};
use crate::cli::{ResyncArgs, VerifyArgs};
use anyhow::{bail, Context, Result};
use std::process::ExitCode;
use tenantsync_admin::cli_actor;

pub(crate) async fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let w = worker().await?;
    let admin = admin_of(&w)?;
    let control = &w.deps().control;
    let tenants = match &args.tenant {
        Some(slug) => vec![control.tenant(slug).await?],
        None => control.tenants().await?,
    };
    let tables: Vec<_> = control
        .tables()
        .await?
        .into_iter()
        .filter(|t| args.table.as_ref().is_none_or(|x| *x == t.source_table))
        .collect();
    if let Some(t) = &args.table {
        if tables.is_empty() {
            bail!("table {t:?} is not registered (see `tenantsync tables list`)");
        }
    }
    let mut results = Vec::new();
    let mut drifted = false;
    for tenant in &tenants {
        for spec in &tables {
            let v = admin
                .verify(&cli_actor(), &w, tenant, spec, args.repair)
                .await
                .with_context(|| format!("verifying {} of {}", spec.source_table, tenant.slug))?;
            drifted |= v.drifted();
            if !args.json {
                print_verification(&v);
            }
            results.push(v);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(if drifted {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_verification(v: &tenantsync_worker::verify::Verification) {
    let state = if v.drifted() { "DRIFT" } else { "ok" };
    let repaired = v
        .repaired_rows
        .map(|n| format!(", repaired: {n} rows sent"))
        .unwrap_or_default();
    println!(
        "{state:5} {} {}: {} rows in Postgres, {} in BigQuery, {} compared (confirmed before {}){repaired}",
        v.tenant,
        v.table,
        v.source_rows,
        v.bigquery_rows,
        v.compared,
        v.checked_before
            .map_or("never".to_string(), |t| t.to_rfc3339()),
    );
    for r in &v.ranges {
        println!(
            "      keys {} .. {}: {} missing, {} stale",
            r.from.join(","),
            r.to.join(","),
            r.missing,
            r.stale
        );
    }
    if !v.extra.is_empty() {
        let shown: Vec<String> = v.extra.iter().take(10).map(|k| k.join(",")).collect();
        println!(
            "      {} key(s) in BigQuery but not in Postgres: {}{}",
            v.extra.len(),
            shown.join(" "),
            if v.extra.len() > 10 { " …" } else { "" }
        );
    }
    if !v.unsyncable.is_empty() {
        let shown: Vec<String> = v.unsyncable.iter().take(10).map(|k| k.join(",")).collect();
        println!(
            "      {} row(s) not synced, their cursor is NULL or infinite (see `dlq list`): {}{}",
            v.unsyncable.len(),
            shown.join(" "),
            if v.unsyncable.len() > 10 { " …" } else { "" }
        );
    }
}

pub(crate) async fn resync(args: ResyncArgs) -> Result<ExitCode> {
    let w = worker().await?;
    let control = &w.deps().control;
    let tenant = control.tenant(&args.tenant).await?;
    let spec = control
        .tables()
        .await?
        .into_iter()
        .find(|t| t.source_table == args.table)
        .with_context(|| format!("table {:?} is not registered", args.table))?;
    let split = |s: &Option<String>| -> Option<Vec<String>> {
        s.as_ref()
            .map(|k| k.split(',').map(|p| p.trim().to_string()).collect())
    };
    let (from, to) = (split(&args.from), split(&args.to));
    let sent = admin_of(&w)?
        .resync(
            &cli_actor(),
            &w,
            &tenant,
            &spec,
            (from.as_deref(), to.as_deref()),
        )
        .await?;
    println!(
        "resent {sent} rows of {} for tenant {}",
        spec.source_table, tenant.slug
    );
    Ok(ExitCode::SUCCESS)
}
