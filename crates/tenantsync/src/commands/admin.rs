//! Admin subcommands: they call `tenantsync-admin`, which writes every action to the audit log.

use super::{control, leases, print_list, source};
use crate::cli::{AuditArgs, KeysCmd, ListArgs, StatusArgs, TableSwitch, TenantRemove, TokensCmd};
use crate::config;
use anyhow::{bail, Context, Result};
use secrecy::ExposeSecret;
use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use tenantsync_admin::progress::TaskStatus;
use tenantsync_admin::{cli_actor, Admin, DataChoice};

/// The admin operations on the control plane only (no source, Redis or key needed).
async fn admin() -> Result<Admin> {
    Ok(Admin::new(control().await?, config::endpoint()?))
}

/// With the master key (credential operations).
async fn admin_with_key() -> Result<Admin> {
    let mut a = admin().await?;
    a.master_key = Some(Arc::new(config::master_key()?));
    Ok(a)
}

/// With the source too (progress), and Redis when configured.
async fn admin_full() -> Result<Admin> {
    let mut a = admin().await?;
    a.source = Some(source().await?);
    if config::redis_url().is_ok() {
        a.leases = Some(leases().await?);
    }
    // Optional here (status and show do not need it), but a key that is set must be usable:
    // ignoring a malformed one would only defer the error to the first operation needing it.
    a.master_key = config::master_key_if_set()?.map(Arc::new);
    Ok(a)
}

fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub(crate) fn print_tasks(json: bool, rows: &[TaskStatus]) -> Result<()> {
    print_list(
        &ListArgs { json },
        rows,
        &[
            "TENANT",
            "STATUS",
            "TABLE",
            "ON",
            "ROWS",
            "WATERMARK",
            "LAG",
            "PROGRESS",
            "ETA",
            "LAST ERROR",
        ],
        |t| {
            let r = &t.row;
            let (progress, eta) = match &t.progress {
                None => ("-".to_string(), "-".to_string()),
                Some(p) => (
                    format!(
                        "{}{:.1}% ({}/{})",
                        if p.estimated { "≥" } else { "" },
                        p.percent,
                        p.source_rows - p.remaining_rows,
                        p.source_rows
                    ),
                    p.eta_seconds.map_or("?".into(), hms),
                ),
            };
            vec![
                r.tenant.clone(),
                r.tenant_status.clone(),
                r.table.clone(),
                if t.enabled { "yes" } else { "no" }.into(),
                r.rows_synced.to_string(),
                r.watermark.clone().unwrap_or_else(|| "-".into()),
                r.lag_seconds
                    .map_or("never synced".into(), |l| format!("{l:.1}s")),
                progress,
                eta,
                r.last_error
                    .clone()
                    .unwrap_or_default()
                    .chars()
                    .take(80)
                    .collect(),
            ]
        },
    )
}

/// Per tenant and table: state, watermark, lag, progress and ETA, last error.
pub(crate) async fn status_rows(args: &StatusArgs) -> Result<Vec<TaskStatus>> {
    Ok(admin_full().await?.status(args.tenant.as_deref()).await?)
}

pub(crate) async fn show(slug: &str, json: bool) -> Result<()> {
    let d = admin_full().await?.tenant_detail(slug).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    let t = &d.tenant;
    println!(
        "tenant {}  organization {}  dataset {}.{}  status {}  key {}",
        t.slug,
        t.organization_id,
        t.bq_project,
        t.bq_dataset,
        t.status,
        if t.has_credentials {
            "sealed"
        } else {
            "none (emulator)"
        }
    );
    println!();
    print_tasks(false, &d.tables)
}

pub(crate) async fn pause(slug: &str, reason: Option<&str>) -> Result<()> {
    let t = admin().await?.pause(&cli_actor(), slug, reason).await?;
    println!("tenant {}: {}", t.slug, t.status);
    Ok(())
}

pub(crate) async fn resume(slug: &str) -> Result<()> {
    let t = admin().await?.resume(&cli_actor(), slug).await?;
    println!("tenant {}: {}; its tasks are due now", t.slug, t.status);
    Ok(())
}

/// Keep or drop: from the flags, else from a prompt on a terminal, else an error. Never a
/// silent default.
fn data_choice(r: &TenantRemove, dataset: &str) -> Result<DataChoice> {
    match (r.keep_data, r.drop_data) {
        (true, _) => return Ok(DataChoice::Keep),
        (_, true) => return Ok(DataChoice::Drop),
        _ => {}
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "tenant remove needs --keep-data or --drop-data when not run on a terminal: \
             say whether BigQuery dataset {dataset} is kept or deleted"
        );
    }
    let mut stdin = std::io::stdin().lock();
    loop {
        eprint!(
            "Remove tenant {}. Its BigQuery dataset {dataset}: [k]eep it, [d]rop it (delete \
             every table in it), or [c]ancel? ",
            r.slug
        );
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 {
            bail!("no answer; nothing removed");
        }
        match line.trim().to_ascii_lowercase().as_str() {
            "k" | "keep" => return Ok(DataChoice::Keep),
            "d" | "drop" => {
                eprint!(
                    "Type the tenant's slug ({}) to confirm dropping {dataset}: ",
                    r.slug
                );
                std::io::stderr().flush()?;
                let mut confirm = String::new();
                stdin.read_line(&mut confirm)?;
                if confirm.trim() == r.slug {
                    return Ok(DataChoice::Drop);
                }
                bail!("slug not confirmed; nothing removed");
            }
            "c" | "cancel" | "" => bail!("cancelled; nothing removed"),
            _ => eprintln!("answer keep, drop or cancel"),
        }
    }
}

