//! Invocations whose emitted output goes to the caller as it is emitted
//! (Server-Sent Events, WebSocket sessions).

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Service, Target};
use crate::runtime::{CallControl, Cancel, Invocation, Request as CallRequest};

/// How often an idle stream is checked: keeps proxies from closing it and
/// notices a caller that went away while the function computes without
/// emitting.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Chunks in flight between the guest and the connection.
const BACKLOG: usize = 8;

/// Where emitted chunks go.
pub(crate) trait Forward {
    /// Sends one chunk; false when the caller is gone.
    async fn send(&mut self, chunk: Bytes) -> bool;
}

impl Service {
    /// Runs `call`, handing each emitted chunk to `forward` as it comes;
    /// every heartbeat without output, `idle` may check the caller (false:
    /// gone). Stops the guest when the caller is gone.
    pub(crate) async fn run_streaming<F, Fut>(
        &self,
        target: &Target,
        started: &super::Started,
        call: CallRequest,
        mut forward: F,
        mut idle: impl FnMut() -> Option<Fut>,
    ) -> Invocation
    where
        F: Forward,
        Fut: Future<Output = bool>,
    {
        let (chunks_tx, mut chunks) = mpsc::channel::<Bytes>(BACKLOG);
        let cancel = Cancel::new();
        let control = started.control(CallControl {
            cancel: Some(cancel.clone()),
            stream: Some(chunks_tx),
            output_limit: 0,
            ..CallControl::default()
        });
        let invoke = self.run(target, call, control);
        tokio::pin!(invoke);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let mut open = true;
        let invocation = loop {
            tokio::select! {
                invocation = &mut invoke => break invocation,
                Some(chunk) = chunks.recv() => {
                    if open && !forward.send(chunk).await {
                        open = false;
                        cancel.cancel();
                    }
                }
                _ = heartbeat.tick(), if open => {
                    if let Some(check) = idle()
                        && !check.await
                    {
                        open = false;
                        cancel.cancel();
                    }
                }
            }
        };
        // Emitted just before the guest returned.
        while let Ok(chunk) = chunks.try_recv() {
            if open && !forward.send(chunk).await {
                open = false;
            }
        }
        invocation
    }
}
