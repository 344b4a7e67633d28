//! The one thread that advances the engines' epochs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::Engine;

/// Increments the epoch of every engine it was given (the runtime's WASI
/// 0.2 and 0.3 engines) every tick until dropped. Deadlines of all stores
/// are measured against it, so one ticker serves every call.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engines: Vec<Engine>, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("gust-epoch".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Acquire) {
                    std::thread::park_timeout(tick);
                    for engine in &engines {
                        engine.increment_epoch();
                    }
                }
            });
        let thread = match thread {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Without a ticker no deadline fires; that must not go unnoticed.
                tracing::error!(error = %e, "could not start the epoch ticker thread; timeouts will not be enforced by epochs");
                None
            }
        };
        Self { stop, thread }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}
