//! How commands print: aligned tables for people, JSON for scripts.

use crate::cli::ListArgs;
use anyhow::Result;
use tenantsync_admin::progress::TaskStatus;

/// Print rows as JSON or as an aligned table.
pub(crate) fn print_list<T: serde::Serialize>(
    l: &ListArgs,
    items: &[T],
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    if l.json {
        println!("{}", serde_json::to_string_pretty(items)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items.iter().map(cells).collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        println!("{}", line(r));
    }
    Ok(())
}

/// A duration for people: `42s`, `3m05s`, `2h10m`.
pub(crate) fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// At most `n` characters of an optional message (a last error in a table cell).
pub(crate) fn clip(s: Option<&str>, n: usize) -> String {
    s.unwrap_or_default().chars().take(n).collect()
}

/// A table's write method: its own, or the deployment's default (as this process reads
/// `TENANTSYNC_WRITE_API`, which the workers should share).
fn write_api(own: Option<&str>) -> String {
    match own {
        Some(w) => w.to_string(),
        None => format!(
            "{} (default)",
            std::env::var("TENANTSYNC_WRITE_API").unwrap_or_else(|_| "insert-all".into())
        ),
    }
}

/// Per tenant and table: state, watermark, lag, progress and ETA, last error.
pub(crate) fn print_tasks(json: bool, rows: &[TaskStatus]) -> Result<()> {
    print_list(
        &ListArgs { json },
        rows,
        &[
            "TENANT",
            "STATUS",
            "TABLE",
            "WRITE API",
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
                write_api(r.write_api.as_deref()),
                if t.enabled { "yes" } else { "no" }.into(),
                r.rows_synced.to_string(),
                r.watermark.clone().unwrap_or_else(|| "-".into()),
                r.lag_seconds
                    .map_or("never synced".into(), |l| format!("{l:.1}s")),
                progress,
                eta,
                clip(r.last_error.as_deref(), 80),
            ]
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(hms(0.4), "0s");
        assert_eq!(hms(59.0), "59s");
        assert_eq!(hms(185.0), "3m05s");
        assert_eq!(hms(7800.0), "2h10m");
    }

    #[test]
    fn clip_counts_characters_not_bytes() {
        assert_eq!(clip(Some("ééé"), 2), "éé");
        assert_eq!(clip(None, 5), "");
    }
}
