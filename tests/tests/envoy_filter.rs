//! The built filter in a real Envoy 1.40 (V8 runtime) at `--concurrency 2`,
//! syncing from a test server that speaks the agent's protocol.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use acme_tests::envoy::{
    Envoy, bootstrap, bootstrap_filter_on_challenge_route, free_addr, wasm_filter_yaml,
};
use acme_tests::http::{self, Reply, Server};
use acme_tests::sync_server::SyncServer;
use acme_tests::{filter_wasm, key_authorization};

const TOKEN: &str = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";
const HOST: &str = "www.example.com";

/// Polls `f` every 20 ms until it returns true, for at most `timeout`.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// An upstream answering 200 with `body` and the path it was asked for in
/// `x-upstream-path`, so a test sees what reached it.
fn upstream_telling_path(body: Vec<u8>) -> Server {
    Server::start(move |req| {
        let mut reply = Reply::new(200, body.clone());
        reply
            .headers
            .push(("x-upstream-path".into(), req.path.clone()));
        reply
    })
    .unwrap()
}

fn upstream_body() -> Vec<u8> {
    // Every byte value, several times, so any rewriting would show.
    (0..64 * 1024).map(|i| (i * 7 % 256) as u8).collect()
}

fn challenge_path() -> String {
    format!("/.well-known/acme-challenge/{TOKEN}")
}

/// A token published by the agent is served; twenty connections open at
/// once, spread over both workers by the listener's exact balance: a
/// challenge on every one is answered inline.
fn the_token_is_answered_inline_on_every_worker(
    envoy: &Envoy,
    agent: &SyncServer,
    listen: SocketAddr,
) {
    let published = Instant::now();
    agent.publish(&[(TOKEN, HOST)]);
    let path = challenge_path();
    assert!(
        eventually(Duration::from_secs(30), || http::get(listen, &path, HOST)
            .is_ok_and(|r| r.status == 200)),
        "token not served:\n{}",
        envoy.log()
    );
    eprintln!("token served {:?} after publishing", published.elapsed());
    let mut connections: Vec<http::Connection> = (0..20)
        .map(|_| http::Connection::open(listen).unwrap())
        .collect();
    for connection in &mut connections {
        for _ in 0..2 {
            let r = connection.send("GET", &path, HOST, false).unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.text(), key_authorization(TOKEN));
            assert_eq!(r.header("content-type"), Some("text/plain"));
            assert!(
                r.header("x-upstream-path").is_none(),
                "the upstream answered a challenge"
            );
        }
    }
    drop(connections);
    let listener_stat = format!("listener.{listen}.worker_").replace(':', "_");
    for worker in 0..2 {
        let cx = envoy
            .stat(&format!("{listener_stat}{worker}.downstream_cx_total"))
            .unwrap()
            .unwrap_or(0);
        assert!(cx >= 5, "worker {worker} answered on only {cx} connections");
    }
}

/// HEAD, unknown token, wrong host, wrong method, a path escape: answered
/// by the filter; other traffic reaches the real upstream, byte-identical.
fn other_requests_are_refused_or_passed_on_untouched(listen: SocketAddr, body: &[u8]) {
    let path = challenge_path();
    let r = http::request(listen, "HEAD", &path, HOST).unwrap();
    assert_eq!(r.status, 200);
    let r = http::get(listen, "/.well-known/acme-challenge/unknown", HOST).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.header("x-upstream-path").is_none());
    let r = http::get(listen, &path, "evil.example.net").unwrap();
    assert_eq!(r.status, 404);
    let r = http::request(listen, "POST", &path, HOST).unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = http::get(listen, "/.well-known/acme-challenge/..%2F..%2Fetc", HOST).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.header("x-upstream-path").is_none());
    for p in ["/", "/data.bin?x=1", "/.well-known/other"] {
        let r = http::get(listen, p, HOST).unwrap();
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(r.header("x-upstream-path"), Some(p));
        assert!(r.body == body, "{p}: body changed on the way through");
    }
}

/// The filter's metric `name` in Envoy's /stats, which must be there.
fn filter_stat(envoy: &Envoy, name: &str) -> i64 {
    let stats = envoy.admin_text("/stats?filter=acme_filter").unwrap();
    stats
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(": ")?;
            n.ends_with(&format!("acme_filter.{name}"))
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("acme_filter.{name} not in /stats:\n{stats}"))
}

