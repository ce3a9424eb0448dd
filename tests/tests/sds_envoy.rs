//! The agent's SDS server (`acme_agent::sds`, in process) feeding a real
//! Envoy 1.40's on-demand certificate selector over delta ADS: one static
//! HTTPS listener serves every certificate by SNI, under each DNS name; an
//! unknown name fails its handshake at once instead of hanging; a renewal is
//! served on the next handshake while a connection opened before keeps
//! working; after the server restarts, Envoy resubscribes and still serves.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_agent::sds::{self};

use acme_agent::ports::secrets::SecretSet;
use acme_tests::envoy::{Envoy, TlsSession, free_addr, on_demand_bootstrap, served_subject};
use acme_tests::tls_probe::{Outcome, outcome_any_sni};
use tokio::sync::oneshot;

/// A self-signed P-256 certificate for `names` (CN the first): (chain, key).
fn self_signed(dir: &Path, names: &[&str]) -> (String, String) {
    let key = dir.join(format!("{}.key", names[0]));
    let crt = dir.join(format!("{}.crt", names[0]));
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-days",
            "1",
            "-subj",
            &format!("/CN={}", names[0]),
            "-addext",
        ])
        .arg(format!("subjectAltName={}", san.join(",")))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    (
        std::fs::read_to_string(crt).unwrap(),
        std::fs::read_to_string(key).unwrap(),
    )
}

/// An `[sds]` section listening on `listen`, defaults otherwise.
fn sds_at(listen: acme_agent::config::Listen) -> acme_agent::config::Sds {
    acme_agent::config::Sds {
        listen,
        allowed_uids: None,
        allowed_gids: None,
        tls: None,
    }
}

/// The SDS server in its own runtime; stops when dropped.
struct Server {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// On the Unix socket `socket`, for the agent's own uid and group.
    fn start(socket: &Path, set: Arc<SecretSet>) -> Self {
        Self::start_on(
            sds_at(acme_agent::config::Listen::Unix(socket.to_owned())),
            set,
        )
    }

    fn start_on(sds: acme_agent::config::Sds, set: Arc<SecretSet>) -> Self {
        Self::start_with(sds, set, Arc::default())
    }

