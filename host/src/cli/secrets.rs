//! `gust secrets set|ls|rm`: the caller's tenant's secrets. A value is read
//! from a file or stdin, never from the command line (where `ps` and shell
//! histories would keep it).

use std::io::{Read, Write};

use clap::{Args, Subcommand};
use http::Method;
use http::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;

use super::client::{Client, ClientError, ConnectArgs, KeyKind, decode, full, segment, write_json};
use super::output;

#[derive(Debug, Args)]
pub(crate) struct SecretsArgs {
    #[command(subcommand)]
    pub(crate) command: SecretsCommand,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SecretsCommand {
    /// Set a secret (creating or replacing it): the value comes from
    /// `--from-file`, else from stdin. A trailing newline is dropped. Calls
    /// of the functions deployed with it see the new value from their next
    /// invocation.
    Set(SetArgs),
    /// List the secrets: names and times, never values.
    Ls(LsArgs),
    /// Delete a secret. Functions deployed with it fail their calls until
    /// it is set again or they are deployed without it.
    Rm(RmArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SetArgs {
    /// The name: `^[A-Z_][A-Z0-9_]{0,127}$`, the environment variable the
    /// functions deployed with it see.
    pub(crate) name: String,

    /// Read the value from this file (as it is, bytes and all).
    #[arg(long, value_name = "FILE")]
    pub(crate) from_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// Print the host's JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RmArgs {
    /// The secret to delete.
    pub(crate) name: String,
}

#[derive(Debug, Deserialize)]
struct Secret {
    name: String,
    created_at: String,
    updated_at: String,
}

#[derive(Debug, Deserialize)]
struct SecretList {
    secrets: Vec<Secret>,
}

/// The value to set: the file's bytes as they are, or stdin's without
/// one trailing newline (what `echo` and a terminal add).
fn value(args: &SetArgs, stdin: &mut dyn Read) -> Result<Vec<u8>, ClientError> {
    if let Some(path) = &args.from_file {
        return std::fs::read(path)
            .map_err(|e| ClientError::Input(format!("reading {}: {e}", path.display())));
    }
    let mut value = Vec::new();
    stdin
        .read_to_end(&mut value)
        .map_err(|e| ClientError::Input(format!("reading the value from stdin: {e}")))?;
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err(ClientError::Input(
            "no value: pipe it on stdin (`printf %s \"$TOKEN\" | gust secrets set NAME`) or give --from-file".into(),
        ));
    }
    Ok(value)
}

pub(crate) async fn secrets(
    args: &SecretsArgs,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    match &args.command {
        SecretsCommand::Set(set) => {
            let value = value(set, stdin)?;
            let path = format!("/v1/secrets/{}", segment(&set.name));
            let mut request = client.request(Method::PUT, &path, full(value))?;
            request.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let response = client.send(request).await?;
            let (status, _) = client.read(response).await?;
            let verb = if status == http::StatusCode::CREATED {
                "set"
            } else {
                "replaced"
            };
            writeln!(out, "{verb} {}", set.name)?;
            Ok(())
        }
        SecretsCommand::Ls(ls) => {
            let (_, value): (_, serde_json::Value) =
                client.call(Method::GET, "/v1/secrets", None).await?;
            if ls.json {
                return write_json(out, &value);
            }
            let list: SecretList = decode(value, "secret list")?;
            let rows: Vec<Vec<String>> = list
                .secrets
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        output::time(&s.created_at),
                        output::time(&s.updated_at),
                    ]
                })
                .collect();
            for line in output::table(&["NAME", "CREATED", "UPDATED"], &rows) {
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        SecretsCommand::Rm(rm) => {
            let path = format!("/v1/secrets/{}", segment(&rm.name));
            client.call_no_content(Method::DELETE, &path).await?;
            writeln!(out, "deleted {}", rm.name)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_from_stdin_without_its_newline_or_from_a_file_as_is() {
        let set = |from_file| SetArgs {
            name: "TOKEN".into(),
            from_file,
        };
        let mut stdin: &[u8] = b"s3cret\r\n";
        assert_eq!(value(&set(None), &mut stdin).unwrap(), b"s3cret");
        let mut empty: &[u8] = b"\n";
        let error = value(&set(None), &mut empty).unwrap_err();
        assert!(error.to_string().contains("--from-file"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("value");
        std::fs::write(&file, b"line one\n").unwrap();
        let mut unused: &[u8] = b"";
        assert_eq!(value(&set(Some(file)), &mut unused).unwrap(), b"line one\n");
        let missing = value(&set(Some(dir.path().join("nope"))), &mut unused).unwrap_err();
        assert_eq!(missing.exit_code(), crate::cli::EXIT_BAD_INPUT);
    }
}
