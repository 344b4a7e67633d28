//! `gust kv ls|get|set|rm`: the caller's tenant's key-value buckets, which
//! its functions use through `wasi:keyvalue`.

use std::io::{Read, Write};

use clap::{Args, Subcommand};
use http::Method;
use http::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;

use super::client::{Client, ClientError, ConnectArgs, KeyKind, decode, full, segment, write_json};
use super::output;

#[derive(Debug, Args)]
pub(crate) struct KvArgs {
    #[command(subcommand)]
    pub(crate) command: KvCommand,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum KvCommand {
    /// List the buckets that hold keys, or with BUCKET its keys (all of
    /// them, one per line, in byte order).
    Ls(LsArgs),
    /// Print a key's value as it is stored (counters are decimal text).
    Get(KeyArgs),
    /// Set a key: the value is VALUE, else `--from-file`, else stdin (as
    /// it is, bytes and all).
    Set(SetArgs),
    /// Remove a key (nothing happens if it is absent).
    Rm(KeyArgs),
}

#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// The bucket whose keys to list.
    pub(crate) bucket: Option<String>,

    /// Print the host's JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    /// The bucket, as functions open it (`default` for `open("")`).
    pub(crate) bucket: String,
    /// The key. (Its id is not `key`, which is `--key`'s.)
    #[arg(id = "entry_key", value_name = "KEY")]
    pub(crate) key: String,
}

#[derive(Debug, Args)]
pub(crate) struct SetArgs {
    /// The bucket, as functions open it (`default` for `open("")`).
    pub(crate) bucket: String,
    /// The key. (Its id is not `key`, which is `--key`'s.)
    #[arg(id = "entry_key", value_name = "KEY")]
    pub(crate) key: String,
    /// The value, as text.
    pub(crate) value: Option<String>,

    /// Read the value from this file.
    #[arg(long, value_name = "FILE", conflicts_with = "value")]
    pub(crate) from_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Deserialize)]
struct Bucket {
    name: String,
    keys: u64,
    bytes: u64,
}

#[derive(Debug, Deserialize)]
struct BucketList {
    buckets: Vec<Bucket>,
}

#[derive(Debug, Deserialize)]
struct KeyList {
    keys: Vec<String>,
    next_cursor: Option<u64>,
}

fn key_path(bucket: &str, key: &str) -> String {
    format!("/v1/kv/{}/{}", segment(bucket), segment(key))
}

fn value(args: &SetArgs, stdin: &mut dyn Read) -> Result<Vec<u8>, ClientError> {
    if let Some(text) = &args.value {
        return Ok(text.as_bytes().to_vec());
    }
    if let Some(path) = &args.from_file {
        return std::fs::read(path)
            .map_err(|e| ClientError::Input(format!("reading {}: {e}", path.display())));
    }
    let mut value = Vec::new();
    stdin
        .read_to_end(&mut value)
        .map_err(|e| ClientError::Input(format!("reading the value from stdin: {e}")))?;
    Ok(value)
}

pub(crate) async fn kv(
    args: &KvArgs,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    match &args.command {
        KvCommand::Ls(LsArgs { bucket: None, json }) => {
            let (_, value): (_, serde_json::Value) =
                client.call(Method::GET, "/v1/kv", None).await?;
            if *json {
                return write_json(out, &value);
            }
            let list: BucketList = decode(value, "bucket list")?;
            let rows: Vec<Vec<String>> = list
                .buckets
                .iter()
                .map(|b| vec![b.name.clone(), b.keys.to_string(), b.bytes.to_string()])
                .collect();
            for line in output::table(&["BUCKET", "KEYS", "BYTES"], &rows) {
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        KvCommand::Ls(LsArgs {
            bucket: Some(bucket),
            json,
        }) => {
            let mut keys = Vec::new();
            let mut cursor = 0;
            loop {
                let path = format!("/v1/kv/{}?cursor={cursor}", segment(bucket));
                let (_, value): (_, serde_json::Value) =
                    client.call(Method::GET, &path, None).await?;
                let page: KeyList = decode(value, "key list")?;
                keys.extend(page.keys);
                match page.next_cursor {
                    Some(next) => cursor = next,
                    None => break,
                }
            }
            if *json {
                return write_json(out, &serde_json::json!({ "keys": keys }));
            }
            for key in keys {
                writeln!(out, "{key}")?;
            }
            Ok(())
        }
        KvCommand::Get(get) => {
            let request = client.request(
                Method::GET,
                &key_path(&get.bucket, &get.key),
                full(Vec::new()),
            )?;
            let response = client.send(request).await?;
            let (_, value) = client.read(response).await?;
            out.write_all(&value)?;
            Ok(())
        }
        KvCommand::Set(set) => {
            let value = value(set, stdin)?;
            let mut request =
                client.request(Method::PUT, &key_path(&set.bucket, &set.key), full(value))?;
            request.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let response = client.send(request).await?;
            client.read(response).await?;
            writeln!(out, "set {}/{}", set.bucket, set.key)?;
            Ok(())
        }
        KvCommand::Rm(rm) => {
            client
                .call_no_content(Method::DELETE, &key_path(&rm.bucket, &rm.key))
                .await?;
            writeln!(out, "removed {}/{}", rm.bucket, rm.key)?;
            Ok(())
        }
    }
}
