//! Who is calling: the admin, a tenant, or nobody.

use http::HeaderMap;

use super::problem::Problem;
use super::state::AppState;
use crate::tenancy::keys;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    Admin,
    Tenant(String),
}

/// The caller named by `Authorization: Bearer`, if the key is valid.
/// `Ok(None)` when no credentials were sent.
pub(crate) fn caller(state: &AppState, headers: &HeaderMap) -> Result<Option<Caller>, Problem> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(keys::parse_bearer)
        .ok_or_else(|| Problem::unauthorized("the Authorization header must be `Bearer <key>`"))?;
    let hash = keys::hash(token);
    if keys::constant_time_eq(&hash, &state.admin_key_hash) {
        return Ok(Some(Caller::Admin));
    }
    match state.store.key_by_hash(&hash)? {
        Some(record) if keys::constant_time_eq(&record.hash, &hash) => {
            Ok(Some(Caller::Tenant(record.tenant)))
        }
        _ => Err(Problem::unauthorized("the API key is not valid")),
    }
}

/// The calling tenant, or 401.
pub(crate) fn tenant(state: &AppState, headers: &HeaderMap) -> Result<String, Problem> {
    match caller(state, headers)? {
        Some(Caller::Tenant(tenant)) => Ok(tenant),
        Some(Caller::Admin) => Err(Problem::unauthorized(
            "the admin key manages tenants; use a tenant's key for functions",
        )),
        None => Err(Problem::unauthorized(
            "an API key is required (Authorization: Bearer <key>)",
        )),
    }
}

/// The admin, or 401.
pub(crate) fn admin(state: &AppState, headers: &HeaderMap) -> Result<(), Problem> {
    match caller(state, headers)? {
        Some(Caller::Admin) => Ok(()),
        Some(Caller::Tenant(_)) => Err(Problem::unauthorized("this endpoint needs the admin key")),
        None => Err(Problem::unauthorized(
            "the admin key is required (Authorization: Bearer <key>)",
        )),
    }
}
