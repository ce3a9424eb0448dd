//! A small server that speaks the agent's side of the challenge sync protocol
//! (`docs/challenge-sync.md`), for testing the filter in a real Envoy before and
//! independently of the real agent.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::http::{Reply, Server};
use crate::snapshot_json;

#[derive(Default)]
struct State {
    version: u64,
    challenges: Vec<(String, String)>,
    stopped: bool,
    polls: usize,
    held: usize,
    max_held: usize,
    /// Files answered (`GET <path>` of a fixed file).
    fetches: usize,
}

/// Answers one long-poll from the state, as the protocol says.
fn poll(lock: &Mutex<State>, cvar: &Condvar, req: &crate::http::Request) -> Reply {
    let asked: u64 = req
        .query("version")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let wait: u64 = req.query("wait").and_then(|v| v.parse().ok()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(wait);
    let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
    s.polls += 1;
    s.held += 1;
    s.max_held = s.max_held.max(s.held);
    while s.version == asked && !s.stopped {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        s = cvar
            .wait_timeout(s, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    s.held -= 1;
    if s.version == asked && !s.stopped {
        return Reply::new(304, "");
    }
    if s.stopped {
        return Reply::new(503, "");
    }
    let pairs: Vec<(&str, &str)> = s
        .challenges
        .iter()
        .map(|(t, h)| (t.as_str(), h.as_str()))
        .collect();
    let mut reply = Reply::new(200, snapshot_json(s.version, &pairs));
    reply
        .headers
        .push(("content-type".into(), "application/json".into()));
    reply
}

/// Holds a challenge set; answers long-polls as the protocol says.
pub struct SyncServer {
    state: Arc<(Mutex<State>, Condvar)>,
    server: Option<Server>,
}

impl SyncServer {
    /// Starts on a free loopback port, or on `addr` (to come back after a stop).
    pub fn start(addr: Option<std::net::SocketAddr>) -> Result<Self> {
        Self::start_with_files(addr, Vec::new())
    }

    /// Like [`SyncServer::start`], also answering `GET <path>` with fixed
    /// bytes (the agent serves the filter's `.wasm` that way).
    pub fn start_with_files(
        addr: Option<std::net::SocketAddr>,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<Self> {
        Self::start_full(addr, files, None)
    }

    /// Like [`SyncServer::start`] with the token scheme: a poll must prove
    /// `token` (else 401), and every answer is signed with it, as the agent
    /// does (`acme_agent::api::auth`).
    pub fn start_signed(token: &str) -> Result<Self> {
        Self::start_full(None, Vec::new(), Some(token.to_owned()))
    }

    /// The general form: on `addr` or a free port, answering `files`, and
    /// with the token scheme when `token` is given.
    pub fn start_full(
        addr: Option<std::net::SocketAddr>,
        files: Vec<(String, Vec<u8>)>,
        token: Option<String>,
    ) -> Result<Self> {
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        {
            // Versions keep growing across restarts, as the protocol asks of the
            // agent: start from the wall clock in milliseconds.
            let mut s = state.0.lock().unwrap_or_else(|e| e.into_inner());
            s.version = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_millis() as u64);
        }
        let handler_state = Arc::clone(&state);
        let handler = move |req: &crate::http::Request| -> Reply {
            let (lock, cvar) = &*handler_state;
            if let Some((_, bytes)) = files
                .iter()
                .find(|(path, _)| req.method == "GET" && *path == req.path)
            {
                lock.lock().unwrap_or_else(|e| e.into_inner()).fetches += 1;
                return Reply::new(200, bytes.clone());
            }
            if req.method != "GET" || !req.path.starts_with("/v1/challenges") {
                return Reply::new(404, "");
            }
            let Some(token) = &token else {
                return poll(lock, cvar, req);
            };
            use acme_agent::api::auth;
            let presented = req.header("authorization").and_then(auth::parse);
            let Some(presented) =
                presented.filter(|p| auth::verify_request(token, p, "GET", &req.path))
            else {
                return Reply::new(401, "");
            };
            let mut reply = poll(lock, cvar, req);
            let signature = auth::sign_response(token, &presented.nonce, reply.status, &reply.body);
            reply
                .headers
                .push((auth::SIGNATURE_HEADER.into(), signature));
            reply
        };
        let server = match addr {
            Some(addr) => Server::start_on(addr, handler)?,
            None => Server::start(handler)?,
        };
        Ok(Self {
            state,
            server: Some(server),
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server
            .as_ref()
            .map_or_else(|| ([127, 0, 0, 1], 0).into(), Server::addr)
    }

    /// Publishes a new challenge set (token, identifier); held polls answer at once.
    pub fn publish(&self, challenges: &[(&str, &str)]) {
        let (lock, cvar) = &*self.state;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        s.version += 1;
        s.challenges = challenges
            .iter()
            .map(|(t, h)| ((*t).to_owned(), (*h).to_owned()))
            .collect();
        cvar.notify_all();
    }

    /// How many times a fixed file (the module) was fetched so far.
    pub fn fetches(&self) -> usize {
        self.state
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fetches
    }

    /// How many polls arrived so far.
    pub fn polls(&self) -> usize {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).polls
    }

    /// The most polls held at the same time so far: one per Envoy process
    /// when the filter's poller election works.
    pub fn max_concurrent_polls(&self) -> usize {
        self.state
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .max_held
    }

    /// Stops answering and closes the listener, like an agent that went away.
    pub fn stop(&mut self) {
        {
            let (lock, cvar) = &*self.state;
            lock.lock().unwrap_or_else(|e| e.into_inner()).stopped = true;
            cvar.notify_all();
        }
        self.server = None;
    }
}

impl Drop for SyncServer {
    fn drop(&mut self) {
        self.stop();
    }
}
