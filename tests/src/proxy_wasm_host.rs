//! A proxy-wasm (ABI 0.2.1) host on wasmtime that runs the built filter the way
//! Envoy does: `_initialize`, then per root context `proxy_on_context_create`,
//! `proxy_on_vm_start`, `proxy_on_configure`, ticks and HTTP call responses; per
//! request a short-lived HTTP context.
//!
//! Several [`Vm`]s may share one [`Process`], as Envoy's workers do: shared data
//! and metrics are process-wide, everything else is per VM. Time is the test's:
//! it moves only when the test advances the [`Process`] clock.
//!
//! The host implements the imports the filter needs with Envoy's semantics
//! (CAS only checked for existing keys, zero-size results returned as a null
//! pointer, `BadArgument` for an unknown cluster, metric ids shared by name).
//! Imports the proxy-wasm SDK declares but the filter must never call are
//! linked to functions that trap, so calling one fails the test; any other
//! import makes loading fail.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use wasmtime::{Caller, Engine, Extern, Instance, Linker, Memory, Module, Store, TypedFunc};
use wasmtime::{Result, bail, format_err as anyhow};

/// Proxy-wasm status codes (ABI 0.2.1).
mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const CAS_MISMATCH: i32 = 8;
}

/// SDK imports the filter has no business calling: linked to a trap.
const TRAPPING_IMPORTS: &[&str] = &[
    "proxy_add_header_map_value",
    "proxy_call_foreign_function",
    "proxy_close_stream",
    "proxy_continue_stream",
    "proxy_dequeue_shared_queue",
    "proxy_done",
    "proxy_enqueue_shared_queue",
    "proxy_get_metric",
    "proxy_get_property",
    "proxy_get_status",
    "proxy_grpc_call",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_grpc_send",
    "proxy_grpc_stream",
    "proxy_register_shared_queue",
    "proxy_remove_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_resolve_shared_queue",
    "proxy_set_buffer_bytes",
    "proxy_set_header_map_pairs",
    "proxy_set_property",
    "proxy_get_log_level",
];

/// What Envoy calls a metric's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Default)]
struct Metrics {
    ids: BTreeMap<String, u32>,
    values: HashMap<u32, (MetricKind, i64)>,
}

