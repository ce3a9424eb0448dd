//! A wildcard certificate by dns-01 through RFC 2136, side by side on one
//! Pebble resolving through one BIND: ours (config edit -> Envoy serves it)
//! against certbot's `dns-rfc2136` plugin and lego's `rfc2136` provider
//! (command -> files), each for `*.<fresh>.example.com` + `<fresh>.example.com`.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Instant;

use acme_tests::http::free_port;
use acme_tests::named::{Named, Zone};
use acme_tests::pebble::{self, Pebble};
use anyhow::Result;

use super::{Row, certbot_command, lego_command, median, ours, release_agent, spread, timed};

fn certbot(pebble: &Pebble, named: &Named, domains: &[String]) -> Result<f64> {
    let work = tempfile::tempdir()?;
    let ini = work.path().join("rfc2136.ini");
    // HMAC-SHA256 in upper case: other spellings fall back to HMAC-MD5.
    std::fs::write(
        &ini,
        format!(
            "dns_rfc2136_server = {}\ndns_rfc2136_port = 53\ndns_rfc2136_name = {}\ndns_rfc2136_secret = {}\ndns_rfc2136_algorithm = HMAC-SHA256\n",
            named.addr.ip(),
            named.key_name,
            named.key_secret
        ),
    )?;
    std::fs::set_permissions(&ini, std::fs::Permissions::from_mode(0o600))?;
    let started = Instant::now();
    let mut cmd = certbot_command(pebble, work.path());
    cmd.args([
        "--authenticator",
        "dns-rfc2136",
        "--dns-rfc2136-propagation-seconds",
        "0",
    ])
    .arg("--dns-rfc2136-credentials")
    .arg(&ini);
    for d in domains {
        cmd.args(["-d", d]);
    }
    timed(cmd, started, "certbot")
}

fn lego(pebble: &Pebble, named: &Named, domains: &[String]) -> Result<f64> {
    let work = tempfile::tempdir()?;
    let started = Instant::now();
    let mut cmd = lego_command(pebble, work.path());
    cmd.env("RFC2136_NAMESERVER", named.addr.to_string())
        .env("RFC2136_TSIG_KEY", &named.key_name)
        .env("RFC2136_TSIG_SECRET", &named.key_secret)
        .env("RFC2136_TSIG_ALGORITHM", "hmac-sha256.")
        .env("RFC2136_POLLING_INTERVAL", "0")
        .env("RFC2136_SEQUENCE_INTERVAL", "0")
        .args([
            "--dns",
            "rfc2136",
            "--dns.resolvers",
            &named.addr.to_string(),
        ])
        .arg("--dns.disable-cp");
    for d in domains {
        cmd.args(["--domains", d]);
    }
    cmd.arg("run");
    timed(cmd, started, "lego")
}

pub fn run(rows: &mut Vec<Row>, rounds: usize) -> Result<()> {
    let agent_bin = release_agent()?;
    let named = Named::start(
        Ipv4Addr::new(127, 53, 9, 1),
        &[Zone {
            apex: "example.com",
            records: &["@ IN A 127.0.0.1", "* IN A 127.0.0.1"],
        }],
    )?;
    let pebble = Pebble::start(
        free_port()?,
        pebble::Options {
            nonce_reject: Some(0),
            authz_reuse: Some(0),
            dns_server: Some(named.addr),
        },
    )?;
    let solver = named.solver_toml("main", "example.com");
    let mut serial = 0;
    let mut fresh = || {
        serial += 1;
        let base = format!("w{serial}.example.com");
        (format!("w{serial}"), vec![format!("*.{base}"), base])
    };
    let (mut t_ours, mut t_lego, mut t_certbot) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        t_ours.push(ours(&pebble, &agent_bin, &[fresh()], Some(&solver))?.0);
        t_lego.push(lego(&pebble, &named, &fresh().1)?);
        t_certbot.push(certbot(&pebble, &named, &fresh().1)?);
    }
    let leftover = named.challenge_records()?;
    if !leftover.is_empty() {
        eprintln!("[bench] challenge records left in the zone: {leftover:?}");
    }
    let best_peer = median(&mut t_lego.clone()).min(median(&mut t_certbot.clone()));
    let fmt = |v: &[f64]| {
        let (lo, hi) = spread(v);
        format!("{:.2} s ({lo:.2}-{hi:.2})", median(&mut v.to_vec()))
    };
    rows.push(Row {
        what: "Time to a wildcard certificate (`*.x.example.com` + `x.example.com`, both by dns-01, RFC 2136 on BIND 9): ours (config edit -> Envoy serves it) / lego / certbot (command -> files)".into(),
        result: format!("{} / {} / {}", fmt(&t_ours), fmt(&t_lego), fmt(&t_certbot)),
        note: format!(
            "{rounds} rounds; ours / best peer = **{:.2}**; target <= 0.2; peers without propagation waits (certbot `--dns-rfc2136-propagation-seconds 0`, lego `--dns.disable-cp`, 0 s intervals); ours checks every nameserver",
            median(&mut t_ours.clone()) / best_peer
        ),
    });
    Ok(())
}
