//! The route table (each route once, with its `utoipa` path attribute) and
//! the OpenAPI 3.1 document generated from it.

use std::sync::{Arc, OnceLock};

use axum::extract::Request;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::Problem;
use super::{functions, host, http_route, invoke, jobs, kv, map, schedules, secrets, tenants, ws};
use crate::service::Service;

/// The document's fixed parts: info, tags, the bearer scheme and the
/// schemas no route names directly.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Gust",
        description = "Sandboxed function host: every function is a WebAssembly component. Errors are application/problem+json with a stable `code`."
    ),
    modifiers(&BearerScheme),
    components(schemas(
        Problem,
        crate::wire::Function,
        crate::wire::Invocation,
        crate::wire::Tenant,
        crate::wire::Key,
        crate::wire::NewKey,
        crate::wire::Job,
        crate::wire::Schedule,
        crate::wire::MapLine,
        crate::wire::StreamDone,
        crate::wire::SessionError,
    )),
    tags(
        (name = "host", description = "Health, metrics and this document"),
        (name = "functions", description = "Deploy, list and delete functions; their records"),
        (name = "invoke", description = "Call functions: invoke, map, streams, wasi:http routes"),
        (name = "jobs", description = "Invocations that run later"),
        (name = "schedules", description = "Cron schedules"),
        (name = "secrets", description = "Tenant secrets: set once, given to the functions deployed with them as environment variables"),
        (name = "kv", description = "Key-value buckets: what functions keep through wasi:keyvalue, to inspect and seed"),
        (name = "keys", description = "API keys and tenants"),
        (name = "gpu", description = "GPU-bridge usage and models")
    )
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route of the API, once. The router and the document both come
/// from here, so neither can list a route the other lacks.
pub(super) fn routes() -> OpenApiRouter<Arc<Service>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(host::healthz))
        .routes(routes!(host::readyz))
        .routes(routes!(host::metrics))
        .routes(routes!(host::openapi))
        .routes(routes!(functions::list))
        .routes(routes!(
            functions::deploy,
            functions::get,
            functions::delete
        ))
        .routes(routes!(functions::logs))
        .routes(routes!(functions::invocation))
        .routes(routes!(invoke::invoke))
        .routes(routes!(map::map))
        .routes(routes!(ws::websocket))
        .routes(routes!(jobs::spawn))
        .routes(routes!(jobs::get, jobs::delete))
        .routes(routes!(schedules::put, schedules::get, schedules::delete))
        .routes(routes!(secrets::list))
        .routes(routes!(secrets::put, secrets::delete))
        .routes(routes!(kv::buckets))
        .routes(routes!(kv::keys))
        .routes(routes!(kv::get, kv::put, kv::delete))
        .routes(routes!(host::usage))
        .routes(routes!(host::models))
        .routes(routes!(tenants::create_own_key, tenants::list_own_keys))
        .routes(routes!(tenants::revoke_own_key))
        .routes(routes!(tenants::create_tenant, tenants::list_tenants))
        .routes(routes!(tenants::admin_create_key))
        .routes(routes!(tenants::admin_revoke_key))
        .routes(routes!(http_route::root))
        .routes(routes!(http_route::root_slash))
        .routes(routes!(http_route::path))
}

/// The router of [`routes`], answering unknown paths and methods with
/// problem documents.
pub(super) fn router() -> axum::Router<Arc<Service>> {
    let (router, _) = routes().split_for_parts();
    router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
}

/// The OpenAPI document, as served at `/v1/openapi.json`: the paths as
/// OpenAPI writes them (`{path}` for the router's catch-all `{*path}`).
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let (_, mut doc) = routes().split_for_parts();
        let paths = std::mem::take(&mut doc.paths.paths);
        doc.paths.paths = paths
            .into_iter()
            .map(|(path, mut item)| {
                distinct_operation_ids(&mut item);
                (path.replace("{*", "{"), item)
            })
            .collect();
        doc.to_pretty_json().unwrap_or_else(|e| {
            tracing::error!(error = %e, "the OpenAPI document does not serialize");
            "{}".to_owned()
        })
    })
}

/// A route served for several methods has one attribute, so its operations
/// share one id; OpenAPI wants each id once, so such ids get the method.
fn distinct_operation_ids(item: &mut utoipa::openapi::PathItem) {
    let operations = [
        ("Get", &mut item.get),
        ("Put", &mut item.put),
        ("Post", &mut item.post),
        ("Delete", &mut item.delete),
        ("Options", &mut item.options),
        ("Head", &mut item.head),
        ("Patch", &mut item.patch),
        ("Trace", &mut item.trace),
    ];
    let present: Vec<_> = operations
        .into_iter()
        .filter_map(|(method, op)| op.as_mut().map(|op| (method, op)))
        .collect();
    let shared = present.len() > 1
        && present
            .windows(2)
            .all(|pair| pair[0].1.operation_id == pair[1].1.operation_id);
    if shared {
        for (method, op) in present {
            if let Some(id) = op.operation_id.as_mut() {
                id.push_str(method);
            }
        }
    }
}

async fn method_not_allowed(request: Request) -> Problem {
    Problem::new(
        http::StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!(
            "{} is not supported on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn not_found(request: Request) -> Problem {
    Problem::not_found(format!("no endpoint {}", request.uri().path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> serde_json::Value {
        serde_json::from_str(document()).unwrap()
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_operation_described() {
        let doc = doc();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1."),
            "{}",
            doc["openapi"]
        );
        let paths = doc["paths"].as_object().unwrap();
        assert!(!paths.is_empty());
        for (path, item) in paths {
            assert!(
                !path.contains("{*"),
                "{path}: router syntax in the document"
            );
            let operations: Vec<_> = item
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "parameters")
                .collect();
            assert!(!operations.is_empty(), "{path}: no operations");
            for (method, op) in operations {
                assert!(op["responses"].is_object(), "{method} {path}: no responses");
                assert!(
                    op["operationId"].is_string(),
                    "{method} {path}: no operationId"
                );
            }
        }
        for schema in [
            "Function",
            "Invocation",
            "Tenant",
            "Key",
            "NewKey",
            "Problem",
            "Job",
            "Schedule",
        ] {
            assert!(
                doc["components"]["schemas"][schema].is_object(),
                "schema {schema} missing"
            );
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }

    #[test]
    fn refs_resolve_and_operation_ids_are_unique() {
        fn walk(value: &serde_json::Value, refs: &mut Vec<String>, ids: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        match (k.as_str(), v) {
                            ("$ref", serde_json::Value::String(r)) => refs.push(r.clone()),
                            ("operationId", serde_json::Value::String(id)) => ids.push(id.clone()),
                            _ => walk(v, refs, ids),
                        }
                    }
                }
                serde_json::Value::Array(items) => {
                    items.iter().for_each(|v| walk(v, refs, ids));
                }
                _ => {}
            }
        }
        let doc = doc();
        let (mut refs, mut ids) = (Vec::new(), Vec::new());
        walk(&doc, &mut refs, &mut ids);
        assert!(!refs.is_empty());
        for r in &refs {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external $ref {r}"));
            assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
        }
        let count = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), count, "duplicate operationId");
    }
}