    fn start_with(sds: acme_agent::config::Sds, set: Arc<SecretSet>, alpn: Arc<SecretSet>) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = sds::Listener::bind(&sds).unwrap();
                ready_tx.send(()).unwrap();
                sds::serve(listener, set, alpn, None, Arc::new(|| {}), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        ready_rx.recv().unwrap();
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn wait_subject(https: SocketAddr, sni: &str, want: &str, envoy: &Envoy) {
    acme_tests::agent::wait_for(
        Duration::from_secs(60),
        &format!("{sni} served with subject {want}"),
        || {
            served_subject(https, sni)
                .unwrap_or_default()
                .contains(want)
                .then_some(())
        },
        || {
            format!(
                "served {:?}\n{}",
                served_subject(https, sni).unwrap_or_default(),
                envoy.log()
            )
        },
    )
    .unwrap();
}

/// The handshake for `sni` is refused by Envoy, not held: the refusal comes
/// within a generous timeout (a held one would still be waiting). Any SNI,
/// also a malformed one a client may send.
fn assert_refused_not_held(https: SocketAddr, sni: &str, envoy: &Envoy) {
    let asked = Instant::now();
    let outcome = outcome_any_sni(https, sni, Duration::from_secs(20)).unwrap();
    assert_eq!(outcome, Outcome::Refused, "{sni:?}\n{}", envoy.log());
    println!("{sni:.40}: refused after {:?}", asked.elapsed());
}

/// Waits until the server tracks at most `at_most` subscribed names.
fn wait_unsubscribed(set: &SecretSet, at_most: usize) {
    acme_tests::agent::wait_for(
        Duration::from_secs(60),
        &format!("at most {at_most} names subscribed"),
        || (set.subscribed_names() <= at_most).then_some(()),
        || format!("{} names still subscribed", set.subscribed_names()),
    )
    .unwrap();
}

#[test]
fn one_listener_serves_every_certificate_by_sni_and_refuses_unknown_names_fast() {
    let work = tempfile::tempdir().unwrap();
    let set = Arc::new(SecretSet::new());
    let (chain, key) = self_signed(work.path(), &["www.example.com", "example.com"]);
    set.set(
        "www",
        &names(&["www.example.com", "example.com"]),
        &chain,
        &key,
    );
    let (chain, key) = self_signed(work.path(), &["api.example.com"]);
    set.set("api", &names(&["api.example.com"]), &chain, &key);
    let socket = work.path().join("run/sds.sock");
    let server = Server::start(&socket, Arc::clone(&set));
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let envoy = Envoy::start(&on_demand_bootstrap(https, admin, &socket), admin, 2).unwrap();

    for (sni, cn) in [
        ("www.example.com", "www.example.com"),
        ("example.com", "www.example.com"),
        ("api.example.com", "api.example.com"),
    ] {
        wait_subject(https, sni, cn, &envoy);
    }

    // A name nobody serves: the handshake fails at once, it does not hang.
    assert_refused_not_held(https, "nope.example.com", &envoy);
    assert_eq!(served_subject(https, "nope.example.com").unwrap(), "");

    // Malformed or oversized names (the client chooses them) fail the same
    // way, and the names that exist are still served.
    let long = "x".repeat(250);
    for sni in ["bad_name!.example.com", "..example.com", long.as_str()] {
        assert_refused_not_held(https, sni, &envoy);
        assert_eq!(served_subject(https, sni).unwrap(), "", "{sni:?}");
    }
    wait_subject(https, "api.example.com", "api.example.com", &envoy);

    // A connection opened now keeps working across the renewal below.
    let mut session = TlsSession::open(https, "www.example.com").unwrap();
    let first = session.get("/", "www.example.com").unwrap();
    assert_eq!((first.status, first.text().as_str()), (200, "tls ok"));

    // A renewal: the next handshake gets the new certificate.
    let (chain, key) = self_signed(
        work.path(),
        &["renewed.example.com", "www.example.com", "example.com"],
    );
    set.set(
        "www",
        &names(&["www.example.com", "example.com"]),
        &chain,
        &key,
    );
    wait_subject(https, "www.example.com", "renewed.example.com", &envoy);
    let second = session.get("/", "www.example.com").unwrap();
    assert_eq!((second.status, second.text().as_str()), (200, "tls ok"));

    // The SDS server restarts (same secrets): Envoy resubscribes with the
    // versions it holds and keeps serving; a later change still arrives.
    drop(server);
    let _server = Server::start(&socket, Arc::clone(&set));
    wait_subject(https, "api.example.com", "api.example.com", &envoy);
    let (chain, key) = self_signed(work.path(), &["api2.example.com", "api.example.com"]);
    set.set("api", &names(&["api.example.com"]), &chain, &key);
    wait_subject(https, "api.example.com", "api2.example.com", &envoy);

    // Envoy goes away mid-stream: the server forgets its subscriptions.
    assert!(set.subscribed_names() > 0);
    drop(envoy);
    wait_unsubscribed(&set, 0);
}

/// Waits until `https` presents for `sni` a chain that verifies against
/// `root`; returns it.
fn served_by_ca(https: SocketAddr, sni: &str, root: &str, envoy: &Envoy) -> String {
    acme_tests::envoy::wait_served_by_ca(https, sni, root, Duration::from_secs(10), || envoy.log())
}

/// The agent binary with `[sds]`, the real Pebble, the filter on a plain-HTTP
/// Envoy answering the validations, and an on-demand Envoy fed by the agent's
/// SDS server: every issued certificate served by SNI on one static listener,
/// a forced renewal served on the next handshake, and the same after the
/// agent is SIGKILLed and restarted.
#[test]
fn the_agent_serves_its_certificates_to_an_on_demand_listener() {
    use acme_tests::pebble;
    use acme_tests::world::World;

    let mut world = World::new(pebble::Options::default());
    let socket = world.work.path().join("run/sds.sock");
    world.extra_config = format!("[sds]\nlisten = \"unix:{}\"\n", socket.display());
    world
        .certificates(&[
            ("www", &["www.example.com", "example.com"]),
            ("api", &["api.example.com"]),
        ])
        .write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let envoy = Envoy::start(&on_demand_bootstrap(https, admin, &socket), admin, 2).unwrap();
    world.wait_issued("www", 1.0);
    world.wait_issued("api", 1.0);
    let root = world.pebble.issuing_root().unwrap();
    let served = |sni: &str| served_by_ca(https, sni, &root, &envoy);
    for sni in ["www.example.com", "example.com", "api.example.com"] {
        served(sni);
    }
    assert_refused_not_held(https, "nope.example.com", &envoy);
    assert_eq!(served_subject(https, "nope.example.com").unwrap(), "");

    let before = served("www.example.com");
    world.renew("www");
    world.wait_issued("www", 2.0);
    acme_tests::agent::wait_for(
        Duration::from_secs(30),
        "the renewed certificate on a new handshake",
        || (served("www.example.com") != before).then_some(()),
        || envoy.log(),
    )
    .unwrap();

    world.agent.as_mut().unwrap().kill();
    world.start_agent();
    world.wait_scheduled();
    world.assert_nothing_registered_or_ordered();
    for sni in ["www.example.com", "api.example.com"] {
        served(sni);
    }
}

/// What `sds-probe` (a plain gRPC SDS client) got when it asked for `name`
/// at `target`, run as `uid`:`gid` when given.
fn probe(target: &str, name: &str, ids: Option<(u32, u32)>, extra: &[&str]) -> serde_json::Value {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_sds_probe"));
    command.args([target, name]).args(extra);
    if let Some((uid, gid)) = ids {
        command.uid(uid).gid(gid);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "sds-probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The default transport: a Unix socket in a directory the agent made
/// (0750), the socket 0660, every peer checked by its credentials. Envoy
/// (the agent's uid) gets its certificate; a client under another uid is
/// closed before a byte is sent, though it can reach the socket; a stale
/// socket is replaced and anything else at the path is not.
#[test]
fn keys_go_only_to_the_peers_the_operator_allowed() {
    use std::os::unix::fs::PermissionsExt;

    let work = tempfile::tempdir().unwrap();
    // Let another uid reach the socket's directory, so that only the peer
    // check stands between it and the keys.
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let set = Arc::new(SecretSet::new());
    let (chain, key) = self_signed(work.path(), &["www.example.com"]);
    set.set("www", &names(&["www.example.com"]), &chain, &key);
    let dir = work.path().join("run");
    let socket = dir.join("sds.sock");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A stale socket of a killed agent is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let (own_uid, own_gid) = acme_agent::net::own_ids();
    let sds = acme_agent::config::Sds {
        // Another uid may reach the socket file (0666): the kernel's peer
        // credentials decide alone.
        allowed_uids: Some(vec![own_uid, 4242]),
        allowed_gids: Some(vec![]),
        ..sds_at(acme_agent::config::Listen::Unix(socket.clone()))
    };
    let _server = Server::start_on(sds, set);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let envoy = Envoy::start(&on_demand_bootstrap(https, admin, &socket), admin, 1).unwrap();
    wait_subject(https, "www.example.com", "www.example.com", &envoy);

    let target = format!("unix:{}", socket.display());
    let allowed = probe(&target, "www.example.com", None, &[]);
    assert_eq!(allowed["resources"], 1, "{allowed}");
    assert_eq!(allowed["key_bytes"], true, "{allowed}");
    let allowed_uid = probe(&target, "www.example.com", Some((4242, 4242)), &[]);
    assert_eq!(allowed_uid["resources"], 1, "{allowed_uid}");
    for (uid, gid) in [(65534, 65534), (65534, own_gid)] {
        let intruder = probe(&target, "www.example.com", Some((uid, gid)), &[]);
        assert_eq!(intruder["resources"], 0, "uid {uid} gid {gid}: {intruder}");
        assert_eq!(
            intruder["key_bytes"], false,
            "uid {uid} gid {gid}: {intruder}"
        );
    }

    // Anything else at the path is not replaced.
    let file = work.path().join("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    assert!(sds::Listener::bind(&sds_at(acme_agent::config::Listen::Unix(file.clone()))).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "openssl {args:?}");
}

/// A CA `<name>-ca.{crt,key}` and a leaf `<leaf>.{crt,key}` it signed for
/// `localhost`.
fn ca_and_leaf(dir: &Path, name: &str, leaves: &[&str]) {
    let ca = format!("{name}-ca");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ],
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    for leaf in leaves {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                &format!("{leaf}.key"),
                "-out",
                &format!("{leaf}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{leaf}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "leaf.ext",
                "-out",
                &format!("{leaf}.crt"),
            ],
        );
    }
}

/// TCP is served only with mutual TLS: Envoy with a client certificate from
/// the configured CA gets its certificates; a client with none, or with one
/// from another CA, gets nothing.
#[test]
fn sds_on_tcp_serves_only_clients_with_the_right_certificate() {
    use std::os::unix::fs::PermissionsExt;

    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    ca_and_leaf(dir, "sds", &["server", "envoy"]);
    ca_and_leaf(dir, "other", &["intruder"]);
    for key in ["server.key", "envoy.key", "intruder.key"] {
        std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let set = Arc::new(SecretSet::new());
    let (chain, key) = self_signed(dir, &["www.example.com"]);
    set.set("www", &names(&["www.example.com"]), &chain, &key);
    let addr = free_addr().unwrap();
    let sds = acme_agent::config::Sds {
        tls: Some(acme_agent::config::ServerTls {
            certificate: dir.join("server.crt"),
            key: dir.join("server.key"),
            client_ca: dir.join("sds-ca.crt"),
        }),
        ..sds_at(acme_agent::config::Listen::Tcp(addr))
    };
    let _server = Server::start_on(sds, set);
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let config = acme_tests::envoy::on_demand_bootstrap_mtls(
        https,
        admin,
        addr,
        (&dir.join("envoy.crt"), &dir.join("envoy.key")),
        &dir.join("sds-ca.crt"),
    );
    let envoy = Envoy::start(&config, admin, 1).unwrap();
    wait_subject(https, "www.example.com", "www.example.com", &envoy);

    let target = format!("tcp:{addr}");
    let ca = dir.join("sds-ca.crt").display().to_string();
    let with = |leaf: &str| {
        let (cert, key) = (
            dir.join(format!("{leaf}.crt")),
            dir.join(format!("{leaf}.key")),
        );
        probe(
            &target,
            "www.example.com",
            None,
            &[
                "--ca",
                &ca,
                "--cert",
                &cert.display().to_string(),
                "--key",
                &key.display().to_string(),
            ],
        )
    };
    let control = with("envoy");
    assert_eq!(
        control["resources"], 1,
        "the right certificate gets it: {control}"
    );
    for report in [
        probe(&target, "www.example.com", None, &["--ca", &ca]),
        with("intruder"),
    ] {
        assert_eq!(report["resources"], 0, "{report}");
        assert_eq!(report["key_bytes"], false, "{report}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Whoever connects chooses the SNI: 10,000 handshakes for random names
/// leave Envoy's memory and the server's subscriptions bounded (every unknown
/// name is answered "removed", Envoy drops it), and the configured name is
/// served throughout.
#[test]
fn ten_thousand_random_snis_leave_memory_bounded_and_known_names_served() {
    use acme_tests::tls_probe::handshake;

    let work = tempfile::tempdir().unwrap();
    let set = Arc::new(SecretSet::new());
    let (chain, key) = self_signed(work.path(), &["www.example.com"]);
    set.set("www", &names(&["www.example.com"]), &chain, &key);
    let socket = work.path().join("run/sds.sock");
    let _server = Server::start(&socket, Arc::clone(&set));
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let envoy = Envoy::start(&on_demand_bootstrap(https, admin, &socket), admin, 2).unwrap();
    wait_subject(https, "www.example.com", "www.example.com", &envoy);
    let pid = envoy.pid().unwrap();
    let timeout = Duration::from_secs(5);
    let www_leaf = handshake(https, "www.example.com", timeout)
        .unwrap()
        .unwrap();
    let rss_before = rss_kib(pid);

    let started = Instant::now();
    let served_unknown = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..16 {
            let served_unknown = &served_unknown;
            scope.spawn(move || {
                for i in 0..625 {
                    let sni = format!(
                        "r{t}x{i}x{:x}.random.example.com",
                        started.elapsed().as_nanos()
                    );
                    if let Ok(Some(_)) = handshake(https, &sni, timeout) {
                        served_unknown.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        // Meanwhile, the configured name keeps being served.
        scope.spawn(|| {
            for _ in 0..50 {
                let leaf = handshake(https, "www.example.com", timeout).unwrap();
                assert_eq!(
                    leaf.as_ref(),
                    Some(&www_leaf),
                    "www.example.com not served during the flood"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    });
    let took = started.elapsed();
    assert_eq!(
        served_unknown.into_inner(),
        0,
        "a certificate for a name nobody has"
    );
    let rss_after = rss_kib(pid);
    // Removed names are dropped by Envoy and unsubscribed from the server.
    wait_unsubscribed(&set, 10);
    println!(
        "10,000 random SNIs in {took:?}; Envoy RSS {rss_before} -> {rss_after} KiB; names subscribed after: {}",
        set.subscribed_names()
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "Envoy grew from {rss_before} to {rss_after} KiB"
    );
    assert_eq!(
        handshake(https, "www.example.com", timeout).unwrap(),
        Some(www_leaf)
    );
}

/// The acme-tls/1 filter chain gets the tls-alpn-01 challenge certificate for
/// the SNI, on a stream asking for the challenge secrets; any other handshake
/// for that name gets the ordinary certificate.
#[test]
fn the_acme_tls_chain_serves_challenge_certificates_apart_from_the_ordinary_ones() {
    let work = tempfile::tempdir().unwrap();
    let set = Arc::new(SecretSet::new());
    let (chain, key) = self_signed(work.path(), &["www.example.com"]);
    set.set("www", &names(&["www.example.com"]), &chain, &key);
    let alpn = Arc::new(SecretSet::new());
    let (chain, key) =
        acme_agent::solvers::tls_alpn01::challenge_certificate("www.example.com", "tok.thumb")
            .unwrap();
    alpn.set("www.example.com", &[], &chain, &key);
    let socket = work.path().join("run/sds.sock");
    let _server = Server::start_with(
        sds_at(acme_agent::config::Listen::Unix(socket.clone())),
        Arc::clone(&set),
        alpn,
    );
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let envoy = Envoy::start(
        &acme_tests::envoy::on_demand_bootstrap_with_alpn(https, admin, &socket),
        admin,
        1,
    )
    .unwrap();
    wait_subject(https, "www.example.com", "www.example.com", &envoy);
    let alpn_answer = || {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &https.to_string(),
                "-servername",
                "www.example.com",
            ])
            .args(["-alpn", "acme-tls/1"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = acme_tests::agent::wait_for(
        Duration::from_secs(60),
        "the acme-tls/1 chain answering",
        || {
            let text = alpn_answer();
            text.contains("ALPN protocol: acme-tls/1").then_some(text)
        },
        || format!("{}\n{}", alpn_answer(), envoy.log()),
    )
    .unwrap();
    let pem: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .take_while(|l| !l.starts_with("-----END CERTIFICATE"))
        .chain(std::iter::once("-----END CERTIFICATE-----"))
        .map(|l| format!("{l}\n"))
        .collect();
    let der = acme_agent::certificate::parse_chain(&pem)
        .unwrap()
        .remove(0);
    assert!(acme_agent::solvers::tls_alpn01::holds_digest(
        &der,
        "tok.thumb"
    ));
}
