//! The agent's API under abuse, with the real agent binary: slow clients
//! dribbling endless headers, clients that send half a request and wait,
//! more long-polls than allowed, a thousand idle connections from the
//! filter's own address. Every one is bounded (connections served at once
//! and per peer, header size and time, held long-polls), the agent's memory
//! stays small while it happens, and a filter that proves the token always
//! finds a slot.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use acme_tests::agent::{Agent, write_idle_config};
use acme_tests::envoy::free_addr;
use acme_tests::http;

const MAX_CONNECTIONS: usize = 64;
const MAX_HELD_POLLS: usize = 4;

fn start_agent(dir: &std::path::Path) -> Agent {
    start_agent_with(dir, "")
}

/// An idle agent with the API's bounds lowered, and `extra` lines in its
/// `[challenge_api]`.
fn start_agent_with(dir: &std::path::Path, extra: &str) -> Agent {
    let api = free_addr().unwrap();
    let config = write_idle_config(dir, api).unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("listen = \"{api}\"\n"),
        &format!(
            "listen = \"{api}\"\nmax_connections = {MAX_CONNECTIONS}\nmax_held_polls = {MAX_HELD_POLLS}\n{extra}"
        ),
    );
    std::fs::write(&config, text).unwrap();
    Agent::start(&config, api, &dir.join("agent.log")).unwrap()
}

fn kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Whether the server has closed `stream` (EOF, reset, or an answer: 431).
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        // 0: closed; more: the 431 answer, after which the agent closes.
        Ok(_n) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// 400 clients each dribble an endless header, 4 KiB every 100 ms (the
/// attack of the issue: 300 KB of headers per connection, never finished):
/// every one is closed by the agent, with never more than the cap open at
/// once and the agent's memory small.
fn dribblers_are_closed_within_the_cap(agent: &Agent) {
    let pid = agent.pid().unwrap();
    let rss_before = kib(pid, "VmRSS");
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let fds_idle = fds();
    let mut dribblers: Vec<Option<TcpStream>> = (0..400)
        .map(|_| {
            let s = TcpStream::connect(agent.api).unwrap();
            s.set_nonblocking(true).unwrap();
            Some(s)
        })
        .collect();
    println!("connected 400");
    let mut first = true;
    let started = Instant::now();
    let mut max_open = 0usize;
    let mut closed_at = Vec::new();
    // Generous: the agent closes them within its header timeout.
    while dribblers.iter().any(Option::is_some) && started.elapsed() < Duration::from_secs(120) {
        for slot in dribblers.iter_mut() {
            let Some(stream) = slot.as_mut() else {
                continue;
            };
            let chunk: Vec<u8> = if first {
                b"GET /healthz HTTP/1.1\r\nhost: agent\r\nx-pad: ".to_vec()
            } else {
                vec![b'a'; 4096]
            };
            let write_failed = matches!(stream.write(&chunk), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock);
            if write_failed || closed_by_server(stream) {
                *slot = None;
                closed_at.push(started.elapsed());
            }
        }
        first = false;
        // Accepted connections are descriptors of the agent; waiting ones are not.
        max_open = max_open.max(fds().saturating_sub(fds_idle));
        std::thread::sleep(Duration::from_millis(100));
    }
    let peak = kib(pid, "VmHWM");
    assert!(
        dribblers.iter().all(Option::is_none),
        "{} dribbling clients still connected after {:?}",
        dribblers.iter().filter(|d| d.is_some()).count(),
        started.elapsed()
    );
    // The cap, plus the one just accepted while the oldest unauthenticated
    // connection closes to make room for it.
    assert!(
        max_open <= MAX_CONNECTIONS + 1,
        "{max_open} connections open at once, cap {MAX_CONNECTIONS}"
    );
    println!(
        "400 dribbling clients: all closed by the agent within {:?}; at most {max_open} open at once; agent RSS {rss_before} KiB before, peak {peak} KiB",
        closed_at.iter().max().unwrap()
    );
    assert!(peak < 64 * 1024, "agent peak RSS {peak} KiB");
}

/// Half a request, then silence: the agent keeps the connection through
/// half its header timeout (it is no eager reaper) and closes it on its
/// own later (the client never gives up first).
fn half_a_request_is_closed_by_the_header_timeout(agent: &Agent) {
    let timeout = acme_agent::api::HEADER_READ_TIMEOUT;
    let mut silent = TcpStream::connect(agent.api).unwrap();
    silent
        .write_all(b"GET /v1/challenges HTTP/1.1\r\n")
        .unwrap();
    let since = Instant::now();
    let mut buf = [0u8; 64];
    silent.set_read_timeout(Some(timeout / 2)).unwrap();
    let early = silent.read(&mut buf);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "closed before half the header timeout ({:?}): {early:?}",
        since.elapsed()
    );
    silent.set_read_timeout(Some(timeout * 6)).unwrap();
    let closed = silent.read(&mut buf);
    assert!(
        matches!(closed, Ok(0))
            || matches!(&closed, Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "still open after {:?}: {closed:?}",
        since.elapsed()
    );
    println!(
        "half a request: closed by the agent after {:?} (header timeout {timeout:?})",
        since.elapsed()
    );
}

