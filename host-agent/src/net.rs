//! Listening sockets and who may use them.
//!
//! A Unix socket is the agent's default transport for everything that hands
//! out keys or challenges: the kernel names the peer (`SO_PEERCRED`), so each
//! connection is checked against the uids and gids the operator allowed
//! before a byte is read or sent, and nobody can take the agent's place
//! while it is down, because the socket lives in a directory only the agent
//! (or root) can write.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener, UnixStream};
use tracing::warn;

use crate::Error;

/// Connections the kernel queues while the server is busy: the standard
/// library's 128 would make clients beyond it retry their SYN for seconds
/// during a burst.
const LISTEN_BACKLOG: u32 = 1024;

/// Longest Unix socket path (`sun_path` holds 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A TCP listening socket with [`LISTEN_BACKLOG`].
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The agent's effective uid and gid.
pub fn own_ids() -> (u32, u32) {
    (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    )
}

/// Who may connect to a Unix socket: a peer whose uid is listed, or whose
/// primary gid is (supplementary groups are not in `SO_PEERCRED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl PeerPolicy {
    /// The configured lists, or the defaults: the agent's own uid, and the
    /// group the socket was created with.
    pub fn resolve(uids: Option<&[u32]>, gids: Option<&[u32]>, socket_gid: u32) -> Self {
        Self {
            uids: uids.map_or_else(|| vec![own_ids().0], <[u32]>::to_vec),
            gids: gids.map_or_else(|| vec![socket_gid], <[u32]>::to_vec),
        }
    }

    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// A bound Unix socket and the group it was created with.
pub struct UnixBound {
    pub listener: UnixListener,
    pub gid: u32,
}

fn io_error(context: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { context, source }
}

fn refused(context: String, reason: &str) -> Error {
    Error::Io {
        context,
        source: io::Error::new(io::ErrorKind::PermissionDenied, reason.to_owned()),
    }
}

/// Checks (or creates, mode 0750) the directory a socket lives in: a real
/// directory, not a symlink, owned by the agent or root, writable by its
/// owner alone. Anyone else who could write there could put their own socket
/// at the path while the agent is down.
pub fn check_socket_dir(dir: &Path) -> Result<(), Error> {
    let what = || format!("the socket directory {}", dir.display());
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o750)
                .create(dir)
                .map_err(io_error(format!("creating {}", what())))?;
            // The umask may have taken the group's bits: set them exactly.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
                .map_err(io_error(format!("setting the mode of {}", what())))
        }
        Err(e) => Err(io_error(format!("reading {}", what()))(e)),
        Ok(meta) => {
            if meta.file_type().is_symlink() {
                return Err(refused(what(), "is a symlink (give the real directory)"));
            }
            if !meta.is_dir() {
                return Err(refused(what(), "is not a directory"));
            }
            let (uid, _) = own_ids();
            if meta.uid() != uid && meta.uid() != 0 {
                return Err(refused(
                    what(),
                    &format!(
                        "is owned by uid {}, not by the agent (uid {uid}) or root",
                        meta.uid()
                    ),
                ));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(refused(
                    what(),
                    &format!(
                        "is writable by its group or by everyone (mode {:o}): chmod go-w it",
                        meta.mode() & 0o7777
                    ),
                ));
            }
            Ok(())
        }
    }
}

/// Binds a Unix socket at `path` with mode `mode`, in a directory checked
/// by [`check_socket_dir`]. The socket is made in a private directory (0700)
/// beside it, given its mode there and renamed into place, so it is never
/// reachable with a looser mode, whatever the umask. A stale socket (from a
/// killed agent) is replaced; anything else at the path is an error.
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixBound, Error> {
    use std::os::unix::fs::FileTypeExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| refused(path.display().to_string(), "has no directory"))?;
    check_socket_dir(dir)?;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.file_type().is_socket()
    {
        return Err(refused(
            format!("{} exists", path.display()),
            "it is not a socket: refusing to replace it",
        ));
    }
    let private = private_dir(dir)?;
    let result = bind_in(&private, path, mode);
    let _ = std::fs::remove_dir_all(&private);
    result
}

fn private_dir(dir: &Path) -> Result<PathBuf, Error> {
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let candidate = dir.join(format!(".bind-{}-{nanos}-{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error(format!("creating {}", candidate.display()))(e)),
        }
    }
    Err(refused(
        dir.display().to_string(),
        "could not create a private directory to bind in",
    ))
}

