//! Outgoing HTTP(S) requests from a function (`wasi:http/outgoing-handler`),
//! to where the tenant's policy allows (`outbound_http`):
//!
//! ```no_run
//! # fn handle() -> Result<gust_sdk::Response, gust_sdk::Error> {
//! let token = std::env::var("API_TOKEN").unwrap_or_default(); // a secret
//! let reply = gust_sdk::Fetch::get("https://api.example.com/v1/models")
//!     .header("authorization", &format!("Bearer {token}"))
//!     .send()?;
//! Ok(gust_sdk::Response::text(reply.text()?))
//! # }
//! ```
//!
//! The call blocks the function (not the host) until the response and its
//! body have arrived. A refused or failed request is a [`FetchError`],
//! which `?` turns into the function's error (code `fetch-failed`, 502).

use std::time::Duration;

use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types::{
    ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use crate::bindings::wasi::io::streams::StreamError;

/// An outgoing request to build and [`send`](Fetch::send).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a request does nothing until it is sent"]
pub struct Fetch {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    connect_timeout: Option<Duration>,
    first_byte_timeout: Option<Duration>,
    between_bytes_timeout: Option<Duration>,
}

/// A response, its body read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The status code.
    pub status: u16,
    /// The headers, in order (names lowercase).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Why a request got no response: refused by the policy, or failed on the
/// way (DNS, connection, TLS, timeouts), with the `wasi:http` error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError {
    /// `METHOD url` of the request.
    pub request: String,
    /// What went wrong (`HttpRequestDenied`, `TlsCertificateError`,
    /// `ConnectionTimeout`…).
    pub reason: String,
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.request, self.reason)
    }
}

impl std::error::Error for FetchError {}

impl From<FetchError> for crate::Error {
    fn from(error: FetchError) -> Self {
        crate::Error::new("fetch-failed", error.to_string()).with_status(502)
    }
}

