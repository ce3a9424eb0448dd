//! The `status` subcommand's table, read from the agent's stored state only
//! (the state directory, or its Secrets in Kubernetes mode): it works while
//! the agent runs, and when it does not.

use std::fmt::Write as _;

use crate::Error;
use crate::config::Config;
use crate::ports::store::{StateStore, Status};
use crate::time::{from_unix, rfc3339};

fn when(secs: Option<u64>) -> String {
    secs.and_then(|s| rfc3339(from_unix(s)))
        .unwrap_or_else(|| "-".into())
}

/// One row per configured certificate, then any certificate with state but no
/// longer configured.
pub async fn table(config: &Config, store: &dyn StateStore) -> Result<String, Error> {
    let mut rows: Vec<(Status, &str)> = Vec::new();
    for cert in &config.certificates {
        let status = store
            .load_status(&cert.name)
            .await?
            .unwrap_or_else(|| Status {
                name: cert.name.clone(),
                domains: cert.domains.clone(),
                last_error: Some("never attempted".into()),
                ..Status::default()
            });
        rows.push((status, ""));
    }
    for name in store.status_names().await? {
        if !config.certificates.iter().any(|c| c.name == name)
            && let Some(status) = store.load_status(&name).await?
        {
            rows.push((status, " (not configured)"));
        }
    }
    let cells: Vec<[String; 7]> = rows
        .into_iter()
        .map(|(s, note)| {
            let mut due = Vec::new();
            if let Some(reason) = &s.due {
                due.push(reason.clone());
            }
            if let Some(limit) = &s.waiting_for {
                due.push(format!("waiting for the CA limit {limit}"));
            }
            if s.awaiting_install {
                due.push("issued, waiting to be stored or installed".into());
            }
            [
                format!("{}{note}", s.name),
                s.domains.join(","),
                when(s.not_after),
                when(s.next_renewal),
                when(s.next_attempt),
                if due.is_empty() {
                    "-".into()
                } else {
                    due.join("; ")
                },
                match (&s.last_error, s.failures) {
                    (Some(e), 0) => e.clone(),
                    (Some(e), n) => format!("{e} ({n} failures)"),
                    (None, _) => "-".into(),
                },
            ]
        })
        .collect();
    let header = [
        "NAME",
        "DOMAINS",
        "NOT AFTER",
        "NEXT RENEWAL",
        "NEXT ATTEMPT",
        "DUE",
        "LAST ERROR",
    ];
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header.map(str::to_owned)).chain(cells) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}
