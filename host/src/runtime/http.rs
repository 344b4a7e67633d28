//! `wasi:http` for guests: serving incoming requests to `wasi:http/proxy`
//! components and the egress policy for their outgoing requests.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{WasiBody, WasiHttpHooks};

type AllowFn = dyn Fn(&str, u16) -> bool + Send + Sync;

/// Decides which outgoing HTTP requests a guest may make. Nothing is allowed
/// by default.
#[derive(Clone, Default)]
pub struct OutboundPolicy {
    allow: Option<Arc<AllowFn>>,
}

impl OutboundPolicy {
    /// Allow requests whose host and port `allow` accepts.
    pub fn new(allow: impl Fn(&str, u16) -> bool + Send + Sync + 'static) -> Self {
        Self {
            allow: Some(Arc::new(allow)),
        }
    }

    /// Whether a request to `host:port` may be sent.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.allow.as_ref().is_some_and(|allow| allow(host, port))
    }
}

impl fmt::Debug for OutboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allow.is_some() {
            "OutboundPolicy(rules)"
        } else {
            "OutboundPolicy(deny all)"
        })
    }
}

type HttpError = wasmtime_wasi_http::Error;
type SendResult = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

/// The host's `wasi:http` hooks: outgoing requests pass the tenant's
/// egress policy, then go out over plain HTTP/1.1.
pub(crate) struct GustHttpHooks {
    pub(crate) outbound: OutboundPolicy,
}

impl WasiHttpHooks for GustHttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let uri = request.uri();
        let host = uri.host().unwrap_or_default().to_owned();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let allowed = !host.is_empty() && self.outbound.allows(&host, port);
        Box::new(async move {
            if !allowed {
                tracing::debug!(%host, port, "outgoing request denied by policy");
                return Err(HttpError::HttpRequestDenied);
            }
            if https {
                // No TLS client is linked into the host yet; refuse clearly
                // rather than downgrade to plain text.
                return Err(HttpError::TlsProtocolError);
            }
            send_plain_http(request, &host, port).await
        })
    }
}

async fn send_plain_http(request: http::Request<WasiBody>, host: &str, port: u16) -> SendResult {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(HttpError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(HttpError::Hyper)?;
    let mut driver = Box::pin(async move { connection.await.map_err(HttpError::Hyper) });
    let (parts, body) = request.into_parts();
    let mut request = http::Request::from_parts(parts, body);
    // HTTP/1.1 wants origin-form on the wire.
    if let Some(path) = request.uri().path_and_query().cloned()
        && let Ok(uri) = http::Uri::builder().path_and_query(path).build()
    {
        *request.uri_mut() = uri;
    }
    let send = sender.send_request(request);
    // Drive the connection until the response head arrives, then hand the
    // connection's remaining work (the body) back as the I/O future.
    let response = tokio::select! {
        response = send => response.map_err(HttpError::Hyper)?,
        result = &mut driver => {
            result?;
            return Err(HttpError::HttpResponseIncomplete);
        }
    };
    let response = response.map(|body| body.map_err(HttpError::Hyper).boxed_unsync());
    Ok((response, Box::new(driver)))
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
