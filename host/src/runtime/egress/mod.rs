//! Outbound HTTP for guests: the tenant's rules ([`OutboundPolicy`]) and
//! the client that sends an allowed request, over plain HTTP/1.1 or HTTPS
//! (rustls on the system's roots plus an operator's CA file), to the very
//! address that was checked.
//!
//! Wasmtime's own sender (`default_send_request`) resolves the name itself
//! when it connects and trusts only the roots compiled into it, so it could
//! neither connect to the address the policy checked nor to a private CA:
//! this client keeps its semantics (the guest's `request-options`
//! timeouts, origin-form requests, the connection driven beside the
//! response) and adds those two.

mod rules;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{RequestOptions, WasiBody};

pub use self::rules::{
    Destination, InvalidOutboundRule, OutboundPolicy, OutboundRule, restricted_kind,
};

type HttpError = wasmtime_wasi_http::Error;

/// What a send yields: the response, and the connection's remaining work
/// (the body) as a future to drive.
pub(crate) type SendResult = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

/// Why the egress client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The CA file given with `--ca-file` (or the TLS configuration) could
    /// not be used.
    #[error("--ca-file {0}")]
    CaFile(String),
}

/// The host's HTTPS client configuration, shared by every call.
#[derive(Clone)]
pub(crate) struct EgressClient {
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for EgressClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressClient").finish_non_exhaustive()
    }
}

impl EgressClient {
    /// Trusts the system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR`
    /// honoured) plus the certificates of `ca_file`, for private CAs.
    ///
    /// # Errors
    /// The CA file cannot be read or holds no certificate.
    pub(crate) fn new(ca_file: Option<&Path>) -> Result<Self, EgressError> {
        let mut config = crate::tls_roots::client_config(ca_file).map_err(EgressError::CaFile)?;
        // The connection speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: Arc::new(config),
        })
    }
}

/// Why outgoing requests of one call were refused, for its invocation
/// record. Bounded: a guest that retries in a loop leaves a few lines and
/// a count, not megabytes.
#[derive(Debug, Clone, Default)]
pub(crate) struct EgressLog(Arc<Mutex<EgressNotes>>);

#[derive(Debug, Default)]
struct EgressNotes {
    lines: Vec<String>,
    more: usize,
}

/// Denials kept per call; the rest are counted.
const MAX_NOTES: usize = 16;

impl EgressLog {
    fn note(&self, line: String) {
        if let Ok(mut notes) = self.0.lock() {
            if notes.lines.len() < MAX_NOTES {
                notes.lines.push(line);
            } else {
                notes.more += 1;
            }
        }
    }

    /// The notes so far, emptied; a last line counts those left out.
    pub(crate) fn take(&self) -> Vec<String> {
        let Ok(mut notes) = self.0.lock() else {
            return Vec::new();
        };
        let EgressNotes { mut lines, more } = std::mem::take(&mut *notes);
        if more > 0 {
            lines.push(format!("… and {more} more denied requests"));
        }
        lines
    }
}

/// One call's outgoing requests: its rules, the shared client, its
/// deadline, where denials are noted, and the trace context to pass on.
#[derive(Clone)]
pub(crate) struct Egress {
    pub(crate) policy: OutboundPolicy,
    pub(crate) client: EgressClient,
    pub(crate) deadline: std::time::Instant,
    pub(crate) log: EgressLog,
    /// The trace the call belongs to, which its outgoing requests carry on.
    pub(crate) trace: Option<crate::trace::TraceContext>,
}

/// The timeouts of one request: the guest's options, none past the call's
/// deadline.
struct Timeouts {
    connect: Duration,
    first_byte: Duration,
    between_bytes: Duration,
    deadline: Instant,
}

impl Timeouts {
    fn new(options: Option<&RequestOptions>, deadline: std::time::Instant) -> Self {
        let deadline = Instant::from_std(deadline);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let cap = |chosen: Option<Duration>| chosen.map_or(remaining, |d| d.min(remaining));
        Self {
            connect: cap(options.and_then(|o| o.connect_timeout)),
            first_byte: cap(options.and_then(|o| o.first_byte_timeout)),
            between_bytes: options
                .and_then(|o| o.between_bytes_timeout)
                .unwrap_or(remaining),
            deadline,
        }
    }
}

