//! The console's tenant pages besides functions (jobs, schedules, models,
//! usage, keys) and the admin's tenants page.

use std::sync::Arc;

use axum::extract::State;
use http::HeaderMap;
use maud::html;

use super::session::Session;
use super::views::{bytes, csrf_input, figure, maybe_time, micros, outcome, time};
use super::{
    Answer, PageForm, TokenForm, charts, check_csrf, not_yours, see_other, session_page,
    tenant_action, tenant_of,
};
use crate::api::blocking;
use crate::api::extract::Params;
use crate::service::Service;
use crate::store::JobStatus;

pub(super) async fn jobs(State(service): State<Arc<Service>>, session: Session) -> Answer {
    let tenant = tenant_of(&session)?;
    let jobs = blocking(&service, move |s| s.jobs(&tenant)).await?;
    let csrf = session.csrf(&service);
    let body = html! {
        @if jobs.is_empty() {
            p { "No jobs: spawn one with " code { "gust spawn" } " or " code { "POST /v1/functions/{name}/spawn" } "." }
        } @else {
            div.scroll { table #jobs {
                thead { tr {
                    th scope="col" { "Job" } th scope="col" { "Function" } th scope="col" { "Status" }
                    th scope="col" { "Created" } th scope="col" { "Finished" } th scope="col" { "Attempts" }
                    th scope="col" { "Result or error" } th scope="col" { span.visually-hidden { "Actions" } }
                } }
                tbody { @for job in &jobs {
                    tr {
                        th scope="row" { code { (job.id) } }
                        td { a href=(format!("/console/functions/{}", job.function)) { (job.function) } }
                        td { (outcome(match job.status { JobStatus::Failed => "failed", JobStatus::Cancelled => "cancelled", other => other.as_str() })) }
                        td { (time(job.created_at)) }
                        td { (maybe_time(job.finished_at)) }
                        td { (job.attempts) }
                        td {
                            @if let Some(result) = &job.result {
                                (result.status) " " code { (result.content_type) } " " (bytes(result.body.len() as u64))
                            }
                            @if let Some(error) = &job.error { (error.status) " " code { (error.code) } ": " (error.message) }
                            @if let Some(id) = &job.invocation_id { " " a href=(format!("/console/invocations/{id}")) { "record" } }
                        }
                        td {
                            form method="post" action=(format!("/console/jobs/{}/cancel", job.id)) data-confirm=(
                                if matches!(job.status, JobStatus::Pending | JobStatus::Running) { "Cancel this job?" } else { "Delete this finished job?" }) {
                                (csrf_input(&csrf))
                                button type="submit" {
                                    @if matches!(job.status, JobStatus::Pending | JobStatus::Running) { "Cancel" } @else { "Delete" }
                                }
                            }
                        }
                    }
                } }
            } }
        }
    };
    Ok(session_page(
        &service,
        &session,
        "/console/jobs",
        "Jobs",
        &body,
    ))
}

pub(super) async fn cancel_job(
    State(service): State<Arc<Service>>,
    session: Session,
    Params(id): Params<String>,
    headers: HeaderMap,
    PageForm(form): PageForm<TokenForm>,
) -> Answer {
    tenant_action(
        &service,
        &session,
        &headers,
        form.csrf.as_deref(),
        move |s, tenant| s.cancel_job(tenant, &id),
    )
    .await?;
    Ok(see_other("/console/jobs"))
}

pub(super) async fn schedules(State(service): State<Arc<Service>>, session: Session) -> Answer {
    let tenant = tenant_of(&session)?;
    let schedules = blocking(&service, move |s| {
        Ok(s.schedules(&tenant)?
            .into_iter()
            .map(|schedule| {
                let next = s.next_run(&schedule.tenant, &schedule.function);
                (schedule, next)
            })
            .collect::<Vec<_>>())
    })
    .await?;
    let body = html! {
        @if schedules.is_empty() {
            p { "No schedules: give a function one with " code { "gust schedule" } "." }
        } @else {
            div.scroll { table #schedules {
                thead { tr {
                    th scope="col" { "Function" } th scope="col" { "Cron (UTC)" } th scope="col" { "Next run" }
                    th scope="col" { "Last run" } th scope="col" { "Last outcome" }
                } }
                tbody { @for (schedule, next) in &schedules {
                    tr {
                        th scope="row" { a href=(format!("/console/functions/{}", schedule.function)) { (schedule.function) } }
                        td { code { (schedule.cron) } }
                        td { (maybe_time(*next)) }
                        td { (maybe_time(schedule.last_run_at)) }
                        td {
                            @if let Some(code) = &schedule.last_outcome {
                                @if let Some(id) = &schedule.last_invocation_id {
                                    a href=(format!("/console/invocations/{id}")) { (outcome(code)) }
                                } @else { (outcome(code)) }
                            } @else { "–" }
                        }
                    }
                } }
            } }
        }
    };
    Ok(session_page(
        &service,
        &session,
        "/console/schedules",
        "Schedules",
        &body,
    ))
}

