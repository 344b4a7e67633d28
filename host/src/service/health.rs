//! Whether the host is ready to serve: its store reachable, with the schema
//! this build needs. A host on a shared store checks every
//! [`READY_CHECK`]; one on its embedded store is ready once open.
//!
//! A host whose store is out of reach keeps serving what it holds in
//! memory (the functions it has loaded, the keys it has recently seen; see
//! [`Service::store_reachable`]) and refuses what needs the store (deploys,
//! reads of jobs and logs) with 503 `store-unavailable`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::Service;

/// How often a host on a shared store checks it.
const READY_CHECK: Duration = Duration::from_secs(1);

/// The last check's answer.
#[derive(Debug)]
pub(super) struct Readiness {
    reachable: AtomicBool,
    /// Why not, when not.
    problem: Mutex<Option<String>>,
}

impl Default for Readiness {
    fn default() -> Self {
        // Opening the store checked it.
        Self {
            reachable: AtomicBool::new(true),
            problem: Mutex::new(None),
        }
    }
}

impl Readiness {
    /// Notes a check's answer; whether it changed.
    fn note(&self, answer: Result<(), String>) -> bool {
        let reachable = answer.is_ok();
        *self.problem.lock().unwrap_or_else(PoisonError::into_inner) = answer.err();
        self.reachable.swap(reachable, Ordering::AcqRel) != reachable
    }
}

impl Service {
    /// Whether the store answered the last check (always, for the embedded
    /// store).
    pub fn store_reachable(&self) -> bool {
        self.readiness.reachable.load(Ordering::Acquire)
    }

    /// `Ok` when the host is ready to serve everything; why not otherwise.
    ///
    /// # Errors
    /// The reason the store is not usable.
    pub fn ready(&self) -> Result<(), String> {
        if self.store_reachable() {
            return Ok(());
        }
        Err(self
            .readiness
            .problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "the store is not reachable".into()))
    }

    /// Starts checking a shared store.
    pub(super) fn start_health(self: &Arc<Self>) {
        if self.store.shared().is_some() {
            self.track(tokio::spawn(check_store(Arc::clone(self))));
        }
    }
}

/// Checks the store every [`READY_CHECK`], noting the answer.
async fn check_store(service: Arc<Service>) {
    loop {
        tokio::time::sleep(READY_CHECK).await;
        let answer = match service.blocking(|s| Ok(s.store.check_ready())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            // The check itself failed (it panicked): not known reachable.
            Err(error) => Err(error.to_string()),
        };
        let failed = answer.clone().err();
        if service.readiness.note(answer) {
            match failed {
                Some(error) => {
                    tracing::error!(%error, "the store is out of reach: not ready; serving what is loaded, refusing what needs the store")
                }
                None => tracing::info!("the store is reachable again: ready"),
            }
        }
    }
}
