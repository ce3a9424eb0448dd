//! The floor for any answer from a proxy-wasm filter, used by the benchmark
//! (`scripts/bench.sh`) next to the real filter and Envoy's `direct_response`:
//! it answers every request with its plugin configuration as the body and the
//! filter's headers, with one host call and no lookup, so what it costs over `direct_response` is
//! what entering the VM for a request costs, whatever the filter does.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Floor { body: Rc::new(Vec::new()) })
    });
}}

struct Floor {
    body: Rc<Vec<u8>>,
}

impl Context for Floor {}

impl RootContext for Floor {
    fn on_configure(&mut self, _: usize) -> bool {
        let body = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX);
        self.body = Rc::new(body.ok().flatten().unwrap_or_default());
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Answer {
            body: Rc::clone(&self.body),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Answer {
    body: Rc<Vec<u8>>,
}

impl Context for Answer {}

impl HttpContext for Answer {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        // The same headers as the filter's answer.
        let headers = vec![
            ("content-type", "text/plain"),
            ("cache-control", "no-store"),
        ];
        let _ = hostcalls::send_http_response(200, headers, Some(&self.body));
        Action::Pause
    }
}