pub(super) async fn models(State(service): State<Arc<Service>>, session: Session) -> Answer {
    let tenant = tenant_of(&session)?;
    let models = service.models(&tenant);
    let residents = service.residents(&tenant);
    let counters = service.model_counters();
    let sizes: Vec<(String, u64)> = residents
        .iter()
        .filter_map(|r| {
            let (batches, requests) = r.batches?;
            // Mean calls per forward pass, in tenths for the bar's scale.
            Some((
                r.name.clone(),
                (requests * 10).checked_div(batches).unwrap_or(0),
            ))
        })
        .collect();
    let body = html! {
        @if models.models.is_empty() {
            p { "No models this tenant may load are installed on this host." }
        } @else {
            div.scroll { table #models {
                thead { tr {
                    th scope="col" { "Model" } th scope="col" { "Family" } th scope="col" { "Weights" }
                    th scope="col" { "Batching" } th scope="col" { "Resident on" }
                } }
                tbody { @for model in &models.models {
                    tr {
                        th scope="row" { (model.name) }
                        td { (model.family) }
                        td { (model.dtype) }
                        td { @if let Some(b) = &model.batching { "up to " (b.max_batch) " per pass, " (b.max_delay_ms) " ms" } @else { "–" } }
                        td { @if model.resident_on.is_empty() { "not loaded" } @else { (model.resident_on.join(", ")) } }
                    }
                } }
            } }
        }
        section aria-labelledby="resident-heading" {
            h2 #resident-heading { "Resident now" }
            @if residents.is_empty() {
                p { "None: a model loads at its first use." }
            } @else {
                div.scroll { table #residents {
                    thead { tr {
                        th scope="col" { "Model" } th scope="col" { "Device" } th scope="col" { "Memory" }
                        th scope="col" { "Forward passes" } th scope="col" { "Calls answered" }
                    } }
                    tbody { @for r in &residents {
                        tr {
                            th scope="row" { (r.name) }
                            td { (r.device) }
                            td { (bytes(r.bytes)) }
                            @if let Some((batches, requests)) = r.batches { td { (batches) } td { (requests) } }
                            @else { td { "–" } td { "–" } }
                        }
                    } }
                } }
            }
            @if !sizes.is_empty() {
                (figure("Mean batch size (calls per forward pass, ×10)", &charts::bars(&sizes, "calls ×10", None)))
            }
        }
        section aria-labelledby="loads-heading" {
            h2 #loads-heading { "Loads" }
            dl.summary {
                dt { "This tenant's loads" } dd { (models.stats.loads) }
                dt { "Its loads found resident" } dd { (models.stats.hits) }
                dt { "Its failed loads" } dd { (models.stats.failures) }
                dt { "Evictions (host)" } dd { (counters.evictions) }
            }
        }
    };
    Ok(session_page(
        &service,
        &session,
        "/console/models",
        "Models",
        &body,
    ))
}

pub(super) async fn usage(State(service): State<Arc<Service>>, session: Session) -> Answer {
    let tenant = tenant_of(&session)?;
    let usage = service.usage(&tenant);
    let gpu = &usage.gpu;
    let time = service.gpu_time_in_use(&tenant);
    let quotas = [
        (
            "memory now".to_owned(),
            gpu.memory_bytes as f64,
            gpu.memory_limit_bytes as f64,
        ),
        (
            "peak memory".to_owned(),
            gpu.peak_memory_bytes as f64,
            gpu.memory_limit_bytes as f64,
        ),
        (
            "device time, last minute".to_owned(),
            time.map_or(0.0, |(used, _)| used.as_secs_f64()),
            time.map_or(0.0, |(_, quota)| quota.as_secs_f64()),
        ),
    ];
    let body = html! {
        dl.summary {
            dt { "Devices" } dd {
                @if gpu.devices.is_empty() { "none granted" }
                @for (i, d) in gpu.devices.iter().enumerate() {
                    @if i > 0 { ", " } (d.backend) " (" (d.name) ")"
                }
            }
            dt { "Device time" } dd { (format!("{:.3} s", gpu.device_seconds)) }
            dt { "Device time quota" } dd {
                @if gpu.time_ms_per_minute == 0 { "none" } @else {
                    (gpu.time_ms_per_minute) " ms per minute"
                    @if let Some((used, _)) = time { ", " (micros(used.as_micros() as u64)) " in use" }
                }
            }
            dt { "Device memory" } dd { (bytes(gpu.memory_bytes)) " now, " (bytes(gpu.peak_memory_bytes)) " at peak" }
            dt { "Memory quota" } dd {
                @if gpu.memory_limit_bytes == 0 { "none" } @else { (bytes(gpu.memory_limit_bytes)) }
            }
        }
        (figure("GPU memory and device time against the tenant's quotas (no bar: no quota)", &charts::quotas(&quotas)))
    };
    Ok(session_page(
        &service,
        &session,
        "/console/usage",
        "Usage",
        &body,
    ))
}

