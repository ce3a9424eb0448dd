//! Binding the SDS listener and deciding who may connect: mutual TLS on
//! TCP, peer credentials on a Unix socket.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::Error;

/// A bound SDS listener and who may use it.
pub enum Listener {
    /// Mutual TLS: only a client with a certificate from the configured CA.
    Tcp(tokio::net::TcpListener, tonic::transport::ServerTlsConfig),
    /// Peer credentials: only the allowed uids and gids.
    Unix(tokio::net::UnixListener, crate::net::PeerPolicy),
}

impl Listener {
    /// Binds `sds.listen`. Config validation guarantees a TCP listen has
    /// `[sds.tls]`; it is checked again here, since it guards private keys.
    pub fn bind(sds: &crate::config::Sds) -> Result<Self, Error> {
        use crate::config::Listen;
        match &sds.listen {
            Listen::Tcp(addr) => {
                let tls = sds.tls.as_ref().ok_or_else(|| Error::Io {
                    context: format!("SDS on {addr}"),
                    source: std::io::Error::other("a TCP SDS listener needs [sds.tls]"),
                })?;
                let tls = server_tls(tls)?;
                let listener = crate::net::bind_tcp(*addr).map_err(|source| Error::Io {
                    context: format!("binding the SDS server to {addr}"),
                    source,
                })?;
                Ok(Self::Tcp(listener, tls))
            }
            Listen::Unix(path) => {
                let bound = crate::net::bind_unix(path, socket_mode(sds))?;
                let policy = crate::net::PeerPolicy::resolve(
                    sds.allowed_uids.as_deref(),
                    sds.allowed_gids.as_deref(),
                    bound.gid,
                );
                info!(path = %path.display(), uids = ?policy.uids, gids = ?policy.gids, "SDS socket: peers allowed");
                Ok(Self::Unix(bound.listener, policy))
            }
        }
    }
}

/// 0660: the socket's group may connect (and is then checked); 0666 when
/// uids outside it are allowed too (peer credentials decide alone).
pub fn socket_mode(sds: &crate::config::Sds) -> u32 {
    let own = crate::net::own_ids().0;
    match &sds.allowed_uids {
        Some(uids) if uids.iter().any(|u| *u != own) => 0o666,
        _ => 0o660,
    }
}

fn server_tls(tls: &crate::config::ServerTls) -> Result<tonic::transport::ServerTlsConfig, Error> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })
    };
    let identity = tonic::transport::Identity::from_pem(read(&tls.certificate)?, read(&tls.key)?);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(tonic::transport::Certificate::from_pem(read(
            &tls.client_ca,
        )?)))
}

static REFUSALS: crate::net::RefusalLog = crate::net::RefusalLog::new("sds");

/// Connections from allowed peers only: anyone else is closed before a byte
/// is read or sent.
pub(super) fn allowed_peers(
    listener: tokio::net::UnixListener,
    policy: crate::net::PeerPolicy,
    refused: Arc<dyn Fn() + Send + Sync>,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    futures_util::stream::unfold(
        (listener, policy, refused),
        |(listener, policy, refused)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        if crate::net::peer_allowed(&stream, &policy, &REFUSALS) {
                            return Some((Ok(stream), (listener, policy, refused)));
                        }
                        refused();
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        warn!("accepting an SDS connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        },
    )
}
