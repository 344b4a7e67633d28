//! Console sessions: a signed cookie instead of the key, and the CSRF
//! tokens of its forms.
//!
//! Signing in with an API key answers a cookie naming the tenant, the
//! key's public id, an expiry and a random nonce, with a MAC under the
//! host's session key (`Service::session_mac`). The key itself never
//! reaches the browser's storage. Every request checks the MAC, the expiry
//! and that the key is still valid, so revoking a key ends its sessions.
//! Forms carry a token derived from the session's nonce; a state-changing
//! request without it is refused. The sign-in form, having no session yet,
//! pairs its token with a short-lived cookie of its own (double submit).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::service::{Caller, Service, SignedIn};
use crate::store::now_millis;

/// The session cookie's name.
pub(super) const SESSION_COOKIE: &str = "gust_session";
/// The sign-in form's own cookie (its CSRF nonce).
pub(super) const SIGN_IN_COOKIE: &str = "gust_sign_in";
/// How long a session lasts.
pub(super) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long a sign-in form stays usable.
const SIGN_IN_TTL: Duration = Duration::from_secs(3600);
/// The form field and the header (htmx requests) carrying the CSRF token.
pub(super) const CSRF_FIELD: &str = "_csrf";
pub(super) const CSRF_HEADER: &str = "x-csrf-token";

/// A signed-in console session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    /// Who signed in, with which key.
    pub(crate) signed: SignedIn,
    /// When it ends, in Unix milliseconds.
    pub(crate) expires_at: u64,
    /// Random, per session: what its CSRF token is derived from.
    nonce: String,
}

impl Session {
    /// A new session for `signed`, ending [`SESSION_TTL`] from now.
    pub(crate) fn new(signed: SignedIn) -> Self {
        let nonce: [u8; 16] = rand::random();
        Self {
            signed,
            expires_at: now_millis() + SESSION_TTL.as_millis() as u64,
            nonce: hex::encode(nonce),
        }
    }

    /// The tenant whose pages the session may see, if it is a tenant's.
    pub(crate) fn tenant(&self) -> Option<&str> {
        match &self.signed.caller {
            Caller::Tenant(tenant) => Some(tenant),
            Caller::Admin => None,
        }
    }

    /// Whether the admin key signed in.
    pub(crate) fn is_admin(&self) -> bool {
        self.signed.caller == Caller::Admin
    }

    /// The cookie value: the fields, then their MAC.
    pub(crate) fn encode(&self, service: &Service) -> String {
        let (kind, tenant) = match &self.signed.caller {
            Caller::Admin => ("admin", ""),
            Caller::Tenant(tenant) => ("tenant", tenant.as_str()),
        };
        let payload = format!(
            "v1\n{kind}\n{tenant}\n{}\n{}\n{}",
            self.signed.key_id, self.expires_at, self.nonce
        );
        let mac = service.session_mac(&[b"session\0", payload.as_bytes()].concat());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(mac)
        )
    }

    /// The session a cookie value holds, if its MAC is this host's and it
    /// has not expired. (Whether its key is still valid is asked of the
    /// store by the extractor.)
    pub(crate) fn decode(service: &Service, value: &str) -> Option<Self> {
        let (payload, mac) = value.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let expected = service.session_mac(&[b"session\0", payload.as_slice()].concat());
        if !same(&mac, &expected) {
            return None;
        }
        let payload = String::from_utf8(payload).ok()?;
        let mut fields = payload.split('\n');
        if fields.next()? != "v1" {
            return None;
        }
        let (kind, tenant, key_id) = (fields.next()?, fields.next()?, fields.next()?);
        let expires_at: u64 = fields.next()?.parse().ok()?;
        let nonce = fields.next()?.to_owned();
        if fields.next().is_some() || expires_at <= now_millis() {
            return None;
        }
        let caller = match kind {
            "admin" => Caller::Admin,
            "tenant" if !tenant.is_empty() => Caller::Tenant(tenant.to_owned()),
            _ => return None,
        };
        Some(Self {
            signed: SignedIn {
                caller,
                key_id: key_id.to_owned(),
            },
            expires_at,
            nonce,
        })
    }

    /// The CSRF token of this session's forms.
    pub(crate) fn csrf(&self, service: &Service) -> String {
        hex::encode(service.session_mac(&[b"csrf\0", self.nonce.as_bytes()].concat()))
    }

    /// Whether `token` is this session's CSRF token.
    pub(crate) fn csrf_ok(&self, service: &Service, token: Option<&str>) -> bool {
        token.is_some_and(|token| same(token.as_bytes(), self.csrf(service).as_bytes()))
    }
}