impl Fetched {
    /// The body as UTF-8 text.
    ///
    /// # Errors
    /// `invalid-response` (502) when it is not UTF-8.
    pub fn text(&self) -> Result<&str, crate::Error> {
        std::str::from_utf8(&self.body).map_err(|_| {
            crate::Error::new("invalid-response", "the response body is not UTF-8").with_status(502)
        })
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `https://host[:port][/path][?query]` split into scheme, authority and
/// path with query.
fn split_url(url: &str) -> Option<(Scheme, &str, String)> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else {
        return None;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let tail = tail.split('#').next().unwrap_or_default();
    let path = if tail.starts_with('/') {
        tail.to_owned()
    } else {
        format!("/{tail}")
    };
    Some((scheme, authority, path))
}

fn method_of(method: &str) -> Method {
    match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        other => Method::Other(other.to_owned()),
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Fetch {
    /// A request with `method` (`GET`, `POST`…) to `url` (`http://` or
    /// `https://`).
    pub fn new(method: &str, url: &str) -> Self {
        Self {
            method: method.to_ascii_uppercase(),
            url: url.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            connect_timeout: None,
            first_byte_timeout: None,
            between_bytes_timeout: None,
        }
    }

    /// `GET url`.
    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }

    /// `POST url` with `body`.
    pub fn post(url: &str, body: impl Into<Vec<u8>>) -> Self {
        Self::new("POST", url).body(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// How long connecting (TLS included) may take; by default, until the
    /// call's deadline.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// How long the response head may take once connected, and then each
    /// piece of the body; by default, until the call's deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.first_byte_timeout = Some(timeout);
        self.between_bytes_timeout = Some(timeout);
        self
    }

    /// Sends the request and reads the whole response.
    ///
    /// # Errors
    /// A malformed URL or header, a request the policy refuses, or one that
    /// fails on the way.
    pub fn send(self) -> Result<Fetched, FetchError> {
        let request_line = format!("{} {}", self.method, self.url);
        let fail = |reason: String| FetchError {
            request: request_line.clone(),
            reason,
        };
        let Some((scheme, authority, path)) = split_url(&self.url) else {
            return Err(fail(
                "not an http:// or https:// URL with a host".to_owned(),
            ));
        };
        let fields = Fields::new();
        for (name, value) in &self.headers {
            fields
                .append(name, value.as_bytes())
                .map_err(|e| fail(format!("header {name}: {e:?}")))?;
        }
        let request = OutgoingRequest::new(fields);
        let invalid = |what: &str| fail(format!("invalid {what}"));
        request
            .set_method(&method_of(&self.method))
            .map_err(|()| invalid("method"))?;
        request
            .set_scheme(Some(&scheme))
            .map_err(|()| invalid("scheme"))?;
        request
            .set_authority(Some(authority))
            .map_err(|()| invalid("host"))?;
        request
            .set_path_with_query(Some(&path))
            .map_err(|()| invalid("path"))?;
        let body = request.body().map_err(|()| invalid("body"))?;
        let options = RequestOptions::new();
        let timeouts = [
            self.connect_timeout,
            self.first_byte_timeout,
            self.between_bytes_timeout,
        ];
        if let Some(timeout) = self.connect_timeout {
            options
                .set_connect_timeout(Some(nanos(timeout)))
                .map_err(|()| invalid("connect timeout"))?;
        }
        if let Some(timeout) = self.first_byte_timeout {
            options
                .set_first_byte_timeout(Some(nanos(timeout)))
                .map_err(|()| invalid("first-byte timeout"))?;
        }
        if let Some(timeout) = self.between_bytes_timeout {
            options
                .set_between_bytes_timeout(Some(nanos(timeout)))
                .map_err(|()| invalid("between-bytes timeout"))?;
        }
        let timeouts = timeouts.iter().any(Option::is_some);
        let pending = outgoing_handler::handle(request, timeouts.then_some(options))
            .map_err(|code| fail(describe(&code)))?;
        {
            let stream = body.write().map_err(|()| invalid("body"))?;
            // Writes go out in pieces of at most 4096 bytes per the stream
            // contract.
            for piece in self.body.chunks(4096) {
                stream
                    .blocking_write_and_flush(piece)
                    .map_err(|e| fail(format!("sending the body: {e:?}")))?;
            }
        }
        OutgoingBody::finish(body, None).map_err(|code| fail(describe(&code)))?;
        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(fail(describe(&code))),
            Some(Err(())) | None => return Err(fail("no response".to_owned())),
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
            .collect();
        let incoming = response
            .consume()
            .map_err(|()| fail("the response has no body".to_owned()))?;
        let mut data = Vec::new();
        {
            let stream = incoming
                .stream()
                .map_err(|()| fail("the response body cannot be read".to_owned()))?;
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(error)) => {
                        return Err(fail(format!(
                            "reading the body: {}",
                            error.to_debug_string()
                        )));
                    }
                }
            }
        }
        Ok(Fetched {
            status,
            headers,
            body: data,
        })
    }
}

/// A `wasi:http` error code as a short reason.
fn describe(code: &ErrorCode) -> String {
    format!("{code:?}")
}

/// `GET url`, its response read whole.
///
/// # Errors
/// As [`Fetch::send`].
pub fn fetch(url: &str) -> Result<Fetched, FetchError> {
    Fetch::get(url).send()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let (scheme, authority, path) =
            split_url("https://api.example.com:8443/v1/x?q=1#frag").unwrap();
        assert!(matches!(scheme, Scheme::Https));
        assert_eq!(
            (authority, path.as_str()),
            ("api.example.com:8443", "/v1/x?q=1")
        );
        let (_, authority, path) = split_url("http://h?q").unwrap();
        assert_eq!((authority, path.as_str()), ("h", "/?q"));
        for bad in ["ftp://h/x", "https://", "api.example.com/x", "https://u@h/"] {
            assert!(split_url(bad).is_none(), "{bad}");
        }
    }
}
