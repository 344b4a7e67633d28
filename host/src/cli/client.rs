//! The HTTP client shared by the subcommands that talk to a Gust host
//! (`deploy`, `invoke`, `ls`, `rm`, `logs`, `tenants`, `keys`): connection
//! flags, key lookup, URL building, problem documents and the exit status each
//! kind of failure maps to.

use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{EXIT_BAD_INPUT, EXIT_FUNCTION_FAILED, EXIT_HOST};

/// The request body type every subcommand sends.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Header carrying the id of the invocation a response belongs to.
pub(crate) const INVOCATION_ID: &str = "gust-invocation-id";

const DEFAULT_URL: &str = "http://127.0.0.1:8080";
const PROBLEM_JSON: &str = "application/problem+json";
/// How much of a non-JSON error body is quoted in the one-line error.
const QUOTE_LIMIT: usize = 200;

/// Where the Gust host is and which key to use: shared by every client
/// subcommand.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection")]
pub(crate) struct ConnectArgs {
    /// Base URL of the Gust host (plain HTTP only, no TLS).
    ///
    /// This client does not speak TLS: reach a remote host through an SSH
    /// tunnel or a local TLS-terminating proxy. A path prefix
    /// (`http://host/gust`) is kept.
    #[arg(long, env = "GUST_URL", default_value = DEFAULT_URL, value_name = "URL", global = true)]
    pub(crate) url: String,

    /// API key, `gust_…` [default: $GUST_KEY; admin commands: $GUST_ADMIN_KEY, then $GUST_KEY].
    ///
    /// Sent as `Authorization: Bearer`. The flag wins over the environment.
    /// Without it, tenant commands read `GUST_KEY`; admin commands (`tenants`,
    /// and `keys create|revoke --tenant`) read `GUST_ADMIN_KEY` first, then
    /// `GUST_KEY`. Prefer the environment: command-line arguments are visible
    /// to other users of this machine.
    #[arg(long, value_name = "KEY", global = true)]
    pub(crate) key: Option<String>,
}

/// Which kind of key an endpoint wants; decides the environment variables
/// consulted when `--key` is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// A tenant key: functions, invocations, logs, the tenant's own keys.
    Tenant,
    /// The admin key: tenants and their keys.
    Admin,
}

impl KeyKind {
    fn env_vars(self) -> &'static [&'static str] {
        match self {
            KeyKind::Tenant => &["GUST_KEY"],
            KeyKind::Admin => &["GUST_ADMIN_KEY", "GUST_KEY"],
        }
    }
}

/// Picks the key: `--key`, else the first non-empty variable of
/// [`KeyKind::env_vars`] as seen through `env`.
pub(crate) fn resolve_key(
    flag: Option<&str>,
    kind: KeyKind,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, ClientError> {
    let key = match flag {
        Some(key) => Some(key.to_owned()),
        None => kind
            .env_vars()
            .iter()
            .find_map(|var| env(var).filter(|v| !v.trim().is_empty())),
    };
    let Some(key) = key else {
        return Err(ClientError::Input(match kind {
            KeyKind::Tenant => "no API key: pass --key or set GUST_KEY".to_owned(),
            KeyKind::Admin => "no admin key: pass --key or set GUST_ADMIN_KEY (a host that \
                               generated one keeps it in <data-dir>/admin.key)"
                .to_owned(),
        }));
    };
    let key = key.trim().to_owned();
    if key.is_empty() {
        return Err(ClientError::Input("the API key is empty".to_owned()));
    }
    Ok(key)
}

/// A parsed `--url`: scheme `http`, an authority and an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseUrl {
    authority: Authority,
    /// Path prefix without a trailing slash; empty for the root.
    prefix: String,
}

