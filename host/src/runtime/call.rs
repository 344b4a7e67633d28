//! Calls: arming a store (new or reused) for one invocation, running the
//! handler or the `wasi:http` proxy in it, and classifying how it ended.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::Instrument as _;
use wasmtime::component::ResourceTableError;
use wasmtime::{PoolConcurrencyLimitError, Store, Trap, UpdateDeadline, WasmBacktrace};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::Runtime;
use super::bindings::Platform;
use super::bindings::exports::gust::function::handler as wit_handler;
use super::capture::BoundedCapture;
use super::config::CallLimits;
use super::control::{self, CallControl, Cancel};
use super::egress::{Egress, EgressLog};
use super::engine::Running;
use super::load::{LoadedComponent, Prepared};
use super::outcome::{self, GuestError, Invocation, Outcome, Request, Response, Timings};
use super::reuse::{IdleInstance, Instance, Ready};
use super::state::{CallState, WasiGrants};

impl Runtime {
    /// A fresh store for one call: memory limit, deadline, captured stdio,
    /// and the caller's controls.
    fn new_call(
        &self,
        component: &LoadedComponent,
        limits: &CallLimits,
        control: CallControl,
    ) -> Call {
        let started = Instant::now();
        let (grants, stdout, stderr) = wasi_grants(limits);
        let memory_limit = usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
        let state = CallState::new(grants, memory_limit);
        let mut store = Store::new(self.engine_of(component), state);
        store.limiter(|state| &mut state.limiter);
        self.stats.instantiations.fetch_add(1, Ordering::Relaxed);
        let fresh = Resumable {
            store,
            guest: None,
            stdout,
            stderr,
            uses: 0,
        };
        self.arm(fresh, started, limits, control)
    }

    /// A call in an instance an earlier call left behind.
    fn resumed_call(&self, idle: IdleInstance, limits: &CallLimits, control: CallControl) -> Call {
        let started = Instant::now();
        self.stats.reuses.fetch_add(1, Ordering::Relaxed);
        let resumed = Resumable {
            store: idle.store,
            guest: idle.guest.into_handler(),
            stdout: idle.stdout,
            stderr: idle.stderr,
            uses: idle.uses,
        };
        self.arm(resumed, started, limits, control)
    }

    /// A call in a fresh instance made ready before it came, and that
    /// instance: its store gets the call's WASI grants and captures (its
    /// instantiation ran no host import, so it has built no WASI context).
    fn ready_call(
        &self,
        ready: IdleInstance,
        limits: &CallLimits,
        control: CallControl,
    ) -> (Call, Instance) {
        let started = Instant::now();
        self.stats.ready_hits.fetch_add(1, Ordering::Relaxed);
        let (grants, stdout, stderr) = wasi_grants(limits);
        let mut store = ready.store;
        store.data_mut().grants = grants;
        let fresh = Resumable {
            store,
            guest: None,
            stdout,
            stderr,
            uses: 0,
        };
        (self.arm(fresh, started, limits, control), ready.guest)
    }

    /// The ready-instance permission that applies to a call with `limits`:
    /// none where reuse does.
    fn ready_for(limits: &CallLimits) -> Option<&Ready> {
        match limits.reuse.as_ref().filter(|reuse| reuse.max_uses > 1) {
            Some(_) => None,
            None => limits.ready.as_ref().filter(|ready| ready.count > 0),
        }
    }

    /// After a call of `component` with `timings`: remembers how quickly
    /// it has instantiated, and has the next instance made where that is
    /// slow enough to pay (see [`RuntimeConfig::ready_min_instantiate`]).
    /// `spent`: the call's store, if it was not kept; dropped here unless
    /// the next instance's preparation takes it over.
    ///
    /// [`RuntimeConfig::ready_min_instantiate`]: super::RuntimeConfig::ready_min_instantiate
    fn after_call(
        &self,
        component: &LoadedComponent,
        ready: Option<&Ready>,
        timings: &Timings,
        limits: &CallLimits,
        spent: Option<Store<CallState>>,
    ) {
        if !timings.ready && !timings.reused && !timings.instantiate.is_zero() {
            let nanos = u64::try_from(timings.instantiate.as_nanos()).unwrap_or(u64::MAX);
            component
                .inner
                .instantiate_nanos
                .fetch_min(nanos, Ordering::Relaxed);
        }
        if let Some(ready) = ready.filter(|_| self.worth_preparing(component)) {
            // Made once this call is done, not beside it: instantiating
            // maps and unmaps memory, which stalls the page faults of a
            // call running at the same time in the same process (a Python
            // call took 4× as long). A call that comes before it is made
            // instantiates its own.
            self.prepare_next(component, ready, limits, spent);
        }
    }