#[derive(Debug, Default)]
struct SharedData {
    map: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

/// What every VM of one Envoy process shares: shared data, metrics, the clock.
#[derive(Debug, Default)]
pub struct Process {
    shared: Mutex<SharedData>,
    metrics: Mutex<Metrics>,
    now_ms: AtomicU64,
    /// Clusters `dispatch_http_call` accepts; others get `BadArgument` like Envoy.
    clusters: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Process {
    /// A process whose clock starts at `start_ms` and which knows `clusters`.
    pub fn new(start_ms: u64, clusters: &[&str]) -> Arc<Self> {
        let p = Self::default();
        p.now_ms.store(start_ms, Ordering::SeqCst);
        *lock(&p.clusters) = clusters.iter().map(|c| (*c).to_owned()).collect();
        Arc::new(p)
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    pub fn advance_ms(&self, ms: u64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// A shared data value; `None` when absent.
    pub fn shared_data(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.shared).map.get(key).map(|(v, _)| v.clone())
    }

    /// Every key with a non-empty value (empty stands for absent in proxy-wasm).
    pub fn shared_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = lock(&self.shared)
            .map
            .iter()
            .filter(|(_, (v, _))| !v.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }

    /// Writes shared data as another VM of the process would.
    pub fn set_shared_data(&self, key: &str, value: &[u8]) {
        let mut shared = lock(&self.shared);
        shared.next_cas += 1;
        let cas = shared.next_cas;
        shared.map.insert(key.to_owned(), (value.to_vec(), cas));
    }

    /// A metric's value by the name the filter defined it with.
    pub fn metric(&self, name: &str) -> Option<i64> {
        let metrics = lock(&self.metrics);
        let id = metrics.ids.get(name)?;
        metrics.values.get(id).map(|(_, v)| *v)
    }

    /// All metrics defined so far, with kind and value.
    pub fn metrics(&self) -> BTreeMap<String, (MetricKind, i64)> {
        let metrics = lock(&self.metrics);
        metrics
            .ids
            .iter()
            .filter_map(|(name, id)| Some((name.clone(), *metrics.values.get(id)?)))
            .collect()
    }
}

/// A response the filter sent with `send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl LocalResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP call the filter dispatched and that awaits a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub root_context: u32,
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub timeout_ms: u32,
}

impl HttpCall {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a request did: continued down the chain, or answered locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    Continue,
    Answered(LocalResponse),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub level: i32,
    pub message: &'a str,
}

/// Headers and body of the HTTP call response being delivered.
type CallResponse = (Vec<(String, String)>, Vec<u8>);

#[derive(Default)]
struct VmState {
    process: Arc<Process>,
    /// Context whose callback is running.
    effective: u32,
    /// Root context of each context (a root is its own root).
    root_of: HashMap<u32, u32>,
    plugin_config: HashMap<u32, Vec<u8>>,
    tick_period_ms: HashMap<u32, u32>,
    request_headers: HashMap<u32, Vec<(String, Vec<u8>)>>,
    local_response: HashMap<u32, LocalResponse>,
    call_response: Option<CallResponse>,
    pending_calls: Vec<HttpCall>,
    next_token: u32,
    logs: Vec<(i32, String)>,
    /// Host functions called, by name, so tests can assert what a path touched.
    calls: Vec<&'static str>,
}

/// One Wasm VM running the filter: one Envoy worker thread.
pub struct Vm {
    store: Store<VmState>,
    instance: Instance,
    next_context: u32,
}

type Ctx<'a> = Caller<'a, VmState>;

fn memory(caller: &mut Ctx<'_>) -> Result<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => bail!("the module exports no memory"),
    }
}

fn read(caller: &mut Ctx<'_>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    let mem = memory(caller)?;
    let start = usize::try_from(ptr)?;
    let end = start + usize::try_from(len)?;
    mem.data(&caller)
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| anyhow!("read out of bounds: {start}..{end}"))
}

fn read_str(caller: &mut Ctx<'_>, ptr: i32, len: i32) -> Result<String> {
    Ok(String::from_utf8(read(caller, ptr, len)?)?)
}

fn write(caller: &mut Ctx<'_>, ptr: i32, bytes: &[u8]) -> Result<()> {
    let mem = memory(caller)?;
    mem.write(&mut *caller, usize::try_from(ptr)?, bytes)?;
    Ok(())
}

fn write_u32(caller: &mut Ctx<'_>, ptr: i32, value: u32) -> Result<()> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Envoy's `copyToPointerSize`: allocate in the module, copy, return pointer and
/// size; nothing allocated (null pointer) for an empty value.
fn return_bytes(caller: &mut Ctx<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> Result<()> {
    let mut ptr = 0u32;
    if !bytes.is_empty() {
        let alloc: TypedFunc<i32, i32> = caller
            .get_export("proxy_on_memory_allocate")
            .and_then(Extern::into_func)
            .ok_or_else(|| anyhow!("no proxy_on_memory_allocate export"))?
            .typed(&*caller)?;
        let len = i32::try_from(bytes.len())?;
        let p = alloc.call(&mut *caller, len)?;
        write(caller, p, bytes)?;
        ptr = u32::try_from(p)?;
    }
    write_u32(caller, ptr_ptr, ptr)?;
    write_u32(caller, size_ptr, u32::try_from(bytes.len())?)
}

/// Proxy-wasm's serialized header map: count, (key len, value len)*, then
/// NUL-terminated keys and values.
fn decode_pairs(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let word = |at: usize| -> Result<usize> {
        let b = bytes
            .get(at..at + 4)
            .ok_or_else(|| anyhow!("short header map"))?;
        Ok(u32::from_le_bytes(b.try_into()?) as usize)
    };
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let n = word(0)?;
    let mut at = 4 + 8 * n;
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        let (kl, vl) = (word(4 + 8 * i)?, word(8 + 8 * i)?);
        let k = bytes.get(at..at + kl).ok_or_else(|| anyhow!("short key"))?;
        at += kl + 1;
        let v = bytes
            .get(at..at + vl)
            .ok_or_else(|| anyhow!("short value"))?;
        at += vl + 1;
        pairs.push((
            String::from_utf8(k.to_vec())?,
            String::from_utf8(v.to_vec())?,
        ));
    }
    Ok(pairs)
}

/// The inverse of [`decode_pairs`], as Envoy serializes a header map.
pub fn encode_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let len = |n: usize| {
        u32::try_from(n)
            .expect("a header map under 4 GiB")
            .to_le_bytes()
    };
    let mut out = len(pairs.len()).to_vec();
    for (k, v) in pairs {
        out.extend(len(k.as_ref().len()));
        out.extend(len(v.as_ref().len()));
    }
    for (k, v) in pairs {
        out.extend(k.as_ref());
        out.push(0);
        out.extend(v.as_ref());
        out.push(0);
    }
    out
}

