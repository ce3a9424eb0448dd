//! The `status` subcommand, read from the agent's stored state only (the
//! state directory, or its Secrets in Kubernetes mode): it works while the
//! agent runs, and when it does not. At 10,000 certificates a table is not
//! read line by line: a summary line counts every state, and `--state` and
//! `--name` pick the rows (`--json` gives the same as one document).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::Error;
use crate::config::Config;
use crate::ports::store::{StateStore, Status};
use crate::time::{from_unix, rfc3339, unix};

/// One word for where a certificate stands, the worst that applies first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// Past its `not_after`.
    Expired,
    /// Held back by the CA-limit budget.
    Waiting,
    /// Its last attempt failed.
    Failing,
    /// Never issued (and nothing failed yet).
    NotIssued,
    /// An order is due (forced, names changed, renewal time, awaiting install).
    Due,
    /// Issued, served, nothing to do before its renewal.
    Valid,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Expired,
        State::Waiting,
        State::Failing,
        State::NotIssued,
        State::Due,
        State::Valid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Expired => "expired",
            State::Waiting => "waiting",
            State::Failing => "failing",
            State::NotIssued => "not-issued",
            State::Due => "due",
            State::Valid => "valid",
        }
    }

    fn of(status: &Status, now: u64) -> Self {
        match status.not_after {
            Some(t) if t <= now => State::Expired,
            _ if status.waiting_for.is_some() => State::Waiting,
            _ if status.failures > 0 => State::Failing,
            None => State::NotIssued,
            _ if status.due.is_some() || status.awaiting_install => State::Due,
            Some(_) => State::Valid,
        }
    }
}

impl std::str::FromStr for State {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown state {s:?}: one of {}", all.join(", "))
            })
    }
}

/// Which rows to show; the summary always counts every certificate.
#[derive(Debug, Default)]
pub struct Query {
    /// Any of these states; all when empty.
    pub states: Vec<State>,
    /// A shell-style pattern (`*`, `?`, `[...]`) on the certificate's name.
    pub name: Option<glob::Pattern>,
}

impl Query {
    /// `pattern` for `--name`, refused with the option named.
    pub fn name_pattern(pattern: &str) -> Result<glob::Pattern, String> {
        glob::Pattern::new(pattern).map_err(|e| format!("--name {pattern:?}: {e}"))
    }

    fn wants(&self, row: &Row) -> bool {
        (self.states.is_empty() || self.states.contains(&row.state))
            && self
                .name
                .as_ref()
                .is_none_or(|p| p.matches(&row.status.name))
    }
}

struct Row {
    status: Status,
    state: State,
    configured: bool,
}

/// What `status` prints: the rows asked for and the count of every state.
pub struct Report {
    rows: Vec<Row>,
    counts: BTreeMap<State, usize>,
    total: usize,
}

/// Every configured certificate, then any with state but no longer
/// configured; counted, then filtered by `query`.
pub async fn report(
    config: &Config,
    store: &dyn StateStore,
    query: &Query,
) -> Result<Report, Error> {
    let now = unix(SystemTime::now());
    let mut statuses = Vec::with_capacity(config.certificates.len());
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
        statuses.push((status, true));
    }
    let configured: HashSet<&str> = config
        .certificates
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for name in store.status_names().await? {
        if !configured.contains(name.as_str())
            && let Some(status) = store.load_status(&name).await?
        {
            statuses.push((status, false));
        }
    }
    Ok(Report::of(statuses, now, query))
}

impl Report {
    /// Counts every status by its state at `now`, then keeps the rows
    /// `query` asks for (the summary counts them all).
    fn of(statuses: Vec<(Status, bool)>, now: u64, query: &Query) -> Self {
        let mut counts = BTreeMap::new();
        let total = statuses.len();
        let rows = statuses
            .into_iter()
            .map(|(status, configured)| {
                let state = State::of(&status, now);
                *counts.entry(state).or_insert(0) += 1;
                Row {
                    status,
                    state,
                    configured,
                }
            })
            .filter(|row| query.wants(row))
            .collect();
        Report {
            rows,
            counts,
            total,
        }
    }
}

fn when(secs: Option<u64>) -> String {
    secs.and_then(|s| rfc3339(from_unix(s)))
        .unwrap_or_else(|| "-".into())
}

/// Why an order is due, the CA-limit wait, a pending install: joined.
fn due_of(s: &Status) -> Option<String> {
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
    (!due.is_empty()).then(|| due.join("; "))
}

fn cells(row: &Row) -> [String; 8] {
    let s = &row.status;
    let note = if row.configured {
        ""
    } else {
        " (not configured)"
    };
    [
        format!("{}{note}", s.name),
        row.state.as_str().into(),
        s.domains.join(","),
        when(s.not_after),
        when(s.next_renewal),
        when(s.next_attempt),
        due_of(s).unwrap_or_else(|| "-".into()),
        match (&s.last_error, s.failures) {
            (Some(e), 0) => e.clone(),
            (Some(e), n) => format!("{e} ({n} failures)"),
            (None, _) => "-".into(),
        },
    ]
}

