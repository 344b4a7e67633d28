//! `gust ls`, `gust rm` and `gust logs`: the caller's functions and their
//! invocation records.

use std::io::Write;

use clap::Args;
use http::Method;

use super::client::{Client, ClientError, ConnectArgs, KeyKind, decode, segment, write_json};
use super::objects::{Function, FunctionList, Invocation, InvocationList};
use super::output;

#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// Print the host's JSON (`{"functions": [...]}`) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub(crate) struct RmArgs {
    /// The function to delete, with all its versions.
    pub(crate) name: String,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// The function whose invocations to show.
    pub(crate) name: String,

    /// How many of the most recent invocations to show, 1 to 1000 [default:
    /// the host's, 50].
    #[arg(short = 'n', long, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(crate) limit: Option<u16>,

    /// Also show each invocation's captured stdout and stderr, phase timings
    /// and peak memory.
    #[arg(long)]
    pub(crate) output: bool,

    /// Print the host's JSON (`{"invocations": [...]}`, newest first)
    /// instead of lines.
    #[arg(long)]
    pub(crate) json: bool,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// The `gust ls` table.
pub(crate) fn functions_table(functions: &[Function]) -> Vec<String> {
    let rows: Vec<Vec<String>> = functions
        .iter()
        .map(|f| {
            vec![
                f.name.clone(),
                f.version.to_string(),
                f.world.clone(),
                if f.public { "yes" } else { "no" }.to_owned(),
                output::size(f.size),
                output::short_digest(&f.digest),
                output::time(&f.updated_at),
                f.schedule.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME", "VERSION", "WORLD", "PUBLIC", "SIZE", "DIGEST", "UPDATED", "SCHEDULE",
        ],
        &rows,
    )
}

pub(crate) async fn ls(
    args: &LsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    let (_, value): (_, serde_json::Value) =
        client.call(Method::GET, "/v1/functions", None).await?;
    if args.json {
        return write_json(out, &value);
    }
    let mut list: FunctionList = decode(value, "function list")?;
    if list.functions.is_empty() {
        writeln!(err, "no functions deployed")?;
        return Ok(());
    }
    list.functions.sort_by(|a, b| a.name.cmp(&b.name));
    for line in functions_table(&list.functions) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

pub(crate) async fn rm(
    args: &RmArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    let path = format!("/v1/functions/{}", segment(&args.name));
    client.call_no_content(Method::DELETE, &path).await?;
    writeln!(out, "removed {}", args.name)?;
    Ok(())
}

/// The `gust logs` lines, oldest first; with `detail`, each invocation is
/// followed by its timings and captured output, indented.
pub(crate) fn log_lines(invocations: &[Invocation], detail: bool) -> Vec<String> {
    let rows: Vec<Vec<String>> = invocations
        .iter()
        .map(|inv| {
            vec![
                output::time(&inv.started_at),
                inv.id.clone(),
                inv.version.to_string(),
                inv.status.to_string(),
                inv.outcome.clone(),
                output::micros(inv.timings.total_us),
                inv.message
                    .as_deref()
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    let mut table = output::table(
        &[
            "TIME", "ID", "VERSION", "STATUS", "OUTCOME", "DURATION", "MESSAGE",
        ],
        &rows,
    )
    .into_iter();
    let mut lines: Vec<String> = table.next().into_iter().collect();
    for (inv, line) in invocations.iter().zip(table) {
        lines.push(line);
        if detail {
            lines.extend(details(inv));
        }
    }
    lines
}

fn details(inv: &Invocation) -> Vec<String> {
    let mut lines = vec![format!(
        "    instantiate {}, call {}, peak memory {}",
        output::micros(inv.timings.instantiate_us),
        output::micros(inv.timings.call_us),
        output::size(inv.peak_memory_bytes),
    )];
    for (stream, text, dropped) in [
        ("stdout", &inv.stdout, inv.stdout_dropped_bytes),
        ("stderr", &inv.stderr, inv.stderr_dropped_bytes),
    ] {
        lines.extend(text.lines().map(|l| format!("    {stream} | {l}")));
        if dropped > 0 {
            lines.push(format!("    [{dropped} more bytes of {stream} dropped]"));
        }
    }
    lines
}

pub(crate) async fn logs(
    args: &LogsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    let mut path = format!("/v1/functions/{}/logs", segment(&args.name));
    if let Some(limit) = args.limit {
        path.push_str(&format!("?limit={limit}"));
    }
    let (_, value): (_, serde_json::Value) = client.call(Method::GET, &path, None).await?;
    if args.json {
        return write_json(out, &value);
    }
    let mut list: InvocationList = decode(value, "invocation list")?;
    if list.invocations.is_empty() {
        writeln!(err, "no invocations of {} recorded", args.name)?;
        return Ok(());
    }
    // The host sends newest first; a log reads top to bottom in time.
    list.invocations.reverse();
    for line in log_lines(&list.invocations, args.output) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::tests::{json_response, mock, no_content};

    fn invocation(id: &str, outcome: &str, message: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "id": id, "function": "hello", "version": 2,
            "started_at": "2025-01-02T03:04:05.678Z", "status": 200, "outcome": outcome,
            "message": message,
            "timings": {"instantiate_us": 12, "call_us": 300, "total_us": 1_500},
            "peak_memory_bytes": 1_048_576, "stdout": "line one\nline two\n", "stderr": "",
            "stdout_dropped_bytes": 0, "stderr_dropped_bytes": 7,
        })
    }

    #[test]
    fn ls_table() {
        let f: Function = serde_json::from_value(serde_json::json!({
            "name": "hello", "version": 12, "digest": "sha256:9f86d081884c7d659a2feaa0c55ad015",
            "size": 2048, "world": "handler", "public": false,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-02T03:04:05.5Z",
        }))
        .unwrap();
        let mut scheduled = f.clone();
        scheduled.name = "tick".to_owned();
        scheduled.schedule = Some("*/5 * * * *".to_owned());
        assert_eq!(
            functions_table(&[f, scheduled]),
            vec![
                "NAME   VERSION  WORLD    PUBLIC  SIZE     DIGEST        UPDATED               SCHEDULE",
                "hello  12       handler  no      2.0 KiB  9f86d081884c  2025-01-02T03:04:05Z  -",
                "tick   12       handler  no      2.0 KiB  9f86d081884c  2025-01-02T03:04:05Z  */5 * * * *",
            ]
        );
    }

    #[test]
    fn log_lines_with_and_without_output() {
        let invs: Vec<Invocation> = vec![
            serde_json::from_value(invocation("inv_1", "ok", None)).unwrap(),
            serde_json::from_value(invocation("inv_2", "timeout", Some("timed out\nafter 5s")))
                .unwrap(),
        ];
        assert_eq!(
            log_lines(&invs, false),
            vec![
                "TIME                  ID     VERSION  STATUS  OUTCOME  DURATION  MESSAGE",
                "2025-01-02T03:04:05Z  inv_1  2        200     ok       1.5ms",
                "2025-01-02T03:04:05Z  inv_2  2        200     timeout  1.5ms     timed out after 5s",
            ]
        );
        let lines = log_lines(&invs[..1], true);
        assert_eq!(
            lines[2..],
            [
                "    instantiate 12µs, call 300µs, peak memory 1.0 MiB",
                "    stdout | line one",
                "    stdout | line two",
                "    [7 more bytes of stderr dropped]",
            ]
        );
    }

    #[tokio::test]
    async fn ls_rm_logs_against_a_host() {
        let host = mock(
            |req| match (req.method.as_str(), req.path_and_query.as_str()) {
                ("GET", "/v1/functions") => {
                    json_response(200, serde_json::json!({"functions": []}))
                }
                ("DELETE", "/v1/functions/hello") => no_content(),
                ("GET", "/v1/functions/hello/logs?limit=2") => json_response(
                    200,
                    serde_json::json!({"invocations": [
                        invocation("inv_new", "ok", None),
                        invocation("inv_old", "ok", None),
                    ]}),
                ),
                _ => json_response(
                    404,
                    serde_json::json!({"code": "not-found", "detail": "nope"}),
                ),
            },
        )
        .await;

        let (mut out, mut err) = (Vec::new(), Vec::new());
        let args = LsArgs {
            json: false,
            connect: host.connect(),
        };
        ls(&args, &mut out, &mut err).await.unwrap();
        assert!(out.is_empty());
        assert_eq!(String::from_utf8(err).unwrap(), "no functions deployed\n");
        let mut out = Vec::new();
        ls(&LsArgs { json: true, ..args }, &mut out, &mut Vec::new())
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json, serde_json::json!({"functions": []}));

        let mut out = Vec::new();
        let rm_args = RmArgs {
            name: "hello".to_owned(),
            connect: host.connect(),
        };
        rm(&rm_args, &mut out, &mut Vec::new()).await.unwrap();
        assert_eq!(out, b"removed hello\n");
        let e = rm(
            &RmArgs {
                name: "gone".to_owned(),
                ..rm_args
            },
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.to_string(), "nope (not-found, HTTP 404)");

        let mut out = Vec::new();
        let logs_args = LogsArgs {
            name: "hello".to_owned(),
            limit: Some(2),
            output: false,
            json: false,
            connect: host.connect(),
        };
        logs(&logs_args, &mut out, &mut Vec::new()).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let ids: Vec<&str> = text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(1).unwrap())
            .collect();
        assert_eq!(ids, ["inv_old", "inv_new"]);
    }
}