fn link(linker: &mut Linker<VmState>) -> Result<()> {
    link_headers(linker)?;
    link_bodies(linker)?;
    link_runtime(linker)?;
    link_shared_data(linker)?;
    link_metrics(linker)?;
    link_wasi(linker)?;
    Ok(())
}

/// Request headers.
fn link_headers(linker: &mut Linker<VmState>) -> Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Ctx<'_>, map: i32, ptr_ptr: i32, size_ptr: i32| -> Result<i32> {
            c.data_mut().calls.push("proxy_get_header_map_pairs");
            let state = c.data();
            let pairs = match map {
                0 => state
                    .request_headers
                    .get(&state.effective)
                    .ok_or_else(|| anyhow!("request headers read outside an HTTP context"))?,
                other => bail!("header map {other} is not read whole by the filter"),
            };
            let bytes = encode_pairs(pairs);
            return_bytes(&mut c, &bytes, ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Ctx<'_>,
         map: i32,
         kptr: i32,
         klen: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> Result<i32> {
            c.data_mut().calls.push("proxy_get_header_map_value");
            let key = read_str(&mut c, kptr, klen)?;
            let state = c.data();
            let value: Option<Vec<u8>> = match map {
                6 => state
                    .call_response
                    .as_ref()
                    .ok_or_else(|| anyhow!("call response read outside on_http_call_response"))?
                    .0
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(&key))
                    .map(|(_, v)| v.clone().into_bytes()),
                // Request headers are read whole (proxy_get_header_map_pairs).
                other => bail!("header map {other} is not read value by value by the filter"),
            };
            match value {
                Some(v) => {
                    return_bytes(&mut c, &v, ptr_ptr, size_ptr)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    Ok(())
}

/// Request bodies, and the local response the filter sends.
fn link_bodies(linker: &mut Linker<VmState>) -> Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Ctx<'_>,
         kind: i32,
         start: i32,
         max: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> Result<i32> {
            c.data_mut().calls.push("proxy_get_buffer_bytes");
            let state = c.data();
            let root = state
                .root_of
                .get(&state.effective)
                .copied()
                .unwrap_or(state.effective);
            let buffer = match kind {
                // VmConfiguration: none.
                6 => Vec::new(),
                // PluginConfiguration
                7 => state.plugin_config.get(&root).cloned().unwrap_or_default(),
                // HttpCallResponseBody
                4 => match &state.call_response {
                    Some((_, body)) => body.clone(),
                    None => return Ok(status::NOT_FOUND),
                },
                other => bail!("proxy_get_buffer_bytes({other}) is not used by the filter"),
            };
            let start = usize::try_from(start)?.min(buffer.len());
            let end = start
                .saturating_add(usize::try_from(max as u32)?)
                .min(buffer.len());
            let slice = buffer.get(start..end).unwrap_or_default().to_vec();
            return_bytes(&mut c, &slice, ptr_ptr, size_ptr)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Ctx<'_>,
         code: i32,
         _dptr: i32,
         _dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         _grpc: i32|
         -> Result<i32> {
            c.data_mut().calls.push("proxy_send_local_response");
            let body = read(&mut c, bptr, blen)?;
            let headers = decode_pairs(&read(&mut c, hptr, hlen)?)?;
            let ctx = c.data().effective;
            let previous = c.data_mut().local_response.insert(
                ctx,
                LocalResponse {
                    status: u32::try_from(code)?,
                    headers,
                    body,
                },
            );
            if previous.is_some() {
                bail!("context {ctx} sent two local responses");
            }
            Ok(status::OK)
        },
    )?;
    Ok(())
}

/// Logging, time, the tick and the effective context.
fn link_runtime(linker: &mut Linker<VmState>) -> Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Ctx<'_>, level: i32, ptr: i32, len: i32| -> Result<i32> {
            let message = read_str(&mut c, ptr, len)?;
            c.data_mut().calls.push("proxy_log");
            if std::env::var_os("PROXY_WASM_HOST_LOG").is_some() {
                eprintln!("[wasm {level}] {message}");
            }
            c.data_mut().logs.push((level, message));
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Ctx<'_>, ret: i32| -> Result<i32> {
            c.data_mut()
                .calls
                .push("proxy_get_current_time_nanoseconds");
            let nanos = c.data().process.now_ms() * 1_000_000;
            write(&mut c, ret, &nanos.to_le_bytes())?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Ctx<'_>, period: i32| -> Result<i32> {
            c.data_mut()
                .calls
                .push("proxy_set_tick_period_milliseconds");
            let root = c.data().effective;
            c.data_mut()
                .tick_period_ms
                .insert(root, u32::try_from(period)?);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Ctx<'_>, ctx: i32| -> Result<i32> {
            c.data_mut().calls.push("proxy_set_effective_context");
            let ctx = ctx as u32;
            if !c.data().root_of.contains_key(&ctx) {
                return Ok(status::BAD_ARGUMENT);
            }
            c.data_mut().effective = ctx;
            Ok(status::OK)
        },
    )?;
    Ok(())
}

