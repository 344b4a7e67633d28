//! `gust tenants` and `gust keys`: tenants (admin key) and API keys (a
//! tenant's own, or any tenant's with the admin key).

use std::io::Write;

use clap::{Args, Subcommand};
use http::Method;

use super::client::{Client, ClientError, ConnectArgs, KeyKind, decode, segment, write_json};
use super::objects::{CreatedTenant, KeyList, NewKey, TenantList};
use super::output;

#[derive(Debug, Args)]
pub(crate) struct TenantsArgs {
    #[command(subcommand)]
    pub(crate) command: TenantsCommand,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TenantsCommand {
    /// Create a tenant and its first key.
    ///
    /// The key is printed alone on stdout (so `export GUST_KEY=$(gust tenants
    /// create acme)` works) and shown only this once: the host stores only
    /// its hash.
    Create(TenantCreateArgs),
    /// List the tenants.
    Ls(JsonArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TenantCreateArgs {
    /// The new tenant's name, `^[a-z0-9][a-z0-9-]{0,62}$`.
    pub(crate) name: String,

    /// Print the host's JSON (`{"tenant": …, "key": …}`, key included)
    /// instead of the key alone.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct JsonArgs {
    /// Print the host's JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct KeysArgs {
    #[command(subcommand)]
    pub(crate) command: KeysCommand,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create an API key.
    ///
    /// Without `--tenant`, a tenant key creates another key for its own
    /// tenant; with `--tenant`, the admin key creates one for that tenant.
    /// The key is printed alone on stdout and shown only this once: the host
    /// stores only its hash.
    Create(KeyCreateArgs),
    /// List the keys of the caller's tenant (ids only; secrets are never
    /// shown again).
    Ls(JsonArgs),
    /// Revoke a key: requests using it are refused from then on.
    Revoke(KeyRevokeArgs),
}

#[derive(Debug, Args)]
pub(crate) struct KeyCreateArgs {
    /// Create the key for this tenant, using the admin key.
    #[arg(long, value_name = "TENANT")]
    pub(crate) tenant: Option<String>,

    /// Print the host's JSON (key included) instead of the key alone.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct KeyRevokeArgs {
    /// The key's id (`key_…`, as `gust keys ls` shows it), not the key.
    pub(crate) id: String,

    /// Revoke a key of this tenant, using the admin key.
    #[arg(long, value_name = "TENANT")]
    pub(crate) tenant: Option<String>,
}

fn once_note(key: &NewKey) -> String {
    format!(
        "this is key {} of tenant {}; it is shown only this once (the host stores only its hash)",
        key.id, key.tenant
    )
}

pub(crate) async fn tenants(
    args: &TenantsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Admin)?;
    match &args.command {
        TenantsCommand::Create(create) => {
            let body = serde_json::json!({ "name": create.name });
            let (_, value): (_, serde_json::Value) = client
                .call(Method::POST, "/v1/tenants", Some(&body))
                .await?;
            let created: CreatedTenant = decode(value.clone(), "tenant")?;
            writeln!(err, "created tenant {}", created.tenant.name)?;
            writeln!(err, "{}", once_note(&created.key))?;
            if create.json {
                write_json(out, &value)
            } else {
                writeln!(out, "{}", created.key.key)?;
                Ok(())
            }
        }
        TenantsCommand::Ls(ls) => {
            let (_, value): (_, serde_json::Value) =
                client.call(Method::GET, "/v1/tenants", None).await?;
            if ls.json {
                return write_json(out, &value);
            }
            let mut list: TenantList = decode(value, "tenant list")?;
            if list.tenants.is_empty() {
                writeln!(err, "no tenants")?;
                return Ok(());
            }
            list.tenants.sort_by(|a, b| a.name.cmp(&b.name));
            let rows: Vec<Vec<String>> = list
                .tenants
                .iter()
                .map(|t| vec![t.name.clone(), output::time(&t.created_at)])
                .collect();
            for line in output::table(&["NAME", "CREATED"], &rows) {
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
    }
}

pub(crate) async fn keys(
    args: &KeysArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ClientError> {
    match &args.command {
        KeysCommand::Create(create) => {
            let (kind, path) = match &create.tenant {
                Some(tenant) => (
                    KeyKind::Admin,
                    format!("/v1/tenants/{}/keys", segment(tenant)),
                ),
                None => (KeyKind::Tenant, "/v1/keys".to_owned()),
            };
            let client = Client::from_args(&args.connect, kind)?;
            let (_, value): (_, serde_json::Value) = client.call(Method::POST, &path, None).await?;
            let key: NewKey = decode(value.clone(), "key")?;
            writeln!(err, "{}", once_note(&key))?;
            if create.json {
                write_json(out, &value)
            } else {
                writeln!(out, "{}", key.key)?;
                Ok(())
            }
        }
        KeysCommand::Ls(ls) => {
            let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
            let (_, value): (_, serde_json::Value) =
                client.call(Method::GET, "/v1/keys", None).await?;
            if ls.json {
                return write_json(out, &value);
            }
            let list: KeyList = decode(value, "key list")?;
            let rows: Vec<Vec<String>> = list
                .keys
                .iter()
                .map(|k| vec![k.id.clone(), k.tenant.clone(), output::time(&k.created_at)])
                .collect();
            for line in output::table(&["ID", "TENANT", "CREATED"], &rows) {
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        KeysCommand::Revoke(revoke) => {
            let (kind, path) = match &revoke.tenant {
                Some(tenant) => (
                    KeyKind::Admin,
                    format!(
                        "/v1/tenants/{}/keys/{}",
                        segment(tenant),
                        segment(&revoke.id)
                    ),
                ),
                None => (KeyKind::Tenant, format!("/v1/keys/{}", segment(&revoke.id))),
            };
            let client = Client::from_args(&args.connect, kind)?;
            client.call_no_content(Method::DELETE, &path).await?;
            writeln!(out, "revoked key {}", revoke.id)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::tests::{json_response, mock, no_content, problem_response};

    fn new_key(tenant: &str) -> serde_json::Value {
        serde_json::json!({
            "id": "key_0a1b2c3d", "tenant": tenant, "created_at": "2025-01-01T00:00:00Z",
            "key": "gust_secret",
        })
    }

    #[tokio::test]
    async fn tenants_and_keys_against_a_host() {
        let host = mock(|req| match (req.method.as_str(), req.path_and_query.as_str()) {
            ("POST", "/v1/tenants") => {
                let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
                if body["name"] == "taken" {
                    return problem_response(409, "conflict", "tenant `taken` already exists");
                }
                json_response(
                    201,
                    serde_json::json!({
                        "tenant": {"name": body["name"], "created_at": "2025-01-01T00:00:00Z"},
                        "key": new_key(body["name"].as_str().unwrap()),
                    }),
                )
            }
            ("GET", "/v1/tenants") => json_response(
                200,
                serde_json::json!({"tenants": [
                    {"name": "zeta", "created_at": "2025-01-01T00:00:00Z"},
                    {"name": "acme", "created_at": "2025-01-02T00:00:00.25Z"},
                ]}),
            ),
            ("POST", "/v1/keys") => json_response(201, new_key("acme")),
            ("POST", "/v1/tenants/acme/keys") => json_response(201, new_key("acme")),
            ("GET", "/v1/keys") => json_response(
                200,
                serde_json::json!({"keys": [
                    {"id": "key_0a1b2c3d", "tenant": "acme", "created_at": "2025-01-01T00:00:00Z"},
                ]}),
            ),
            ("DELETE", "/v1/keys/key_1") | ("DELETE", "/v1/tenants/acme/keys/key_2") => {
                no_content()
            }
            _ => problem_response(404, "not-found", "no such thing"),
        })
        .await;
        let connect = host.connect();

        let run_tenants = |command: TenantsCommand| TenantsArgs {
            command,
            connect: connect.clone(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let create = run_tenants(TenantsCommand::Create(TenantCreateArgs {
            name: "acme".to_owned(),
            json: false,
        }));
        tenants(&create, &mut out, &mut err).await.unwrap();
        assert_eq!(out, b"gust_secret\n");
        let err = String::from_utf8(err).unwrap();
        assert!(err.starts_with("created tenant acme\n"), "{err}");
        assert!(err.contains("shown only this once"), "{err}");

        let taken = run_tenants(TenantsCommand::Create(TenantCreateArgs {
            name: "taken".to_owned(),
            json: false,
        }));
        let e = tenants(&taken, &mut Vec::new(), &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant `taken` already exists (conflict, HTTP 409)"
        );

        let mut out = Vec::new();
        let ls = run_tenants(TenantsCommand::Ls(JsonArgs { json: false }));
        tenants(&ls, &mut out, &mut Vec::new()).await.unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME  CREATED\nacme  2025-01-02T00:00:00Z\nzeta  2025-01-01T00:00:00Z\n"
        );

        let run_keys = |command: KeysCommand| KeysArgs {
            command,
            connect: connect.clone(),
        };
        for tenant in [None, Some("acme".to_owned())] {
            let mut out = Vec::new();
            let create = run_keys(KeysCommand::Create(KeyCreateArgs {
                tenant,
                json: false,
            }));
            keys(&create, &mut out, &mut Vec::new()).await.unwrap();
            assert_eq!(out, b"gust_secret\n");
        }
        let mut out = Vec::new();
        keys(
            &run_keys(KeysCommand::Ls(JsonArgs { json: false })),
            &mut out,
            &mut Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID            TENANT  CREATED\nkey_0a1b2c3d  acme    2025-01-01T00:00:00Z\n"
        );
        for (id, tenant) in [("key_1", None), ("key_2", Some("acme".to_owned()))] {
            let mut out = Vec::new();
            let revoke = run_keys(KeysCommand::Revoke(KeyRevokeArgs {
                id: id.to_owned(),
                tenant,
            }));
            keys(&revoke, &mut out, &mut Vec::new()).await.unwrap();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("revoked key {id}\n")
            );
        }
        let paths: Vec<String> = host
            .requests()
            .into_iter()
            .map(|r| format!("{} {}", r.method, r.path_and_query))
            .collect();
        assert!(
            paths.contains(&"POST /v1/tenants/acme/keys".to_owned()),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"DELETE /v1/tenants/acme/keys/key_2".to_owned()),
            "{paths:?}"
        );
    }
}