/// Envoy's /stats carries the filter's metrics, with what was answered so
/// far; its Prometheus output drops the `wasmcustom.` prefix and adds no
/// `envoy_`.
fn the_filters_metrics_are_in_envoys_stats(envoy: &Envoy) {
    let stats = envoy.admin_text("/stats?filter=acme_filter").unwrap();
    eprintln!("{stats}");
    let stat = |name: &str| filter_stat(envoy, name);
    assert!(stat("challenges_served") >= 42, "{stats}");
    assert!(stat("challenges_not_found") >= 1);
    assert!(stat("challenges_rejected") >= 3);
    assert!(stat("sync_success") >= 1);
    assert_eq!(stat("tokens_known"), 1);
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("wasmcustom.acme_filter.")),
        "stat names changed:\n{stats}"
    );
    let prometheus = envoy.admin_text("/stats/prometheus").unwrap();
    assert!(
        prometheus
            .lines()
            .any(|l| l.starts_with("acme_filter_challenges_served{")),
        "not in Prometheus output as documented"
    );
}

/// With the long-poll established, a newly published token is served
/// (the time is printed for the record, not asserted); one poller for the
/// whole process (three root contexts at concurrency 2), and it keeps
/// polling.
fn a_new_token_reaches_the_one_held_poll(agent: &SyncServer, listen: SocketAddr) {
    let published = Instant::now();
    agent.publish(&[(TOKEN, HOST), ("fresh-token", HOST)]);
    assert!(eventually(Duration::from_secs(30), || {
        http::get(listen, "/.well-known/acme-challenge/fresh-token", HOST)
            .is_ok_and(|r| r.status == 200)
    }));
    eprintln!(
        "second token served {:?} after publishing",
        published.elapsed()
    );
    let polls = agent.polls();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(agent.polls() > polls, "the filter stopped polling");
    assert_eq!(
        agent.max_concurrent_polls(),
        1,
        "more than one poller in one Envoy"
    );
}

/// The agent goes away: known tokens still answer, failures are counted.
/// It comes back on the same address: the filter resyncs by itself, and
/// the old token is gone with the new snapshot.
fn known_tokens_outlive_the_agent_and_its_return_resyncs(
    envoy: &Envoy,
    mut agent: SyncServer,
    listen: SocketAddr,
) {
    let path = challenge_path();
    let agent_addr = agent.addr();
    agent.stop();
    let failures_before = filter_stat(envoy, "sync_failure");
    envoy
        .wait_stat_at_least(
            "wasmcustom.acme_filter.sync_failure",
            failures_before + 1,
            Duration::from_secs(30),
        )
        .expect("a sync failure counted with the agent down");
    for _ in 0..10 {
        let r = http::get(listen, &path, HOST).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), key_authorization(TOKEN));
    }
    let agent = SyncServer::start(Some(agent_addr)).unwrap();
    agent.publish(&[("second-token", HOST)]);
    assert!(
        eventually(Duration::from_secs(30), || {
            http::get(listen, "/.well-known/acme-challenge/second-token", HOST)
                .is_ok_and(|r| r.status == 200)
        }),
        "no resync after the agent came back:\n{}",
        envoy.log()
    );
    assert_eq!(http::get(listen, &path, HOST).unwrap().status, 404);
}

