//! `tenantsync tenant …`: onboard, list, show, pause, resume, limit, rotate keys, remove.

use super::output::print_tasks;
use super::{admin, admin_full, admin_with_key, admin_with_source, print_list};
use crate::cli::{TenantAdd, TenantCmd, TenantRemove};
use crate::config;
use anyhow::{bail, Context, Result};
use secrecy::SecretString;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use tenantsync_admin::{cli_actor, DataChoice};
use tenantsync_worker::onboard::TenantRequest;

pub(crate) async fn run(cmd: TenantCmd) -> Result<ExitCode> {
    match cmd {
        TenantCmd::Add(a) => add(a).await?,
        TenantCmd::RotateCredentials(a) => {
            let json = read_key(&a.credentials_file)?;
            let t = admin_with_key()
                .await?
                .rotate_credentials(&cli_actor(), &a.slug, json)
                .await?;
            println!("tenant {}: new key stored, status {}", t.slug, t.status);
        }
        TenantCmd::Update { slug, location } => {
            let mut admin = admin().await?;
            admin.master_key = config::master_key_if_set()?.map(Arc::new);
            let t = admin.set_location(&cli_actor(), &slug, &location).await?;
            println!(
                "tenant {}: dataset {}.{} is in {}",
                t.slug,
                t.bq_project,
                t.bq_dataset,
                t.bq_location.as_deref().unwrap_or("?")
            );
        }
        TenantCmd::Limits(a) => {
            let t = admin()
                .await?
                .set_limits(
                    &cli_actor(),
                    &a.slug,
                    a.requests_per_second,
                    a.rows_per_second,
                )
                .await?;
            let show = |v: Option<f64>| v.map_or("default".to_string(), |v| v.to_string());
            println!(
                "tenant {}: {} requests/s, {} rows/s",
                t.slug,
                show(t.max_requests_per_s),
                show(t.max_rows_per_s)
            );
        }
        TenantCmd::List(l) => {
            let tenants = admin().await?.tenants().await?;
            print_list(
                &l,
                &tenants,
                &["SLUG", "ORG", "PROJECT", "DATASET", "STATUS", "KEY"],
                |t| {
                    vec![
                        t.slug.clone(),
                        t.organization_id.clone(),
                        t.bq_project.clone(),
                        t.bq_dataset.clone(),
                        t.status.to_string(),
                        key_kind(t, "emulator"),
                    ]
                },
            )?;
        }
        TenantCmd::Show { slug, json } => show(&slug, json).await?,
        TenantCmd::Pause { slug, reason } => {
            let t = admin()
                .await?
                .pause(&cli_actor(), &slug, reason.as_deref())
                .await?;
            println!("tenant {}: {}", t.slug, t.status);
        }
        TenantCmd::Resume { slug } => {
            let t = admin().await?.resume(&cli_actor(), &slug).await?;
            println!("tenant {}: {}; its tasks are due now", t.slug, t.status);
        }
        TenantCmd::Remove(r) => remove(r).await?,
    }
    Ok(ExitCode::SUCCESS)
}

fn read_key(path: &Path) -> Result<SecretString> {
    Ok(SecretString::from(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read credentials file {}", path.display()))?,
    ))
}

async fn add(a: TenantAdd) -> Result<()> {
    let credentials = a.credentials_file.as_deref().map(read_key).transpose()?;
    let mut admin = admin_with_source().await?;
    admin.master_key = Some(Arc::new(config::master_key()?));
    let t = admin
        .add_tenant(
            &cli_actor(),
            TenantRequest {
                slug: a.slug,
                organization_id: a.organization_id,
                project: a.project,
                dataset: a.dataset,
                location: Some(match a.location {
                    Some(l) => l,
                    None => config::default_location()?,
                }),
                credentials,
                impersonate: a.impersonate,
            },
        )
        .await?;
    println!(
        "tenant {} added (organization {}, dataset {}.{} in {}); its backfill starts with the next worker tick",
        t.slug,
        t.organization_id,
        t.bq_project,
        t.bq_dataset,
        t.bq_location.as_deref().unwrap_or("?")
    );
    Ok(())
}

/// How the tenant authenticates, for listings: a sealed key, an impersonated account, or
/// (emulator only) nothing.
fn key_kind(t: &tenantsync_core::Tenant, none: &str) -> String {
    match (&t.impersonate, t.has_credentials) {
        (_, true) => "sealed".into(),
        (Some(email), false) => format!("impersonates {email}"),
        (None, false) => none.into(),
    }
}

async fn show(slug: &str, json: bool) -> Result<()> {
    let d = admin_full().await?.tenant_detail(slug).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    let t = &d.tenant;
    println!(
        "tenant {}  organization {}  dataset {}.{} ({})  status {}  key {}",
        t.slug,
        t.organization_id,
        t.bq_project,
        t.bq_dataset,
        t.bq_location.as_deref().unwrap_or("location not recorded"),
        t.status,
        key_kind(t, "none (emulator)")
    );
    println!();
    print_tasks(false, &d.tables)
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

async fn remove(r: TenantRemove) -> Result<()> {
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