/// Shared data and the HTTP callout: what the poller and the workers use.
fn link_shared_data(linker: &mut Linker<VmState>) -> Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Ctx<'_>,
         kptr: i32,
         klen: i32,
         ptr_ptr: i32,
         size_ptr: i32,
         cas_ptr: i32|
         -> Result<i32> {
            c.data_mut().calls.push("proxy_get_shared_data");
            let key = read_str(&mut c, kptr, klen)?;
            let found = lock(&c.data().process.shared).map.get(&key).cloned();
            match found {
                Some((value, cas)) => {
                    return_bytes(&mut c, &value, ptr_ptr, size_ptr)?;
                    write_u32(&mut c, cas_ptr, cas)?;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Ctx<'_>, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| -> Result<i32> {
            c.data_mut().calls.push("proxy_set_shared_data");
            let key = read_str(&mut c, kptr, klen)?;
            let value = read(&mut c, vptr, vlen)?;
            let process = Arc::clone(&c.data().process);
            let mut shared = lock(&process.shared);
            let cas = cas as u32;
            if let Some((_, have)) = shared.map.get(&key)
                && cas != 0
                && cas != *have
            {
                return Ok(status::CAS_MISMATCH);
            }
            shared.next_cas += 1;
            let next = shared.next_cas;
            shared.map.insert(key, (value, next));
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Ctx<'_>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         _bptr: i32,
         blen: i32,
         _tptr: i32,
         _tlen: i32,
         timeout: i32,
         token_ptr: i32|
         -> Result<i32> {
            c.data_mut().calls.push("proxy_http_call");
            let cluster = read_str(&mut c, uptr, ulen)?;
            if blen != 0 {
                bail!("the sync request must not have a body");
            }
            if !lock(&c.data().process.clusters).contains(&cluster) {
                return Ok(status::BAD_ARGUMENT);
            }
            let headers = decode_pairs(&read(&mut c, hptr, hlen)?)?;
            let state = c.data_mut();
            state.next_token += 1;
            let token = state.next_token;
            let root = state.effective;
            state.pending_calls.push(HttpCall {
                root_context: root,
                token,
                cluster,
                headers,
                timeout_ms: timeout as u32,
            });
            write_u32(&mut c, token_ptr, token)?;
            Ok(status::OK)
        },
    )?;
    Ok(())
}

/// Metrics the filter defines and moves.
fn link_metrics(linker: &mut Linker<VmState>) -> Result<()> {
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Ctx<'_>, kind: i32, nptr: i32, nlen: i32, id_ptr: i32| -> Result<i32> {
            c.data_mut().calls.push("proxy_define_metric");
            let name = read_str(&mut c, nptr, nlen)?;
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return Ok(status::BAD_ARGUMENT),
            };
            let id = {
                let process = Arc::clone(&c.data().process);
                let mut metrics = lock(&process.metrics);
                let next = u32::try_from(metrics.ids.len())? + 1;
                let id = *metrics.ids.entry(name).or_insert(next);
                metrics.values.entry(id).or_insert((kind, 0));
                id
            };
            write_u32(&mut c, id_ptr, id)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: Ctx<'_>, id: i32, offset: i64| -> Result<i32> {
            c.data_mut().calls.push("proxy_increment_metric");
            let mut metrics = lock(&c.data().process.metrics);
            match metrics.values.get_mut(&(id as u32)) {
                Some((MetricKind::Histogram, _)) => Ok(status::BAD_ARGUMENT),
                Some((_, v)) => {
                    *v += offset;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: Ctx<'_>, id: i32, value: i64| -> Result<i32> {
            c.data_mut().calls.push("proxy_record_metric");
            let mut metrics = lock(&c.data().process.metrics);
            match metrics.values.get_mut(&(id as u32)) {
                Some((MetricKind::Counter, _)) => Ok(status::BAD_ARGUMENT),
                Some((_, v)) => {
                    *v = value;
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    Ok(())
}

/// WASI, as much as Rust's std on wasip1 uses.
fn link_wasi(linker: &mut Linker<VmState>) -> Result<()> {
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "random_get",
        |mut c: Ctx<'_>, ptr: i32, len: i32| -> Result<i32> {
            let mut buf = vec![0u8; usize::try_from(len)?];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
            write(&mut c, ptr, &buf)?;
            Ok(0)
        },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "environ_sizes_get",
        |mut c: Ctx<'_>, count_ptr: i32, size_ptr: i32| -> Result<i32> {
            write_u32(&mut c, count_ptr, 0)?;
            write_u32(&mut c, size_ptr, 0)?;
            Ok(0)
        },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "environ_get",
        |_c: Ctx<'_>, _env: i32, _buf: i32| -> Result<i32> { Ok(0) },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "fd_write",
        |mut c: Ctx<'_>, _fd: i32, iovs: i32, iovs_len: i32, nwritten: i32| -> Result<i32> {
            let mut total = 0u32;
            let mut text = Vec::new();
            for i in 0..iovs_len {
                let iov = read(&mut c, iovs + 8 * i, 8)?;
                let ptr = i32::from_le_bytes(iov[0..4].try_into()?);
                let len = i32::from_le_bytes(iov[4..8].try_into()?);
                text.extend(read(&mut c, ptr, len)?);
                total += len as u32;
            }
            c.data_mut()
                .logs
                .push((-1, String::from_utf8_lossy(&text).into_owned()));
            write_u32(&mut c, nwritten, total)?;
            Ok(0)
        },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "proc_exit",
        |_c: Ctx<'_>, code: i32| -> Result<()> { bail!("the filter called proc_exit({code})") },
    )?;
    Ok(())
}