impl Egress {
    /// Sends `request` if the policy allows it, to an address that was
    /// checked: resolve, check every address, connect to a checked one.
    pub(crate) async fn send(
        self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> SendResult {
        let timeouts = Timeouts::new(options.as_ref(), self.deadline);
        let uri = request.uri();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let Some(destination) = uri.host().and_then(Destination::of_host) else {
            return Err(HttpError::HttpRequestUriInvalid);
        };
        if let Err(reason) = self.policy.admits(https, &destination, port) {
            return Err(self.deny(reason));
        }
        let connect_by = Instant::now() + timeouts.connect;
        let addresses = match &destination {
            Destination::Ip(ip) => vec![SocketAddr::new(*ip, port)],
            Destination::Name(name) => {
                let addresses = resolve(name, port, connect_by).await?;
                for address in &addresses {
                    if let Err(reason) = self.policy.admits_address(https, name, address.ip(), port)
                    {
                        // One refused address refuses the name: an answer
                        // that mixes public and private addresses is how a
                        // rebinding attack looks.
                        return Err(self.deny(reason));
                    }
                }
                addresses
            }
        };
        let stream = connect(&addresses, connect_by).await?;
        // The next hop's parent: this request's span where spans are
        // exported, else a new span id in the call's trace.
        let next_hop = crate::trace::TraceContext::of_span(&tracing::Span::current())
            .or_else(|| self.trace.map(crate::trace::TraceContext::child));
        if let Some(next_hop) = next_hop
            && let Ok(value) = http::HeaderValue::from_str(&next_hop.traceparent())
        {
            request.headers_mut().insert("traceparent", value);
        }
        origin_form(&mut request);
        if https {
            let name = match &destination {
                Destination::Ip(ip) => ServerName::IpAddress((*ip).into()),
                Destination::Name(name) => ServerName::try_from(name.clone())
                    .map_err(|_| HttpError::HttpRequestUriInvalid)?,
            };
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.client.tls));
            let handshake = connector.connect(name, stream);
            let stream = match tokio::time::timeout_at(connect_by, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return Err(tls_error(&error)),
                Err(_) => return Err(HttpError::ConnectionTimeout),
            };
            exchange(stream, request, &timeouts, connect_by).await
        } else {
            exchange(stream, request, &timeouts, connect_by).await
        }
    }

    fn deny(&self, reason: String) -> HttpError {
        tracing::debug!(%reason, "outgoing request denied");
        self.log.note(format!("outgoing request denied: {reason}"));
        HttpError::HttpRequestDenied
    }
}

/// HTTP/1.1 wants origin-form on the wire; the scheme and authority went
/// into the connection and the `Host` header.
fn origin_form(request: &mut http::Request<WasiBody>) {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str)
        .to_owned();
    if let Ok(uri) = http::Uri::builder().path_and_query(path).build() {
        *request.uri_mut() = uri;
    }
}

/// The addresses `name` resolves to, before `by`.
async fn resolve(name: &str, port: u16, by: Instant) -> Result<Vec<SocketAddr>, HttpError> {
    let lookup = tokio::net::lookup_host((name, port));
    match tokio::time::timeout_at(by, lookup).await {
        Err(_) => Err(HttpError::DnsTimeout),
        Ok(Err(error)) => {
            tracing::debug!(%name, %error, "outgoing request: name resolution failed");
            Err(HttpError::DnsError {
                rcode: None,
                info_code: None,
            })
        }
        Ok(Ok(found)) => {
            let mut addresses: Vec<SocketAddr> = found.collect();
            addresses.dedup();
            if addresses.is_empty() {
                Err(HttpError::DestinationNotFound)
            } else {
                Ok(addresses)
            }
        }
    }
}

/// A connection to the first of `addresses` that answers before `by`.
async fn connect(addresses: &[SocketAddr], by: Instant) -> Result<TcpStream, HttpError> {
    let mut last = HttpError::DestinationNotFound;
    for address in addresses {
        match tokio::time::timeout_at(by, TcpStream::connect(address)).await {
            Err(_) => return Err(HttpError::ConnectionTimeout),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(error)) => last = connect_error(&error, address.ip()),
        }
    }
    Err(last)
}

fn connect_error(error: &io::Error, ip: IpAddr) -> HttpError {
    tracing::debug!(%ip, %error, "outgoing request: connect failed");
    match error.kind() {
        io::ErrorKind::ConnectionRefused => HttpError::ConnectionRefused,
        io::ErrorKind::TimedOut => HttpError::ConnectionTimeout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            HttpError::DestinationUnavailable
        }
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            HttpError::ConnectionTerminated
        }
        _ => HttpError::DestinationUnavailable,
    }
}

