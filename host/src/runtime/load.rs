//! Loading: validating a component's bytes, compiling them (or taking the
//! verified artifact from the compiled cache), detecting the world it
//! targets and pre-instantiating it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use wasmtime::component::Component;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use super::bindings::PlatformPre;
use super::cache::Lookup;
use super::engine::Side;
use super::imports;
use super::reuse::Instance;
use super::state::CallState;
use super::{Digest, Runtime};

/// Interface a component must export to be invoked as a handler.
pub const HANDLER_EXPORT: &str = "gust:function/handler@0.1.0";
/// Interface a component exports to serve HTTP (`wasi:http/proxy`).
pub const HTTP_EXPORT_PREFIX: &str = "wasi:http/incoming-handler@";
/// Interface a WASI 0.3 component exports to serve HTTP
/// (`wasi:http/service`).
pub const HTTP_P3_EXPORT_PREFIX: &str = "wasi:http/handler@0.3";
/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Zero bytes.
    #[error("the file is empty; expected a WebAssembly component")]
    Empty,
    /// Not WebAssembly at all.
    #[error("not a WebAssembly binary (no `\\0asm` header); expected a WebAssembly component")]
    NotWasm,
    /// A core module, not a component.
    #[error(
        "this is a core WebAssembly module, not a component; build for `wasm32-wasip2` or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    /// The binary failed validation or compilation.
    #[error("invalid component: {0:#}")]
    Invalid(#[source] wasmtime::Error),
    /// The component imports interfaces the host does not provide.
    #[error("the component imports what this host does not provide: {}", .imports.join(", "))]
    UnsatisfiedImports {
        /// The unsatisfied import names.
        imports: Vec<String>,
        /// Wasmtime's own explanation (the first failure it found).
        #[source]
        detail: wasmtime::Error,
    },
    /// The component does not export a world the host can run.
    #[error(
        "the component exports neither `{HANDLER_EXPORT}` nor `wasi:http/incoming-handler` (WASI 0.2) nor `wasi:http/handler` (WASI 0.3); it exports: {}",
        if .exports.is_empty() { "nothing".to_owned() } else { .exports.join(", ") }
    )]
    MissingExport {
        /// What it does export.
        exports: Vec<String>,
    },
    /// It exports the handler interface, but with the wrong types.
    #[error("the component's `{HANDLER_EXPORT}` export does not match the contract: {0:#}")]
    ExportMismatch(#[source] wasmtime::Error),
}

/// The world a loaded component targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum World {
    /// Exports `gust:function/handler`.
    Handler,
    /// Exports `wasi:http/incoming-handler` (WASI 0.2).
    Http,
    /// Exports `wasi:http/handler` (WASI 0.3, the component model's async).
    HttpP3,
}

impl World {
    /// The world's name as the API reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handler => "handler",
            Self::Http => "http",
            Self::HttpP3 => "http-p3",
        }
    }
}

/// How a component was obtained by [`Runtime::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSource {
    /// Compiled now (and written to the cache).
    Compiled,
    /// Deserialized from the cache.
    Cache,
}

#[derive(Clone)]
pub(super) enum Prepared {
    Handler(PlatformPre<CallState>),
    // Served by the HTTP front end, which arrives with the server.
    Http(ProxyPre<CallState>),
    HttpP3(ServicePre<CallState>),
}

impl Prepared {
    /// A new instance in `store`, of whichever world the component is.
    pub(super) async fn instantiate(
        &self,
        store: &mut wasmtime::Store<CallState>,
    ) -> wasmtime::Result<Instance> {
        Ok(match self {
            Self::Handler(pre) => Instance::Handler(pre.instantiate_async(store).await?),
            Self::Http(pre) => Instance::Http(pre.instantiate_async(store).await?),
            Self::HttpP3(pre) => Instance::HttpP3(pre.instantiate_async(store).await?),
        })
    }
}

/// A validated, compiled, pre-instantiated component, ready to invoke.
/// Cheap to clone; share it across calls.
#[derive(Clone)]
pub struct LoadedComponent {
    pub(super) inner: Arc<LoadedInner>,
}

pub(super) struct LoadedInner {
    digest: Digest,
    pub(super) prepared: Prepared,
    source: LoadSource,
    imports: Vec<String>,
    /// The quickest instantiation on a call's path so far, in nanoseconds
    /// (`u64::MAX` until one): whether making instances ahead pays. The
    /// quickest, because a loaded machine only ever makes it slower than
    /// the component's own cost.
    pub(super) instantiate_nanos: std::sync::atomic::AtomicU64,
}

impl LoadedComponent {
    /// The sha256 of the component's bytes.
    pub fn digest(&self) -> Digest {
        self.inner.digest
    }

