//! Chaos: 50 cycles of issue, forced renewal and config change, the agent
//! SIGKILLed at a random moment in each (mid-order, mid-write, mid-restore,
//! whatever the dice say), against the real Pebble with the real filter in a
//! real Envoy. After every cycle: the state loads, no file under its real name
//! is half-written, the account is the one registered first, the CA-limit
//! budget was never exceeded and counted every order Pebble saw, and every
//! certificate ends up served for its configured names (or visibly waits for
//! the budget).

use std::path::Path;
use std::time::{Duration, SystemTime};

use acme_tests::agent::wait_for;
use acme_tests::pebble;
use acme_tests::world::World;

const CYCLES: usize = 50;
const WWW: &[&str] = &["www.example.com", "example.com"];
const API: &[&str] = &["api.example.com"];
const API_MORE: &[&str] = &["api.example.com", "api2.example.com"];

/// A small deterministic generator: the seed is printed (again when the
/// test fails), and `CHAOS_SEED=<seed>` replays a run.
struct Dice(u64);

/// The seed from `CHAOS_SEED`, else from the clock.
fn seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("CHAOS_SEED={text:?}: {e}")),
        Err(_) => {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        }
    }
}

/// Prints how to replay the run if the test fails (panics) while it lives.
struct ReplayHint(u64);

impl Drop for ReplayHint {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "chaos failed with seed {0}: replay with CHAOS_SEED={0} cargo test -p acme-tests --test agent_chaos",
                self.0
            );
        }
    }
}

impl Dice {
    fn roll(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".tmp-") || name.starts_with(".probe-"))
}

/// Every file under its real name is whole: JSON parses, PEM has its end.
/// Returns the temporaries found (a killed write leaves those, never a torn
/// real file).
fn assert_files_whole(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut temporaries = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return temporaries;
    };
    for entry in entries.map(Result::unwrap) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            temporaries.extend(assert_files_whole(&path));
            continue;
        }
        if is_temporary(&name) {
            temporaries.push(path);
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        if name.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .unwrap_or_else(|e| panic!("{} is not whole: {e}", path.display()));
        } else if name.ends_with(".crt") || name.ends_with(".key") {
            let text = String::from_utf8(bytes).unwrap();
            assert!(
                text.trim_end().ends_with("-----"),
                "{} is not whole",
                path.display()
            );
        }
    }
    temporaries
}

fn json_file(dir: &Path, prefix: &str) -> Option<serde_json::Value> {
    let path = std::fs::read_dir(dir)
        .ok()?
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".json"))
        })?;
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The CA-limit ledger the agent kept in `dir`: its snapshot with its
/// journal replayed, read by the agent's own code.
fn ledger(dir: &Path) -> Option<serde_json::Value> {
    let snapshot = std::fs::read_dir(dir)
        .ok()?
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ledger-") && n.ends_with(".json"))
        })?;
    let journal = std::fs::read(snapshot.with_extension("journal")).unwrap_or_default();
    let snapshot = std::fs::read(&snapshot).ok()?;
    let (ledger, _) = acme_agent::domain::budget::Ledger::load(Some(&snapshot), &journal).ok()?;
    serde_json::to_value(&ledger).ok()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The budget, from the ledger the agent keeps: no set of names got more
/// than 5 certificates in a week, no more than 300 orders in 3 hours, and
/// Pebble saw no order the ledger did not count.
fn assert_budget_kept(world: &World) {
    let Some(ledger) = ledger(&world.state_dir()) else {
        return;
    };
    let week_ago = now() - 7 * 86_400;
    for (names, times) in ledger["certificates"].as_object().unwrap() {
        let in_week = times
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t.as_u64().unwrap() > week_ago)
            .count();
        assert!(in_week <= 5, "{in_week} certificates for {names} in a week");
    }
    let orders = ledger["orders"].as_array().unwrap().len();
    assert!(orders <= 300);
    let pebble_orders = world
        .pebble
        .log()
        .lines()
        .filter_map(|l| {
            l.split("There are now ")
                .nth(1)?
                .strip_suffix(" orders in the db")?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    assert!(
        pebble_orders <= orders,
        "Pebble has {pebble_orders} orders, the ledger counted {orders}"
    );
}

/// Whether node 0 serves a chain from the CA for every one of `domains`.
fn served_for(world: &World, domains: &[String]) -> bool {
    let Ok(root) = world.pebble.issuing_root() else {
        return false;
    };
    let https = world.nodes[0].https;
    domains.iter().all(|d| {
        acme_tests::envoy::served_chain(https, d)
            .is_ok_and(|c| pebble::verify_chain(&c, &root, d).is_ok())
    })
}

/// Every certificate is served for its configured names, or waits visibly
/// for the CA-limit budget, and then what it served before is still served.
/// `served` holds, per certificate, the names it was last seen served for;
/// updated.
fn wait_converged(world: &World, served: &mut std::collections::BTreeMap<String, Vec<String>>) {
    for (name, domains) in world.certificates.clone() {
        let before = served.get(&name).cloned();
        let now = wait_for(
            Duration::from_secs(120),
            &format!("{name} served for {domains:?}, or waiting for the budget and still served for what it was"),
            || {
                if served_for(world, &domains) {
                    return Some(domains.clone());
                }
                let waiting = world.status_line(&name).contains("waiting for the CA limit");
                match &before {
                    Some(before) if waiting && served_for(world, before) => Some(before.clone()),
                    None if waiting => Some(Vec::new()),
                    _ => None,
                }
            },
            || world.context(),
        )
        .unwrap();
        if !now.is_empty() {
            served.insert(name, now);
        }
    }
}

#[test]
fn fifty_cycles_of_orders_renewals_and_config_changes_killed_at_random_moments() {
    let seed = seed();
    println!("chaos seed {seed} (replay: CHAOS_SEED={seed})");
    let _hint = ReplayHint(seed);
    let mut dice = Dice(seed);
    let mut served = std::collections::BTreeMap::new();
    let mut world = World::new(pebble::Options::default());
    world.retry = (1, 2);
    world
        .certificates(&[("www", WWW), ("api", API)])
        .write_config();
    world.start_agent();
    world.add_envoy(&["www", "api"], 1);
    wait_converged(&world, &mut served);
    let state_dir = world.state_dir();
    let account =
        move || json_file(&state_dir, "account-").expect("an account")["credentials"]["id"].clone();
    let first_account = account();
    assert!(first_account.is_string());

    let mut api_more = false;
    let mut actions = [0usize; 3];
    for cycle in 0..CYCLES {
        let action = dice.roll(3) as usize;
        actions[action] += 1;
        match action {
            0 => {
                let _ = world.cli(&["renew", "www"]);
            }
            1 => {
                api_more = !api_more;
                let api = if api_more { API_MORE } else { API };
                world
                    .certificates(&[("www", WWW), ("api", api)])
                    .write_config();
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(dice.roll(1500)));
        world.agent.as_mut().unwrap().kill();

        // What the kill left: whole files under real names, the budget kept.
        let mut left = assert_files_whole(&world.state_dir());
        left.extend(assert_files_whole(&world.sds_dir()));
        assert_budget_kept(&world);

        world.start_agent();
        wait_converged(&world, &mut served);
        assert_eq!(account(), first_account, "cycle {cycle}: a second account");
        let kept: Vec<_> = left.iter().filter(|p| p.exists()).collect();
        assert!(kept.is_empty(), "cycle {cycle}: a start left {kept:?}");
    }
    assert_budget_kept(&world);
    println!(
        "{CYCLES} cycles: {} renewals, {} config changes, {} idle",
        actions[0], actions[1], actions[2]
    );
}