/// Whether two byte strings are equal, in time that does not depend on
/// where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    bool::from(a.ct_eq(b))
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Whether the request reached the host over TLS (a terminating proxy in
/// front says so): then cookies are `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, scoped to the
/// console, `Secure` over TLS; `max_age` zero clears it.
pub(super) fn set_cookie(
    headers: &HeaderMap,
    name: &str,
    value: &str,
    max_age: Duration,
) -> HeaderValue {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    let text = format!(
        "{name}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        max_age.as_secs()
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

/// A new sign-in nonce, with the `Set-Cookie` that pairs it with the form.
pub(super) fn sign_in_nonce(headers: &HeaderMap) -> (String, HeaderValue) {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let cookie = set_cookie(headers, SIGN_IN_COOKIE, &nonce, SIGN_IN_TTL);
    (nonce, cookie)
}

/// The sign-in form's CSRF token for `nonce`.
pub(super) fn sign_in_token(service: &Service, nonce: &str) -> String {
    hex::encode(service.session_mac(&[b"sign-in\0", nonce.as_bytes()].concat()))
}

/// Whether a sign-in form's `token` pairs with the request's sign-in cookie.
pub(super) fn sign_in_token_ok(service: &Service, headers: &HeaderMap, token: &str) -> bool {
    cookie(headers, SIGN_IN_COOKIE)
        .is_some_and(|nonce| same(token.as_bytes(), sign_in_token(service, nonce).as_bytes()))
}

/// Where a request without a valid session goes: the sign-in page (htmx
/// requests are told to go there with `HX-Redirect`).
#[derive(Debug)]
pub(crate) struct SignInFirst {
    htmx: bool,
    clear: bool,
}

impl IntoResponse for SignInFirst {
    fn into_response(self) -> Response {
        let mut response = if self.htmx {
            let mut response = StatusCode::UNAUTHORIZED.into_response();
            response
                .headers_mut()
                .insert("hx-redirect", HeaderValue::from_static("/console/sign-in"));
            response
        } else {
            let mut response = StatusCode::SEE_OTHER.into_response();
            response.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_static("/console/sign-in"),
            );
            response
        };
        if self.clear {
            // A cookie that is not (or no longer) a session is dropped.
            let clear =
                format!("{SESSION_COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0");
            if let Ok(value) = HeaderValue::from_str(&clear) {
                response.headers_mut().append(header::SET_COOKIE, value);
            }
        }
        response
    }
}

impl FromRequestParts<Arc<Service>> for Session {
    type Rejection = SignInFirst;

    async fn from_request_parts(
        parts: &mut Parts,
        service: &Arc<Service>,
    ) -> Result<Self, Self::Rejection> {
        let htmx = parts.headers.contains_key("hx-request");
        let Some(value) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(SignInFirst { htmx, clear: false });
        };
        let refused = SignInFirst { htmx, clear: true };
        let session = Session::decode(service, value).ok_or(SignInFirst { htmx, clear: true })?;
        let signed = session.signed.clone();
        match super::super::blocking(service, move |s| s.session_key_valid(&signed)).await {
            Ok(true) => Ok(session),
            Ok(false) => Err(refused),
            // The store is out of reach: the page cannot be shown anyway,
            // and the session is not the problem.
            Err(_) => Err(SignInFirst { htmx, clear: false }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; gust_session=xyz"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("xyz"));
        assert_eq!(cookie(&headers, "b"), Some("2"));
        assert_eq!(cookie(&headers, "gust"), None);
    }

    #[test]
    fn cookies_are_secure_only_behind_tls() {
        let mut headers = HeaderMap::new();
        let plain = set_cookie(&headers, "n", "v", Duration::from_secs(5));
        assert_eq!(
            plain.to_str().ok(),
            Some("n=v; Path=/console; HttpOnly; SameSite=Strict; Max-Age=5")
        );
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let secure = set_cookie(&headers, "n", "v", Duration::from_secs(5));
        assert!(secure.to_str().is_ok_and(|v| v.ends_with("; Secure")));
    }
}