    /// Records how a `wasi:http` call (0.2 or 0.3) ended: `result` is its
    /// run under the call's hard limit. The response (status, headers,
    /// body) went to the caller as the guest gave it; here only success is
    /// recorded.
    fn end_http_call(
        &self,
        call: Call,
        result: Result<wasmtime::Result<()>, tokio::time::error::Elapsed>,
        timings: Timings,
        running: Running,
        component: &LoadedComponent,
        ready: Option<&Ready>,
    ) -> Invocation {
        let result = match result {
            Err(_elapsed) => Err(None),
            Ok(Ok(())) => Ok(Outcome::Ok(Response::default())),
            Ok(Err(error)) => Err(Some(error)),
        };
        let limits = call.limits.clone();
        let (invocation, left) = call.finish(result, timings);
        drop(running);
        self.after_call(component, ready, &timings, &limits, left.spent());
        invocation
    }

    /// Whether instances of `component` are made ahead: its quickest
    /// instantiation on a call's path so far was slow enough. (Where they
    /// are not, a call does not even look for one.)
    fn worth_preparing(&self, component: &LoadedComponent) -> bool {
        let quickest = component.inner.instantiate_nanos.load(Ordering::Relaxed);
        quickest != u64::MAX && u128::from(quickest) >= self.config.ready_min_instantiate.as_nanos()
    }

