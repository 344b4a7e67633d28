//! Touches the filesystem as the request body says, to test volumes:
//!
//! * `read PATH` → 200, the file's contents
//! * `write PATH TEXT` → 200 `written`
//! * `list PATH` → 200, the entry names, one per line, sorted
//!
//! Any I/O failure → error `io` (status 403) whose message is the OS error.

use gust_sdk::{Error, Request, Response};

fn io_error(e: std::io::Error) -> Error {
    Error::new("io", e.to_string()).with_status(403)
}

fn handle(req: Request) -> Result<Response, Error> {
    let command = req.text()?.to_owned();
    let mut words = command.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some("read"), Some(path), None) => {
            let data = std::fs::read(path).map_err(io_error)?;
            Ok(Response::bytes(data))
        }
        (Some("write"), Some(path), Some(text)) => {
            std::fs::write(path, text).map_err(io_error)?;
            Ok(Response::text("written"))
        }
        (Some("list"), Some(path), None) => {
            let mut names: Vec<String> = std::fs::read_dir(path)
                .map_err(io_error)?
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            Ok(Response::text(names.join("\n")))
        }
        _ => Err(
            Error::new("invalid-input", format!("unknown command `{command}`")).with_status(400),
        ),
    }
}

gust_sdk::export_handler!(handle);
