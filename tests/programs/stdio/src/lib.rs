//! Writes to stdout and stderr so tests can check log capture. A body that
//! parses as an integer N adds N bytes of `x` (and a newline) to stdout, to
//! exercise output limits.

use std::io::Write;

use gust_sdk::{Error, Request, Response};

fn handle(req: Request) -> Result<Response, Error> {
    println!("hello stdout");
    eprintln!("hello stderr");
    if let Some(n) = req.text().ok().and_then(|t| t.trim().parse::<usize>().ok()) {
        let mut out = std::io::stdout().lock();
        // Written in pieces so a big N does not need N bytes of guest memory.
        let piece = [b'x'; 4096];
        let mut left = n;
        while left > 0 {
            let len = left.min(piece.len());
            write_all(&mut out, &piece[..len])?;
            left -= len;
        }
        write_all(&mut out, b"\n")?;
        out.flush().map_err(io_error)?;
    }
    Ok(Response::new(200, "text/plain", "ok"))
}

fn write_all(out: &mut impl Write, bytes: &[u8]) -> Result<(), Error> {
    out.write_all(bytes).map_err(io_error)
}

fn io_error(e: std::io::Error) -> Error {
    Error::new("stdout-failed", format!("writing to stdout failed: {e}"))
}

gust_sdk::export_handler!(handle);
