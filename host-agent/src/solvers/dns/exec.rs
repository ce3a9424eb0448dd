//! dns-01 through the operator's own commands (`[dns.<name>.exec]`), so any
//! DNS provider can be scripted: `present` adds the TXT record, `clean_up`
//! removes it. Each runs without a shell, with the record in its
//! environment, killed after the configured timeout; a failure carries the
//! exit status and the end of what it printed, which the certificate's
//! status shows. The propagation check and the journal are the same as for
//! RFC 2136 (`super::zone`, `super::journal`).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::rfc2136::TxtRecord;
use crate::Error;
use crate::config::DnsSolver;

/// What a command prints is kept up to this much (each stream), for the
/// error; a command that prints more is not waited on for the rest.
const OUTPUT_LIMIT: u64 = 16 * 1024;
/// The end of the output an error quotes.
const QUOTED: usize = 1000;

pub struct Exec {
    label: String,
    zone: String,
    ttl: u32,
    present: Vec<String>,
    clean_up: Vec<String>,
    timeout: Duration,
}

impl Exec {
    /// The commands of solver `[dns.<label>]`, when it has `exec`.
    pub fn new(label: &str, config: &DnsSolver) -> Option<Self> {
        let exec = config.exec.as_ref()?;
        Some(Self {
            label: label.to_owned(),
            zone: config.zone.clone(),
            ttl: config.ttl,
            present: exec.present.clone(),
            clean_up: exec.clean_up.clone(),
            timeout: Duration::from_secs(exec.timeout_seconds),
        })
    }

    /// Runs `present` for `record`.
    pub async fn add(&self, record: &TxtRecord) -> Result<(), Error> {
        self.run("present", &self.present, record).await
    }

    /// Runs `clean_up` for `record`.
    pub async fn delete(&self, record: &TxtRecord) -> Result<(), Error> {
        self.run("clean_up", &self.clean_up, record).await
    }

    async fn run(&self, step: &str, argv: &[String], record: &TxtRecord) -> Result<(), Error> {
        let what = format!("dns.{}.exec.{step} for TXT {}", self.label, record.name);
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error::Dns(format!("{what}: no command")))?;
        let mut child = Command::new(program)
            .args(args)
            .env("ACME_DNS_NAME", &record.name)
            .env("ACME_DNS_VALUE", &record.value)
            .env("ACME_DNS_ZONE", &self.zone)
            .env("ACME_DNS_TTL", self.ttl.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Dns(format!("{what}: starting {program}: {e}")))?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let finished = async {
            let (out, err, status) = tokio::join!(read(stdout), read(stderr), child.wait());
            (out, err, status)
        };
        // Dropped on the timeout: `kill_on_drop` ends the command.
        let Ok((out, err, status)) = tokio::time::timeout(self.timeout, finished).await else {
            return Err(Error::Dns(format!(
                "{what}: {program} did not finish within {:?} and was killed",
                self.timeout
            )));
        };
        let status =
            status.map_err(|e| Error::Dns(format!("{what}: waiting for {program}: {e}")))?;
        if status.success() {
            return Ok(());
        }
        Err(Error::Dns(format!(
            "{what}: {program} failed ({status}){}",
            quoted(&out, &err)
        )))
    }
}

/// Up to [`OUTPUT_LIMIT`] of a stream.
async fn read(stream: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Some(stream) = stream {
        let _ = stream.take(OUTPUT_LIMIT).read_to_end(&mut bytes).await;
    }
    bytes
}

/// The end of what the command printed, stderr first, for an error message.
fn quoted(out: &[u8], err: &[u8]) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(err).trim(),
        String::from_utf8_lossy(out).trim()
    );
    let text = text.trim();
    if text.is_empty() {
        return String::from(", printing nothing");
    }
    let start = text.char_indices().rev().nth(QUOTED).map_or(0, |(i, _)| i);
    format!(": {}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A shell script at `dir/name` (the test's own program, run for real).
    fn script(dir: &std::path::Path, name: &str, body: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    fn exec(present: &str, timeout: Duration) -> Exec {
        Exec {
            label: "hook".into(),
            zone: "example.com".into(),
            ttl: 60,
            present: vec![present.to_owned(), "present".into()],
            clean_up: vec!["/bin/true".into()],
            timeout,
        }
    }

    fn record() -> TxtRecord {
        TxtRecord {
            solver: "hook".into(),
            name: "_acme-challenge.www.example.com.".into(),
            value: "61rBZ_4knHblO0MNoxFsXZ_eTFUHum0B6IVRbhvUn5I".into(),
        }
    }

    #[tokio::test]
    async fn the_record_is_in_the_environment_and_the_arguments_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let body = format!(
            "echo \"$1 $ACME_DNS_NAME $ACME_DNS_VALUE $ACME_DNS_ZONE $ACME_DNS_TTL\" > {}",
            seen.display()
        );
        let hook = exec(&script(dir.path(), "hook", &body), Duration::from_secs(10));
        hook.add(&record()).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&seen).unwrap().trim(),
            "present _acme-challenge.www.example.com. 61rBZ_4knHblO0MNoxFsXZ_eTFUHum0B6IVRbhvUn5I example.com 60"
        );
    }

    #[tokio::test]
    async fn a_failure_says_the_status_and_what_the_command_printed() {
        let dir = tempfile::tempdir().unwrap();
        let body = "echo 'provider says: zone not found' >&2\nexit 3";
        let hook = exec(&script(dir.path(), "hook", body), Duration::from_secs(10));
        let error = hook.add(&record()).await.unwrap_err().to_string();
        assert!(error.contains("dns.hook.exec.present"), "{error}");
        assert!(error.contains("exit status: 3"), "{error}");
        assert!(error.contains("provider says: zone not found"), "{error}");
    }

    #[tokio::test]
    async fn a_command_that_hangs_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pid");
        let body = format!("echo $$ > {}\nexec sleep 60", pid.display());
        let hook = exec(
            &script(dir.path(), "hook", &body),
            Duration::from_millis(500),
        );
        let started = std::time::Instant::now();
        let error = hook.add(&record()).await.unwrap_err().to_string();
        assert!(error.contains("was killed"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid = std::fs::read_to_string(&pid).unwrap();
        // Killed: gone, or a zombie until tokio's reaper gets to it.
        let gone = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).map_or(true, |stat| {
                stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'))
            })
        });
        assert!(gone, "the hanging command is still running");
    }
}