impl BaseUrl {
    /// Parses a base URL; a missing scheme means `http://`.
    pub(crate) fn parse(raw: &str) -> Result<Self, ClientError> {
        // An empty `GUST_URL=` reads as unset, as an empty variable usually does.
        let raw = match raw.trim() {
            "" => DEFAULT_URL,
            raw => raw,
        };
        let bad = |why: &str| ClientError::Input(format!("--url `{raw}`: {why}"));
        let with_scheme = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("http://{raw}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => {}
            Some(s) if *s == Scheme::HTTPS => {
                return Err(bad(
                    "https is not supported: this client speaks plain HTTP only; reach a TLS \
                     host through an SSH tunnel or a local TLS-terminating proxy",
                ));
            }
            _ => return Err(bad("only http:// URLs are supported")),
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad(
                "user information in the URL is not supported; use --key",
            ));
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed in the base URL"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(BaseUrl { authority, prefix })
    }

    /// The URL of `path_and_query`, which starts with `/` and has its
    /// variable segments already encoded with [`segment`].
    pub(crate) fn join(&self, path_and_query: &str) -> Result<Uri, ClientError> {
        let pq: PathAndQuery = format!("{}{path_and_query}", self.prefix)
            .parse()
            .map_err(|e| ClientError::Input(format!("bad request path `{path_and_query}`: {e}")))?;
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| ClientError::Input(format!("bad URL: {e}")))
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.prefix)
    }
}

/// Percent-encodes one path segment (a function, tenant or key name).
///
/// Everything but ASCII letters, digits, `-`, `_` and `~` is encoded; `.` is
/// too, so that a name like `..` cannot become a dot-segment that some proxy
/// normalises into another path.
pub(crate) fn segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Parses `NAME:VALUE` for `-H`.
pub(crate) fn parse_header(raw: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = raw
        .split_once(':')
        .ok_or_else(|| format!("`{raw}` is not NAME:VALUE"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("`{raw}` has an empty header name"));
    }
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name"))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the value of `{name}` is not a valid header value"))?;
    Ok((name, value))
}

/// An RFC 9457 problem document as Gust sends it (see docs/api.md). Every
/// field is optional so that an error from a proxy still reads well.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct Problem {
    /// Stable, machine-readable error code, e.g. `not-found`.
    #[serde(default)]
    pub(crate) code: Option<String>,
    /// Human-readable explanation.
    #[serde(default)]
    pub(crate) detail: Option<String>,
    /// Short summary of the problem type.
    #[serde(default)]
    pub(crate) title: Option<String>,
    /// The HTTP status the host meant.
    #[serde(default)]
    pub(crate) status: Option<u16>,
    /// The invocation that ran, when one did.
    #[serde(default)]
    pub(crate) invocation_id: Option<String>,
    /// Unsatisfied imports of a rejected component.
    #[serde(default)]
    pub(crate) imports: Option<Vec<String>>,
}

/// A non-2xx answer from the host, ready to be shown on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    /// The HTTP status of the response.
    pub(crate) status: u16,
    /// The problem document, or one built from a body that was not one.
    pub(crate) problem: Problem,
    /// The `Retry-After` header of a 429 or 503.
    pub(crate) retry_after: Option<String>,
}