const HEADER: [&str; 8] = [
    "NAME",
    "STATE",
    "DOMAINS",
    "NOT AFTER",
    "NEXT RENEWAL",
    "NEXT ATTEMPT",
    "DUE",
    "LAST ERROR",
];

impl Report {
    /// `12 certificates: 10 valid, 1 due, 1 failing` (states with none left
    /// out), and how many rows the filters kept when they left some out.
    pub fn summary(&self) -> String {
        let states: Vec<String> = self
            .counts
            .iter()
            .map(|(state, n)| format!("{n} {}", state.as_str()))
            .collect();
        let mut line = format!("{} certificates: {}", self.total, states.join(", "));
        if self.rows.len() < self.total {
            let _ = write!(line, "; {} shown", self.rows.len());
        }
        line
    }

    /// The rows as aligned columns under a header, then the summary line.
    pub fn table(&self) -> String {
        let cells: Vec<[String; 8]> = self.rows.iter().map(cells).collect();
        let mut widths = HEADER.map(str::len);
        for row in &cells {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(HEADER.map(str::to_owned)).chain(cells) {
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
        out.push_str(&self.summary());
        out.push('\n');
        out
    }

    /// The same as one JSON document: `summary` (total, and the count of
    /// every state, zeros included) and `certificates` (the rows kept).
    pub fn json(&self) -> Value {
        let counts: serde_json::Map<String, Value> = State::ALL
            .iter()
            .map(|s| {
                let n = self.counts.get(s).copied().unwrap_or(0);
                (s.as_str().to_owned(), json!(n))
            })
            .collect();
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let s = &row.status;
                json!({
                    "name": s.name,
                    "state": row.state.as_str(),
                    "configured": row.configured,
                    "domains": s.domains,
                    "not_after": s.not_after.and_then(|t| rfc3339(from_unix(t))),
                    "next_renewal": s.next_renewal.and_then(|t| rfc3339(from_unix(t))),
                    "next_attempt": s.next_attempt.and_then(|t| rfc3339(from_unix(t))),
                    "due": due_of(s),
                    "last_error": s.last_error,
                    "failures": s.failures,
                })
            })
            .collect();
        json!({
            "summary": {"total": self.total, "shown": self.rows.len(), "states": counts},
            "certificates": rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str) -> Status {
        Status {
            name: name.into(),
            domains: vec![format!("{name}.example.com")],
            not_after: Some(2_000),
            ..Status::default()
        }
    }

    #[test]
    fn the_worst_state_that_applies_wins() {
        let now = 1_000;
        let valid = status("a");
        assert_eq!(State::of(&valid, now), State::Valid);
        let due = Status {
            due: Some("forced".into()),
            ..status("b")
        };
        assert_eq!(State::of(&due, now), State::Due);
        let failing = Status {
            failures: 2,
            ..due.clone()
        };
        assert_eq!(State::of(&failing, now), State::Failing);
        let waiting = Status {
            waiting_for: Some("orders".into()),
            ..failing.clone()
        };
        assert_eq!(State::of(&waiting, now), State::Waiting);
        assert_eq!(State::of(&waiting, 2_000), State::Expired);
        let never = Status {
            not_after: None,
            ..status("c")
        };
        assert_eq!(State::of(&never, now), State::NotIssued);
        assert_eq!(
            State::of(
                &Status {
                    failures: 1,
                    ..never
                },
                now
            ),
            State::Failing
        );
    }

    #[test]
    fn states_parse_by_their_names_and_anything_else_is_refused() {
        for state in State::ALL {
            assert_eq!(state.as_str().parse::<State>(), Ok(state));
        }
        let refused = "broken".parse::<State>().unwrap_err();
        assert!(refused.contains("not-issued"), "{refused}");
        assert!(Query::name_pattern("www-[").is_err());
    }

    #[test]
    fn filters_pick_rows_and_the_summary_counts_them_all() {
        let failing = |name| Status {
            failures: 1,
            ..status(name)
        };
        let rows = vec![
            (status("www"), true),
            (failing("api"), true),
            (failing("web-1"), true),
            (status("web-2"), false),
        ];
        let query = Query {
            states: vec![State::Failing],
            name: Some(Query::name_pattern("web-*").unwrap()),
        };
        let report = Report::of(rows, 1_000, &query);
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("NAME"), "{table}");
        assert!(lines[1].starts_with("web-1 "), "{table}");
        assert_eq!(
            lines[2], "4 certificates: 2 failing, 2 valid; 1 shown",
            "{table}"
        );
        let json = report.json();
        assert_eq!(json["summary"]["total"], 4);
        assert_eq!(json["summary"]["shown"], 1);
        assert_eq!(json["summary"]["states"]["failing"], 2);
        assert_eq!(json["summary"]["states"]["expired"], 0);
        assert_eq!(json["certificates"][0]["name"], "web-1");
        assert_eq!(json["certificates"][0]["state"], "failing");
    }
}