#[test]
fn filter_in_real_envoy_answers_from_synced_data_on_every_worker() {
    let wasm = filter_wasm().unwrap();
    let agent = SyncServer::start(None).unwrap();
    let body = upstream_body();
    let upstream = upstream_telling_path(body.clone());
    let (listen, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let filter = wasm_filter_yaml(
        &wasm,
        r#"{"agent_cluster":"acme_agent","poll_wait_seconds":2}"#,
    );
    let config = bootstrap(listen, admin, &filter, upstream.addr(), agent.addr());
    let envoy = Envoy::start(&config, admin, 2).unwrap();
    the_token_is_answered_inline_on_every_worker(&envoy, &agent, listen);
    other_requests_are_refused_or_passed_on_untouched(listen, &body);
    the_filters_metrics_are_in_envoys_stats(&envoy);
    a_new_token_reaches_the_one_held_poll(&agent, listen);
    known_tokens_outlive_the_agent_and_its_return_resyncs(&envoy, agent, listen);
}

#[test]
fn bad_filter_configuration_stops_envoy_from_starting() {
    let wasm = filter_wasm().unwrap();
    let (listen, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let filter = wasm_filter_yaml(
        &wasm,
        r#"{"agent_cluster":"acme_agent","poll_wait_secs":2}"#,
    );
    let config = bootstrap(listen, admin, &filter, admin, admin);
    let err = match Envoy::start(&config, admin, 1) {
        Ok(_) => panic!("envoy started with a bad filter configuration"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("poll_wait_secs"),
        "the log names the field:\n{err}"
    );
}

/// The filter disabled in the chain and enabled only on the challenge route
/// (the standalone configuration's shape, so ordinary traffic never enters
/// the VM) behaves exactly like the filter on every request.
#[test]
fn filter_enabled_only_on_the_challenge_route_behaves_the_same() {
    let agent = SyncServer::start(None).unwrap();
    let upstream = upstream_telling_path(b"upstream".to_vec());
    let (listen, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let config = bootstrap_filter_on_challenge_route(
        listen,
        admin,
        &filter_wasm().unwrap(),
        r#"{"agent_cluster":"acme_agent","poll_wait_seconds":2}"#,
        upstream.addr(),
        agent.addr(),
    );
    let envoy = Envoy::start(&config, admin, 2).unwrap();
    agent.publish(&[(TOKEN, HOST)]);
    let path = format!("/.well-known/acme-challenge/{TOKEN}");
    assert!(
        eventually(Duration::from_secs(30), || http::get(listen, &path, HOST)
            .is_ok_and(|r| r.status == 200)),
        "token not served:\n{}",
        envoy.log()
    );
    let r = http::get(listen, &path, HOST).unwrap();
    assert_eq!(r.text(), key_authorization(TOKEN));
    assert!(r.header("x-upstream-path").is_none());
    // Unknown, wrong host, traversal, wrong method: answered by the filter,
    // never forwarded.
    for (method, p, host, status) in [
        (
            "GET",
            "/.well-known/acme-challenge/unknown-token".to_owned(),
            HOST,
            404,
        ),
        ("GET", path.clone(), "other.example.com", 404),
        (
            "GET",
            "/.well-known/acme-challenge/..%2F..%2Fetc".to_owned(),
            HOST,
            404,
        ),
        ("POST", path.clone(), HOST, 405),
    ] {
        let r = http::request(listen, method, &p, host).unwrap();
        assert_eq!(r.status, status, "{method} {p} {host}");
        assert!(
            r.header("x-upstream-path").is_none(),
            "{method} {p} reached the upstream"
        );
    }
    // Everything else goes to the upstream, untouched.
    let r = http::get(listen, "/app/page?x=1", HOST).unwrap();
    assert_eq!(
        (r.status, r.header("x-upstream-path")),
        (200, Some("/app/page?x=1"))
    );
    let served = envoy
        .stat("wasmcustom.acme_filter.challenges_served")
        .unwrap()
        .unwrap_or(0);
    assert!(served >= 2);
}

/// With the filter enabled only on the challenge route, ordinary requests
/// never enter the Wasm VM: a probe module in the filter's place counts the
/// HTTP contexts Envoy creates in it.
#[test]
fn filter_enabled_only_on_the_challenge_route_is_created_for_challenges_only() {
    let dir = tempfile::tempdir().unwrap();
    let probe = acme_tests::probe::http_context_counter(dir.path()).unwrap();
    let agent = SyncServer::start(None).unwrap();
    let upstream = Server::start(|_| Reply::new(200, "upstream")).unwrap();
    let (listen, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let config = bootstrap_filter_on_challenge_route(
        listen,
        admin,
        &probe,
        "",
        upstream.addr(),
        agent.addr(),
    );
    let envoy = Envoy::start(&config, admin, 2).unwrap();
    for _ in 0..20 {
        assert_eq!(http::get(listen, "/app/page", HOST).unwrap().status, 200);
    }
    for i in 0..3 {
        let path = format!("/.well-known/acme-challenge/t{i}");
        assert_eq!(http::get(listen, &path, HOST).unwrap().status, 200);
    }
    let contexts = envoy
        .stat(acme_tests::probe::HTTP_CONTEXTS_STAT)
        .unwrap()
        .unwrap_or(0);
    assert_eq!(
        contexts, 3,
        "HTTP contexts for 20 ordinary requests and 3 challenges"
    );
}
