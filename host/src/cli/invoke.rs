//! `gust invoke`: call a deployed function once through the host.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::AsyncReadExt;

use super::client::{
    ApiError, Client, ClientError, ConnectArgs, INVOCATION_ID, KeyKind, full, is_problem,
    parse_header, segment,
};

/// Where the request body comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Data {
    /// Sent as given.
    Text(String),
    /// `@FILE`.
    File(PathBuf),
    /// `-` or `@-`.
    Stdin,
}

/// Parses `--data` the way curl does: `@FILE`, `-` or `@-` for stdin, else
/// the text itself.
pub(crate) fn parse_data(raw: &str) -> Result<Data, String> {
    match raw {
        "-" | "@-" => Ok(Data::Stdin),
        "@" => Err("`@` needs a file name after it (`@FILE`)".to_owned()),
        _ => Ok(match raw.strip_prefix('@') {
            Some(path) => Data::File(PathBuf::from(path)),
            None => Data::Text(raw.to_owned()),
        }),
    }
}

fn parse_content_type(raw: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(raw.trim()).map_err(|_| format!("`{raw}` is not a valid media type"))
}

#[derive(Debug, Args)]
pub(crate) struct InvokeArgs {
    /// The function to call.
    pub(crate) name: String,

    /// Request body: `@FILE` reads a file, `-` (or `@-`) reads stdin, any
    /// other value is sent as it is. Empty when omitted.
    #[arg(short, long, value_name = "@FILE|-|TEXT", value_parser = parse_data)]
    pub(crate) data: Option<Data>,

    /// Media type of the request body.
    #[arg(long, value_name = "TYPE", default_value = "application/octet-stream", value_parser = parse_content_type)]
    pub(crate) content_type: HeaderValue,

    /// A request header for the function, `NAME:VALUE` (repeatable). A
    /// header the client sets itself (e.g. `Content-Type`) is replaced.
    #[arg(short = 'H', long = "header", value_name = "NAME:VALUE", value_parser = parse_header)]
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,

    /// Show the response's status line and headers (including
    /// `gust-invocation-id`) on stderr.
    #[arg(short, long)]
    pub(crate) include: bool,

    /// Ask for Server-Sent Events and print what the function emits as it
    /// emits it (then its response body).
    #[arg(short, long)]
    pub(crate) stream: bool,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

pub(crate) async fn read_data(data: Option<&Data>) -> Result<Vec<u8>, ClientError> {
    match data {
        None => Ok(Vec::new()),
        Some(Data::Text(text)) => Ok(text.as_bytes().to_vec()),
        Some(Data::File(path)) => tokio::fs::read(path)
            .await
            .map_err(|e| ClientError::Input(format!("{}: {e}", path.display()))),
        Some(Data::Stdin) => {
            let mut body = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut body)
                .await
                .map_err(|e| ClientError::Input(format!("reading stdin: {e}")))?;
            Ok(body)
        }
    }
}

/// Puts `user` headers over `headers`: a name the user gives replaces every
/// value the client set for it, and the user's values for one name all go.
pub(crate) fn apply_headers(headers: &mut HeaderMap, user: &[(HeaderName, HeaderValue)]) {
    for (name, _) in user {
        headers.remove(name);
    }
    for (name, value) in user {
        headers.append(name.clone(), value.clone());
    }
}

