//! `gust map`: run a function once per input line through the host's map
//! endpoint, streaming inputs up and results down.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Args;
use http::Method;
use http::header::{CONTENT_TYPE, HeaderValue};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::client::{
    ApiError, Body, Client, ClientError, ConnectArgs, KeyKind, is_problem, segment,
};

const CHUNK: usize = 64 << 10;

#[derive(Debug, Args)]
pub(crate) struct MapArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// The function to run.
    name: String,

    /// Inputs, one JSON value per line (NDJSON): a file, or `-` for stdin. A
    /// JSON string reaches the function as its text, any other value as
    /// JSON.
    #[arg(short, long, value_name = "FILE|-")]
    input: String,

    /// No progress bar, even on a terminal.
    #[arg(short, long)]
    quiet: bool,
}

fn reader_body(reader: Box<dyn AsyncRead + Send + Unpin>) -> Body {
    let stream = futures::stream::try_unfold(reader, |mut reader| async move {
        let mut buf = BytesMut::with_capacity(CHUNK);
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        Ok(Some((Frame::data(buf.freeze()), reader)))
    });
    StreamBody::new(stream).boxed_unsync()
}

/// Lines in `path` with something on them, for the progress bar's total.
async fn count_inputs(path: &str) -> Result<u64, ClientError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ClientError::Input(format!("reading {path}: {e}")))?;
    let mut buf = vec![0u8; CHUNK];
    let (mut count, mut blank) = (0u64, true);
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| ClientError::Input(format!("reading {path}: {e}")))?;
        if n == 0 {
            break;
        }
        for &byte in &buf[..n] {
            if byte == b'\n' {
                count += u64::from(!blank);
                blank = true;
            } else if !byte.is_ascii_whitespace() {
                blank = false;
            }
        }
    }
    Ok(count + u64::from(!blank))
}

/// What came back, for the summary.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
}

impl Tally {
    /// Count one result line (`{"index", "ok" | "error", …}`).
    pub(crate) fn add(&mut self, line: &[u8]) {
        let failed = serde_json::from_slice::<serde_json::Value>(line)
            .map_or(true, |v| v.get("error").is_some());
        if failed {
            self.failed += 1;
        } else {
            self.ok += 1;
        }
    }
}

pub(crate) async fn map(
    args: &MapArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    let (reader, total): (Box<dyn AsyncRead + Send + Unpin>, Option<u64>) = if args.input == "-" {
        (Box::new(tokio::io::stdin()), None)
    } else {
        let total = count_inputs(&args.input).await?;
        let file = tokio::fs::File::open(&args.input)
            .await
            .map_err(|e| ClientError::Input(format!("reading {}: {e}", args.input)))?;
        (Box::new(file), Some(total))
    };
    let path = format!("/v1/functions/{}/map", segment(&args.name));
    let mut request = client.request(Method::POST, &path, reader_body(reader))?;
    request.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );

    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden());
    if !args.quiet && std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        let template = if total.is_some() {
            "{spinner} {msg} {wide_bar} {pos}/{len} ({per_sec}, {eta} left)"
        } else {
            "{spinner} {msg} {pos} done ({per_sec})"
        };
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(args.name.clone());
        bar.enable_steady_tick(Duration::from_millis(100));
    }

    let started = Instant::now();
    let response = client.send(request).await?;
    let (parts, mut body) = response.into_parts();
    if !parts.status.is_success() {
        let bytes = body
            .collect()
            .await
            .map_err(|e| ClientError::Host(format!("reading the answer: {e}")))?
            .to_bytes();
        bar.finish_and_clear();
        if is_problem(&parts.headers) {
            return Err(ClientError::Api(Box::new(ApiError::from_parts(
                parts.status,
                &parts.headers,
                &bytes,
            ))));
        }
        return Err(ClientError::Host(format!(
            "the host answered HTTP {}",
            parts.status
        )));
    }
    let mut tally = Tally::default();
    let mut pending = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Host(format!("reading the results: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Bytes = pending.split_to(end + 1).freeze();
            bar.suspend(|| out.write_all(&line))?;
            tally.add(&line[..end]);
            bar.inc(1);
        }
    }
    out.flush()?;
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let count = tally.ok + tally.failed;
    writeln!(
        err,
        "map {}: {count} inputs, {} ok, {} failed in {:.2?} ({:.0}/s)",
        args.name,
        tally.ok,
        tally.failed,
        elapsed,
        count as f64 / elapsed.as_secs_f64().max(1e-9)
    )?;
    if tally.failed > 0 {
        return Err(ClientError::MapFailures {
            failed: tally.failed,
            total: count,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_counts_errors_and_unreadable_lines_as_failures() {
        let mut tally = Tally::default();
        tally.add(br#"{"index":0,"ok":"hi","invocation_id":"inv_1"}"#);
        tally.add(br#"{"index":1,"error":{"code":"trap"}}"#);
        tally.add(b"not json");
        assert_eq!(tally, Tally { ok: 1, failed: 2 });
    }
}
