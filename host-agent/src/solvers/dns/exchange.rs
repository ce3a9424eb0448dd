//! One DNS exchange over TCP (RFC 1035 section 4.2.2, RFC 7766): a query or
//! an update out, its answer back, bounded in time. Messages are encoded,
//! signed and checked by hickory-proto; this file only moves bytes.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::TSigner;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Error;

/// A DNS server's answer, whatever its response code.
pub struct Answer {
    pub message: Message,
}

impl Answer {
    pub fn code(&self) -> ResponseCode {
        self.message.metadata.response_code
    }

    /// The TSIG error the server reported (`BADKEY`, `BADSIG`, `BADTIME`).
    pub fn tsig_error(&self) -> Option<String> {
        self.message
            .signature
            .as_ref()
            .and_then(|tsig| tsig.data.error.as_ref())
            .map(|e| format!("{e:?}").to_uppercase())
    }
}

fn dns_error(server: SocketAddr, what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Dns(format!("{what} ({server}): {detail}"))
}

/// Sends `message` to `server` and reads the answer. With `signer`, the
/// message is TSIG-signed and a successful answer must carry a valid
/// signature (an error answer is returned for the caller to report).
pub async fn exchange(
    server: SocketAddr,
    mut message: Message,
    signer: Option<&TSigner>,
    timeout: Duration,
    what: &str,
) -> Result<Answer, Error> {
    let mut verifier = match signer {
        Some(signer) => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            message
                .finalize(signer, now)
                .map_err(|e| dns_error(server, what, format!("signing: {e}")))?
        }
        None => None,
    };
    let bytes = message
        .to_vec()
        .map_err(|e| dns_error(server, what, format!("encoding: {e}")))?;
    let len = u16::try_from(bytes.len())
        .map_err(|_| dns_error(server, what, "message over 65535 bytes"))?;
    let response = tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(server).await?;
        stream.set_nodelay(true)?;
        let mut out = Vec::with_capacity(bytes.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&bytes);
        stream.write_all(&out).await?;
        let answer_len = stream.read_u16().await?;
        let mut answer = vec![0; usize::from(answer_len)];
        stream.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    })
    .await
    .map_err(|_| dns_error(server, what, format!("no answer within {timeout:?}")))?
    .map_err(|e| dns_error(server, what, e))?;
    let answer = Message::from_vec(&response)
        .map_err(|e| dns_error(server, what, format!("malformed answer: {e}")))?;
    if answer.metadata.id != message.metadata.id {
        return Err(dns_error(server, what, "answer to another message"));
    }
    if answer.metadata.response_code == ResponseCode::NoError
        && let Some(verifier) = verifier.as_mut()
    {
        verifier.verify(&response).map_err(|e| {
            dns_error(
                server,
                what,
                format!("the answer's TSIG signature does not verify: {e}"),
            )
        })?;
    }
    Ok(Answer { message: answer })
}