impl ApiError {
    /// Builds the error from a response's status, headers and body. A body
    /// that is not a problem document is quoted (first line, shortened).
    pub(crate) fn from_parts(status: StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Self {
        let mut problem = serde_json::from_slice::<Problem>(body).unwrap_or_else(|_| Problem {
            detail: quote_body(body),
            ..Problem::default()
        });
        if problem.invocation_id.is_none() {
            problem.invocation_id = header_str(headers, INVOCATION_ID);
        }
        ApiError {
            status: status.as_u16(),
            problem,
            retry_after: header_str(headers, RETRY_AFTER.as_str()),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.problem;
        let detail = p
            .detail
            .as_deref()
            .or(p.title.as_deref())
            .filter(|d| !d.trim().is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                StatusCode::from_u16(self.status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("request failed")
                    .to_owned()
            });
        // One line, whatever the server put in `detail`.
        let detail = detail.split_whitespace().collect::<Vec<_>>().join(" ");
        write!(f, "{detail} (")?;
        if let Some(code) = p.code.as_deref().filter(|c| !c.is_empty()) {
            write!(f, "{code}, ")?;
        }
        write!(f, "HTTP {}", self.status)?;
        if let Some(id) = &p.invocation_id {
            write!(f, ", invocation {id}")?;
        }
        if let Some(after) = &self.retry_after {
            write!(f, "; retry after {after}s")?;
        }
        write!(f, ")")
    }
}

fn quote_body(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut quoted: String = line.chars().take(QUOTE_LIMIT).collect();
    if line.chars().count() > QUOTE_LIMIT {
        quoted.push('…');
    }
    Some(quoted)
}

fn header_str(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Whether a response carries a problem document.
pub(crate) fn is_problem(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(PROBLEM_JSON))
}

/// Why a client subcommand failed; each kind has its exit status.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// Bad local input: an unreadable file, a bad flag value, no key (exit 2).
    Input(String),
    /// The host answered with an error (exit 1). Boxed: it is by far the
    /// largest variant.
    Api(Box<ApiError>),
    /// `gust invoke`: the function answered with a non-2xx status of its own
    /// (its body was written to stdout) (exit 1).
    FunctionStatus {
        /// The status the function answered with.
        status: u16,
        /// The `gust-invocation-id` header.
        invocation_id: Option<String>,
    },
    /// Nothing answered at the URL (exit 3).
    Unreachable {
        /// The base URL tried.
        url: String,
        /// Why, e.g. `Connection refused (os error 111)`.
        reason: String,
    },
    /// The exchange broke or the answer made no sense (exit 3).
    Host(String),
    /// Writing our own output failed, e.g. a closed pipe (exit 3).
    Output(std::io::Error),
    /// `gust job`/`gust spawn --wait`: the job failed or was cancelled
    /// (exit 1).
    JobFailed {
        /// The job.
        id: String,
        /// `failed` or `cancelled`.
        status: String,
        /// The error's code.
        code: String,
        /// The error's message.
        message: String,
    },
    /// `gust map`: some inputs failed (their lines say why) (exit 1).
    MapFailures {
        /// Inputs that failed.
        failed: u64,
        /// Inputs in all.
        total: u64,
    },
}

impl ClientError {
    /// The process exit status for this failure.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            ClientError::Input(_) => EXIT_BAD_INPUT,
            ClientError::Api(_)
            | ClientError::FunctionStatus { .. }
            | ClientError::JobFailed { .. }
            | ClientError::MapFailures { .. } => EXIT_FUNCTION_FAILED,
            ClientError::Unreachable { .. } | ClientError::Host(_) | ClientError::Output(_) => {
                EXIT_HOST
            }
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Input(message) | ClientError::Host(message) => f.write_str(message),
            ClientError::Api(e) => e.fmt(f),
            ClientError::FunctionStatus {
                status,
                invocation_id,
            } => {
                write!(f, "the function answered with HTTP {status}")?;
                if let Some(id) = invocation_id {
                    write!(f, " (invocation {id})")?;
                }
                Ok(())
            }
            ClientError::Unreachable { url, reason } => {
                write!(f, "cannot reach the Gust host at {url}: {reason}")
            }
            ClientError::Output(e) => write!(f, "writing output: {e}"),
            ClientError::JobFailed {
                id,
                status,
                code,
                message,
            } => write!(f, "job {id} {status}: {message} ({code})"),
            ClientError::MapFailures { failed, total } => {
                write!(f, "{failed} of {total} inputs failed")
            }
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Output(e)
    }
}

/// Prints a failure as `error: …` and turns the result into the exit status.
pub(crate) fn exit(result: Result<(), ClientError>, err: &mut dyn Write) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// An error's chain of sources as one line, for transport failures whose
/// top-level message (`client error (Connect)`) says little.
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(e);
    while let Some(err) = current {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    // The deepest causes are the informative ones; the top is hyper's summary.
    if parts.len() > 1 {
        parts.remove(0);
    }
    parts.join(": ")
}

/// A body of known bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A connection to one Gust host with one key.
pub(crate) struct Client {
    http: HyperClient<HttpConnector, Body>,
    base: BaseUrl,
    authorization: HeaderValue,
}

impl Client {
    /// Builds a client from the flags, reading the key from the environment
    /// when `--key` is absent.
    pub(crate) fn from_args(args: &ConnectArgs, kind: KeyKind) -> Result<Self, ClientError> {
        let base = BaseUrl::parse(&args.url)?;
        let key = resolve_key(args.key.as_deref(), kind, |var| std::env::var(var).ok())?;
        Client::new(base, &key)
    }

