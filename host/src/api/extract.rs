//! What handlers take from a request: the authenticated caller, path
//! parameters and query flags (with problem documents as rejections), and
//! bodies read up to a limit.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, header};
use http_body_util::BodyExt as _;

use super::problem::Problem;
use crate::service::{Caller, Service};
use crate::tenancy::keys;

/// A tenant key's tenant: 401 for no key, a bad key or the admin key.
#[derive(Debug, Clone)]
pub(crate) struct TenantKey(pub(crate) String);

/// The admin key: 401 otherwise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdminKey;

/// The caller named by `Authorization: Bearer`; `None` when no key was
/// sent, 401 for a malformed header or a key of no one. A key seen valid
/// moments ago is answered from memory; otherwise the store is asked on a
/// blocking thread.
pub(crate) async fn caller(
    service: &Arc<Service>,
    headers: &HeaderMap,
) -> Result<Option<Caller>, Problem> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(keys::parse_bearer)
        .ok_or_else(|| Problem::unauthorized("the Authorization header must be `Bearer <key>`"))?;
    if let Some(known) = service.authenticate_cached(token) {
        return Ok(Some(known));
    }
    let token = token.to_owned();
    super::blocking(service, move |s| s.authenticate(&token))
        .await?
        .map(Some)
        .ok_or_else(|| Problem::unauthorized("the API key is not valid"))
}

impl FromRequestParts<Arc<Service>> for TenantKey {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        service: &Arc<Service>,
    ) -> Result<Self, Self::Rejection> {
        match caller(service, &parts.headers).await? {
            Some(Caller::Tenant(tenant)) => Ok(Self(tenant)),
            Some(Caller::Admin) => Err(Problem::unauthorized(
                "the admin key manages tenants; use a tenant's key for functions",
            )),
            None => Err(Problem::unauthorized(
                "an API key is required (Authorization: Bearer <key>)",
            )),
        }
    }
}

impl FromRequestParts<Arc<Service>> for AdminKey {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        service: &Arc<Service>,
    ) -> Result<Self, Self::Rejection> {
        match caller(service, &parts.headers).await? {
            Some(Caller::Admin) => Ok(Self),
            Some(Caller::Tenant(_)) => {
                Err(Problem::unauthorized("this endpoint needs the admin key"))
            }
            None => Err(Problem::unauthorized(
                "the admin key is required (Authorization: Bearer <key>)",
            )),
        }
    }
}

/// Path parameters, percent-decoded, with a problem document as the
/// rejection.
#[derive(Debug, Clone)]
pub(crate) struct Params<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for Params<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|e| Problem::bad_request("invalid-request", e.body_text()))
    }
}

/// Query parameters, percent-decoded, with a problem document as the
/// rejection.
#[derive(Debug, Clone)]
pub(crate) struct QueryParams<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for QueryParams<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|e| Problem::bad_request("invalid-request", e.body_text()))
    }
}

/// A boolean query flag: absent or `false` is false, `true` or a bare name
/// is true, anything else is an error naming the flag.
pub(crate) fn flag(value: Option<&str>, name: &str) -> Result<bool, Problem> {
    match value {
        None | Some("false") => Ok(false),
        Some("true" | "") => Ok(true),
        Some(other) => Err(Problem::bad_request(
            "invalid-request",
            format!("`{name}` must be true or false, not `{other}`"),
        )),
    }
}

/// The body length the client declared, if it sent a valid `Content-Length`.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The request's media type, `application/octet-stream` when it has none.
pub(crate) fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned()
}

/// Bytes of an oversized body the server still reads (and discards) before
/// answering 413, so that a client that does not wait for `100 Continue`
/// gets the answer instead of a broken pipe. Beyond it the connection closes.
const DRAIN_LIMIT: u64 = 64 << 20;

/// When the request's body must have arrived by: stamped on every request
/// as its head arrives (see `api::router`), from the host's
/// [`ConnectionLimits::body_timeout`](crate::service::ConnectionLimits).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyDeadline(pub(crate) tokio::time::Instant);

/// Stamps [`BodyDeadline`] on a request, `timeout` from now.
pub(crate) async fn stamp_body_deadline(
    axum::extract::State(timeout): axum::extract::State<std::time::Duration>,
    mut request: axum::extract::Request,
) -> axum::extract::Request {
    let deadline = tokio::time::Instant::now() + timeout;
    request.extensions_mut().insert(BodyDeadline(deadline));
    request
}

/// Reads a body, refusing it with 413 as soon as it passes `limit` (and
/// before reading anything when `Content-Length` already says so), and
/// with 408 when it has not all arrived by the request's [`BodyDeadline`]:
/// a client that trickles its body would otherwise hold what the request
/// holds (a connection, a buffer) for as long as it likes.
pub(crate) async fn read_capped(
    request: axum::extract::Request,
    limit: u64,
    what: &str,
) -> Result<(http::request::Parts, Bytes), Problem> {
    let deadline = request.extensions().get::<BodyDeadline>().copied();
    let read = read_body(request, limit, what);
    match deadline {
        Some(BodyDeadline(at)) => tokio::time::timeout_at(at, read).await.unwrap_or_else(|_| {
            Err(Problem::new(
                http::StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                format!("{what} did not arrive in time; send it at once, not in a trickle"),
            ))
        }),
        None => read.await,
    }
}

async fn read_body(
    request: axum::extract::Request,
    limit: u64,
    what: &str,
) -> Result<(http::request::Parts, Bytes), Problem> {
    let declared = declared_length(request.headers());
    let (parts, mut body) = request.into_parts();
    if declared.is_some_and(|length| length > limit) {
        if declared.is_some_and(|length| length <= DRAIN_LIMIT) {
            drain(&mut body).await;
        }
        return Err(Problem::too_large(limit, what));
    }
    let mut collected = bytes::BytesMut::new();
    let mut over = false;
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Problem::bad_request(
                "invalid-request",
                format!("reading the request body failed: {e}"),
            )
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > limit {
            // Stop keeping it; keep reading (to a bound) so the client can
            // finish sending and read our answer.
            over = true;
            collected.clear();
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        collected.extend_from_slice(data);
    }
    if over {
        return Err(Problem::too_large(limit, what));
    }
    Ok((parts, collected.freeze()))
}

async fn drain(body: &mut axum::body::Body) {
    let mut seen: u64 = 0;
    let discard = async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), discard).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_accept_true_false_and_bare_names() {
        assert!(!flag(None, "public").unwrap());
        assert!(!flag(Some("false"), "public").unwrap());
        assert!(flag(Some("true"), "public").unwrap());
        assert!(flag(Some(""), "public").unwrap());
        let problem = flag(Some("yes"), "public").unwrap_err();
        assert_eq!(problem.code(), "invalid-request");
        assert!(problem.detail().contains("`public` must be true or false"));
    }
}
