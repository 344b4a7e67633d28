//! Traces: which trace a request, its invocation and the requests its
//! function makes belong to (W3C Trace Context), and the export of the
//! host's spans over OTLP.
//!
//! A request that carries a valid `traceparent` joins the caller's trace;
//! any other starts one. The trace id is recorded on the invocation, and
//! the function's outgoing requests carry it on, with the span that sent
//! them as their parent, so that a slow call can be followed from its
//! caller through the function to the API it called. This works whether
//! or not spans are exported; when they are (`--otlp-endpoint`), the
//! host's spans are in that trace too: each request's (named for its
//! route), `admission`, `invocation`, `instantiate`, `call`, `model.*` and
//! `http.outbound` (and, at debug level, `bridge.op`).

use std::fmt;
use std::future::Future;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

mod export;

pub use self::export::{Telemetry, TelemetryError};

/// The trace context of a request: its trace, the span it came from, and
/// whether the caller samples it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    sampled: bool,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

tokio::task_local! {
    /// The trace of the request a task serves (set by the API for each
    /// request, read where an invocation starts).
    static CURRENT: TraceContext;
}

impl TraceContext {
    /// The context a `traceparent` header gives, if it is valid (version
    /// `00`, or a later version read as `00` as the spec asks; ids not all
    /// zeros).
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let version = u8::from_str_radix(version, 16)
            .ok()
            .filter(|v| *v != 0xff)?;
        // Version 00 has exactly four fields; later ones may add more.
        if (version == 0 && parts.next().is_some()) || version_field(version, header).is_none() {
            return None;
        }
        let lower_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(trace, 32) || !lower_hex(parent, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(parent, &mut parent_id).ok()?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }

    /// A new trace, sampled.
    pub fn new_root() -> Self {
        // The thread's CSPRNG (seeded from the OS): no syscall per request.
        let mut trace_id: [u8; 16] = rand::random();
        let mut parent_id: [u8; 8] = rand::random();
        // An all-zero id means "no trace" to readers.
        trace_id[15] |= 1;
        parent_id[7] |= 1;
        Self {
            trace_id,
            parent_id,
            sampled: true,
        }
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// This context as a `traceparent` header value.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.parent_id),
            u8::from(self.sampled)
        )
    }

    /// The same trace, coming from the span `parent_id`.
    pub fn with_parent(self, parent_id: [u8; 8]) -> Self {
        Self { parent_id, ..self }
    }

    /// The same trace, from a new span id of its own (where no exported
    /// span names the hop).
    pub fn child(self) -> Self {
        let fresh = Self::new_root();
        self.with_parent(fresh.parent_id)
    }

    /// As the parent of an OpenTelemetry span.
    fn otel_parent(&self) -> opentelemetry::Context {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let remote = SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.parent_id),
            flags,
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(remote)
    }

    /// The context of `span` as exported, when spans are (its trace, and
    /// itself as the parent of what it calls); `None` otherwise.
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        let context = span.context();
        let otel = context.span();
        let span_context = otel.span_context();
        span_context.is_valid().then(|| Self {
            trace_id: span_context.trace_id().to_bytes(),
            parent_id: span_context.span_id().to_bytes(),
            sampled: span_context.is_sampled(),
        })
    }

    /// Makes `span` (just created, a request's root) part of the trace
    /// `incoming` names, and returns the request's context: as exported
    /// when spans are, else `incoming` or a new trace.
    pub fn adopt(span: &tracing::Span, incoming: Option<Self>) -> Self {
        if let Some(incoming) = incoming {
            // Without an OpenTelemetry layer there is nothing to set.
            let _ = span.set_parent(incoming.otel_parent());
        }
        Self::of_span(span)
            .or(incoming)
            .unwrap_or_else(Self::new_root)
    }

    /// Runs `work` with this as the current request's context.
    pub async fn scope<F: Future>(self, work: F) -> F::Output {
        CURRENT.scope(self, work).await
    }

    /// The current request's context (see [`TraceContext::scope`]), or a
    /// new trace for work no request started (jobs, schedules).
    pub fn current() -> Self {
        CURRENT
            .try_with(|context| *context)
            .unwrap_or_else(|_| Self::new_root())
    }
}

/// `Some` when a header of `version` is long enough for its fields.
fn version_field(version: u8, header: &str) -> Option<()> {
    let needed = 55;
    (header.len() == needed
        || (version > 0 && header.len() > needed && header.as_bytes()[needed] == b'-'))
        .then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_headers_parse_as_the_spec_says() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(header).unwrap();
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.traceparent(), header);
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(unsampled.traceparent().ends_with("-00"));
        // A later version with more fields reads as 00.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn children_keep_the_trace_and_take_a_new_parent() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.traceparent(), root.traceparent());
        assert_eq!(TraceContext::parse(&child.traceparent()), Some(child));
    }

    #[tokio::test]
    async fn the_current_context_is_the_requests_or_a_new_one() {
        let root = TraceContext::new_root();
        let seen = root.scope(async { TraceContext::current() }).await;
        assert_eq!(seen, root);
        assert_ne!(TraceContext::current().trace_id(), root.trace_id());
        // Without an OpenTelemetry layer, a span has no exported context:
        // the incoming one is adopted as it is.
        let span = tracing::info_span!("request");
        assert_eq!(TraceContext::adopt(&span, Some(root)), root);
    }
}