    /// Sets a store up for one call: the call's limits and grants, its
    /// deadline and cancel token, and where its emitted output goes.
    fn arm(
        &self,
        resumable: Resumable,
        started: Instant,
        limits: &CallLimits,
        control: CallControl,
    ) -> Call {
        let Resumable {
            mut store,
            guest,
            stdout,
            stderr,
            uses,
        } = resumable;
        let deadline = started + limits.timeout;
        let memory_limit = usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
        let cancel = control.cancel.unwrap_or_default();
        let state = store.data_mut();
        let egress = Egress {
            policy: limits.outbound.clone(),
            client: self.egress.clone(),
            deadline,
            log: EgressLog::default(),
            trace: control.trace,
        };
        state.renew(
            egress,
            memory_limit,
            limits.gpu.clone(),
            deadline,
            Arc::clone(&limits.config),
            limits.kv.clone(),
        );
        state.output = match control.stream {
            Some(sender) => control::OutputSink::stream(sender, cancel.clone()),
            None => control::OutputSink::Buffer {
                data: Vec::new(),
                limit: match control.output_limit {
                    0 => memory_limit,
                    limit => limit,
                },
            },
        };
        store.set_epoch_deadline(1);
        let interrupt = cancel.clone();
        store.epoch_deadline_callback(move |_| {
            // Yielding on every tick keeps a busy guest from monopolising an
            // executor thread; past the deadline, or once cancelled,
            // interrupt it.
            if interrupt.is_cancelled() || Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        Call {
            store,
            guest,
            stdout,
            stderr,
            started,
            uses,
            limits: limits.clone(),
            cancel,
            // Host imports may await (the GPU bridge, outgoing HTTP); the
            // epoch only interrupts wasm, so the whole call is bounded too,
            // one tick past the deadline.
            hard_limit: limits.timeout + self.config.epoch_tick,
        }
    }

    /// A new instance of `prepared` in a call's `store`. While the
    /// allocator has no slot for it and an instance is kept for later
    /// (ready or reused), the one kept longest is dropped and instantiation
    /// tried again: a call comes before a kept instance.
    async fn instantiate_evicting(
        &self,
        prepared: &Prepared,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<Instance> {
        let instantiate = async {
            loop {
                match prepared.instantiate(&mut *store).await {
                    Err(error)
                        if error.downcast_ref::<PoolConcurrencyLimitError>().is_some()
                            && self.idle.evict_oldest() => {}
                    result => break result,
                }
            }
        };
        instantiate
            .instrument(tracing::info_span!("instantiate"))
            .await
    }

    /// Runs one invocation of a handler component in a fresh instance (or,
    /// when `limits.reuse` allows, one an earlier call left behind).
    /// Never fails: every way a call can end is an [`Outcome`].
    pub async fn invoke(
        &self,
        component: &LoadedComponent,
        request: Request,
        limits: &CallLimits,
    ) -> Invocation {
        self.invoke_with(component, request, limits, CallControl::default())
            .await
    }

    /// [`Runtime::invoke`] with controls: a cancel token, and where the
    /// function's emitted output goes. Without a stream, emitted chunks are
    /// put in front of the response body, at most `control.output_limit`
    /// bytes of them (by default `limits.memory_bytes`).
    pub async fn invoke_with(
        &self,
        component: &LoadedComponent,
        request: Request,
        limits: &CallLimits,
        control: CallControl,
    ) -> Invocation {
        if !matches!(component.inner.prepared, Prepared::Handler(_)) {
            return Invocation::host_error("this component serves wasi:http; call it over HTTP");
        }
        let running = Running::start(&self.stats);
        let digest = component.digest();
        let reuse = limits.reuse.as_ref().filter(|reuse| reuse.max_uses > 1);
        let ready = Self::ready_for(limits);
        let idle = match (reuse, ready) {
            (Some(reuse), _) => self.idle.take(&reuse.scope, digest, limits, false),
            (None, Some(ready)) if self.worth_preparing(component) => {
                self.idle.take(&ready.scope, digest, limits, true)
            }
            (None, _) => None,
        };
        let mut call = match idle {
            Some(idle) if idle.is_ready() => {
                let (mut call, instance) = self.ready_call(idle, limits, control);
                call.guest = instance.into_handler();
                call
            }
            Some(idle) => self.resumed_call(idle, limits, control),
            None => self.new_call(component, limits, control),
        };
        let cancel = call.cancel.clone();
        let mut timings = Timings {
            reused: call.guest.is_some() && call.uses > 0,
            ready: call.guest.is_some() && call.uses == 0,
            ..Timings::default()
        };
        let request = wit_handler::Request {
            body: request.body,
            content_type: request.content_type,
            headers: request.headers,
            invocation_id: request.invocation_id,
        };
        let started = call.started;
        let reused_guest = call.guest.take();
        let store = &mut call.store;
        // Boxed: Wasmtime's instantiate and call futures make this one
        // kilobytes large, and every combinator below would copy it again.
        let run = Box::pin(async {
            let guest = match reused_guest {
                Some(guest) => guest,
                None => self
                    .instantiate_evicting(&component.inner.prepared, store)
                    .await?
                    .into_handler()
                    .ok_or_else(|| wasmtime::format_err!("not a handler component"))?,
            };
            timings.instantiate = started.elapsed();
            let result = guest
                .gust_function_handler()
                .call_handle(&mut *store, &request)
                .instrument(tracing::info_span!("call"))
                .await;
            timings.call = started.elapsed() - timings.instantiate;
            result.map(|returned| (returned, guest))
        });
        // Host imports may await; a cancel must not wait for them.
        let result = tokio::select! {
            result = tokio::time::timeout(call.hard_limit, run) => result,
            () = cancel.cancelled() => Ok(Err(wasmtime::Error::from(Trap::Interrupt))),
        };
        let emitted = call.store.data_mut().output.take_buffer();
        let result = match result {
            Err(_elapsed) => Err(None),
            Ok(Ok((returned, guest))) => {
                // The guest returned: its instance is sound and may serve
                // the next call of the same scope.
                call.guest = reuse.map(|_| guest);
                Ok(returned)
            }
            Ok(Err(error)) => Err(Some(error)),
        };
        let result = match result {
            Err(failure) => Err(failure),
            Ok(Ok(response)) => Ok(Outcome::Ok(Response {
                status: response.status,
                content_type: response.content_type,
                headers: response.headers,
                body: if emitted.is_empty() {
                    response.body
                } else {
                    let mut body = emitted;
                    body.extend_from_slice(&response.body);
                    body
                },
            })),
            Ok(Err(error)) => Ok(Outcome::GuestError(GuestError {
                code: error.code,
                message: error.message,
                status: error.status,
            })),
        };
        let (invocation, left) = call.finish(result, timings);
        let spent = match (reuse, left) {
            (Some(reuse), Left::Idle(idle)) => {
                self.idle.put(&reuse.scope, digest, idle);
                None
            }
            (_, left) => left.spent(),
        };
        drop(running);
        self.after_call(component, ready, &timings, limits, spent);
        invocation
    }

    /// Serves one HTTP request with a `wasi:http/proxy` component in a fresh
    /// instance. Returns once the guest has set its response (or failed
    /// before doing so); the body then streams while the guest keeps running
    /// in a task of its own, and `completion` resolves when it is done.
    pub fn serve_http<B>(
        self: &Arc<Self>,
        component: &LoadedComponent,
        request: hyper::Request<B>,
        limits: &CallLimits,
        control: CallControl,
    ) -> Result<HttpCall, Box<Invocation>>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        use wasmtime_wasi_http::WasiHttpView as _;

        match component.inner.prepared {
            Prepared::Http(_) => {}
            Prepared::HttpP3(_) => {
                return Ok(self.serve_http_p3(component, request, limits, control));
            }
            Prepared::Handler(_) => {
                return Err(Box::new(Invocation::host_error(
                    "this component exports gust:function/handler; invoke it instead",
                )));
            }
        }
        let runtime = Arc::clone(self);
        let running = Running::start(&self.stats);
        let ready = Self::ready_for(limits).cloned();
        let idle = ready
            .as_ref()
            .filter(|_| self.worth_preparing(component))
            .and_then(|ready| {
                self.idle
                    .take(&ready.scope, component.digest(), limits, true)
            });
        let (mut call, mut proxy) = match idle {
            Some(idle) => {
                let (call, instance) = self.ready_call(idle, limits, control);
                (call, instance.into_http())
            }
            None => (self.new_call(component, limits, control), None),
        };
        let component = component.clone();
        call.store.data_mut().output = control::OutputSink::Refused;
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let store = call.store.data_mut();
        let prepared = store
            .http()
            .new_incoming_request(Scheme::Http, request)
            .and_then(|req| Ok((req, store.http().new_response_outparam(sender)?)));
        let (req, out) = match prepared {
            Ok(resources) => resources,
            Err(e) => return Err(Box::new(Invocation::host_error(&format!("{e:#}")))),
        };
        let completion = tokio::spawn(
            async move {
                let mut timings = Timings {
                    ready: proxy.is_some(),
                    ..Timings::default()
                };
                let started = call.started;
                let store = &mut call.store;
                let run = async {
                    let proxy = match proxy.take() {
                        Some(proxy) => proxy,
                        None => runtime
                            .instantiate_evicting(&component.inner.prepared, store)
                            .await?
                            .into_http()
                            .ok_or_else(|| wasmtime::format_err!("not a wasi:http component"))?,
                    };
                    timings.instantiate = started.elapsed();
                    let result = proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut *store, req, out)
                        .instrument(tracing::info_span!("call"))
                        .await;
                    timings.call = started.elapsed() - timings.instantiate;
                    result
                };
                let result = tokio::time::timeout(call.hard_limit, run).await;
                runtime.end_http_call(call, result, timings, running, &component, ready.as_ref())
            }
            // The guest runs on in a task of its own: in the caller's span.
            .instrument(tracing::Span::current()),
        );
        Ok(HttpCall {
            response: Box::pin(async move {
                receiver
                    .await
                    .map(|answer| answer.map_err(|code| format!("{code:?}")))
            }),
            completion,
        })
    }

    /// [`Runtime::serve_http`] for a WASI 0.3 `wasi:http/service`
    /// component, in a fresh instance. Its `handle` runs in the store's
    /// event loop (`run_concurrent`), which goes on running until the
    /// response body is done with: the guest writes the body through it,
    /// possibly after `handle` returned.
    fn serve_http_p3<B>(
        self: &Arc<Self>,
        component: &LoadedComponent,
        request: hyper::Request<B>,
        limits: &CallLimits,
        control: CallControl,
    ) -> HttpCall
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        use wasmtime_wasi_http::WasiHttpView as _;

        let runtime = Arc::clone(self);
        let running = Running::start(&self.stats);
        let mut call = self.new_call(component, limits, control);
        let component = component.clone();
        call.store.data_mut().output = control::OutputSink::Refused;
        let (sender, receiver) = tokio::sync::oneshot::channel::<HttpAnswer>();
        let (request, request_body) =
            wasmtime_wasi_http::p3::Request::from_http(call.store.data_mut().http().hooks, request);
        let completion = tokio::spawn(
            async move {
                let mut timings = Timings::default();
                let started = call.started;
                let store = &mut call.store;
                let run = async {
                    let service = runtime
                        .instantiate_evicting(&component.inner.prepared, store)
                        .await?
                        .into_http_p3()
                        .ok_or_else(|| {
                            wasmtime::format_err!("not a WASI 0.3 wasi:http component")
                        })?;
                    timings.instantiate = started.elapsed();
                    let served = store
                        .run_concurrent(async move |accessor| {
                            let respond = async {
                                let response = match service.handle(accessor, request).await? {
                                    Ok(response) => response,
                                    Err(code) => {
                                        let _ = sender.send(Err(format!("{code:?}")));
                                        return wasmtime::Result::Ok(());
                                    }
                                };
                                let response = accessor
                                    .with(|store| response.into_http(store, async { Ok(()) }))?;
                                let (done, body_done) = tokio::sync::oneshot::channel();
                                let response = response.map(|body| {
                                    http_body_util::BodyExt::boxed_unsync(
                                        super::http::NotifyingBody::new(body, done),
                                    )
                                });
                                if sender.send(Ok(response)).is_ok() {
                                    let _ = body_done.await;
                                }
                                Ok(())
                            };
                            // The request body flows in while the guest
                            // runs; its failure (too large, the caller gone)
                            // reaches the guest as its read's error.
                            let (responded, _request_body) = futures::join!(respond, request_body);
                            responded
                        })
                        .instrument(tracing::info_span!("call"))
                        .await;
                    timings.call = started.elapsed() - timings.instantiate;
                    served?
                };
                let result = tokio::time::timeout(call.hard_limit, run).await;
                runtime.end_http_call(call, result, timings, running, &component, None)
            }
            .instrument(tracing::Span::current()),
        );
        HttpCall {
            response: Box::pin(receiver),
            completion,
        }
    }
}