    /// Builds a client for `base` using `key`.
    pub(crate) fn new(base: BaseUrl, key: &str) -> Result<Self, ClientError> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            ClientError::Input("the API key has characters not allowed in a header".to_owned())
        })?;
        authorization.set_sensitive(true);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        connector.set_nodelay(true);
        let http = HyperClient::builder(TokioExecutor::new()).build(connector);
        Ok(Client {
            http,
            base,
            authorization,
        })
    }

    /// A request to `path_and_query` with the key and user agent set.
    pub(crate) fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Body,
    ) -> Result<Request<Body>, ClientError> {
        let uri = self.base.join(path_and_query)?;
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(AUTHORIZATION, self.authorization.clone());
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("gust/", env!("CARGO_PKG_VERSION"))),
        );
        Ok(request)
    }

    /// Sends a request; transport failures become [`ClientError::Unreachable`]
    /// or [`ClientError::Host`].
    pub(crate) async fn send(
        &self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, ClientError> {
        tracing::debug!(method = %request.method(), uri = %request.uri(), "request");
        self.http.request(request).await.map_err(|e| {
            if e.is_connect() {
                ClientError::Unreachable {
                    url: self.base.to_string(),
                    reason: source_chain(&e),
                }
            } else {
                ClientError::Host(format!(
                    "request to the Gust host at {} failed: {}",
                    self.base,
                    source_chain(&e)
                ))
            }
        })
    }

    /// Sends a request and returns the status and the JSON body of a 2xx
    /// answer; anything else is an error.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, T), ClientError> {
        let response = self
            .send(self.json_request(method, path_and_query, body)?)
            .await?;
        let (status, bytes) = self.read(response).await?;
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Host(format!(
                "unexpected answer from the Gust host at {}: {e}",
                self.base
            ))
        })?;
        Ok((status, value))
    }

    /// Sends a request whose answer has no body of interest (e.g. a `204`).
    pub(crate) async fn call_no_content(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<StatusCode, ClientError> {
        let response = self
            .send(self.request(method, path_and_query, empty())?)
            .await?;
        let (status, _) = self.read(response).await?;
        Ok(status)
    }

    fn json_request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Request<Body>, ClientError> {
        let Some(body) = body else {
            return self.request(method, path_and_query, empty());
        };
        let bytes = serde_json::to_vec(body)
            .map_err(|e| ClientError::Input(format!("encoding the request: {e}")))?;
        let mut request = self.request(method, path_and_query, full(bytes))?;
        request
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(request)
    }

    /// Reads a whole response; a non-2xx one becomes [`ClientError::Api`].
    pub(crate) async fn read(
        &self,
        response: Response<Incoming>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (parts, body) = response.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| {
                ClientError::Host(format!(
                    "reading the answer of the Gust host at {}: {}",
                    self.base,
                    source_chain(&e)
                ))
            })?
            .to_bytes();
        if !parts.status.is_success() {
            return Err(ClientError::Api(Box::new(ApiError::from_parts(
                parts.status,
                &parts.headers,
                &bytes,
            ))));
        }
        Ok((parts.status, bytes))
    }
}

/// Writes `value` as pretty JSON plus a newline (the `--json` output).
pub(crate) fn write_json(
    out: &mut dyn Write,
    value: &serde_json::Value,
) -> Result<(), ClientError> {
    serde_json::to_writer_pretty(&mut *out, value)
        .map_err(|e| ClientError::Output(std::io::Error::other(e)))?;
    writeln!(out)?;
    Ok(())
}