/// Long-polls beyond the cap are answered 503 at once: while the held ones
/// are still held (their wait is 60 s), not after.
fn extra_long_polls_are_refused_while_the_cap_is_held(agent: &Agent) {
    let api = agent.api;
    let version = {
        let r = http::get(api, "/v1/challenges?version=0&wait=0", "agent").unwrap();
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["version"]
            .as_u64()
            .unwrap()
    };
    let path = format!("/v1/challenges?version={version}&wait=60");
    let holders: Vec<_> = (0..MAX_HELD_POLLS)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || http::get(api, &path, "agent").map(|r| r.status))
        })
        .collect();
    // Give the holds time to start.
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let extra = http::get(api, &path, "agent").unwrap();
    let took = asked.elapsed();
    assert_eq!(extra.status, 503, "{}", extra.text());
    assert_eq!(extra.header("retry-after"), Some("1"));
    assert!(
        holders.iter().all(|h| !h.is_finished()),
        "the refusal came only after a held poll ended ({took:?})"
    );
    println!("a long-poll beyond the cap: 503 after {took:?}");
    // The gauge operators count pollers by: exactly the held ones.
    assert_eq!(
        agent
            .metric("acme_agent_challenge_polls_held", &[])
            .unwrap(),
        MAX_HELD_POLLS as f64
    );
    // The agent still answers everything else.
    assert_eq!(
        http::get(agent.health, "/healthz", "agent").unwrap().status,
        200
    );
    drop(holders);
}

#[test]
fn slow_clients_big_headers_and_extra_long_polls_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path());
    dribblers_are_closed_within_the_cap(&agent);
    half_a_request_is_closed_by_the_header_timeout(&agent);
    extra_long_polls_are_refused_while_the_cap_is_held(&agent);
}

/// A request head that reaches the limit is refused with 431, not buffered.
#[test]
fn oversized_headers_get_431() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path());
    let mut s = TcpStream::connect(agent.api).unwrap();
    // Exactly the limit and never finished: the agent can only refuse once it
    // has read every byte, so it closes a drained connection (a reset, with
    // bytes left unread, could swallow the answer).
    let start = "GET /v1/challenges HTTP/1.1\r\nhost: agent\r\nx-pad: ";
    let pad = "a".repeat(acme_agent::api::MAX_HEADER_BYTES - start.len());
    s.write_all(format!("{start}{pad}").as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(s);
    let r = http::read_response(&mut reader, false).unwrap();
    assert_eq!(r.status, 431);
    let ok: SocketAddr = agent.api;
    assert_eq!(
        http::get(ok, "/filter.wasm.sha256", "agent")
            .unwrap()
            .status,
        200
    );
}

/// A poll proving the token from `api`: its status, and how long it took.
fn signed_poll(api: SocketAddr) -> (u16, Duration) {
    use acme_agent::api::auth;
    let path = "/v1/challenges?version=0&wait=0";
    let proof = auth::authorization(
        acme_tests::agent::TEST_TOKEN,
        &auth::nonce(),
        0,
        "GET",
        path,
    );
    let asked = Instant::now();
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: agent\r\nauthorization: {proof}\r\n\r\n"
    )
    .unwrap();
    let r = http::read_response(&mut std::io::BufReader::new(s), false).unwrap();
    (r.status, asked.elapsed())
}

/// The attack: a thousand connections from one address (the
/// filter's own, loopback) sit idle or loop `/healthz` on both listeners;
/// a filter poll that proves the token is still answered within a second,
/// every time, and the kubelet's probe too.
#[test]
fn a_thousand_idle_and_looping_connections_leave_room_for_a_proven_poll() {
    let dir = tempfile::tempdir().unwrap();
    let token = acme_tests::agent::write_token_file(dir.path()).unwrap();
    let agent = start_agent_with(
        dir.path(),
        &format!("token_file = {:?}\n", token.display().to_string()),
    );
    let (api, health) = (agent.api, agent.health);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loopers: Vec<_> = (0..8)
        .map(|i| {
            let stop = std::sync::Arc::clone(&stop);
            let target = if i % 2 == 0 { api } else { health };
            std::thread::spawn(move || {
                let mut loops = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut s) = TcpStream::connect(target) {
                        // Keep-alive requests until the agent closes.
                        while write!(s, "GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n").is_ok() {
                            let mut buf = [0u8; 512];
                            if matches!(s.read(&mut buf), Ok(0) | Err(_)) {
                                break;
                            }
                            loops += 1;
                        }
                    }
                }
                loops
            })
        })
        .collect();
    let idle: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect(api).ok())
        .collect();
    assert_eq!(idle.len(), 1000);
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let (status, took) = signed_poll(api);
        assert_eq!(status, 200);
        slowest = slowest.max(took);
        let probe = Instant::now();
        assert_eq!(http::get(health, "/readyz", "kubelet").unwrap().status, 200);
        slowest = slowest.max(probe.elapsed());
        // More idle connections keep arriving meanwhile.
        for _ in 0..50 {
            let _ = TcpStream::connect(api);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let loops: u64 = loopers.into_iter().map(|l| l.join().unwrap()).sum();
    let evicted = agent
        .metric(
            "acme_agent_connections_refused_total",
            &["listener=\"api\"", "reason=\"evicted\""],
        )
        .unwrap();
    println!(
        "1,000 idle + 8 looping connections ({loops} requests): slowest proven poll or probe {slowest:?}; {evicted} idle connections evicted"
    );
    // Answered by evicting idle connections, not by waiting for them to
    // time out: every answer came before the first header timeout.
    assert!(
        slowest < acme_agent::api::HEADER_READ_TIMEOUT,
        "a poll waited {slowest:?}, as long as idle connections live"
    );
    assert!(evicted >= 900.0, "{evicted}");
    drop(idle);
}