    /// The world it targets.
    pub fn world(&self) -> World {
        match self.inner.prepared {
            Prepared::Handler(_) => World::Handler,
            Prepared::Http(_) => World::Http,
            Prepared::HttpP3(_) => World::HttpP3,
        }
    }

    /// Whether it was compiled or came from the cache.
    pub fn source(&self) -> LoadSource {
        self.inner.source
    }

    /// The interfaces it imports.
    pub fn imports(&self) -> &[String] {
        &self.inner.imports
    }
}

impl fmt::Debug for LoadedComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedComponent")
            .field("digest", &self.inner.digest)
            .field("world", &self.world())
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Validates `bytes` as a component this host can run, compiles it (or
    /// loads the verified compiled artifact from the cache) and
    /// pre-instantiates it. CPU-heavy on a cache miss: call it from a
    /// blocking thread in async code.
    pub fn load(&self, bytes: &[u8]) -> Result<LoadedComponent, LoadError> {
        check_header(bytes)?;
        let digest = Digest::of(bytes);
        // Compiling is the expensive part of a deploy (and of a cold start
        // after a cache rejection); its logs carry the component's digest.
        let _span = tracing::debug_span!("load", %digest).entered();
        let side = self.side(exports_wasi3_http(bytes));
        let (component, source) = match side.cache.load(side.engine, &digest) {
            Lookup::Hit(component) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                (component, LoadSource::Cache)
            }
            lookup => {
                if let Lookup::Rejected(reason) = lookup {
                    self.reject(side, &digest, &reason);
                }
                (self.compile(side, &digest, bytes)?, LoadSource::Compiled)
            }
        };
        self.prepare(side, digest, component, source)
    }

    /// Loads the component `digest` from its verified compiled artifact
    /// alone, without its bytes: what a restart does for every function
    /// compiled before, so it neither reads nor hashes the component.
    /// `None` when the cache holds no valid entry for it (a rejected entry
    /// is counted and logged): then fetch the bytes and [`Runtime::load`]
    /// them.
    pub fn load_compiled(&self, digest: &Digest) -> Option<Result<LoadedComponent, LoadError>> {
        let _span = tracing::debug_span!("load", %digest).entered();
        // Each engine has its own cache; a component is in one of them (a
        // miss is one `stat`).
        for side in [self.side(false), self.side(true)] {
            match side.cache.load(side.engine, digest) {
                Lookup::Hit(component) => {
                    self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Some(self.prepare(side, *digest, component, LoadSource::Cache));
                }
                Lookup::Miss => {}
                Lookup::Rejected(reason) => {
                    self.reject(side, digest, &reason);
                    // Removed, so that the load that follows compiles without
                    // checking (and rejecting) it again.
                    if let Err(e) = side.cache.remove(digest) {
                        tracing::warn!(%digest, error = %e, "could not remove a rejected compiled-cache entry");
                    }
                    return None;
                }
            }
        }
        None
    }

    fn reject(&self, side: Side<'_>, digest: &Digest, reason: &str) {
        self.stats.cache_rejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%digest, %reason, path = %side.cache.path_for(digest).display(), "ignoring compiled-cache entry; recompiling");
    }

    /// Removes the compiled artifact of `digest` from the cache: its
    /// component was deleted or replaced and nothing else uses it.
    ///
    /// # Errors
    /// The artifact could not be removed.
    pub fn forget_compiled(&self, digest: &Digest) -> Result<(), super::CacheError> {
        self.cache.remove(digest)?;
        self.wasi3.cache.remove(digest)
    }

    /// Removes every compiled artifact but those of `keep` (the components
    /// still deployed); returns how many files went.
    ///
    /// # Errors
    /// The cache directory could not be read or a file not removed.
    pub fn retain_compiled(&self, keep: &[Digest]) -> Result<usize, super::CacheError> {
        Ok(self.cache.retain(keep)? + self.wasi3.cache.retain(keep)?)
    }

    fn compile(
        &self,
        side: Side<'_>,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<Component, LoadError> {
        self.stats.compiles.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let component = Component::new(side.engine, bytes).map_err(LoadError::Invalid)?;
        tracing::info!(%digest, elapsed = ?started.elapsed(), "compiled component");
        // A failure to cache costs a recompile later, not this load.
        match component.serialize() {
            Ok(artifact) => {
                if let Err(e) = side.cache.store(digest, &artifact) {
                    tracing::warn!(%digest, error = %e, "could not write the compiled cache");
                }
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "could not serialize the compiled component")
            }
        }
        Ok(component)
    }

    fn prepare(
        &self,
        side: Side<'_>,
        digest: Digest,
        component: Component,
        source: LoadSource,
    ) -> Result<LoadedComponent, LoadError> {
        let component_type = component.component_type();
        let imports: Vec<String> = component_type
            .imports(side.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let exports: Vec<String> = component_type
            .exports(side.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let pre = side.linker.instantiate_pre(&component).map_err(|e| {
            let mut unsatisfied: Vec<String> = imports
                .iter()
                .filter(|name| !imports::is_provided(name))
                .cloned()
                .collect();
            if unsatisfied.is_empty() {
                // Provided by name but with other types (e.g. an
                // incompatible prerelease of an interface).
                unsatisfied.push(format!("{e:#}"));
            }
            LoadError::UnsatisfiedImports {
                imports: unsatisfied,
                detail: e,
            }
        })?;
        let prepared = if side.wasi3 {
            // Only what `exports_wasi3_http` found sends a component here.
            Prepared::HttpP3(ServicePre::new(pre).map_err(LoadError::ExportMismatch)?)
        } else if exports
            .iter()
            .any(|e| imports::same_interface(e, HANDLER_EXPORT))
        {
            Prepared::Handler(PlatformPre::new(pre).map_err(LoadError::ExportMismatch)?)
        } else if exports.iter().any(|e| e.starts_with(HTTP_EXPORT_PREFIX)) {
            Prepared::Http(ProxyPre::new(pre).map_err(LoadError::ExportMismatch)?)
        } else {
            return Err(LoadError::MissingExport { exports });
        };
        Ok(LoadedComponent {
            inner: Arc::new(LoadedInner {
                digest,
                prepared,
                source,
                imports,
                instantiate_nanos: std::sync::atomic::AtomicU64::new(u64::MAX),
            }),
        })
    }
}

/// Whether the component `bytes` exports WASI 0.3's `wasi:http/handler`,
/// and so runs on the runtime's WASI 0.3 engine. Read from its own export
/// sections alone, nested modules and components skipped: a pass over
/// section headers, not a validation. Anything malformed answers `false`,
/// and the compile that follows says what is wrong.
fn exports_wasi3_http(bytes: &[u8]) -> bool {
    use wasmtime::wasmparser::{Chunk, Parser, Payload};

    let mut parser = Parser::new(0);
    let mut at = 0;
    loop {
        let Some(rest) = bytes.get(at..) else {
            return false;
        };
        let payload = match parser.parse(rest, true) {
            Ok(Chunk::Parsed { consumed, payload }) => {
                at += consumed;
                payload
            }
            Ok(Chunk::NeedMoreData(_)) | Err(_) => return false,
        };
        match payload {
            // The parser has stepped over the nested one already; so do we.
            Payload::ModuleSection {
                unchecked_range, ..
            }
            | Payload::ComponentSection {
                unchecked_range, ..
            } => at = unchecked_range.end,
            Payload::ComponentExportSection(exports) => {
                for export in exports {
                    match export {
                        Ok(export) if export.name.name.starts_with(HTTP_P3_EXPORT_PREFIX) => {
                            return true;
                        }
                        Ok(_) => {}
                        Err(_) => return false,
                    }
                }
            }
            Payload::End(_) => return false,
            _ => {}
        }
    }
}

fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.is_empty() {
        return Err(LoadError::Empty);
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(LoadError::NotWasm);
    }
    if wasmtime::wasmparser::Parser::is_core_wasm(bytes) {
        return Err(LoadError::CoreModule);
    }
    if !wasmtime::wasmparser::Parser::is_component(bytes) {
        return Err(LoadError::Invalid(wasmtime::format_err!(
            "unsupported WebAssembly binary version or layer"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::exports_wasi3_http;

    fn component(wat: &str) -> Vec<u8> {
        wat::parse_str(wat).unwrap()
    }

    #[test]
    fn the_wasi3_engine_is_chosen_by_the_outer_components_own_export() {
        let exports = component(
            r#"(component (instance $i) (export "wasi:http/handler@0.3.0" (instance $i)))"#,
        );
        assert!(exports_wasi3_http(&exports));
        // A WASI 0.2 server, and a nested component exporting the name
        // where the outer one does not: the other engine.
        let p2 = component(
            r#"(component (instance $i) (export "wasi:http/incoming-handler@0.2.6" (instance $i)))"#,
        );
        assert!(!exports_wasi3_http(&p2));
        let nested = component(
            r#"(component
                (component (instance $i) (export "wasi:http/handler@0.3.0" (instance $i)))
                (core module (func (export "f")))
                (instance $j)
                (export "gust:function/handler@0.1.0" (instance $j)))"#,
        );
        assert!(!exports_wasi3_http(&nested));
        // Malformed or cut short: not WASI 0.3 (compiling says why).
        assert!(!exports_wasi3_http(b"\0asm"));
        assert!(!exports_wasi3_http(b"\0asm\x0d\0\x01\0\x0b\x7f"));
    }
}
