//! Inputs that are not runnable components get clear errors.

use gust_host::runtime::LoadError;
use gust_test_artifacts as artifacts;
use sha2::{Digest, Sha256};

use super::runtime;

#[test]
fn an_empty_file() {
    let (rt, _dir) = runtime();
    let err = rt.load(&[]).unwrap_err();
    assert!(matches!(err, LoadError::Empty), "{err:?}");
    assert!(err.to_string().contains("empty"));
}

#[test]
fn random_bytes() {
    let (rt, _dir) = runtime();
    let mut bytes = Vec::new();
    let mut block = Sha256::digest(b"gust random bytes").to_vec();
    while bytes.len() < 4096 {
        bytes.extend_from_slice(&block);
        block = Sha256::digest(&block).to_vec();
    }
    let err = rt.load(&bytes).unwrap_err();
    assert!(matches!(err, LoadError::NotWasm), "{err:?}");
    assert!(err.to_string().contains("not a WebAssembly binary"));

    // The right magic with garbage after it is caught by validation.
    let mut garbage = b"\0asm\x0d\0\x01\0".to_vec();
    garbage.extend_from_slice(&bytes);
    let err = rt.load(&garbage).unwrap_err();
    assert!(matches!(err, LoadError::Invalid(_)), "{err:?}");
}

#[test]
fn a_core_module_is_not_a_component() {
    let (rt, _dir) = runtime();
    let module = wat::parse_str(r#"(module (func (export "handle")))"#).unwrap();
    let err = rt.load(&module).unwrap_err();
    assert!(matches!(err, LoadError::CoreModule), "{err:?}");
    assert!(
        err.to_string()
            .contains("core WebAssembly module, not a component")
    );
}

#[test]
fn unsatisfied_imports_are_all_listed() {
    let (rt, _dir) = runtime();
    let component = wat::parse_str(
        r#"(component
            (import "acme:storage/kv@1.0.0" (instance (export "get" (func))))
            (import "wasi:random/random@0.2.0" (instance
                (export "get-random-u64" (func (result u64)))))
            (import "wasi:keyvalue/store@0.2.0" (instance (export "f" (func)))))"#,
    )
    .unwrap();
    let err = rt.load(&component).unwrap_err();
    let LoadError::UnsatisfiedImports { imports, .. } = &err else {
        panic!("expected unsatisfied imports, got {err:?}")
    };
    assert_eq!(
        imports,
        &["acme:storage/kv@1.0.0", "wasi:keyvalue/store@0.2.0"]
    );
    assert!(
        err.to_string()
            .contains("acme:storage/kv@1.0.0, wasi:keyvalue/store@0.2.0")
    );
}

#[test]
fn a_component_without_the_handler_export() {
    let (rt, _dir) = runtime();
    let component = wat::parse_str(
        r#"(component
            (core module $m (func (export "f")))
            (core instance $i (instantiate $m))
            (func (export "something-else") (canon lift (core func $i "f"))))"#,
    )
    .unwrap();
    let err = rt.load(&component).unwrap_err();
    let LoadError::MissingExport { exports } = &err else {
        panic!("expected a missing export, got {err:?}")
    };
    assert_eq!(exports, &["something-else"]);
    assert!(err.to_string().contains("gust:function/handler@0.1.0"));
}

#[test]
fn every_example_imports_only_what_the_host_provides() {
    let (rt, _dir) = runtime();
    for (name, path) in artifacts::EXAMPLES {
        let bytes = std::fs::read(path).unwrap();
        let loaded = rt.load(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        for import in loaded.imports() {
            assert!(
                gust_host::runtime::is_provided(import),
                "{name} imports {import}"
            );
        }
    }
}

#[test]
fn every_fixture_loads_with_its_world() {
    let (rt, _dir) = runtime();
    for (name, path) in artifacts::FIXTURES {
        let bytes = std::fs::read(path).unwrap();
        let loaded = rt.load(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let world = match *name {
            "http_hello" | "hostile_http" => "http",
            "http_p3" => "http-p3",
            _ => "handler",
        };
        assert_eq!(loaded.world().as_str(), world, "{name}");
        let uses_gpu = loaded.imports().iter().any(|i| i.starts_with("gust:gpu"));
        assert_eq!(
            uses_gpu,
            matches!(*name, "tensors" | "models" | "hostile"),
            "{name}: only a function that calls the bridge imports it: {:?}",
            loaded.imports()
        );
        // The list that explains unsatisfied imports names everything
        // the linker gave this component.
        for import in loaded.imports() {
            assert!(
                gust_host::runtime::is_provided(import),
                "{name} imports {import}, which the host links, but the list of provided interfaces lacks it"
            );
        }
        let uses_kv = loaded
            .imports()
            .iter()
            .any(|i| i.starts_with("wasi:keyvalue"));
        let uses_config = loaded
            .imports()
            .iter()
            .any(|i| i.starts_with("wasi:config"));
        assert_eq!(
            (uses_kv, uses_config),
            (*name == "kv_config", *name == "kv_config"),
            "{name}"
        );
        let uses_nn = loaded.imports().iter().any(|i| i.starts_with("wasi:nn"));
        assert_eq!(
            uses_nn,
            matches!(*name, "wasi_nn" | "hostile"),
            "{name}: {:?}",
            loaded.imports()
        );
    }
}