pub(super) async fn keys(State(service): State<Arc<Service>>, session: Session) -> Answer {
    keys_page(&service, &session, None).await
}

/// The keys page; `created` is a new key's secret, shown this once.
async fn keys_page(
    service: &Arc<Service>,
    session: &Session,
    created: Option<(String, String)>,
) -> Answer {
    let tenant = tenant_of(session)?;
    let keys = blocking(service, move |s| s.keys(&tenant)).await?;
    let csrf = session.csrf(service);
    let body = html! {
        @if let Some((id, secret)) = &created {
            div.created role="status" {
                p { "New key " code { (id) } ". Copy it now: it is not shown again." }
                pre #new-key .output { (secret) }
            }
        }
        div.scroll { table #keys {
            thead { tr { th scope="col" { "Key" } th scope="col" { "Created" } th scope="col" { span.visually-hidden { "Actions" } } } }
            tbody { @for key in &keys {
                tr {
                    th scope="row" {
                        code { (key.id) }
                        @if key.id == session.signed.key_id { " (this session's)" }
                    }
                    td { (time(key.created_at)) }
                    td {
                        form method="post" action=(format!("/console/keys/{}/revoke", key.id))
                            data-confirm=(format!("Revoke {}? Programs using it stop working.", key.id)) {
                            (csrf_input(&csrf))
                            button.danger type="submit" { "Revoke" }
                        }
                    }
                }
            } }
        } }
        form #create-key method="post" action="/console/keys" {
            (csrf_input(&csrf))
            button type="submit" { "Create a key" }
        }
    };
    Ok(session_page(
        service,
        session,
        "/console/keys",
        "Keys",
        &body,
    ))
}

pub(super) async fn create_key(
    State(service): State<Arc<Service>>,
    session: Session,
    headers: HeaderMap,
    PageForm(form): PageForm<TokenForm>,
) -> Answer {
    let (record, secret) = tenant_action(
        &service,
        &session,
        &headers,
        form.csrf.as_deref(),
        |s, tenant| s.create_key(tenant),
    )
    .await?;
    keys_page(&service, &session, Some((record.id, secret))).await
}

pub(super) async fn revoke_key(
    State(service): State<Arc<Service>>,
    session: Session,
    Params(id): Params<String>,
    headers: HeaderMap,
    PageForm(form): PageForm<TokenForm>,
) -> Answer {
    tenant_action(
        &service,
        &session,
        &headers,
        form.csrf.as_deref(),
        move |s, tenant| s.revoke_key(tenant, &id),
    )
    .await?;
    // Revoking the session's own key ends the session: the next page
    // sends it to sign in.
    Ok(see_other("/console/keys"))
}

/// The admin's page: every tenant, and a form for a new one.
async fn tenants_page(
    service: &Arc<Service>,
    session: &Session,
    created: Option<(String, String)>,
) -> Answer {
    if !session.is_admin() {
        return Err(not_yours());
    }
    let tenants = blocking(service, |s| s.tenants()).await?;
    let csrf = session.csrf(service);
    let body = html! {
        @if let Some((tenant, secret)) = &created {
            div.created role="status" {
                p { "Tenant " code { (tenant) } " created. Its first key, shown this once:" }
                pre #new-key .output { (secret) }
            }
        }
        div.scroll { table #tenants {
            thead { tr { th scope="col" { "Tenant" } th scope="col" { "Created" } } }
            tbody { @for tenant in &tenants {
                tr { th scope="row" { (tenant.name) } td { (time(tenant.created_at)) } }
            } }
        } }
        form #create-tenant method="post" action="/console/tenants" {
            (csrf_input(&csrf))
            label for="tenant-name" { "New tenant" }
            input #tenant-name type="text" name="name" required pattern="[a-z0-9][a-z0-9-]*" maxlength="63";
            button type="submit" { "Create" }
        }
    };
    Ok(session_page(
        service,
        session,
        "/console/tenants",
        "Tenants",
        &body,
    ))
}

pub(super) async fn tenants(State(service): State<Arc<Service>>, session: Session) -> Answer {
    tenants_page(&service, &session, None).await
}

/// The new-tenant form's fields.
#[derive(Debug, serde::Deserialize)]
pub(super) struct TenantForm {
    #[serde(rename = "_csrf")]
    csrf: Option<String>,
    name: String,
}

pub(super) async fn create_tenant(
    State(service): State<Arc<Service>>,
    session: Session,
    headers: HeaderMap,
    PageForm(form): PageForm<TenantForm>,
) -> Answer {
    if !session.is_admin() {
        return Err(not_yours());
    }
    check_csrf(&service, &session, &headers, form.csrf.as_deref())?;
    let name = form.name.trim().to_owned();
    let (tenant, _, secret) = blocking(&service, move |s| s.create_tenant(&name)).await?;
    tenants_page(&service, &session, Some((tenant.name, secret))).await
}
