//! `gust spawn`, `gust job`, `gust schedule` and `gust unschedule`: jobs
//! and cron schedules through the host.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use http::Method;
use http::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;

use super::client::{Client, ClientError, ConnectArgs, KeyKind, full, segment, write_json};
use super::invoke::{Data, parse_data, read_data};

/// How often `--wait` asks for a job's state.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Args)]
pub(crate) struct SpawnArgs {
    /// The function to run as a job.
    pub(crate) name: String,

    /// Input: `@FILE` reads a file, `-` (or `@-`) reads stdin, any other
    /// value is sent as it is. Empty when omitted.
    #[arg(short, long, value_name = "@FILE|-|TEXT", value_parser = parse_data)]
    pub(crate) data: Option<Data>,

    /// Media type of the input.
    #[arg(long, value_name = "TYPE", default_value = "application/octet-stream")]
    pub(crate) content_type: String,

    /// Wait for the job to finish and print its output, as `gust job
    /// --wait` does.
    #[arg(short, long)]
    pub(crate) wait: bool,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub(crate) struct JobArgs {
    /// The job's id (`job_…`, as `gust spawn` printed it).
    pub(crate) id: String,

    /// Wait until the job has finished.
    #[arg(short, long, conflicts_with = "cancel")]
    pub(crate) wait: bool,

    /// Cancel the job if it is pending or running (a running function is
    /// interrupted); delete it if it has finished.
    #[arg(long)]
    pub(crate) cancel: bool,

    /// Print the host's JSON instead of the output.
    #[arg(long)]
    pub(crate) json: bool,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ScheduleArgs {
    /// The function to run on a schedule.
    pub(crate) name: String,

    /// When, as a cron expression in UTC: 5 fields (minute hour
    /// day-of-month month day-of-week) or 6 with seconds first. Without it,
    /// the current schedule is shown.
    #[arg(long, value_name = "EXPR")]
    pub(crate) cron: Option<String>,

    /// The input of every run, as JSON (a string reaches the function as
    /// text, any other value as JSON). A value that is not JSON is sent as
    /// a string.
    #[arg(short, long, value_name = "JSON", requires = "cron")]
    pub(crate) input: Option<String>,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub(crate) struct UnscheduleArgs {
    /// The function whose schedule to remove.
    pub(crate) name: String,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// A job as the client reads it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) status: String,
    #[serde(default)]
    pub(crate) result: Option<JobResult>,
    #[serde(default)]
    pub(crate) error: Option<JobError>,
}

/// A succeeded job's output.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct JobResult {
    #[serde(default)]
    pub(crate) output: serde_json::Value,
}

/// A failed job's error.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct JobError {
    #[serde(default)]
    pub(crate) code: String,
    #[serde(default)]
    pub(crate) message: String,
}

fn finished(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// Writes a finished job's output (text as it is, other JSON as JSON) or
/// turns its failure into the error.
pub(crate) fn report(job: &Job, out: &mut dyn Write) -> Result<(), ClientError> {
    if let Some(result) = &job.result {
        match &result.output {
            serde_json::Value::String(text) => out.write_all(text.as_bytes())?,
            other => writeln!(out, "{other}")?,
        }
        out.flush()?;
        return Ok(());
    }
    let (code, message) = job
        .error
        .as_ref()
        .map(|e| (e.code.clone(), e.message.clone()))
        .unwrap_or_default();
    Err(ClientError::JobFailed {
        id: job.id.clone(),
        status: job.status.clone(),
        code,
        message,
    })
}

async fn get_job(client: &Client, id: &str) -> Result<serde_json::Value, ClientError> {
    let path = format!("/v1/jobs/{}", segment(id));
    let (_, value) = client.call(Method::GET, &path, None).await?;
    Ok(value)
}

async fn wait_for(client: &Client, id: &str) -> Result<serde_json::Value, ClientError> {
    loop {
        let value = get_job(client, id).await?;
        if value["status"].as_str().is_some_and(finished) {
            return Ok(value);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn decode_job(value: serde_json::Value) -> Result<Job, ClientError> {
    super::client::decode(value, "job")
}

pub(crate) async fn spawn(
    args: &SpawnArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    let body = read_data(args.data.as_ref()).await?;
    let content_type = HeaderValue::from_str(args.content_type.trim()).map_err(|_| {
        ClientError::Input(format!("`{}` is not a valid media type", args.content_type))
    })?;
    let path = format!("/v1/functions/{}/spawn", segment(&args.name));
    let mut request = client.request(Method::POST, &path, full(body))?;
    request.headers_mut().insert(CONTENT_TYPE, content_type);
    let response = client.send(request).await?;
    let (_, bytes) = client.read(response).await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Host(format!("unexpected answer from the Gust host: {e}")))?;
    let id = value["job_id"]
        .as_str()
        .ok_or_else(|| ClientError::Host("the host's answer has no job_id".to_owned()))?
        .to_owned();
    if !args.wait {
        writeln!(out, "{id}")?;
        return Ok(());
    }
    writeln!(err, "{id}")?;
    report(&decode_job(wait_for(&client, &id).await?)?, out)
}

pub(crate) async fn job(
    args: &JobArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    if args.cancel {
        let path = format!("/v1/jobs/{}", segment(&args.id));
        let response = client
            .send(client.request(Method::DELETE, &path, super::client::empty())?)
            .await?;
        let (status, _) = client.read(response).await?;
        if status == http::StatusCode::NO_CONTENT {
            writeln!(out, "deleted {}", args.id)?;
        } else {
            writeln!(out, "cancelled {}", args.id)?;
        }
        return Ok(());
    }
    let value = if args.wait {
        wait_for(&client, &args.id).await?
    } else {
        get_job(&client, &args.id).await?
    };
    if args.json {
        return write_json(out, &value);
    }
    let job = decode_job(value)?;
    if !finished(&job.status) {
        writeln!(err, "{} is {}", job.id, job.status)?;
        return Ok(());
    }
    report(&job, out)
}

pub(crate) async fn schedule(
    args: &ScheduleArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    let path = format!("/v1/functions/{}/schedule", segment(&args.name));
    let Some(cron) = &args.cron else {
        let (_, value): (_, serde_json::Value) = client.call(Method::GET, &path, None).await?;
        return write_json(out, &value);
    };
    let input = match &args.input {
        None => serde_json::Value::Null,
        Some(raw) => {
            serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.clone()))
        }
    };
    let body = serde_json::json!({"cron": cron, "input": input});
    let (_, value): (_, serde_json::Value) = client.call(Method::PUT, &path, Some(&body)).await?;
    writeln!(
        out,
        "scheduled {} at `{}` (next run {})",
        args.name,
        cron,
        value["next_run_at"].as_str().unwrap_or("unknown")
    )?;
    Ok(())
}

pub(crate) async fn unschedule(
    args: &UnscheduleArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    let path = format!("/v1/functions/{}/schedule", segment(&args.name));
    client.call_no_content(Method::DELETE, &path).await?;
    writeln!(out, "unscheduled {}", args.name)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_jobs_print_their_output_or_fail() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "id": "job_1", "status": "succeeded",
            "result": {"status": 200, "content_type": "text/plain", "output": "Hello!"},
            "error": null,
        }))
        .unwrap();
        let mut out = Vec::new();
        report(&job, &mut out).unwrap();
        assert_eq!(out, b"Hello!");
        let job: Job = serde_json::from_value(serde_json::json!({
            "id": "job_2", "status": "failed", "result": null,
            "error": {"code": "timeout", "status": 504, "message": "timed out after 5s"},
        }))
        .unwrap();
        let e = report(&job, &mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "job job_2 failed: timed out after 5s (timeout)"
        );
        assert_eq!(e.exit_code(), crate::cli::EXIT_FUNCTION_FAILED);
    }
}