/// The WASI grants of a call with `limits`, and the captures of its stdout
/// and stderr.
fn wasi_grants(limits: &CallLimits) -> (WasiGrants, BoundedCapture, BoundedCapture) {
    let stdout = BoundedCapture::new(limits.stdout_limit);
    let stderr = BoundedCapture::new(limits.stderr_limit);
    let grants = WasiGrants {
        env: Arc::clone(&limits.env),
        preopens: Arc::clone(&limits.preopens),
        stdout: stdout.clone(),
        stderr: stderr.clone(),
    };
    (grants, stdout, stderr)
}

/// A store, new or left behind by an earlier call, before it is armed for
/// a call.
struct Resumable {
    store: Store<CallState>,
    guest: Option<Platform>,
    stdout: BoundedCapture,
    stderr: BoundedCapture,
    uses: u32,
}

/// One call's store and what it captures.
struct Call {
    store: Store<CallState>,
    /// Before the call: the instance to reuse, if any. After it: the
    /// instance to keep, if the call may leave it behind.
    guest: Option<Platform>,
    stdout: BoundedCapture,
    stderr: BoundedCapture,
    started: Instant,
    /// Calls the instance served before this one.
    uses: u32,
    limits: CallLimits,
    cancel: Cancel,
    hard_limit: std::time::Duration,
}

