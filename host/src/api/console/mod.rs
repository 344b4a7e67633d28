//! The web console at `/console/`: server-rendered pages (maud templates,
//! a little htmx) over the same service operations as the JSON API, signed
//! in with an API key and kept by a signed session cookie (see
//! [`session`]). Assets are embedded in the binary; nothing needs Node to
//! build or run. `gust serve --no-console` leaves it out.

mod account;
mod charts;
mod functions;
mod session;
mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use maud::{Markup, html};

use self::session::{CSRF_HEADER, SESSION_COOKIE, SESSION_TTL, SIGN_IN_COOKIE, Session};
use self::views::{Frame, csrf_input, page, problem_box};
use super::problem::Problem;
use crate::service::{Caller, Service, ServiceError};

/// The console's routes.
pub(super) fn router() -> Router<Arc<Service>> {
    Router::new()
        .route("/console", get(|| async { see_other("/console/") }))
        .route("/console/", get(home))
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/assets/{file}", get(asset))
        .route(
            "/console/functions",
            get(functions::list)
                .post(functions::deploy)
                // The upload is read with the tenant's own component limit.
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/console/functions/{name}", get(functions::detail))
        .route("/console/functions/{name}/invoke", post(functions::invoke))
        .route("/console/functions/{name}/delete", post(functions::delete))
        .route("/console/functions/{name}/live", get(functions::live))
        .route("/console/invocations/{id}", get(functions::invocation))
        .route("/console/jobs", get(account::jobs))
        .route("/console/jobs/{id}/cancel", post(account::cancel_job))
        .route("/console/schedules", get(account::schedules))
        .route("/console/models", get(account::models))
        .route("/console/usage", get(account::usage))
        .route(
            "/console/keys",
            get(account::keys).post(account::create_key),
        )
        .route("/console/keys/{id}/revoke", post(account::revoke_key))
        .route(
            "/console/tenants",
            get(account::tenants).post(account::create_tenant),
        )
        .layer(axum::middleware::map_response(page_headers))
}

/// Headers of every console answer: nothing cached, no framing, scripts
/// and styles from the console's own assets only.
async fn page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// A console failure, answered as a page with the problem the JSON API
/// would give (status, code, detail).
#[derive(Debug)]
pub(crate) struct PageError(Problem);

impl From<Problem> for PageError {
    fn from(problem: Problem) -> Self {
        Self(problem)
    }
}

impl From<ServiceError> for PageError {
    fn from(error: ServiceError) -> Self {
        Self(Problem::from(error))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let problem = self.0;
        let status = problem.status();
        let body = html! {
            (problem_box(status.as_u16(), problem.code(), problem.detail()))
            p { a href="/console/" { "Back to the console" } }
        };
        let frame = Frame {
            session: None,
            csrf: "",
            current: "",
        };
        let title = status.canonical_reason().unwrap_or("Error");
        (status, page(&frame, title, &body)).into_response()
    }
}

/// A form body, refused with a problem page (not axum's plain-text
/// rejection) when it cannot be read.
#[derive(Debug)]
pub(crate) struct PageForm<T>(pub(crate) T);

impl<T, S> axum::extract::FromRequest<S> for PageForm<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = PageError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, PageError> {
        axum::Form::<T>::from_request(request, state)
            .await
            .map(|axum::Form(form)| Self(form))
            .map_err(|e| PageError(Problem::bad_request("invalid-request", e.body_text())))
    }
}

/// What a console handler answers.
pub(crate) type Answer = Result<Response, PageError>;

/// A `303 See Other` to `location` (after a form, and for the bare root).
fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// 404 for a page of the wrong kind of session (a tenant on the admin's
/// pages, the admin on a tenant's), as the API answers for what is not
/// the caller's.
fn not_yours() -> PageError {
    PageError(Problem::not_found("no such page for this sign-in"))
}

/// The tenant a tenant page is for; 404 for the admin.
fn tenant_of(session: &Session) -> Result<String, PageError> {
    session.tenant().map(str::to_owned).ok_or_else(not_yours)
}

/// Refuses a state-changing request whose CSRF token (form field or
/// header) is not its session's.
fn check_csrf(
    service: &Service,
    session: &Session,
    headers: &HeaderMap,
    field: Option<&str>,
) -> Result<(), PageError> {
    let token = field.or_else(|| headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()));
    if session.csrf_ok(service, token) {
        Ok(())
    } else {
        Err(PageError(Problem::new(
            StatusCode::FORBIDDEN,
            "csrf-refused",
            "the form's CSRF token is missing or not this session's; reload the page and try again",
        )))
    }
}

/// What a tenant's state-changing form does, once its CSRF token is
/// checked: `work` on the tenant, on a blocking thread.
async fn tenant_action<T: Send + 'static>(
    service: &Arc<Service>,
    session: &Session,
    headers: &HeaderMap,
    csrf: Option<&str>,
    work: impl FnOnce(&Service, &str) -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, PageError> {
    let tenant = tenant_of(session)?;
    check_csrf(service, session, headers, csrf)?;
    Ok(super::blocking(service, move |s| work(s, &tenant)).await?)
}