/// The `wasi:http` error code of a failed TLS handshake: the certificate,
/// an alert from the server, or the protocol.
fn tls_error(error: &io::Error) -> HttpError {
    tracing::debug!(%error, "outgoing request: TLS handshake failed");
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => HttpError::ConnectionTerminated,
            _ => HttpError::TlsProtocolError,
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertRevocationList(_) => HttpError::TlsCertificateError,
        rustls::Error::AlertReceived(alert) => HttpError::TlsAlertReceived {
            alert_id: Some(u8::from(*alert)),
            alert_message: Some(format!("{alert:?}")),
        },
        _ => HttpError::TlsProtocolError,
    }
}

/// Sends `request` over `stream` and waits for the response head (the
/// connection's handshake bounded by `connect_by`, the head by the
/// first-byte timeout); the body then comes with the between-bytes timeout.
async fn exchange<S>(
    stream: S,
    request: http::Request<WasiBody>,
    timeouts: &Timeouts,
    connect_by: Instant,
) -> SendResult
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = hyper::client::conn::http1::handshake(TokioIo::new(stream));
    let (mut sender, connection) = match tokio::time::timeout_at(connect_by, handshake).await {
        Ok(result) => result.map_err(HttpError::Hyper)?,
        Err(_) => return Err(HttpError::ConnectionTimeout),
    };
    let mut driver = Box::pin(async move { connection.await.map_err(HttpError::Hyper) });
    let send = sender.send_request(request);
    let first_byte_by = (Instant::now() + timeouts.first_byte).min(timeouts.deadline);
    // Drive the connection until the response head arrives, then hand the
    // connection's remaining work (the body) back as the I/O future.
    let response = tokio::select! {
        response = tokio::time::timeout_at(first_byte_by, send) => match response {
            Ok(response) => response.map_err(HttpError::Hyper)?,
            Err(_) => return Err(HttpError::ConnectionReadTimeout),
        },
        result = &mut driver => {
            result?;
            return Err(HttpError::HttpResponseIncomplete);
        }
    };
    let between = timeouts.between_bytes;
    let deadline = timeouts.deadline;
    let response = response.map(|incoming| {
        TimedBody {
            inner: incoming,
            between,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(
                (Instant::now() + between).min(deadline),
            )),
        }
        .boxed_unsync()
    });
    Ok((response, Box::new(driver)))
}

/// A response body that fails with `connection-read-timeout` when no frame
/// comes within the between-bytes timeout, or the call's deadline passes.
struct TimedBody {
    inner: hyper::body::Incoming,
    between: Duration,
    deadline: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = (Instant::now() + this.between).min(this.deadline);
                this.timer.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(if error.is_timeout() {
                HttpError::HttpResponseTimeout
            } else {
                HttpError::Hyper(error)
            }))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_timeouts_are_capped_by_the_calls_deadline() {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        // None chosen: each waits at most until the deadline.
        let defaults = Timeouts::new(None, deadline);
        assert!(defaults.connect <= Duration::from_secs(2));
        assert!(defaults.connect > Duration::from_millis(1500));
        assert!(defaults.first_byte <= Duration::from_secs(2));
        // Shorter ones are kept; longer ones cut to the deadline.
        let options = RequestOptions {
            connect_timeout: Some(Duration::from_millis(100)),
            first_byte_timeout: Some(Duration::from_secs(60)),
            between_bytes_timeout: Some(Duration::from_millis(250)),
        };
        let chosen = Timeouts::new(Some(&options), deadline);
        assert_eq!(chosen.connect, Duration::from_millis(100));
        assert!(chosen.first_byte <= Duration::from_secs(2));
        assert_eq!(chosen.between_bytes, Duration::from_millis(250));
        // Past the deadline, nothing waits.
        let late = Timeouts::new(Some(&options), std::time::Instant::now());
        assert_eq!(late.connect, Duration::ZERO);
    }

    #[test]
    fn denials_are_kept_bounded_and_counted() {
        let log = EgressLog::default();
        for i in 0..(MAX_NOTES + 5) {
            log.note(format!("denied {i}"));
        }
        let notes = log.take();
        assert_eq!(notes.len(), MAX_NOTES + 1);
        assert_eq!(notes[MAX_NOTES], "… and 5 more denied requests");
        assert!(log.take().is_empty());
    }

    #[test]
    fn a_ca_file_that_is_not_pem_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let error = EgressClient::new(Some(&path)).unwrap_err().to_string();
        assert!(
            error.contains("ca.pem") && error.contains("no certificate"),
            "{error}"
        );
        let missing = EgressClient::new(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing.pem"), "{missing}");
    }
}
