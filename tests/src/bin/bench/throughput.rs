//! Issuance throughput on Pebble (issue 21): certificates per second from
//! config to served for the agent, and for certbot and lego issuing the same
//! names one process per certificate, each tool at the same concurrency (16
//! at once) on a fresh Pebble of its own (`PEBBLE_VA_NOSLEEP`, no nonce
//! rejection, no authorization reuse), so no tool meets Pebble's lock bug
//! (past ~8,500 certificates in one Pebble) or another tool's leftovers.
//!
//! The peers cannot all bind Pebble's HTTP-01 port at once, so they run in
//! webroot mode (each writes its token file into one directory) behind one
//! static file server on that port, the way a webroot setup runs beside a
//! web server; each process has its own config, work and log directories
//! (so certbot's locks do not serialize them) and registers its own account.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use acme_tests::pebble::Pebble;
use anyhow::{Context as _, Result, bail};

use super::{Row, certbot_command, lego_command};

/// Orders or peer processes at once, for every tool.
const CONCURRENCY: usize = 16;

/// The names every tool issues: one certificate each, one name each (the
/// agent's run names them the same way).
fn domain(i: usize) -> String {
    format!("c{i}.bulk.example.com")
}

/// A static file server for `webroot` on Pebble's HTTP-01 port.
struct Webroot {
    dir: tempfile::TempDir,
    server: Child,
}

impl Webroot {
    fn start(pebble: &Pebble) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let server = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(pebble.http_port.to_string())
            .arg("--directory")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting python3 -m http.server")?;
        let addr = format!("127.0.0.1:{}", pebble.http_port);
        for _ in 0..100 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return Ok(Self { dir, server });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        bail!("the webroot server did not listen on {addr}");
    }
}

impl Drop for Webroot {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// `count` peer processes, [`CONCURRENCY`] at once, each made by `command`
/// for certificate `i` with its own directory; the wall time in seconds.
fn peers(count: usize, command: impl Fn(usize, &Path) -> Command + Sync) -> Result<f64> {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= count {
                            return Ok(());
                        }
                        let work = tempfile::tempdir()?;
                        let out = command(i, work.path()).output()?;
                        if !out.status.success() {
                            bail!(
                                "certificate {i} failed: {}{}",
                                String::from_utf8_lossy(&out.stdout),
                                String::from_utf8_lossy(&out.stderr)
                            );
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a peer thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(started.elapsed().as_secs_f64())
}

fn certbot(count: usize) -> Result<f64> {
    let pebble = super::fresh_pebble()?;
    let webroot = Webroot::start(&pebble)?;
    peers(count, |i, work| {
        let mut cmd = certbot_command(&pebble, work);
        cmd.arg("--webroot")
            .arg("-w")
            .arg(webroot.dir.path())
            .args(["-d", &domain(i)]);
        cmd
    })
}

fn lego(count: usize) -> Result<f64> {
    let pebble = super::fresh_pebble()?;
    let webroot = Webroot::start(&pebble)?;
    peers(count, |i, work| {
        let mut cmd = lego_command(&pebble, work);
        cmd.arg("--http")
            .arg("--http.webroot")
            .arg(webroot.dir.path())
            .args(["--domains", &domain(i), "run"]);
        cmd
    })
}

/// The agent issuing `ours` names (config edit -> all served by the
/// on-demand listener) and the peers `peers` names each.
pub fn run(rows: &mut Vec<Row>, agent_bin: &Path, ours: usize, peers: usize) -> Result<()> {
    eprintln!("[bench] throughput: the agent, {ours} certificates");
    let (t_ours, agent_peak, _) =
        super::sds::many_on_demand_at(&super::fresh_pebble()?, agent_bin, ours, CONCURRENCY)?;
    eprintln!("[bench] throughput: certbot, {peers} certificates");
    let t_certbot = certbot(peers)?;
    eprintln!("[bench] throughput: lego, {peers} certificates");
    let t_lego = lego(peers)?;
    let (r_ours, r_certbot, r_lego) = (
        ours as f64 / t_ours,
        peers as f64 / t_certbot,
        peers as f64 / t_lego,
    );
    rows.push(Row {
        what: format!(
            "Issuance throughput, {CONCURRENCY} at once, one name per certificate: ours ({ours}, config -> all served) / certbot ({peers}) / lego ({peers}) (command -> files)"
        ),
        result: format!(
            "{r_ours:.1} / {r_certbot:.2} / {r_lego:.2} certificates/s; ours / certbot = **{:.1}**, ours / lego = **{:.1}**",
            r_ours / r_certbot,
            r_ours / r_lego
        ),
        note: format!(
            "{t_ours:.1} s / {t_certbot:.1} s / {t_lego:.1} s; one run each, a fresh Pebble per tool (VA_NOSLEEP); ours order_concurrency {CONCURRENCY}, served by the on-demand listener (agent peak RSS {:.0} MB); peers one process per certificate, {CONCURRENCY} at once, webroot mode behind one static server, own config dirs and accounts",
            agent_peak as f64 / 1024.0
        ),
    });
    Ok(())
}