impl Call {
    /// Classifies the result and collects captures. `Err(None)` means the
    /// hard time limit fired; `Err(Some(e))` is a trap or host failure.
    /// Returns the instance for reuse when the call left one to keep (see
    /// [`Call::guest`]), it returned normally and it has uses left, and
    /// otherwise the store.
    fn finish(
        self,
        result: Result<Outcome, Option<wasmtime::Error>>,
        timings: Timings,
    ) -> (Invocation, Left) {
        let egress_denied = self.store.data().egress_denials();
        let limiter = &self.store.data().limiter;
        let peak_memory_bytes = limiter.peak_bytes as u64;
        let denied = limiter.denied_request;
        let uses = self.uses.saturating_add(1);
        let keep = match (&self.guest, &result, &self.limits.reuse) {
            (Some(_), Ok(Outcome::Ok(_) | Outcome::GuestError(_)), Some(reuse)) => {
                !self.cancel.is_cancelled() && uses < reuse.max_uses
            }
            _ => false,
        };
        let left = match (keep, self.guest) {
            (true, Some(guest)) => Left::Idle(IdleInstance::reused(
                {
                    let mut store = self.store;
                    // Nothing of this call's caller stays with the idle
                    // instance (a streaming caller's channel, say).
                    store.data_mut().output = control::OutputSink::default();
                    store
                },
                guest,
                self.stdout.clone(),
                self.stderr.clone(),
                uses,
                &self.limits,
            )),
            _ => Left::Spent(self.store),
        };
        let stderr = self.stderr.take();
        let outcome = match result {
            Ok(outcome) => outcome,
            // However the interrupted guest ended (a trap, or the caller's
            // side of a stream closing), it was stopped on purpose.
            Err(_) if self.cancel.is_cancelled() => Outcome::Cancelled,
            Err(None) => Outcome::Timeout {
                limit: self.limits.timeout,
            },
            Err(Some(error)) => classify_failure(&error, denied, &self.limits, &stderr.text()),
        };
        let invocation = Invocation {
            outcome,
            stdout: self.stdout.take(),
            stderr,
            timings,
            peak_memory_bytes,
            egress_denied,
        };
        (invocation, left)
    }
}

