//! The agent's side of the sync protocol (`docs/challenge-sync.md`): answered
//! directly over HTTP, then long-polled by the real filter in a real Envoy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_agent::api::{self, ApiState};
use acme_agent::challenges::{Challenge, ChallengeSet};
use acme_tests::agent::wait_for;
use acme_tests::envoy::{Envoy, bootstrap, free_addr, wasm_filter_yaml};
use acme_tests::filter_wasm;
use acme_tests::http::{self, Reply, Server};
use tokio::sync::oneshot;

const TOKEN: &str = "agent-api-test-token-0123456789";

/// The agent's challenge API on a loopback port, in its own runtime; stops
/// (gracefully, as on SIGTERM) when dropped.
struct Agent {
    addr: SocketAddr,
    set: Arc<ChallengeSet>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    fn start(token: Option<&str>) -> Self {
        let set = Arc::new(ChallengeSet::new());
        let state = ApiState::new(Arc::clone(&set), token.map(str::to_owned));
        state.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                api::serve(listener, state, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            addr,
            set,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn publish(&self, token: &str, identifier: &str) {
        self.set.publish([Challenge {
            token: token.into(),
            key_authorization: format!("{token}.{}", acme_tests::THUMBPRINT),
            identifier: identifier.into(),
        }]);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn get_with(addr: SocketAddr, path: &str, auth: Option<&str>) -> http::Response {
    use std::io::{BufReader, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let auth = auth
        .map(|a| format!("authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: agent\r\n{auth}connection: close\r\n\r\n"
    )
    .unwrap();
    http::read_response(&mut BufReader::new(stream), false).unwrap()
}

/// A GET proving `token` (the filter's way), and whether the answer is
/// signed with it for this request.
fn signed_get(addr: SocketAddr, path: &str, token: &str) -> (http::Response, bool) {
    use acme_agent::api::auth;
    let nonce = auth::nonce();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let proof = auth::authorization(token, &nonce, now, "GET", path);
    let r = get_with(addr, path, Some(&proof));
    let signed = r
        .header(auth::SIGNATURE_HEADER)
        .is_some_and(|sig| auth::verify_response(token, &nonce, r.status, &r.body, sig));
    (r, signed)
}

/// GET `path` proving the token; the answer must be signed with it.
fn proven_get(agent: &Agent, path: &str) -> http::Response {
    let (r, signed) = signed_get(agent.addr, path, TOKEN);
    assert!(signed, "{path}: the answer ({}) is signed", r.status);
    r
}

/// No proof, a proof with another token, the token itself as a bearer
/// (never accepted: the scheme never sends it), a proof for another path:
/// 401, and nothing of the set.
fn unproven_requests_are_refused(agent: &Agent) {
    for auth in [
        None,
        Some(format!("Bearer {TOKEN}")),
        Some(acme_agent::api::auth::authorization(
            "not-the-token-0123456789",
            &acme_agent::api::auth::nonce(),
            1,
            "GET",
            "/v1/challenges?version=0&wait=1",
        )),
    ] {
        let r = get_with(
            agent.addr,
            "/v1/challenges?version=0&wait=1",
            auth.as_deref(),
        );
        assert_eq!(r.status, 401, "{auth:?}");
        assert!(
            !r.text().contains("key_authorization"),
            "nothing of the set"
        );
    }
    let proof = acme_agent::api::auth::authorization(
        TOKEN,
        &acme_agent::api::auth::nonce(),
        1,
        "GET",
        "/v1/challenges?version=1&wait=1",
    );
    assert_eq!(
        get_with(agent.addr, "/v1/challenges?version=0&wait=1", Some(&proof)).status,
        401
    );
    // Bad query.
    assert_eq!(
        proven_get(agent, "/v1/challenges?version=x&wait=1").status,
        400
    );
    assert_eq!(proven_get(agent, "/v1/challenges").status, 400);
}

/// A different version, or the same version of another instance (a
/// previous agent process, or a made-up number): the snapshot at once, and
/// a caller's version is never followed. Returns (version, instance).
fn another_version_gets_the_snapshot_at_once(agent: &Agent) -> (u64, String) {
    agent.publish("tok1", "www.example.com");
    let r = proven_get(agent, "/v1/challenges?version=0&wait=30");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let body = r.text();
    assert!(body.contains(r#""token":"tok1""#), "{body}");
    let version = agent.set.version();
    assert!(body.contains(&format!(r#""version":{version}"#)), "{body}");
    let instance = agent.set.instance().to_owned();
    assert!(
        body.contains(&format!(r#""instance":"{instance}""#)),
        "{body}"
    );
    let r = proven_get(
        agent,
        &format!("/v1/challenges?version={version}&wait=30&instance=0000000000000000"),
    );
    assert_eq!(r.status, 200);
    let r = proven_get(
        agent,
        &format!("/v1/challenges?version={}&wait=0", 1u64 << 52),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        agent.set.version(),
        version,
        "a caller's version is never followed"
    );
    (version, instance)
}

/// The same version: held for its wait, then 304 with no body; held, a
/// change answers it with the new snapshot (not the 304 its wait ends with).
fn the_same_version_is_held_until_a_change(agent: &Agent, version: u64, instance: &str) {
    let start = Instant::now();
    let r = proven_get(
        agent,
        &format!("/v1/challenges?version={version}&wait=1&instance={instance}"),
    );
    let held = start.elapsed();
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    // A hold that must last: it never ends before its wait (no upper bound).
    assert!(held >= Duration::from_millis(900), "not held: {held:?}");
    let addr = agent.addr;
    let held = std::thread::spawn(move || {
        let start = Instant::now();
        let (r, signed) = signed_get(
            addr,
            &format!("/v1/challenges?version={version}&wait=30"),
            TOKEN,
        );
        assert!(signed);
        (r, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    agent.publish("tok2", "api.example.com");
    let (r, took) = held.join().unwrap();
    // A 200 with the change: the change ended the hold, not its 30 s wait
    // (which answers 304).
    assert_eq!(r.status, 200, "a change did not end the hold ({took:?})");
    assert!(r.text().contains("tok2"));
    println!("a change answered a held poll after {took:?}");
}

#[test]
fn protocol_answers() {
    let agent = Agent::start(Some(TOKEN));
    unproven_requests_are_refused(&agent);
    let (version, instance) = another_version_gets_the_snapshot_at_once(&agent);
    the_same_version_is_held_until_a_change(&agent, version, &instance);
    // Probes and metrics have a listener of their own.
    assert_eq!(get_with(agent.addr, "/healthz", None).status, 404);
    assert_eq!(get_with(agent.addr, "/metrics", None).status, 404);
}

#[test]
fn shutdown_answers_held_polls_at_once() {
    let agent = Agent::start(None);
    let version = agent.set.version();
    let addr = agent.addr;
    // Held for up to 120 s unless the shutdown answers it.
    const WAIT: Duration = Duration::from_secs(120);
    let held = std::thread::spawn(move || {
        let start = Instant::now();
        let r = get_with(
            addr,
            &format!("/v1/challenges?version={version}&wait={}", WAIT.as_secs()),
            None,
        );
        (r.status, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    drop(agent);
    let stopped = stopping.elapsed();
    let (status, took) = held.join().unwrap();
    // 503 is the shutdown's answer: the hold's own end (after WAIT) would
    // be a 304, and a shutdown that waited for it would get that 304.
    assert_eq!(
        status, 503,
        "answered by the end of the hold, not the shutdown ({took:?})"
    );
    println!("shutdown with a held poll: stopped in {stopped:?}, the poll answered after {took:?}");
}

#[test]
fn real_filter_in_real_envoy_syncs_from_the_agent_api() {
    let wasm = filter_wasm().unwrap();
    let agent = Agent::start(Some(TOKEN));
    let upstream = Server::start(|_| Reply::new(200, "upstream")).unwrap();
    let (listen, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let filter = wasm_filter_yaml(
        &wasm,
        &format!(
            r#"{{"agent_cluster":"acme_agent","agent_token":"{TOKEN}","poll_wait_seconds":5}}"#
        ),
    );
    let envoy = Envoy::start(
        &bootstrap(listen, admin, &filter, upstream.addr(), agent.addr),
        admin,
        2,
    )
    .unwrap();
    let path = "/.well-known/acme-challenge/fromAgent";
    let served = |host: &str| http::get(listen, path, host).is_ok_and(|r| r.status == 200);
    // Wait for the first sync, then publish and measure.
    envoy
        .wait_stat_at_least(
            "wasmcustom.acme_filter.sync_success",
            1,
            Duration::from_secs(10),
        )
        .unwrap();
    let published = Instant::now();
    agent.publish("fromAgent", "www.example.com");
    wait_for(
        Duration::from_secs(30),
        "the published token served by Envoy",
        || served("www.example.com").then_some(()),
        || envoy.log(),
    )
    .unwrap();
    eprintln!("agent -> Envoy propagation: {:?}", published.elapsed());
    let r = http::get(listen, path, "www.example.com").unwrap();
    assert_eq!(r.text(), format!("fromAgent.{}", acme_tests::THUMBPRINT));
    assert!(!served("other.example.com"), "host check");
    // Removal reaches Envoy too.
    agent.set.remove(["fromAgent"]);
    let removed = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "the removed token no longer served",
        || (!served("www.example.com")).then_some(()),
        || envoy.log(),
    )
    .unwrap();
    eprintln!("agent -> Envoy removal: {:?}", removed.elapsed());
    assert_eq!(
        envoy.stat("wasmcustom.acme_filter.sync_failure").unwrap(),
        Some(0)
    );
}

#[test]
fn filter_with_a_wrong_token_is_refused_and_counts_failures() {
    let wasm = filter_wasm().unwrap();
    let agent = Agent::start(Some(TOKEN));
    agent.publish("secretToken", "www.example.com");
    let upstream = Server::start(|_| Reply::new(200, "upstream")).unwrap();
    let (listen, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let filter = wasm_filter_yaml(
        &wasm,
        r#"{"agent_cluster":"acme_agent","agent_token":"not-the-right-token-at-all"}"#,
    );
    let envoy = Envoy::start(
        &bootstrap(listen, admin, &filter, upstream.addr(), agent.addr),
        admin,
        1,
    )
    .unwrap();
    envoy
        .wait_stat_at_least(
            "wasmcustom.acme_filter.sync_failure",
            2,
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(envoy.log().contains("status 401"), "{}", envoy.log());
    assert!(
        !envoy.log().contains("not-the-right-token-at-all"),
        "the token is never logged"
    );
    let r = http::get(
        listen,
        "/.well-known/acme-challenge/secretToken",
        "www.example.com",
    )
    .unwrap();
    assert_eq!(r.status, 404);
}