pub(crate) async fn remove(r: TenantRemove) -> Result<()> {
    let a = admin_full().await?;
    let t = a.control.tenant(&r.slug).await?;
    let dataset = format!("{}.{}", t.bq_project, t.bq_dataset);
    let choice = data_choice(&r, &dataset)?;
    a.remove(&cli_actor(), &r.slug, choice).await?;
    match choice {
        DataChoice::Keep => println!("tenant {} removed; dataset {dataset} kept", r.slug),
        DataChoice::Drop => println!("tenant {} removed; dataset {dataset} dropped", r.slug),
    }
    Ok(())
}

pub(crate) async fn set_table(s: TableSwitch, enabled: bool) -> Result<()> {
    let changed = admin()
        .await?
        .set_table_enabled(&cli_actor(), &s.tenant, &s.table, enabled)
        .await?;
    println!(
        "table {} for tenant {}: {}{}",
        s.table,
        s.tenant,
        if enabled { "enabled" } else { "disabled" },
        if changed { "" } else { " (already)" }
    );
    Ok(())
}

pub(crate) async fn keys(cmd: KeysCmd) -> Result<ExitCode> {
    match cmd {
        KeysCmd::Rotate => {
            let a = admin_with_key().await?;
            let r = a.rotate_master_key(&cli_actor()).await?;
            println!(
                "credentials now under master key {}: {} re-sealed, {} already current, {} failed",
                r.key_id,
                r.resealed,
                r.already_current,
                r.failed.len()
            );
            for (tenant_id, e) in &r.failed {
                eprintln!("tenant id {tenant_id}: {e}");
            }
            if !r.failed.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        KeysCmd::Status(l) => {
            let rows = control().await?.credentials_by_key_id().await?;
            let current = config::master_key().ok();
            let view: Vec<serde_json::Value> = rows
                .iter()
                .map(|(id, n)| {
                    serde_json::json!({
                        "key_id": id,
                        "credentials": n,
                        "configured": current.as_ref().map(|k| k.can_open(id)),
                        "current": current.as_ref().map(|k| k.id() == id),
                    })
                })
                .collect();
            print_list(
                &l,
                &view,
                &["KEY ID", "CREDENTIALS", "CURRENT", "CONFIGURED"],
                |v| {
                    vec![
                        v["key_id"].as_str().unwrap_or_default().to_string(),
                        v["credentials"].to_string(),
                        v["current"].to_string(),
                        v["configured"].to_string(),
                    ]
                },
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn tokens(cmd: TokensCmd) -> Result<()> {
    let a = admin().await?;
    match cmd {
        TokensCmd::Create { name } => {
            let token = a.create_token(&cli_actor(), &name).await?;
            eprintln!("token {name} created; it is shown only this once:");
            // The one place a token is printed: to the operator who asked for it, on stdout.
            println!("{}", token.expose_secret());
        }
        TokensCmd::List(l) => {
            let rows = a.tokens().await?;
            print_list(
                &l,
                &rows,
                &["NAME", "CREATED", "LAST USED", "REVOKED"],
                |t| {
                    let ts = |v: Option<chrono::DateTime<chrono::Utc>>| {
                        v.map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    };
                    vec![
                        t.name.clone(),
                        ts(Some(t.created_at)),
                        ts(t.last_used_at),
                        ts(t.revoked_at),
                    ]
                },
            )?;
        }
        TokensCmd::Revoke { name } => {
            a.revoke_token(&cli_actor(), &name).await?;
            println!("token {name} revoked");
        }
    }
    Ok(())
}

pub(crate) async fn audit(args: AuditArgs) -> Result<()> {
    let rows = control()
        .await?
        .audit_log(i64::from(args.limit.clamp(1, 10_000)))
        .await?;
    print_list(
        &ListArgs { json: args.json },
        &rows,
        &["AT", "ACTOR", "ACTION", "TARGET", "DETAILS"],
        |e| {
            vec![
                e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                e.actor.clone(),
                e.action.clone(),
                e.target.clone().unwrap_or_default(),
                e.details.to_string(),
            ]
        },
    )
}

/// Serve the admin API until SIGINT/SIGTERM.
pub(crate) async fn serve_api() -> Result<ExitCode> {
    // Required, as for the other long-running roles: the API rotates credentials and master
    // keys, and a server that starts without a usable key fails only at the first such call.
    let key = Arc::new(config::master_key()?);
    let mut a = admin_full().await?;
    a.master_key = Some(key);
    let a = Arc::new(a);
    let shutdown = super::shutdown_on_signal();
    let (_, handle) = tenantsync_admin::api::serve(a, config::admin_addr()?, shutdown)
        .await
        .context("cannot listen on TENANTSYNC_ADMIN_ADDR")?;
    handle.await.context("admin api panicked")??;
    Ok(ExitCode::SUCCESS)
}