/// Checks every import of `module` is one the host provides or traps on.
fn link_module(engine: &Engine, module: &Module) -> Result<Linker<VmState>> {
    let mut linker = Linker::new(engine);
    link(&mut linker)?;
    let mut unknown = Vec::new();
    for import in module.imports() {
        if linker
            .get_by_import(&mut Store::new(engine, VmState::default()), &import)
            .is_some()
        {
            continue;
        }
        let name = import.name().to_owned();
        if import.module() == "env" && TRAPPING_IMPORTS.contains(&name.as_str()) {
            let ty = import
                .ty()
                .func()
                .cloned()
                .ok_or_else(|| anyhow!("{name} is not a function"))?;
            let trap_name = name.clone();
            linker.func_new("env", &name, ty, move |_c, _args, _results| {
                bail!("the filter called {trap_name}, which it must not need")
            })?;
        } else {
            unknown.push(format!("{}::{}", import.module(), name));
        }
    }
    if !unknown.is_empty() {
        bail!(
            "the test host does not implement these imports: {}",
            unknown.join(", ")
        );
    }
    Ok(linker)
}

impl Vm {
    /// Loads a compiled filter into a new VM of `process`, runs `_initialize`.
    pub fn load(engine: &Engine, module: &Module, process: Arc<Process>) -> Result<Self> {
        let linker = link_module(engine, module)?;
        let mut store = Store::new(
            engine,
            VmState {
                process,
                ..VmState::default()
            },
        );
        let instance = linker.instantiate(&mut store, module)?;
        if instance
            .get_func(&mut store, "proxy_abi_version_0_2_1")
            .is_none()
        {
            bail!("the module does not export proxy_abi_version_0_2_1");
        }
        let init: TypedFunc<(), ()> = instance.get_typed_func(&mut store, "_initialize")?;
        init.call(&mut store, ())?;
        Ok(Self {
            store,
            instance,
            next_context: 1,
        })
    }

