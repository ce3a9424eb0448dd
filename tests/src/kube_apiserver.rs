//! A real Kubernetes control plane for tests: etcd and kube-apiserver built
//! from `tools/control-plane/` (`scripts/build-control-plane.sh`, cached
//! outside the repository), started on loopback with free ports in a temp
//! dir, and `kubectl` to drive them. What the fake (`fake_kube`) only
//! models, this one does: RBAC (`--authorization-mode=Node,RBAC`), admission
//! (the default plugins, ValidatingAdmissionPolicy among them), server-side
//! apply with field validation, CRDs, ServiceAccount tokens from the
//! TokenRequest API.
//!
//! TLS and identities are made here with the openssl CLI: a CA, the server's
//! `localhost`/127.0.0.1 certificate, an admin client certificate in
//! `system:masters`, and the ServiceAccount signing key. Both processes are
//! killed on drop (their logs, in the temp dir, are printed when a test
//! panicked).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::http::free_port;
use crate::workspace_root;

/// The directory of the control plane's binaries (`kube-apiserver`, `etcd`,
/// `kubectl`), built or found in the cache the first time it is asked for.
/// A build that fails is an error, never a skip.
pub fn control_plane_bin() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let output = Command::new(workspace_root().join("scripts/build-control-plane.sh"))
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("running scripts/build-control-plane.sh: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "building the control plane failed ({})",
                    output.status
                ));
            }
            let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            if dir.join("kube-apiserver").is_file() {
                Ok(dir)
            } else {
                Err(format!("{} holds no kube-apiserver", dir.display()))
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The ServiceAccount tokens' issuer (and audience).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

pub struct KubeApiServer {
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:<port>`
    pub url: String,
    /// The CA that signed the server's certificate (and the admin's).
    pub ca: PathBuf,
    /// A kubeconfig for the admin (`system:masters`).
    pub admin: PathBuf,
    bin: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Result<Child> {
    let file = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

fn openssl(args: &[&str], paths: &[(&str, &Path)]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    let out = cmd.output().context("running openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A client certificate for `subject` signed by the test CA.
fn client_cert(dir: &Path, tls: &crate::tls::LocalTls, name: &str, subject: &str) -> Result<()> {
    let (key, csr, crt, ext) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.ext")),
    );
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )?;
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            subject,
        ],
        &[("-keyout", &key), ("-out", &csr)],
    )?;
    openssl(
        &["x509", "-req", "-days", "2", "-CAcreateserial"],
        &[
            ("-in", &csr),
            ("-CA", &tls.ca),
            ("-CAkey", &tls.ca_key),
            ("-extfile", &ext),
            ("-out", &crt),
        ],
    )
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver and waits for `/readyz`.
    pub fn start() -> Result<Self> {
        let bin = control_plane_bin()?;
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let tls = crate::tls::localhost(d, "test CA for kube-apiserver")?;
        client_cert(d, &tls, "admin", "/O=system:masters/CN=envoy-acme-admin")?;
        // The ServiceAccount signing key: SEC1 ("EC PRIVATE KEY"); the API
        // server reads no PKCS#8 private key as a verification key, so the
        // public half goes apart.
        let sa_key = d.join("sa.key");
        openssl(
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
            &[("-out", &sa_key)],
        )?;
        openssl(
            &["ec", "-pubout"],
            &[("-in", &sa_key), ("-out", &d.join("sa.pub"))],
        )?;
        let (client, peer, secure) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = d.join("etcd");
        std::fs::create_dir(&data)?;
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.arg("--name=test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            // A test's data need not survive a power cut.
            .arg("--unsafe-no-fsync");
        let etcd = spawn_logged(etcd, &d.join("etcd.log"))?;
        let url = format!("https://127.0.0.1:{secure}");
        let mut server = Self {
            admin: d.join("admin.kubeconfig"),
            ca: tls.ca.clone(),
            url,
            bin,
            etcd: Some(etcd),
            apiserver: None,
            dir,
        };
        server.start_apiserver(&etcd_url, secure, &tls, &sa_key)?;
        let d = server.dir.path();
        let user = format!(
            "    client-certificate: {}\n    client-key: {}\n",
            d.join("admin.crt").display(),
            d.join("admin.key").display()
        );
        server.write_kubeconfig(&server.admin, "admin", &user, "default")?;
        Ok(server)
    }

    fn start_apiserver(
        &mut self,
        etcd_url: &str,
        port: u16,
        tls: &crate::tls::LocalTls,
        sa_key: &Path,
    ) -> Result<()> {
        let d = self.dir.path();
        let mut cmd = Command::new(self.bin.join("kube-apiserver"));
        cmd.arg(format!("--etcd-servers={etcd_url}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={port}"))
            .arg(format!(
                "--cert-dir={}",
                d.join("apiserver-certs").display()
            ))
            .arg(format!("--tls-cert-file={}", tls.cert.display()))
            .arg(format!("--tls-private-key-file={}", tls.key.display()))
            .arg(format!("--client-ca-file={}", tls.ca.display()))
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!("--service-account-issuer={ISSUER}"))
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            // Service IPs are only allocated, never routed: no Service
            // traffic leaves the test (there are no nodes).
            .arg("--service-cluster-ip-range=198.18.0.0/24")
            // The `kubernetes` Service's endpoint would be 127.0.0.1, which
            // Endpoints refuse: keep the reconciler off.
            .arg("--endpoint-reconciler-type=none")
            .arg("--profiling=false")
            // Every request for a Secret, Lease or Event, in a JSON line
            // (`audit`): what a test counts on the server's side.
            .arg(format!(
                "--audit-policy-file={}",
                self.audit_policy()?.display()
            ))
            .arg(format!(
                "--audit-log-path={}",
                d.join("audit.log").display()
            ))
            .arg("--audit-log-format=json");
        self.apiserver = Some(spawn_logged(cmd, &d.join("kube-apiserver.log"))?);
        self.wait_ready(Duration::from_secs(90))
    }

    fn audit_policy(&self) -> Result<PathBuf> {
        let path = self.dir.path().join("audit-policy.yaml");
        std::fs::write(
            &path,
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n  resources:\n  - group: \"\"\n    resources: [secrets]\n  - group: coordination.k8s.io\n    resources: [leases]\n  - group: events.k8s.io\n    resources: [events]\n- level: None\n",
        )?;
        Ok(path)
    }

    /// The audit log's entries so far (stage ResponseComplete, or Panic):
    /// requests for Secrets, Leases and Events, with user, verb, objectRef
    /// and responseStatus.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The audited requests by `user` for the object `resource`/`name`.
    pub fn audited(&self, user: &str, resource: &str, name: &str) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|e| {
                e["user"]["username"] == user
                    && e["objectRef"]["resource"] == resource
                    && e["objectRef"]["name"] == name
            })
            .collect()
    }

    /// Object `kind/name` of `namespace` as JSON, None if absent.
    pub fn get(&self, namespace: &str, kind: &str, name: &str) -> Option<serde_json::Value> {
        let text = self
            .kubectl_ok(&[
                "get",
                kind,
                name,
                "-n",
                namespace,
                "-o",
                "json",
                "--ignore-not-found",
                "--show-managed-fields",
            ])
            .ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Applies (server-side, as the admin) the JSON `object`.
    pub fn apply(&self, object: &serde_json::Value) -> Result<()> {
        let out = self.kubectl_as(
            &self.admin,
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            &object.to_string(),
        )?;
        if !out.status.success() {
            bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Adds `names` to the resourceNames of the Secret rule of Role
    /// `namespace/role`, as an operator lists a certificate's Secret, and
    /// waits until RBAC allows `user` to get each.
    pub fn grant_secrets(
        &self,
        namespace: &str,
        role: &str,
        user: &str,
        names: &[&str],
    ) -> Result<()> {
        let current = self
            .get(namespace, "role", role)
            .context("the Role to grant Secrets in")?;
        let rules = current["spec"]["rules"]
            .as_array()
            .or(current["rules"].as_array());
        let index = rules
            .and_then(|rules| {
                rules.iter().position(|r| {
                    r["resources"]
                        .as_array()
                        .is_some_and(|x| x.iter().any(|x| x == "secrets"))
                        && r["resourceNames"].is_array()
                })
            })
            .context("no Secret rule with resourceNames in the Role")?;
        let patch: Vec<serde_json::Value> = names
            .iter()
            .map(|n| serde_json::json!({"op": "add", "path": format!("/rules/{index}/resourceNames/-"), "value": n}))
            .collect();
        self.kubectl_ok(&[
            "patch",
            "role",
            role,
            "-n",
            namespace,
            "--type=json",
            "-p",
            &serde_json::Value::from(patch).to_string(),
        ])?;
        let start = Instant::now();
        for name in names {
            let resource = format!("secret/{name}");
            while self
                .kubectl_ok(&[
                    "auth", "can-i", "get", &resource, "-n", namespace, "--as", user,
                ])
                .is_err()
            {
                if start.elapsed() > Duration::from_secs(30) {
                    bail!("{user} still may not get {resource}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let mut exited = None;
            for child in [&mut self.etcd, &mut self.apiserver].into_iter().flatten() {
                exited = exited.or(child.try_wait()?);
            }
            if let Some(status) = exited {
                bail!("the control plane exited ({status}):\n{}", self.logs());
            }
            // As the admin: anonymous /readyz is 403 until RBAC's
            // bootstrap roles exist, which readiness waits for anyway.
            let d = self.dir.path();
            let out = Command::new("curl")
                .args(["-sS", "--fail", "--max-time", "5", "--cacert"])
                .arg(&self.ca)
                .arg("--cert")
                .arg(d.join("admin.crt"))
                .arg("--key")
                .arg(d.join("admin.key"))
                .arg(format!("{}/readyz", self.url))
                .output()
                .context("running curl")?;
            if out.status.success() {
                eprintln!("kube-apiserver ready in {:?}", start.elapsed());
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "kube-apiserver not ready within {timeout:?}:\n{}",
            self.logs()
        )
    }

    /// Writes a kubeconfig for this server with `user` (the YAML lines of a
    /// kubeconfig `user:`) and default `namespace`.
    fn write_kubeconfig(&self, path: &Path, name: &str, user: &str, namespace: &str) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: {name}\n  user:\n{user}contexts:\n- name: {name}\n  context:\n    cluster: test\n    user: {name}\n    namespace: {namespace}\ncurrent-context: {name}\n",
                url = self.url,
                ca = self.ca.display(),
            ),
        )?;
        Ok(())
    }

    /// A kubeconfig for the ServiceAccount `namespace/name` (which must
    /// exist), with a token minted by the TokenRequest API (`kubectl create
    /// token`), valid for an hour.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let token =
            self.kubectl_ok(&["create", "token", name, "-n", namespace, "--duration=1h"])?;
        let path = self
            .dir
            .path()
            .join(format!("{namespace}-{name}.kubeconfig"));
        let user = format!("    token: {}\n", token.trim());
        self.write_kubeconfig(&path, name, &user, namespace)?;
        Ok(path)
    }

    /// Runs `kubectl` as the identity of `kubeconfig`, with `stdin` as its
    /// standard input.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: &str) -> Result<Output> {
        use std::io::Write as _;
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl's stdin")?
            .write_all(stdin.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// Runs `kubectl` as the admin; its stdout, or an error with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_as(&self.admin, args, "")?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The last lines of etcd's and kube-apiserver's logs.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["etcd.log", "kube-apiserver.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out.push_str(&format!("--- {name} (last {} lines)\n", tail.len()));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // The API server first: it would log etcd's absence otherwise.
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
