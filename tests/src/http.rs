//! Just enough HTTP/1.1 over loopback for tests: a blocking client that controls
//! every byte it sends (method, Host), and a thread-per-connection server.
//! Servers stop when dropped; every socket has a timeout so nothing hangs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A header's value by case-insensitive name.
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A parsed request, as a server handler sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// A query parameter's raw value.
    pub fn query(&self, name: &str) -> Option<&str> {
        let (_, query) = self.path.split_once('?')?;
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// A start line and its lower-cased headers.
type Head = (String, Vec<(String, String)>);

fn read_head(reader: &mut impl BufRead) -> Result<Option<Head>> {
    let mut first = String::new();
    if reader.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed inside the header block");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| anyhow!("bad header line {line:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Some((first.trim_end().to_owned(), headers)))
}

fn content_length(headers: &[(String, String)]) -> Option<usize> {
    headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)?;
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk)?;
        chunk.truncate(size);
        body.extend(chunk);
        if size == 0 {
            return Ok(body);
        }
    }
}

/// Reads one response from `reader`; `head` says the request was HEAD (no body).
pub fn read_response(reader: &mut impl BufRead, head: bool) -> Result<Response> {
    let (status_line, headers) =
        read_head(reader)?.ok_or_else(|| anyhow!("connection closed before a response"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?
        .parse()?;
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if head || status == 304 || status == 204 {
        Vec::new()
    } else if chunked {
        read_chunked(reader)?
    } else if let Some(len) = content_length(&headers) {
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        body
    } else {
        let mut body = Vec::new();
        reader.read_to_end(&mut body)?;
        body
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// One request on a new connection (`connection: close`).
pub fn request(addr: SocketAddr, method: &str, path: &str, host: &str) -> Result<Response> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut conn = Connection {
        reader: BufReader::new(stream),
    };
    conn.send(method, path, host, true)
}

pub fn get(addr: SocketAddr, path: &str, host: &str) -> Result<Response> {
    request(addr, "GET", path, host)
}

/// A keep-alive connection for several requests in a row.
pub struct Connection {
    reader: BufReader<TcpStream>,
}

impl Connection {
    pub fn open(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    pub fn send(&mut self, method: &str, path: &str, host: &str, close: bool) -> Result<Response> {
        let connection = if close { "close" } else { "keep-alive" };
        // One write: `write!` on the socket would send each piece as its own
        // segment, and Nagle plus delayed ACKs would add ~40 ms per request.
        let request =
            format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: {connection}\r\n\r\n");
        self.reader.get_mut().write_all(request.as_bytes())?;
        read_response(&mut self.reader, method == "HEAD")
    }
}

/// What a handler answers: status, extra headers, body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A loopback HTTP/1.1 server; each connection gets a thread, each request the
/// handler. Stops accepting when dropped.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, handler)
    }

    /// Starts on a given address (e.g. to come back on the same port).
    pub fn start_on(
        addr: SocketAddr,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let accept_stop = Arc::clone(&stop);
        let accept = std::thread::spawn(move || {
            while !accept_stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let handler = Arc::clone(&handler);
                        let stop = Arc::clone(&accept_stop);
                        std::thread::spawn(move || {
                            let _ = serve_connection(stream, &*handler, &stop);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve_connection(stream: TcpStream, handler: &Handler, stop: &AtomicBool) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        // Wait for the next request, noticing a stop between requests.
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            match reader.fill_buf() {
                Ok([]) => return Ok(()),
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        writer.set_read_timeout(Some(IO_TIMEOUT))?;
        let Some((line, headers)) = read_head(&mut reader)? else {
            return Ok(());
        };
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let body = if chunked {
            read_chunked(&mut reader)?
        } else if let Some(len) = content_length(&headers) {
            let mut body = vec![0; len];
            reader.read_exact(&mut body)?;
            body
        } else {
            Vec::new()
        };
        let close = headers
            .iter()
            .any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("close"));
        let request = Request {
            method,
            path,
            headers,
            body,
        };
        let reply = handler(&request);
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut head = format!("HTTP/1.1 {} X\r\n", reply.status);
        for (n, v) in &reply.headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        if reply.status != 304 {
            head.push_str(&format!("content-length: {}\r\n", reply.body.len()));
        }
        head.push_str("\r\n");
        // One write: head and body in separate segments would meet Nagle and
        // delayed ACK and add 40 ms to every response.
        let mut message = head.into_bytes();
        if request.method != "HEAD" && reply.status != 304 {
            message.extend_from_slice(&reply.body);
        }
        writer.write_all(&message)?;
        writer.flush()?;
        if close {
            return Ok(());
        }
        writer.set_read_timeout(Some(Duration::from_millis(200)))?;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// A free loopback port (bound and released; the OS does not hand it out again at once).
/// A loopback port for a server a test starts, from a process-wide counter
/// below the kernel's ephemeral range (32768 and up here), so neither another
/// test of this process nor an outgoing connection can have taken it between
/// this call and the server's bind. Ports that are taken are skipped.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const LAST: u16 = 32_000;
    // Start where the previous test process most likely did not.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        FIRST + (std::process::id() % 200) as u16 * 50,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..(LAST - FIRST) {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = if port >= LAST {
            NEXT.store(FIRST + 1, Ordering::SeqCst);
            FIRST
        } else {
            port
        };
        // Free for TCP, and for UDP too (pebble-challtestsrv's DNS uses both).
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port between {FIRST} and {LAST}")
}