    /// Compiles the `.wasm` at `path`.
    pub fn compile(engine: &Engine, path: &Path) -> Result<Module> {
        Module::from_file(engine, path).map_err(|e| anyhow!("compiling {}: {e}", path.display()))
    }

    fn func<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        name: &str,
    ) -> Result<TypedFunc<P, R>> {
        self.instance.get_typed_func(&mut self.store, name)
    }

    fn context_id(&mut self) -> u32 {
        let id = self.next_context;
        self.next_context += 1;
        id
    }

    /// Creates a root context and configures it, as Envoy does for a plugin:
    /// returns its id and what `proxy_on_configure` answered.
    pub fn start_root(&mut self, plugin_config: &[u8]) -> Result<(u32, bool)> {
        let root = self.context_id();
        let state = self.store.data_mut();
        state.root_of.insert(root, root);
        state.plugin_config.insert(root, plugin_config.to_vec());
        state.effective = root;
        let i32_len = |n: usize| i32::try_from(n);
        self.func::<(i32, i32), ()>("proxy_on_context_create")?
            .call(&mut self.store, (root as i32, 0))?;
        let started = self
            .func::<(i32, i32), i32>("proxy_on_vm_start")?
            .call(&mut self.store, (root as i32, 0))?;
        if started == 0 {
            bail!("proxy_on_vm_start returned false");
        }
        let configured = self.func::<(i32, i32), i32>("proxy_on_configure")?.call(
            &mut self.store,
            (root as i32, i32_len(plugin_config.len())?),
        )?;
        Ok((root, configured != 0))
    }

    /// Fires one tick of `root`, as Envoy's timer would.
    pub fn tick(&mut self, root: u32) -> Result<()> {
        self.store.data_mut().effective = root;
        self.func::<i32, ()>("proxy_on_tick")?
            .call(&mut self.store, root as i32)
    }

    /// The tick period `root` asked for, if any.
    pub fn tick_period_ms(&self, root: u32) -> Option<u32> {
        self.store.data().tick_period_ms.get(&root).copied()
    }

    /// Runs one request's headers through a fresh HTTP context of `root`.
    pub fn request(&mut self, root: u32, headers: &[(&str, &str)]) -> Result<RequestOutcome> {
        let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        self.request_bytes(root, &raw)
    }

    /// Like [`Vm::request`], with header values that need not be UTF-8.
    pub fn request_bytes(
        &mut self,
        root: u32,
        headers: &[(&str, &[u8])],
    ) -> Result<RequestOutcome> {
        let ctx = self.context_id();
        let state = self.store.data_mut();
        state.root_of.insert(ctx, root);
        state.request_headers.insert(
            ctx,
            headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
                .collect(),
        );
        state.effective = ctx;
        self.func::<(i32, i32), ()>("proxy_on_context_create")?
            .call(&mut self.store, (ctx as i32, root as i32))?;
        let action = self
            .func::<(i32, i32, i32), i32>("proxy_on_request_headers")?
            .call(
                &mut self.store,
                (ctx as i32, i32::try_from(headers.len())?, 1),
            )?;
        self.func::<i32, i32>("proxy_on_done")?
            .call(&mut self.store, ctx as i32)?;
        // Envoy calls a callback only if the module exports it.
        if let Ok(on_log) = self.func::<i32, ()>("proxy_on_log") {
            on_log.call(&mut self.store, ctx as i32)?;
        }
        self.func::<i32, ()>("proxy_on_delete")?
            .call(&mut self.store, ctx as i32)?;
        let state = self.store.data_mut();
        state.request_headers.remove(&ctx);
        state.root_of.remove(&ctx);
        let response = state.local_response.remove(&ctx);
        match (action, response) {
            // Action::Continue
            (0, None) => Ok(RequestOutcome::Continue),
            // Action::Pause with a local response
            (1, Some(r)) => Ok(RequestOutcome::Answered(r)),
            (a, r) => bail!("inconsistent request handling: action {a}, local response {r:?}"),
        }
    }

    /// HTTP calls dispatched since the last time this was asked.
    pub fn take_http_calls(&mut self) -> Vec<HttpCall> {
        std::mem::take(&mut self.store.data_mut().pending_calls)
    }

    /// Delivers the response to `call`: `Some((status, body))`, or `None` for a
    /// call that failed without a response (connection refused, timeout), which
    /// Envoy reports as a response with no headers.
    pub fn respond(&mut self, call: &HttpCall, response: Option<(u16, &[u8])>) -> Result<()> {
        let (headers, body) = match response {
            Some((status, body)) => (
                vec![
                    (":status".to_owned(), status.to_string()),
                    ("content-length".to_owned(), body.len().to_string()),
                ],
                body.to_vec(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let (n_headers, n_body) = (i32::try_from(headers.len())?, i32::try_from(body.len())?);
        let state = self.store.data_mut();
        state.call_response = Some((headers, body));
        state.effective = call.root_context;
        let result = self
            .func::<(i32, i32, i32, i32, i32), ()>("proxy_on_http_call_response")?
            .call(
                &mut self.store,
                (
                    call.root_context as i32,
                    call.token as i32,
                    n_headers,
                    n_body,
                    0,
                ),
            );
        self.store.data_mut().call_response = None;
        result
    }

    /// Ends a root context, as Envoy does when a worker's VM goes away.
    pub fn stop_root(&mut self, root: u32) -> Result<()> {
        self.store.data_mut().effective = root;
        self.func::<i32, i32>("proxy_on_done")?
            .call(&mut self.store, root as i32)?;
        self.func::<i32, ()>("proxy_on_delete")?
            .call(&mut self.store, root as i32)
    }

    /// Log lines the filter wrote, with proxy-wasm levels (2 info, 3 warn, 4 error).
    pub fn logs(&self) -> Vec<LogLine<'_>> {
        self.store
            .data()
            .logs
            .iter()
            .map(|(level, message)| LogLine {
                level: *level,
                message,
            })
            .collect()
    }

    pub fn clear_logs(&mut self) {
        self.store.data_mut().logs.clear();
    }

    /// Host functions called since the last time this was asked, in order.
    pub fn take_host_calls(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.store.data_mut().calls)
    }
}