/// Turns a JSON value from the host into a typed object.
pub(crate) fn decode<T: DeserializeOwned>(
    value: serde_json::Value,
    what: &str,
) -> Result<T, ClientError> {
    serde_json::from_value(value)
        .map_err(|e| ClientError::Host(format!("unexpected {what} from the Gust host: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn key_precedence_is_flag_then_env() {
        let env = |var: &str| match var {
            "GUST_KEY" => Some("gust_tenant".to_owned()),
            "GUST_ADMIN_KEY" => Some("gust_admin".to_owned()),
            _ => None,
        };
        assert_eq!(
            resolve_key(Some("gust_flag"), KeyKind::Admin, env).unwrap(),
            "gust_flag"
        );
        assert_eq!(
            resolve_key(None, KeyKind::Admin, env).unwrap(),
            "gust_admin"
        );
        assert_eq!(
            resolve_key(None, KeyKind::Tenant, env).unwrap(),
            "gust_tenant"
        );
        let tenant_only = |var: &str| (var == "GUST_KEY").then(|| "gust_t".to_owned());
        assert_eq!(
            resolve_key(None, KeyKind::Admin, tenant_only).unwrap(),
            "gust_t"
        );
        let admin_only = |var: &str| (var == "GUST_ADMIN_KEY").then(|| "gust_a".to_owned());
        let missing = resolve_key(None, KeyKind::Tenant, admin_only).unwrap_err();
        assert_eq!(missing.exit_code(), EXIT_BAD_INPUT);
        assert!(missing.to_string().contains("GUST_KEY"), "{missing}");
        let blank = |_: &str| Some("  ".to_owned());
        assert!(resolve_key(None, KeyKind::Tenant, blank).is_err());
    }

    #[test]
    fn base_urls() {
        let base = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(base.to_string(), "http://127.0.0.1:8080");
        assert_eq!(
            base.join("/v1/functions").unwrap().to_string(),
            "http://127.0.0.1:8080/v1/functions"
        );
        let prefixed = BaseUrl::parse("http://example.test/gust/").unwrap();
        assert_eq!(
            prefixed.join("/v1/keys").unwrap().to_string(),
            "http://example.test/gust/v1/keys"
        );
        let bare = BaseUrl::parse("localhost:9000").unwrap();
        assert_eq!(bare.to_string(), "http://localhost:9000");

        let https = BaseUrl::parse("https://gust.example").unwrap_err();
        assert_eq!(https.exit_code(), EXIT_BAD_INPUT);
        assert!(https.to_string().contains("plain HTTP"), "{https}");
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert_eq!(BaseUrl::parse(" ").unwrap().to_string(), DEFAULT_URL);
        assert!(BaseUrl::parse("http://h/?a=b").is_err());
        assert!(BaseUrl::parse("http://user:pw@h").is_err());
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("hello-world_2"), "hello-world_2");
        assert_eq!(segment("a/b"), "a%2Fb");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("a b?#%"), "a%20b%3F%23%25");
        assert_eq!(segment("é"), "%C3%A9");
        let base = BaseUrl::parse("http://h").unwrap();
        let uri = base
            .join(&format!("/v1/functions/{}/invoke", segment("../admin")))
            .unwrap();
        assert_eq!(uri.path(), "/v1/functions/%2E%2E%2Fadmin/invoke");
    }

    #[test]
    fn header_flags() {
        let (name, value) = parse_header("X-Trace: abc def ").unwrap();
        assert_eq!(name.as_str(), "x-trace");
        assert_eq!(value, "abc def");
        let (name, value) = parse_header("accept:").unwrap();
        assert_eq!(name.as_str(), "accept");
        assert_eq!(value, "");
        let (_, value) = parse_header("x-url: http://a:b").unwrap();
        assert_eq!(value, "http://a:b");
        assert!(parse_header("no-colon").is_err());
        assert!(parse_header(": v").is_err());
        assert!(parse_header("bad name: v").is_err());
        assert!(parse_header("x: a\nb").is_err());
    }

    #[test]
    fn problem_documents_format_on_one_line() {
        let body = br#"{"type": "https://gust.invalid/problems/not-found", "title": "Not Found",
            "status": 404, "detail": "no function `hello`", "code": "not-found"}"#;
        let mut headers = http::HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        assert!(is_problem(&headers));
        let e = ApiError::from_parts(StatusCode::NOT_FOUND, &headers, body);
        assert_eq!(e.to_string(), "no function `hello` (not-found, HTTP 404)");
        let e = ClientError::Api(Box::new(e));
        assert_eq!(e.exit_code(), EXIT_FUNCTION_FAILED);

        let body = br#"{"status": 500, "detail": "panicked:\n  boom", "code": "trap",
            "invocation_id": "inv_1"}"#;
        let e = ApiError::from_parts(StatusCode::INTERNAL_SERVER_ERROR, &headers, body);
        assert_eq!(
            e.to_string(),
            "panicked: boom (trap, HTTP 500, invocation inv_1)"
        );

        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        headers.insert(INVOCATION_ID, HeaderValue::from_static("inv_2"));
        let body = br#"{"title": "Too Many Requests", "code": "too-many-requests"}"#;
        let e = ApiError::from_parts(StatusCode::TOO_MANY_REQUESTS, &headers, body);
        assert_eq!(
            e.to_string(),
            "Too Many Requests (too-many-requests, HTTP 429, invocation inv_2; retry after 2s)"
        );

        let e = ApiError::from_parts(
            StatusCode::BAD_GATEWAY,
            &http::HeaderMap::new(),
            b"\n<html>upstream down</html>\nmore",
        );
        assert_eq!(e.to_string(), "<html>upstream down</html> (HTTP 502)");
        let e = ApiError::from_parts(StatusCode::NOT_FOUND, &http::HeaderMap::new(), b"");
        assert_eq!(e.to_string(), "Not Found (HTTP 404)");
        let long = "x".repeat(500);
        let e = ApiError::from_parts(
            StatusCode::BAD_GATEWAY,
            &http::HeaderMap::new(),
            long.as_bytes(),
        );
        assert!(
            e.to_string()
                .starts_with(&format!("{}… (", "x".repeat(QUOTE_LIMIT)))
        );
    }

    #[test]
    fn problem_content_type_detection() {
        let mut headers = http::HeaderMap::new();
        assert!(!is_problem(&headers));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Application/Problem+JSON; charset=utf-8"),
        );
        assert!(is_problem(&headers));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_problem(&headers));
    }

    #[test]
    fn exit_codes_and_messages() {
        let mut err = Vec::new();
        let code = exit(
            Err(ClientError::Unreachable {
                url: "http://127.0.0.1:1".to_owned(),
                reason: "Connection refused (os error 111)".to_owned(),
            }),
            &mut err,
        );
        assert_eq!(code, ExitCode::from(EXIT_HOST));
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "error: cannot reach the Gust host at http://127.0.0.1:1: Connection refused (os error 111)\n"
        );
        let e = ClientError::FunctionStatus {
            status: 404,
            invocation_id: Some("inv_9".to_owned()),
        };
        assert_eq!(e.exit_code(), EXIT_FUNCTION_FAILED);
        assert_eq!(
            e.to_string(),
            "the function answered with HTTP 404 (invocation inv_9)"
        );
        assert_eq!(exit(Ok(()), &mut Vec::new()), ExitCode::SUCCESS);
    }

    #[tokio::test]
    async fn connection_refused_is_unreachable() {
        // A port that was just free is very likely still closed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let base = BaseUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let client = Client::new(base, "gust_x").unwrap();
        let e = client
            .call_no_content(Method::GET, "/healthz")
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), EXIT_HOST);
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot reach the Gust host at http://127.0.0.1:{port}: "
            )),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn command_line() {
        use crate::cli::{Cli, Command};
        use clap::{CommandFactory, Parser};

        Cli::command().debug_assert();
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("gust").chain(args.iter().copied()))
        };

        let cli = parse(&[
            "tenants",
            "create",
            "acme",
            "--url",
            "http://h:1",
            "--key",
            "k",
        ])
        .unwrap();
        let Command::Tenants(tenants) = cli.command else {
            panic!("not tenants");
        };
        assert_eq!(tenants.connect.url, "http://h:1");
        assert_eq!(tenants.connect.key.as_deref(), Some("k"));

        let cli = parse(&["keys", "--key", "k", "revoke", "key_1", "--tenant", "acme"]).unwrap();
        let Command::Keys(keys) = cli.command else {
            panic!("not keys");
        };
        assert_eq!(keys.connect.key.as_deref(), Some("k"));

        let cli = parse(&["invoke", "hello", "-d", "@body.json", "-H", "x-a: 1", "-i"]).unwrap();
        let Command::Invoke(invoke) = cli.command else {
            panic!("not invoke");
        };
        assert_eq!(
            invoke.data,
            Some(crate::cli::invoke::Data::File("body.json".into()))
        );
        assert_eq!(invoke.content_type, "application/octet-stream");
        assert!(invoke.include);
        if std::env::var_os("GUST_URL").is_none() {
            assert_eq!(invoke.connect.url, DEFAULT_URL);
        }

        assert!(parse(&["logs", "hello", "--limit", "1000", "--output", "--json"]).is_ok());
        assert!(parse(&["logs", "hello", "-n", "0"]).is_err());
        assert!(parse(&["logs", "hello", "--limit", "1001"]).is_err());
        assert!(parse(&["invoke", "hello", "-H", "novalue"]).is_err());
        assert!(parse(&["deploy", "x.wasm", "--public", "--name", "x"]).is_ok());
        assert!(parse(&["run", "x.wasm", "--url", "http://h"]).is_err());
        assert!(parse(&["ls", "--json"]).is_ok());
        assert!(parse(&["rm"]).is_err());
    }

    /// One request as the mock host saw it.
    #[derive(Debug, Clone)]
    pub(crate) struct Recorded {
        pub(crate) method: Method,
        pub(crate) path_and_query: String,
        pub(crate) headers: http::HeaderMap,
        pub(crate) body: Bytes,
    }

    /// A stand-in Gust host on a local port answering with `handler`.
    pub(crate) struct Mock {
        pub(crate) url: String,
        pub(crate) requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
    }

    impl Mock {
        pub(crate) fn connect(&self) -> ConnectArgs {
            ConnectArgs {
                url: self.url.clone(),
                key: Some("gust_test".to_owned()),
            }
        }

        pub(crate) fn requests(&self) -> Vec<Recorded> {
            self.requests.lock().unwrap().clone()
        }
    }

    pub(crate) async fn mock<F>(handler: F) -> Mock
    where
        F: Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let seen = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = Arc::clone(&handler);
                let seen = Arc::clone(&seen);
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let handler = Arc::clone(&handler);
                    let seen = Arc::clone(&seen);
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let recorded = Recorded {
                            method: parts.method,
                            path_and_query: parts
                                .uri
                                .path_and_query()
                                .map(|pq| pq.as_str().to_owned())
                                .unwrap_or_default(),
                            headers: parts.headers,
                            body,
                        };
                        let response = handler(&recorded);
                        seen.lock().unwrap().push(recorded);
                        Ok::<_, hyper::Error>(response)
                    }
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Mock { url, requests }
    }

    pub(crate) fn json_response(status: u16, value: serde_json::Value) -> Response<Full<Bytes>> {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(value.to_string())))
            .unwrap()
    }

    pub(crate) fn problem_response(status: u16, code: &str, detail: &str) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "type": format!("https://gust.invalid/problems/{code}"),
            "title": "Error", "status": status, "detail": detail, "code": code,
        });
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, PROBLEM_JSON)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    pub(crate) fn no_content() -> Response<Full<Bytes>> {
        Response::builder()
            .status(204)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn calls_send_the_key_and_decode_problems() {
        let host = mock(|req| match req.path_and_query.as_str() {
            "/v1/tenants" => json_response(200, serde_json::json!({"tenants": []})),
            _ => problem_response(401, "unauthorized", "missing or bad key"),
        })
        .await;
        let client = Client::from_args(&host.connect(), KeyKind::Admin).unwrap();
        let (status, value): (_, serde_json::Value) =
            client.call(Method::GET, "/v1/tenants", None).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(value["tenants"], serde_json::json!([]));
        let e = client
            .call::<serde_json::Value>(Method::GET, "/v1/other", None)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "missing or bad key (unauthorized, HTTP 401)");
        assert_eq!(e.exit_code(), EXIT_FUNCTION_FAILED);
        let seen = host.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].headers[AUTHORIZATION], "Bearer gust_test");
        assert!(
            seen[0].headers[USER_AGENT]
                .to_str()
                .unwrap()
                .starts_with("gust/")
        );
    }
}
