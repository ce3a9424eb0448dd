//! The test host itself: it must refuse a module importing something it does
//! not implement, and trap when the filter calls an SDK import it must not need,
//! so a passing filter test cannot hide an unexpected host dependency.

use acme_tests::proxy_wasm_host::{Process, Vm};
use wasmtime::{Engine, Module};

#[test]
fn unknown_import_is_refused_at_load() {
    let engine = Engine::default();
    let module = Module::new(
        &engine,
        r#"(module
             (import "env" "proxy_get_configuration" (func (param i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "_initialize"))
             (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    let err = match Vm::load(&engine, &module, Process::new(0, &[])) {
        Ok(_) => panic!("a module with an unknown import loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("env::proxy_get_configuration"), "{err}");
}

#[test]
fn sdk_import_the_filter_must_not_need_traps_when_called() {
    let engine = Engine::default();
    let module = Module::new(
        &engine,
        r#"(module
             (import "env" "proxy_grpc_call"
               (func $grpc (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "_initialize")
               (drop (call $grpc (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                                 (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                                 (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))))
             (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    let err = match Vm::load(&engine, &module, Process::new(0, &[])) {
        Ok(_) => panic!("calling proxy_grpc_call did not trap"),
        Err(e) => format!("{e:?}"),
    };
    assert!(err.contains("proxy_grpc_call"), "{err}");
}