/// A page of `session`'s: the frame with its navigation and CSRF token.
fn session_page(
    service: &Service,
    session: &Session,
    current: &str,
    title: &str,
    body: &Markup,
) -> Response {
    let csrf = session.csrf(service);
    let frame = Frame {
        session: Some(session),
        csrf: &csrf,
        current,
    };
    page(&frame, title, body).into_response()
}

/// `/console/`: the session's first page, or the sign-in page.
async fn home(session: Result<Session, session::SignInFirst>) -> Response {
    match session {
        Ok(session) if session.is_admin() => see_other("/console/tenants"),
        Ok(_) => see_other("/console/functions"),
        Err(sign_in) => sign_in.into_response(),
    }
}

/// The sign-in form, with `problem` above it after a failed try.
fn sign_in_form(
    service: &Service,
    headers: &HeaderMap,
    status: StatusCode,
    problem: Option<&Problem>,
) -> Response {
    let (nonce, cookie) = session::sign_in_nonce(headers);
    let token = session::sign_in_token(service, &nonce);
    let body = html! {
        @if let Some(problem) = problem {
            (problem_box(problem.status().as_u16(), problem.code(), problem.detail()))
        }
        form.sign-in method="post" action="/console/sign-in" {
            (csrf_input(&token))
            label for="key" { "API key" }
            input #key type="password" name="key" autocomplete="off" required
                aria-describedby="key-help" autofocus;
            p #key-help .help {
                "A tenant's key (the demo tenant's is in "
                code { "gust-data/demo.key" }
                "), or the admin key. The browser keeps a signed session, never the key."
            }
            button type="submit" { "Sign in" }
        }
    };
    let frame = Frame {
        session: None,
        csrf: &token,
        current: "",
    };
    let mut response = (status, page(&frame, "Sign in", &body)).into_response();
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

async fn sign_in_page(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    sign_in_form(&service, &headers, StatusCode::OK, None)
}

/// The sign-in form's fields.
#[derive(Debug, serde::Deserialize)]
struct SignInForm {
    key: String,
    #[serde(rename = "_csrf")]
    csrf: String,
}

async fn sign_in(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    PageForm(form): PageForm<SignInForm>,
) -> Response {
    if !session::sign_in_token_ok(&service, &headers, &form.csrf) {
        let problem = Problem::new(
            StatusCode::FORBIDDEN,
            "csrf-refused",
            "the sign-in form expired or did not come from this console; try again",
        );
        return sign_in_form(&service, &headers, StatusCode::FORBIDDEN, Some(&problem));
    }
    let key = form.key.trim().to_owned();
    let signed = match super::blocking(&service, move |s| s.sign_in(&key)).await {
        Ok(Some(signed)) => signed,
        Ok(None) => {
            let problem = Problem::unauthorized("the API key is not valid");
            return sign_in_form(&service, &headers, StatusCode::UNAUTHORIZED, Some(&problem));
        }
        Err(problem) => return sign_in_form(&service, &headers, problem.status(), Some(&problem)),
    };
    let landing = match signed.caller {
        Caller::Admin => "/console/tenants",
        Caller::Tenant(_) => "/console/functions",
    };
    let session = Session::new(signed);
    let mut response = see_other(landing);
    let cookies = response.headers_mut();
    cookies.append(
        header::SET_COOKIE,
        session::set_cookie(
            &headers,
            SESSION_COOKIE,
            &session.encode(&service),
            SESSION_TTL,
        ),
    );
    cookies.append(
        header::SET_COOKIE,
        session::set_cookie(&headers, SIGN_IN_COOKIE, "", std::time::Duration::ZERO),
    );
    response
}

/// A form that only carries its CSRF token.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct TokenForm {
    #[serde(rename = "_csrf")]
    csrf: Option<String>,
}

async fn sign_out(
    State(service): State<Arc<Service>>,
    session: Session,
    headers: HeaderMap,
    PageForm(form): PageForm<TokenForm>,
) -> Answer {
    check_csrf(&service, &session, &headers, form.csrf.as_deref())?;
    let mut response = see_other("/console/sign-in");
    response.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(&headers, SESSION_COOKIE, "", std::time::Duration::ZERO),
    );
    Ok(response)
}

/// The console's embedded assets.
async fn asset(super::extract::Params(file): super::extract::Params<String>) -> Response {
    let (body, kind): (&'static [u8], &str) = match file.as_str() {
        "console.css" => (include_bytes!("assets/console.css"), "text/css"),
        "console.js" => (include_bytes!("assets/console.js"), "text/javascript"),
        // htmx 2.0.11 (0BSD), from the npm package `htmx.org`.
        "htmx.min.js" => (include_bytes!("assets/htmx.min.js"), "text/javascript"),
        _ => return PageError(Problem::not_found("no such asset")).into_response(),
    };
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // Assets change only with the binary.
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}
