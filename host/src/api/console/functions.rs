//! The console's function pages: the list (with the last hour's figures
//! and the upload form), a function's page (charts, invocations, a quick
//! invoke, the live feed) and an invocation's page.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Multipart, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::StreamBody;
use hyper::body::Frame as BodyFrame;
use maud::{Markup, html};

use super::session::{CSRF_FIELD, Session};
use super::views::{
    bytes, csrf_input, figure, maybe_time, micros, millis, outcome, problem_box, time,
};
use super::{
    Answer, PageError, PageForm, TokenForm, charts, check_csrf, see_other, session_page,
    tenant_action, tenant_of,
};
use crate::api::extract::{Params, QueryParams, read_capped};
use crate::api::problem::Problem;
use crate::api::{BoxError, blocking, respond};
use crate::runtime::{Invocation, Outcome};
use crate::service::{CallStats, DeployOptions, Failure, Service};
use crate::store::{FunctionRecord, FunctionWorld, InvocationRecord};

/// The window of the figures on the function pages.
const WINDOW: Duration = Duration::from_secs(3600);
/// Invocations listed on a function's page.
const RECENT: usize = 50;
/// Room for the multipart framing and the small fields around an upload.
const FORM_OVERHEAD: u64 = 64 << 10;

/// The function list with the last hour's figures, and the upload form
/// (with `problem` above it after a refused upload).
async fn list_page(
    service: &Arc<Service>,
    session: &Session,
    problem: Option<&Problem>,
) -> Result<Response, PageError> {
    let tenant = tenant_of(session)?;
    let rows = blocking(service, move |s| {
        s.functions(&tenant)?
            .into_iter()
            .map(|(function, schedule)| {
                let stats = s.call_stats(&function.tenant, &function.name, WINDOW)?;
                Ok((function, schedule, stats))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let csrf = session.csrf(service);
    let body = html! {
        @if let Some(problem) = problem {
            (problem_box(problem.status().as_u16(), problem.code(), problem.detail()))
        }
        @if rows.is_empty() {
            p { "No functions yet: deploy one below, or with " code { "gust deploy" } "." }
        } @else {
            div.scroll {
                table #functions {
                    caption { "Figures cover the last hour." }
                    thead { tr {
                        th scope="col" { "Name" } th scope="col" { "World" } th scope="col" { "Version" }
                        th scope="col" { "Size" } th scope="col" { "Public" } th scope="col" { "Schedule" }
                        th scope="col" { "Last call" } th scope="col" { "Calls" } th scope="col" { "Errors" }
                        th scope="col" { "p50" } th scope="col" { "p95" }
                    } }
                    tbody {
                        @for (function, schedule, stats) in &rows {
                            tr {
                                th scope="row" { a href=(format!("/console/functions/{}", function.name)) { (function.name) } }
                                td { (function.world.as_str()) }
                                td { (function.version) }
                                td { (bytes(function.size)) }
                                td { @if function.public { "yes" } @else { "no" } }
                                td { @if let Some(cron) = schedule { code { (cron) } } @else { "–" } }
                                td { (maybe_time(stats.last_call)) }
                                td { (stats.calls) }
                                td { (format!("{:.1} %", stats.error_rate() * 100.0)) }
                                td { (millis(stats.p50_ms)) }
                                td { (millis(stats.p95_ms)) }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="deploy-heading" {
            h2 #deploy-heading { "Deploy" }
            form #deploy method="post" action="/console/functions" enctype="multipart/form-data" {
                (csrf_input(&csrf))
                label.drop for="component" {
                    span { "Drop a component (.wasm) here, or choose one" }
                    input #component type="file" name="component" accept=".wasm,application/wasm" required;
                }
                label for="name" { "Name" }
                input #name type="text" name="name" required pattern="[a-z0-9][a-z0-9-]*" maxlength="63"
                    aria-describedby="name-help";
                p #name-help .help { "Lowercase letters, digits and dashes; a new version when the name exists." }
                label.check { input type="checkbox" name="public" value="true"; " Public (serve /http/… without a key)" }
                button type="submit" { "Deploy" }
            }
        }
    };
    let status = problem.map_or(StatusCode::OK, Problem::status);
    let mut response = session_page(service, session, "/console/functions", "Functions", &body);
    *response.status_mut() = status;
    Ok(response)
}

pub(super) async fn list(State(service): State<Arc<Service>>, session: Session) -> Answer {
    list_page(&service, &session, None).await
}

/// An upload, read from the multipart form.
struct Upload {
    name: String,
    public: bool,
    csrf: Option<String>,
    component: Bytes,
}

/// Reads the upload form: the body capped at the tenant's component limit
/// (and the form's framing), then its fields.
async fn read_upload(service: &Service, tenant: &str, request: Request) -> Result<Upload, Problem> {
    let limit = service.policy(tenant).max_component_bytes;
    let too_large = || Problem::too_large(limit, "the component");
    let (parts, body) = read_capped(request, limit.saturating_add(FORM_OVERHEAD), "the upload")
        .await
        .map_err(|problem| {
            if problem.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                problem
            }
        })?;
    let request = Request::from_parts(parts, axum::body::Body::from(body));
    let bad = |e: axum::extract::multipart::MultipartError| {
        Problem::bad_request(
            "invalid-request",
            format!("the upload form: {}", e.body_text()),
        )
    };
    let mut form = <Multipart as axum::extract::FromRequest<()>>::from_request(request, &())
        .await
        .map_err(|e| Problem::bad_request("invalid-request", e.body_text()))?;
    let mut upload = Upload {
        name: String::new(),
        public: false,
        csrf: None,
        component: Bytes::new(),
    };
    while let Some(field) = form.next_field().await.map_err(bad)? {
        match field.name().unwrap_or_default() {
            "component" => {
                let file = field.file_name().map(str::to_owned);
                upload.component = field.bytes().await.map_err(bad)?;
                if upload.name.is_empty() {
                    // The file's stem when no name was typed.
                    upload.name = file
                        .as_deref()
                        .and_then(|f| f.rsplit('/').next())
                        .map(|f| f.trim_end_matches(".wasm").to_owned())
                        .unwrap_or_default();
                }
            }
            "name" => {
                let name = field.text().await.map_err(bad)?;
                if !name.trim().is_empty() {
                    upload.name = name.trim().to_owned();
                }
            }
            "public" => upload.public = field.text().await.map_err(bad)? == "true",
            CSRF_FIELD => upload.csrf = Some(field.text().await.map_err(bad)?),
            _ => {}
        }
    }
    if upload.component.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(upload)
}

/// A deploy by upload: the function's page after it, or the list with the
/// API's problem on it.
pub(super) async fn deploy(
    State(service): State<Arc<Service>>,
    session: Session,
    request: Request,
) -> Answer {
    let tenant = tenant_of(&session)?;
    let headers = request.headers().clone();
    let upload = match read_upload(&service, &tenant, request).await {
        Ok(upload) => upload,
        Err(problem) => return list_page(&service, &session, Some(&problem)).await,
    };
    check_csrf(&service, &session, &headers, upload.csrf.as_deref())?;
    let deployed = async {
        let name = crate::service::checked_name(&upload.name, "function")?.to_owned();
        let options = DeployOptions {
            public: upload.public,
            ..DeployOptions::default()
        };
        service
            .deploy(&tenant, &name, upload.component, options)
            .await
            .map(|_| name)
    }
    .await;
    match deployed {
        Ok(name) => Ok(see_other(&format!("/console/functions/{name}"))),
        Err(error) => list_page(&service, &session, Some(&Problem::from(error))).await,
    }
}

/// `?outcome=…` of a function's page.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Filter {
    /// Only invocations with this outcome code (`ok`, `failed` for any
    /// failure, or a code).
    outcome: Option<String>,
}

fn keep(filter: Option<&str>, record: &InvocationRecord) -> bool {
    match filter {
        None | Some("") => true,
        Some("failed") => record.outcome != "ok" || record.status >= 500,
        Some(code) => record.outcome == code,
    }
}

/// One invocation as a table row (the page's list and the live feed).
fn invocation_row(record: &InvocationRecord) -> Markup {
    html! {
        tr data-id=(record.id) {
            th scope="row" { a href=(format!("/console/invocations/{}", record.id)) { code { (record.id) } } }
            td { (time(record.started_at)) }
            td { (record.status) }
            td { (outcome(&record.outcome)) }
            td { (micros(record.timings.total_us)) }
            td { (micros(record.timings.instantiate_us)) }
            td { (micros(record.timings.call_us)) }
            td { (bytes(record.peak_memory_bytes)) }
        }
    }
}

fn invocation_table(records: &[InvocationRecord], filter: Option<&str>) -> Markup {
    html! {
        table #invocations {
            thead { tr {
                th scope="col" { "Invocation" } th scope="col" { "Started" } th scope="col" { "Status" }
                th scope="col" { "Outcome" } th scope="col" { "Duration" } th scope="col" { "Instantiate" }
                th scope="col" { "Call" } th scope="col" { "Peak memory" }
            } }
            tbody #invocation-rows data-filter=(filter.unwrap_or_default()) {
                @for record in records.iter().filter(|r| keep(filter, r)) {
                    (invocation_row(record))
                }
            }
        }
    }
}

/// A function's page, with `tried` (the last quick invoke) on it.
async fn detail_page(
    service: &Arc<Service>,
    session: &Session,
    name: String,
    filter: Option<String>,
    tried: Option<Markup>,
) -> Answer {
    let tenant = tenant_of(session)?;
    let (function, schedule, stats, records) = blocking(service, move |s| {
        let (function, schedule) = s.function(&tenant, &name)?;
        let stats = s.call_stats(&tenant, &name, WINDOW)?;
        let (records, _) = s.invocations(&tenant, &name, RECENT, None)?;
        Ok((function, schedule, stats, records))
    })
    .await?;
    let csrf = session.csrf(service);
    let filter = filter.filter(|f| !f.is_empty());
    let outcomes: Vec<String> = stats.outcomes.keys().cloned().collect();
    let body = html! {
        (summary(&function, schedule.as_deref(), &stats))
        section aria-labelledby="charts-heading" {
            h2 #charts-heading { "Last hour" }
            div.charts {
                (figure("Calls per minute", &charts::calls_per_minute(&stats.minutes)))
                (figure("Latency per minute (p50, p95)", &charts::latency_per_minute(&stats.minutes)))
                (figure("Calls by outcome", &charts::bars(
                    &stats.outcomes.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>(),
                    "calls",
                    Some("ok"),
                )))
            }
        }
        @if function.world == FunctionWorld::Handler {
            section aria-labelledby="invoke-heading" {
                h2 #invoke-heading { "Invoke" }
                form #invoke method="post" action=(format!("/console/functions/{}/invoke", function.name))
                    hx-post=(format!("/console/functions/{}/invoke", function.name)) hx-target="#invoke-result" hx-swap="innerHTML" {
                    (csrf_input(&csrf))
                    label for="content-type" { "Content type" }
                    select #content-type name="content_type" {
                        option value="application/json" { "application/json" }
                        option value="text/plain" { "text/plain" }
                    }
                    label for="body" { "Body" }
                    textarea #body name="body" rows="6" spellcheck="false" { "{}" }
                    button type="submit" { "Invoke" }
                }
                div #invoke-result aria-live="polite" { @if let Some(tried) = tried { (tried) } }
            }
        } @else {
            p { "An HTTP app: call it at " a href=(format!("/http/{}/{}/", function.tenant, function.name)) { code { (format!("/http/{}/{}/", function.tenant, function.name)) } } "." }
        }
        section aria-labelledby="invocations-heading" {
            h2 #invocations-heading { "Recent invocations" }
            form.filter method="get" hx-get="" hx-select="#invocations" hx-target="#invocations" hx-swap="outerHTML" hx-trigger="change" {
                label for="outcome" { "Outcome" }
                select #outcome name="outcome" {
                    option value="" selected[filter.is_none()] { "all" }
                    option value="ok" selected[filter.as_deref() == Some("ok")] { "ok" }
                    option value="failed" selected[filter.as_deref() == Some("failed")] { "failed" }
                    @for code in outcomes.iter().filter(|code| *code != "ok") {
                        option value=(code) selected[filter.as_deref() == Some(code.as_str())] { (code) }
                    }
                }
                noscript { button type="submit" { "Filter" } }
            }
            p.live { span #live-status data-live=(format!("/console/functions/{}/live", function.name)) { "Live: new invocations appear here." } }
            div.scroll { (invocation_table(&records, filter.as_deref())) }
        }
        section.danger aria-labelledby="delete-heading" {
            h2 #delete-heading { "Delete" }
            form #delete method="post" action=(format!("/console/functions/{}/delete", function.name))
                data-confirm=(format!("Delete {} and its schedule? Its records go with it.", function.name)) {
                (csrf_input(&csrf))
                button.danger type="submit" { "Delete " (function.name) }
            }
        }
    };
    Ok(session_page(
        service,
        session,
        "/console/functions",
        &function.name,
        &body,
    ))
}

fn summary(function: &FunctionRecord, schedule: Option<&str>, stats: &CallStats) -> Markup {
    html! {
        dl.summary {
            dt { "World" } dd { (function.world.as_str()) }
            dt { "Version" } dd { (function.version) }
            dt { "Size" } dd { (bytes(function.size)) }
            dt { "Digest" } dd { code { (function.digest.get(..16).unwrap_or(&function.digest)) "…" } }
            dt { "Public" } dd { @if function.public { "yes" } @else { "no" } }
            dt { "Schedule" } dd { @if let Some(cron) = schedule { code { (cron) } } @else { "–" } }
            dt { "Updated" } dd { (time(function.updated_at)) }
            dt { "Calls (1 h)" } dd { (stats.calls) @if stats.truncated { " (newest kept records only)" } }
            dt { "Error rate" } dd { (format!("{:.1} %", stats.error_rate() * 100.0)) }
            dt { "p50 / p95" } dd { (millis(stats.p50_ms)) " / " (millis(stats.p95_ms)) }
        }
    }
}

pub(super) async fn detail(
    State(service): State<Arc<Service>>,
    session: Session,
    Params(name): Params<String>,
    QueryParams(filter): QueryParams<Filter>,
) -> Answer {
    detail_page(&service, &session, name, filter.outcome, None).await
}

/// The quick-invoke form's fields.
#[derive(Debug, serde::Deserialize)]
pub(super) struct InvokeForm {
    #[serde(rename = "_csrf")]
    csrf: Option<String>,
    content_type: Option<String>,
    body: String,
}

/// What a quick invoke did: the answer, or the problem, with a link to its
/// record.
fn tried(id: &str, invocation: &Invocation) -> Markup {
    let link =
        html! { a href=(format!("/console/invocations/{id}")) { "invocation " code { (id) } } };
    match &invocation.outcome {
        Outcome::Ok(reply) => html! {
            div.result.ok {
                p { "Answered " strong { (reply.status) } " " code { (reply.content_type) } " in " (micros((invocation.timings.instantiate + invocation.timings.call).as_micros() as u64)) " (" (link) ")" }
                pre.output { (String::from_utf8_lossy(&reply.body)) }
            }
        },
        other => {
            let failure = Failure::of(other);
            html! {
                div.result.bad {
                    (problem_box(failure.status.as_u16(), &failure.code, &failure.detail))
                    p { "See " (link) " for its output." }
                }
            }
        }
    }
}

pub(super) async fn invoke(
    State(service): State<Arc<Service>>,
    session: Session,
    Params(name): Params<String>,
    headers: HeaderMap,
    PageForm(form): PageForm<InvokeForm>,
) -> Answer {
    let tenant = tenant_of(&session)?;
    check_csrf(&service, &session, &headers, form.csrf.as_deref())?;
    let limit = service.policy(&tenant).max_body_bytes;
    if form.body.len() as u64 > limit {
        return Err(Problem::too_large(limit, "the request body").into());
    }
    let content_type = form
        .content_type
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "application/json".to_owned());
    let result = service
        .invoke_now(&tenant, &name, form.body.into_bytes(), content_type)
        .await;
    let htmx = headers.contains_key("hx-request");
    let shown = match result {
        Ok((id, invocation)) => tried(&id, &invocation),
        // Not run (no such function, no free slot): the problem, as the
        // API answers it; htmx shows it under the form.
        Err(error) if htmx => {
            let problem = Problem::from(error);
            let shown = problem_box(problem.status().as_u16(), problem.code(), problem.detail());
            return Ok((problem.status(), shown).into_response());
        }
        Err(error) => return Err(error.into()),
    };
    if htmx {
        return Ok((StatusCode::OK, shown).into_response());
    }
    detail_page(&service, &session, name, None, Some(shown)).await
}

pub(super) async fn delete(
    State(service): State<Arc<Service>>,
    session: Session,
    Params(name): Params<String>,
    headers: HeaderMap,
    PageForm(form): PageForm<TokenForm>,
) -> Answer {
    tenant_action(
        &service,
        &session,
        &headers,
        form.csrf.as_deref(),
        move |s, tenant| s.delete_function(tenant, &name),
    )
    .await?;
    Ok(see_other("/console/functions"))
}

/// How often the live feed looks for new records: the store is the one
/// place every host's records meet.
const LIVE_POLL: Duration = Duration::from_secs(1);
/// A comment this often keeps proxies from closing a quiet feed.
const LIVE_KEEPALIVE: Duration = Duration::from_secs(15);

/// The live feed of a function's page: Server-Sent Events, each a table
/// row of a new invocation (`event: invocation`).
pub(super) async fn live(
    State(service): State<Arc<Service>>,
    session: Session,
    Params(name): Params<String>,
) -> Answer {
    let tenant = tenant_of(&session)?;
    // A feed is one of the tenant's long-lived requests (its policy's
    // `max_streams`): open pages cannot poll the store without bound.
    let slot = service.open_stream(&tenant)?;
    let (t, n) = (tenant.clone(), name.clone());
    // What is on the page already is not sent again.
    let (first, _) = blocking(&service, move |s| s.invocations(&t, &n, RECENT, None)).await?;
    let mut seen: HashSet<String> = first.into_iter().map(|r| r.id).collect();
    let (frames, receiver) = tokio::sync::mpsc::channel::<Result<BodyFrame<Bytes>, BoxError>>(4);
    let task = async move {
        let _slot = slot;
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(LIVE_POLL).await;
            // The page went away: give the stream's place back now, not at
            // the next event.
            if frames.is_closed() {
                return;
            }
            let (t, n) = (tenant.clone(), name.clone());
            let Ok((records, _)) =
                blocking(&service, move |s| s.invocations(&t, &n, RECENT, None)).await
            else {
                // The function is gone, or the store is out of reach.
                let _ = frames
                    .send(Ok(BodyFrame::data(Bytes::from_static(
                        b"event: gone\ndata: \n\n",
                    ))))
                    .await;
                return;
            };
            let mut sent = false;
            // Oldest first, so the page's newest-first list stays in order.
            for record in records.iter().rev().filter(|r| !seen.contains(&r.id)) {
                let row = invocation_row(record).into_string();
                let event = format!("event: invocation\ndata: {row}\n\n");
                if frames
                    .send(Ok(BodyFrame::data(Bytes::from(event))))
                    .await
                    .is_err()
                {
                    return;
                }
                sent = true;
            }
            seen = records.into_iter().map(|r| r.id).collect();
            quiet = if sent {
                Duration::ZERO
            } else {
                quiet + LIVE_POLL
            };
            if quiet >= LIVE_KEEPALIVE {
                quiet = Duration::ZERO;
                if frames
                    .send(Ok(BodyFrame::data(Bytes::from_static(b": keep-alive\n\n"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    };
    // Detached: it ends within a poll of its page going away (at the
    // latest when shutdown closes the connection), giving back its slot.
    drop(tokio::spawn(task));
    let body = http_body_util::BodyExt::boxed_unsync(StreamBody::new(tokio_stream_from(receiver)));
    let mut response = respond(StatusCode::OK, body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    Ok(response)
}

/// The frames a channel receives, as a stream.
fn tokio_stream_from<T>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// An invocation's page: outcome, timings, the guest's message (a
/// traceback, for a failure) and its captured output.
pub(super) async fn invocation(
    State(service): State<Arc<Service>>,
    session: Session,
    Params(id): Params<String>,
) -> Answer {
    let tenant = tenant_of(&session)?;
    let record = blocking(&service, move |s| s.invocation(&tenant, &id)).await?;
    let failed = keep(Some("failed"), &record);
    let body = html! {
        dl.summary {
            dt { "Function" } dd { a href=(format!("/console/functions/{}", record.function)) { (record.function) } " v" (record.version) }
            dt { "Started" } dd { (time(record.started_at)) }
            dt { "Status" } dd { (record.status) }
            dt { "Outcome" } dd { (outcome(&record.outcome)) }
            dt { "Duration" } dd { (micros(record.timings.total_us)) }
            dt { "Instantiate" } dd { (micros(record.timings.instantiate_us))
                @if record.timings.reused_instance { " (reused instance)" }
                @if record.timings.ready_instance { " (instance made ready ahead)" } }
            dt { "Call" } dd { (micros(record.timings.call_us)) }
            dt { "Peak memory" } dd { (bytes(record.peak_memory_bytes)) }
            @if let Some(trace) = &record.trace_id { dt { "Trace" } dd { code { (trace) } } }
        }
        @if let Some(message) = &record.message {
            section aria-labelledby="message-heading" {
                h2 #message-heading { @if failed { "Error" } @else { "Message" } }
                pre #message .output.bad[failed] { (message) }
            }
        }
        @if !record.egress_denied.is_empty() {
            section aria-labelledby="egress-heading" {
                h2 #egress-heading { "Refused outgoing requests" }
                ul { @for denied in &record.egress_denied { li { code { (denied) } } } }
            }
        }
        section aria-labelledby="stdout-heading" {
            h2 #stdout-heading { "stdout" }
            pre #stdout .output { (record.stdout) }
            @if record.stdout_dropped_bytes > 0 { p.help { (bytes(record.stdout_dropped_bytes)) " more were dropped." } }
        }
        section aria-labelledby="stderr-heading" {
            h2 #stderr-heading { "stderr" }
            pre #stderr .output { (record.stderr) }
            @if record.stderr_dropped_bytes > 0 { p.help { (bytes(record.stderr_dropped_bytes)) " more were dropped." } }
        }
    };
    Ok(session_page(
        &service,
        &session,
        "/console/functions",
        &record.id,
        &body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_filter_keeps_what_it_names() {
        let mut record: InvocationRecord = serde_json::from_value(serde_json::json!({
            "id": "inv_1", "tenant": "t", "function": "f", "version": 1, "started_at": 1,
            "status": 200, "outcome": "ok", "message": null,
            "timings": {"instantiate_us": 1, "call_us": 1, "total_us": 2},
            "peak_memory_bytes": 0, "stdout": "", "stderr": "",
            "stdout_dropped_bytes": 0, "stderr_dropped_bytes": 0
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(keep(None, &record) && keep(Some("ok"), &record));
        assert!(!keep(Some("failed"), &record) && !keep(Some("trap"), &record));
        record.outcome = "trap".into();
        record.status = 500;
        assert!(keep(Some("failed"), &record) && keep(Some("trap"), &record));
        assert!(!keep(Some("ok"), &record));
        // An answer of 5xx the function chose is a failure too.
        record.outcome = "ok".into();
        assert!(keep(Some("failed"), &record));
    }
}
