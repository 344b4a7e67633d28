//! A handler over `wasi:keyvalue` and `wasi:config`, the way Spin and
//! wasmCloud components use them. The body is a command, words separated
//! by spaces:
//!
//! - `config KEY`: the value, or `<none>`; `config-all`: `k=v` lines.
//! - `set B K V`, `get B K` (`<none>` when absent), `del B K`,
//!   `exists B K`, `list B` (every key, following cursors, one per line).
//! - `incr B K N`: adds N, answers the new value.
//! - `batch B N`: sets keys `k0..kN` to `v0..vN` in one call, reads them
//!   and one absent key back in one call, deletes the even ones in one
//!   call, and answers what `get-many` saw.
//!
//! A `wasi:keyvalue` error is answered as the function's error `kv`
//! (`access-denied`, `no-such-store` or the host's message).

use gust_sdk::{Error, Request, Response};

wit_bindgen::generate!({
    path: ["../../../wit", "wit"],
    world: "test:kv-config/uses",
    generate_all,
});

use wasi::config::store as config;
use wasi::keyvalue::{atomics, batch, store};

fn kv_error(error: store::Error) -> Error {
    let message = match error {
        store::Error::NoSuchStore => "no-such-store".to_owned(),
        store::Error::AccessDenied => "access-denied".to_owned(),
        store::Error::Other(message) => message,
    };
    Error::new("kv", message).with_status(500)
}

fn config_error(error: config::Error) -> Error {
    let message = match error {
        config::Error::Upstream(m) | config::Error::Io(m) => m,
    };
    Error::new("config", message).with_status(500)
}

fn words(text: &str, n: usize) -> Result<Vec<&str>, Error> {
    let words: Vec<&str> = text.splitn(n, ' ').collect();
    if words.len() == n {
        Ok(words)
    } else {
        Err(Error::new("usage", format!("expected {n} words")).with_status(400))
    }
}

fn handle(req: Request) -> Result<Response, Error> {
    let text = req.text()?;
    let command = text.split(' ').next().unwrap_or_default();
    let answer = match command {
        "config" => {
            let [_, key] = words(text, 2)?[..] else {
                unreachable!()
            };
            config::get(key)
                .map_err(config_error)?
                .unwrap_or_else(|| "<none>".to_owned())
        }
        "config-all" => {
            let mut all = config::get_all().map_err(config_error)?;
            all.sort();
            all.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
        }
        "set" => {
            let [_, b, k, v] = words(text, 4)?[..] else {
                unreachable!()
            };
            store::open(b)
                .map_err(kv_error)?
                .set(k, v.as_bytes())
                .map_err(kv_error)?;
            "ok".to_owned()
        }
        "get" => {
            let [_, b, k] = words(text, 3)?[..] else {
                unreachable!()
            };
            match store::open(b).map_err(kv_error)?.get(k).map_err(kv_error)? {
                Some(value) => String::from_utf8_lossy(&value).into_owned(),
                None => "<none>".to_owned(),
            }
        }
        "del" => {
            let [_, b, k] = words(text, 3)?[..] else {
                unreachable!()
            };
            store::open(b)
                .map_err(kv_error)?
                .delete(k)
                .map_err(kv_error)?;
            "ok".to_owned()
        }
        "exists" => {
            let [_, b, k] = words(text, 3)?[..] else {
                unreachable!()
            };
            store::open(b)
                .map_err(kv_error)?
                .exists(k)
                .map_err(kv_error)?
                .to_string()
        }
        "list" => {
            let [_, b] = words(text, 2)?[..] else {
                unreachable!()
            };
            let bucket = store::open(b).map_err(kv_error)?;
            let mut keys = Vec::new();
            let mut cursor = None;
            loop {
                let page = bucket.list_keys(cursor).map_err(kv_error)?;
                keys.extend(page.keys);
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            keys.iter().map(|k| format!("{k}\n")).collect()
        }
        "incr" => {
            let [_, b, k, n] = words(text, 4)?[..] else {
                unreachable!()
            };
            let n: u64 = n
                .parse()
                .map_err(|_| Error::new("usage", "N is a u64").with_status(400))?;
            let bucket = store::open(b).map_err(kv_error)?;
            atomics::increment(&bucket, k, n)
                .map_err(kv_error)?
                .to_string()
        }
        "batch" => {
            let [_, b, n] = words(text, 3)?[..] else {
                unreachable!()
            };
            let n: usize = n
                .parse()
                .map_err(|_| Error::new("usage", "N is a number").with_status(400))?;
            let bucket = store::open(b).map_err(kv_error)?;
            let pairs: Vec<(String, Vec<u8>)> = (0..n)
                .map(|i| (format!("k{i}"), format!("v{i}").into_bytes()))
                .collect();
            batch::set_many(&bucket, &pairs).map_err(kv_error)?;
            let mut keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            keys.push("absent".to_owned());
            let got = batch::get_many(&bucket, &keys).map_err(kv_error)?;
            let even: Vec<String> = (0..n).step_by(2).map(|i| format!("k{i}")).collect();
            batch::delete_many(&bucket, &even).map_err(kv_error)?;
            got.iter()
                .map(|entry| match entry {
                    Some((k, v)) => format!("{k}={}\n", String::from_utf8_lossy(v)),
                    None => "<none>\n".to_owned(),
                })
                .collect()
        }
        other => {
            return Err(Error::new("usage", format!("unknown command {other:?}")).with_status(400));
        }
    };
    Ok(Response::text(answer))
}

gust_sdk::export_handler!(handle);