/// What a call leaves of its store (see [`Call::finish`]).
enum Left {
    /// The instance, kept for the next call of its scope.
    Idle(IdleInstance),
    /// The store, done with; dropping it tears the instance down.
    Spent(Store<CallState>),
}

impl Left {
    /// The store to tear down: a spent one, or a kept instance's when
    /// there is nowhere to keep it.
    fn spent(self) -> Option<Store<CallState>> {
        match self {
            Self::Idle(idle) => Some(idle.store),
            Self::Spent(store) => Some(store),
        }
    }
}

/// What a `wasi:http` guest answered: its response, or the error code it
/// gave instead of one (as text).
pub type HttpAnswer = Result<hyper::Response<HyperOutgoingBody>, String>;

/// A `wasi:http` request in flight; see [`Runtime::serve_http`].
pub struct HttpCall {
    /// Resolves to the guest's answer once it has one (WASI 0.2: it calls
    /// `response-outparam.set`; 0.3: `handle` returns); an error means the
    /// guest finished or failed without answering: see `completion`.
    pub response: futures::future::BoxFuture<
        'static,
        Result<HttpAnswer, tokio::sync::oneshot::error::RecvError>,
    >,
    /// Resolves when the guest has finished (its body fully written) with
    /// the invocation's outcome; for success the outcome's response is empty
    /// (the real one went out through `response`).
    pub completion: tokio::task::JoinHandle<Invocation>,
}

fn classify_failure(
    error: &wasmtime::Error,
    denied_memory: Option<usize>,
    limits: &CallLimits,
    stderr: &str,
) -> Outcome {
    let backtrace = error
        .downcast_ref::<WasmBacktrace>()
        .map(|bt| bt.to_string())
        .unwrap_or_default();
    if let Some(requested) = denied_memory {
        // Rust (and most guest languages) abort when an allocation fails, so
        // the trap that follows a refused growth is the out-of-memory itself.
        return Outcome::OutOfMemory {
            limit_bytes: limits.memory_bytes,
            requested_bytes: requested as u64,
        };
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return match trap {
            Trap::Interrupt => Outcome::Timeout {
                limit: limits.timeout,
            },
            Trap::StackOverflow => Outcome::StackOverflow { backtrace },
            other => Outcome::Trap {
                message: other.to_string(),
                panic_message: outcome::panic_message(stderr),
                backtrace,
            },
        };
    }
    if let Some(refused) = error.downcast_ref::<control::LimitExceeded>() {
        return Outcome::LimitExceeded {
            message: refused.message.clone(),
        };
    }
    if let Some(ResourceTableError::Full) = error.downcast_ref::<ResourceTableError>() {
        return Outcome::LimitExceeded {
            message: format!(
                "the function holds more than {} host resources (handles) at once",
                super::state::MAX_RESOURCES
            ),
        };
    }
    if let Some(limit) = error.downcast_ref::<PoolConcurrencyLimitError>() {
        return Outcome::Overloaded {
            reason: limit.to_string(),
        };
    }
    Outcome::HostError {
        message: format!("{error:#}"),
    }
}