fn bind_in(private: &Path, path: &Path, mode: u32) -> Result<UnixBound, Error> {
    let temporary = private.join("socket");
    let listener = UnixListener::bind(&temporary)
        .map_err(io_error(format!("binding a socket for {}", path.display())))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        .map_err(io_error(format!("setting the mode of {}", path.display())))?;
    let gid = std::fs::metadata(&temporary)
        .map_err(io_error(format!("reading {}", path.display())))?
        .gid();
    std::fs::rename(&temporary, path)
        .map_err(io_error(format!("moving the socket to {}", path.display())))?;
    Ok(UnixBound { listener, gid })
}

/// Whether `stream`'s peer may talk to a listener with `policy`. Refusals
/// are logged at most once a second per listener (a refused client can
/// reconnect in a loop); each is counted by the caller.
pub fn peer_allowed(stream: &UnixStream, policy: &PeerPolicy, log: &RefusalLog) -> bool {
    match stream.peer_cred() {
        Ok(cred) if policy.allows(cred.uid(), cred.gid()) => true,
        Ok(cred) => {
            log.note(|| {
                format!(
                    "refused a connection from uid {} gid {} (pid {}): not in allowed_uids {:?} or allowed_gids {:?}",
                    cred.uid(),
                    cred.gid(),
                    cred.pid().map_or_else(|| "?".into(), |p| p.to_string()),
                    policy.uids,
                    policy.gids
                )
            });
            false
        }
        Err(e) => {
            log.note(|| format!("refused a connection whose peer is unknown: {e}"));
            false
        }
    }
}

/// Rate-limits the warning a listener logs about refused connections.
pub struct RefusalLog {
    listener: &'static str,
    last: Mutex<Option<Instant>>,
}

impl RefusalLog {
    pub const fn new(listener: &'static str) -> Self {
        Self {
            listener,
            last: Mutex::new(None),
        }
    }

    fn note(&self, message: impl FnOnce() -> String) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if last.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            *last = Some(now);
            warn!(listener = self.listener, "{}", message());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_allowed_by_uid_or_by_primary_gid() {
        let policy = PeerPolicy {
            uids: vec![1000],
            gids: vec![101],
        };
        assert!(policy.allows(1000, 5));
        assert!(policy.allows(2000, 101));
        assert!(!policy.allows(2000, 5));
        let nobody = PeerPolicy {
            uids: vec![],
            gids: vec![],
        };
        assert!(!nobody.allows(0, 0));
    }

    #[test]
    fn defaults_are_the_agents_uid_and_the_sockets_group() {
        let policy = PeerPolicy::resolve(None, None, 4242);
        assert_eq!(policy.uids, vec![own_ids().0]);
        assert_eq!(policy.gids, vec![4242]);
        let set = PeerPolicy::resolve(Some(&[7]), Some(&[]), 4242);
        assert_eq!((set.uids, set.gids), (vec![7], vec![]));
    }

    #[test]
    fn a_socket_directory_writable_by_others_or_a_symlink_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_unix(&open.join("s.sock"), 0o600).err().unwrap();
        assert!(e.to_string().contains("writable"), "{e}");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        let e = bind_unix(&link.join("s.sock"), 0o600).err().unwrap();
        assert!(e.to_string().contains("symlink"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_directory_is_created_0750_and_the_socket_has_its_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let path = dir.join("s.sock");
        let bound = bind_unix(&path, 0o660).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o7777,
            0o750,
            "directory mode"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o660);
        // Only the socket is left: the private directory is gone.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let client = UnixStream::connect(&path).await.unwrap();
        let (server, _) = bound.listener.accept().await.unwrap();
        let me = PeerPolicy::resolve(None, Some(&[]), bound.gid);
        assert!(peer_allowed(&server, &me, &RefusalLog::new("test")));
        let other = PeerPolicy {
            uids: vec![own_ids().0 + 1],
            gids: vec![],
        };
        assert!(!peer_allowed(&server, &other, &RefusalLog::new("test")));
        drop(client);
        // A stale socket is replaced; a regular file is not.
        drop(bound);
        bind_unix(&path, 0o600).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(bind_unix(&file, 0o600).is_err());
    }
}
