//! `wasi:http` for guests: serving incoming requests to `wasi:http/proxy`
//! components, and the hooks that hand their outgoing requests to the
//! call's egress (see `egress`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use wasmtime_wasi_http::{WasiBody, WasiHttpHooks};

use tracing::Instrument as _;

use super::egress::{Egress, SendResult};

type HttpError = wasmtime_wasi_http::Error;

/// The host's `wasi:http` hooks: outgoing requests go through the call's
/// [`Egress`] (the tenant's rules, the address check, HTTP or HTTPS); a
/// store not yet armed for a call sends nothing.
pub(crate) struct GustHttpHooks {
    pub(crate) egress: Option<Egress>,
}

impl WasiHttpHooks for GustHttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let Some(egress) = &self.egress else {
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        };
        // Sent from a task of its own: the span carries the call's trace.
        let span = tracing::info_span!(
            "http.outbound",
            http.request.method = %request.method(),
            server.address = request.uri().host().unwrap_or_default(),
            url.scheme = request.uri().scheme_str().unwrap_or_default(),
        );
        Box::new(egress.clone().send(request, options).instrument(span))
    }
}

/// A request body that fails once more than `limit` bytes arrive, so an
/// oversized upload is refused while streaming, not after buffering it.
pub struct CappedBody<B> {
    inner: B,
    remaining: u64,
    limit: u64,
}

impl<B> CappedBody<B> {
    /// Wraps `inner`, allowing at most `limit` bytes.
    pub fn new(inner: B, limit: u64) -> Self {
        Self {
            inner,
            remaining: limit,
            limit,
        }
    }
}

/// The error of a [`CappedBody`] whose limit was exceeded.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit, in bytes.
    pub limit: u64,
}

/// Why reading a [`CappedBody`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CappedBodyError<E> {
    /// Over the limit.
    #[error(transparent)]
    TooLarge(#[from] BodyTooLarge),
    /// The underlying body failed.
    #[error("reading the request body: {0}")]
    Inner(E),
}

impl<E> From<CappedBodyError<E>> for HttpError
where
    E: Into<HttpError>,
{
    fn from(error: CappedBodyError<E>) -> Self {
        match error {
            CappedBodyError::TooLarge(too_large) => {
                HttpError::HttpRequestBodySize(Some(too_large.limit))
            }
            CappedBodyError::Inner(inner) => inner.into(),
        }
    }
}

impl<B> Body for CappedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = CappedBodyError<B::Error>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.remaining = 0;
                        return Poll::Ready(Some(Err(BodyTooLarge { limit: this.limit }.into())));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(CappedBodyError::Inner(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that says when it is done with (ended, failed or
/// dropped by the caller): a WASI 0.3 guest writes its body through the
/// store's event loop, which must keep running until then.
pub(crate) struct NotifyingBody {
    inner: wasmtime_wasi_http::p2::body::HyperOutgoingBody,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl NotifyingBody {
    /// Wraps `inner`; `done` fires once it is done with.
    pub(crate) fn new(
        inner: wasmtime_wasi_http::p2::body::HyperOutgoingBody,
        done: tokio::sync::oneshot::Sender<()>,
    ) -> Self {
        Self {
            inner,
            done: Some(done),
        }
    }

    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

impl Drop for NotifyingBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for NotifyingBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