/// The `--include` block: status line, headers, blank line.
pub(crate) fn head(
    version: http::Version,
    status: http::StatusCode,
    headers: &HeaderMap,
) -> String {
    let mut text = format!("{version:?} {status}\n");
    for (name, value) in headers {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push('\n');
    text
}

pub(crate) async fn invoke(
    args: &InvokeArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    let body = read_data(args.data.as_ref()).await?;
    let path = format!("/v1/functions/{}/invoke", segment(&args.name));
    let mut request = client.request(Method::POST, &path, full(body))?;
    request
        .headers_mut()
        .insert(CONTENT_TYPE, args.content_type.clone());
    if args.stream {
        request.headers_mut().insert(
            http::header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
    }
    apply_headers(request.headers_mut(), &args.headers);

    let response = client.send(request).await?;
    let (parts, body) = response.into_parts();
    if args.include {
        err.write_all(head(parts.version, parts.status, &parts.headers).as_bytes())?;
    }
    if !parts.status.is_success() && is_problem(&parts.headers) {
        let bytes = body
            .collect()
            .await
            .map_err(|e| ClientError::Host(format!("reading the answer: {e}")))?
            .to_bytes();
        return Err(ClientError::Api(Box::new(ApiError::from_parts(
            parts.status,
            &parts.headers,
            &bytes,
        ))));
    }
    let events = parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if events {
        return copy_events(body, out).await;
    }
    copy_body(body, out).await?;
    if parts.status.is_success() {
        Ok(())
    } else {
        // The function's own non-2xx response: its body is already out, the
        // status decides the exit code.
        Err(ClientError::FunctionStatus {
            status: parts.status.as_u16(),
            invocation_id: parts
                .headers
                .get(INVOCATION_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        })
    }
}

/// One Server-Sent Event: its name and its data lines joined by `\n`.
pub(crate) fn parse_event(block: &str) -> (Option<&str>, String) {
    let mut name = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.split('\n') {
        if let Some(value) = line.strip_prefix("event:") {
            name = Some(value.trim_start());
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    (name, data.join("\n"))
}

/// Writes the data of each event to `out` as it arrives; an `error` event
/// becomes the command's error.
async fn copy_events(mut body: Incoming, out: &mut dyn Write) -> Result<(), ClientError> {
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Host(format!("reading the events: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            match parse_event(block.trim_end_matches('\n')) {
                (None, data) if !block.starts_with(':') => {
                    out.write_all(data.as_bytes())?;
                    out.flush()?;
                }
                (Some("error"), data) => {
                    let status = serde_json::from_str::<serde_json::Value>(&data)
                        .ok()
                        .and_then(|v| v["status"].as_u64())
                        .and_then(|s| u16::try_from(s).ok())
                        .and_then(|s| http::StatusCode::from_u16(s).ok())
                        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                    return Err(ClientError::Api(Box::new(ApiError::from_parts(
                        status,
                        &HeaderMap::new(),
                        data.as_bytes(),
                    ))));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Streams a response body to `out` as it arrives.
async fn copy_body(mut body: Incoming, out: &mut dyn Write) -> Result<(), ClientError> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Host(format!("reading the answer: {e}")))?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data)?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::tests::{mock, problem_response};
    use bytes::Bytes;
    use http_body_util::Full;

    #[test]
    fn data_flags() {
        assert_eq!(parse_data("-").unwrap(), Data::Stdin);
        assert_eq!(parse_data("@-").unwrap(), Data::Stdin);
        assert_eq!(
            parse_data("@in/body.json").unwrap(),
            Data::File(PathBuf::from("in/body.json"))
        );
        assert_eq!(parse_data("hello").unwrap(), Data::Text("hello".to_owned()));
        assert_eq!(parse_data("").unwrap(), Data::Text(String::new()));
        assert_eq!(parse_data("a@b").unwrap(), Data::Text("a@b".to_owned()));
        assert!(parse_data("@").is_err());
    }

    #[test]
    fn user_headers_replace_the_clients() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert("x-keep", HeaderValue::from_static("1"));
        let user = vec![
            parse_header("Content-Type: text/plain").unwrap(),
            parse_header("x-multi: a").unwrap(),
            parse_header("x-multi: b").unwrap(),
        ];
        apply_headers(&mut headers, &user);
        assert_eq!(headers[CONTENT_TYPE], "text/plain");
        assert_eq!(headers.get_all(CONTENT_TYPE).iter().count(), 1);
        assert_eq!(headers["x-keep"], "1");
        let multi: Vec<_> = headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
    }

    #[test]
    fn events_parse() {
        assert_eq!(parse_event("data: a\ndata: "), (None, "a\n".to_owned()));
        assert_eq!(
            parse_event("event: done\ndata: {}"),
            (Some("done"), "{}".to_owned())
        );
    }

    #[test]
    fn include_block() {
        let mut headers = HeaderMap::new();
        headers.insert(INVOCATION_ID, HeaderValue::from_static("inv_1"));
        assert_eq!(
            head(http::Version::HTTP_11, http::StatusCode::OK, &headers),
            "HTTP/1.1 200 OK\ngust-invocation-id: inv_1\n\n"
        );
    }

    fn args(url: String, name: &str) -> InvokeArgs {
        InvokeArgs {
            name: name.to_owned(),
            data: Some(Data::Text("Gust".to_owned())),
            content_type: HeaderValue::from_static("text/plain"),
            headers: vec![parse_header("x-a: 1").unwrap()],
            include: true,
            stream: false,
            connect: ConnectArgs {
                url,
                key: Some("gust_k".to_owned()),
            },
        }
    }

    #[tokio::test]
    async fn invokes_and_prints_the_body() {
        let host = mock(|req| {
            let answer = |status: u16, body: String| {
                http::Response::builder()
                    .status(status)
                    .header(INVOCATION_ID, "inv_7")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap()
            };
            match req.path_and_query.as_str() {
                "/v1/functions/hello/invoke" => answer(
                    200,
                    format!("Hello, {}!", String::from_utf8_lossy(&req.body)),
                ),
                "/v1/functions/teapot/invoke" => answer(418, "short and stout".to_owned()),
                _ => {
                    let mut r = problem_response(500, "trap", "panicked: boom");
                    r.headers_mut()
                        .insert(INVOCATION_ID, HeaderValue::from_static("inv_8"));
                    r
                }
            }
        })
        .await;

        let (mut out, mut err) = (Vec::new(), Vec::new());
        invoke(&args(host.url.clone(), "hello"), &mut out, &mut err)
            .await
            .unwrap();
        assert_eq!(out, b"Hello, Gust!");
        let err = String::from_utf8(err).unwrap();
        assert!(err.starts_with("HTTP/1.1 200 OK\n"), "{err}");
        assert!(err.contains("gust-invocation-id: inv_7\n"), "{err}");
        let seen = &host.requests()[0];
        assert_eq!(seen.method, Method::POST);
        assert_eq!(seen.headers[CONTENT_TYPE], "text/plain");
        assert_eq!(seen.headers["x-a"], "1");

        let mut out = Vec::new();
        let e = invoke(&args(host.url.clone(), "teapot"), &mut out, &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(out, b"short and stout");
        assert_eq!(
            e.to_string(),
            "the function answered with HTTP 418 (invocation inv_7)"
        );
        assert_eq!(e.exit_code(), crate::cli::EXIT_FUNCTION_FAILED);

        let mut out = Vec::new();
        let e = invoke(&args(host.url.clone(), "boom"), &mut out, &mut Vec::new())
            .await
            .unwrap_err();
        assert!(out.is_empty());
        assert_eq!(
            e.to_string(),
            "panicked: boom (trap, HTTP 500, invocation inv_8)"
        );
    }

    #[tokio::test]
    async fn a_missing_data_file_is_a_local_error() {
        let mut a = args("http://127.0.0.1:1".to_owned(), "x");
        a.data = Some(Data::File(PathBuf::from("/nonexistent/body")));
        let e = invoke(&a, &mut Vec::new(), &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), crate::cli::EXIT_BAD_INPUT);
    }
}
