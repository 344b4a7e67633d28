//! `application/problem+json` error responses (RFC 9457) with a stable code.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;

use super::{ResponseBody, full};
use crate::service::{Failure, ServiceError};

/// An error answer: status, stable code and a human-readable detail.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// `https://gust.invalid/problems/{code}`.
    #[serde(rename = "type")]
    kind: String,
    /// The status's reason phrase.
    title: String,
    /// The HTTP status.
    status: u16,
    /// What went wrong, for people.
    detail: String,
    /// The stable, machine-readable code.
    code: String,
    /// The invocation the problem belongs to, when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    invocation_id: Option<String>,
    /// Unsatisfied imports, for a deploy refused with `unsatisfied-imports`.
    #[serde(skip_serializing_if = "Option::is_none")]
    imports: Option<Vec<String>>,
    #[serde(skip)]
    retry_after: Option<u32>,
    #[serde(skip)]
    www_authenticate: bool,
}

impl Problem {
    /// A problem with `status`, `code` and `detail`.
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://gust.invalid/problems/{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.to_owned(),
            invocation_id: None,
            imports: None,
            retry_after: None,
            www_authenticate: false,
        }
    }

    /// The same problem as an anonymous caller sees it: a server-side
    /// failure (5xx) keeps its status, code and invocation id, and its
    /// detail becomes a short fixed sentence; what the function or host
    /// said (a backtrace, an error chain) stays in the invocation record.
    #[must_use]
    pub fn for_anonymous(mut self) -> Self {
        if self.status >= 500 {
            self.detail = match &self.invocation_id {
                Some(id) => format!(
                    "the function failed ({}); its owner can look up invocation {id}",
                    self.code
                ),
                None => format!("the function failed ({})", self.code),
            };
        }
        self
    }

    /// 400 with `code`.
    pub fn bad_request(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// 401, with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        let mut problem = Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail);
        problem.www_authenticate = true;
        problem
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// 413.
    pub fn too_large(limit: u64, what: &str) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!("{what} exceeds the limit of {limit} bytes"),
        )
    }

    /// 500 for failures of the host itself.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "host-error", detail)
    }

    /// Adds a `Retry-After` header (seconds).
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Names the invocation the problem belongs to.
    pub fn with_invocation(mut self, id: &str) -> Self {
        self.invocation_id = Some(id.to_owned());
        self
    }

    /// Lists unsatisfied imports (deploy errors).
    pub fn with_imports(mut self, imports: Vec<String>) -> Self {
        self.imports = Some(imports);
        self
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The human-readable explanation.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The stable code.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The HTTP response.
    pub fn into_response(self) -> http::Response<ResponseBody> {
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = http::Response::new(full(Bytes::from(body)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.www_authenticate {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(id) = self
            .invocation_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            headers.insert("gust-invocation-id", id);
        }
        response
    }
}

impl From<Failure> for Problem {
    fn from(failure: Failure) -> Self {
        let problem = Self::new(failure.status, &failure.code, failure.detail);
        if failure.retry {
            problem.retry_after(1)
        } else {
            problem
        }
    }
}

/// The one conversion of a service error into a problem document.
impl From<ServiceError> for Problem {
    fn from(error: ServiceError) -> Self {
        let imports = error.unsatisfied_imports().map(<[String]>::to_vec);
        let problem = Self::from(error.failure());
        match imports {
            Some(imports) => problem.with_imports(imports),
            None => problem,
        }
    }
}

impl axum::response::IntoResponse for Problem {
    fn into_response(self) -> axum::response::Response {
        Problem::into_response(self).map(axum::body::Body::new)
    }
}
