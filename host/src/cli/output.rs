//! Formatting for people: aligned tables, times, durations, sizes, digests.

use std::time::Duration;

/// Lays out `rows` under `header` in columns separated by two spaces. The
/// last column is not padded, so lines carry no trailing blanks.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let render = |cells: &mut dyn Iterator<Item = &str>| {
        let mut line = String::new();
        for (i, cell) in cells.enumerate().take(columns) {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < columns {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        line.truncate(line.trim_end().len());
        line
    };
    let mut lines = Vec::with_capacity(rows.len() + 1);
    lines.push(render(&mut header.iter().copied()));
    for row in rows {
        lines.push(render(&mut row.iter().map(String::as_str)));
    }
    lines
}

/// An RFC 3339 time from the host, to the second (`2025-01-02T03:04:05Z`);
/// anything unparsable is shown as it came.
pub(crate) fn time(rfc3339: &str) -> String {
    match humantime::parse_rfc3339_weak(rfc3339) {
        Ok(t) => humantime::format_rfc3339_seconds(t).to_string(),
        Err(_) => rfc3339.to_owned(),
    }
}

/// A duration in microseconds, short: `850µs`, `12.3ms`, `1.52s`.
pub(crate) fn micros(us: u64) -> String {
    let value = us as f64;
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", value / 1e3)
    } else if us < 60_000_000 {
        format!("{:.2}s", value / 1e6)
    } else {
        humantime::format_duration(Duration::from_secs(us / 1_000_000)).to_string()
    }
}

/// A byte count in IEC units (`1.2 MiB`).
pub(crate) fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).to_string()
}

/// The first 12 hex digits of a `sha256:<hex>` digest, as `docker` shows ids.
pub(crate) fn short_digest(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let rows = vec![
            vec!["hello".to_owned(), "3".to_owned(), "x".to_owned()],
            vec![
                "a-much-longer-name".to_owned(),
                "12".to_owned(),
                String::new(),
            ],
        ];
        let lines = table(&["NAME", "VERSION", "LAST"], &rows);
        assert_eq!(
            lines,
            vec![
                "NAME                VERSION  LAST",
                "hello               3        x",
                "a-much-longer-name  12",
            ]
        );
        assert_eq!(table(&["A", "B"], &[]), vec!["A  B"]);
        // Width counts characters, not bytes.
        let lines = table(&["T", "X"], &[vec!["850µs".to_owned(), "y".to_owned()]]);
        assert_eq!(lines[1], "850µs  y");
        assert_eq!(lines[0], "T      X");
    }

    #[test]
    fn times() {
        assert_eq!(time("2025-01-02T03:04:05.123456Z"), "2025-01-02T03:04:05Z");
        assert_eq!(time("2025-01-02T03:04:05Z"), "2025-01-02T03:04:05Z");
        assert_eq!(time("yesterday"), "yesterday");
        assert_eq!(time(""), "");
    }

    #[test]
    fn durations() {
        assert_eq!(micros(0), "0µs");
        assert_eq!(micros(999), "999µs");
        assert_eq!(micros(12_345), "12.3ms");
        assert_eq!(micros(1_520_000), "1.52s");
        assert_eq!(micros(90_000_000), "1m 30s");
    }

    #[test]
    fn sizes_and_digests() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(
            short_digest("sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
            "9f86d081884c"
        );
        assert_eq!(short_digest("abc"), "abc");
    }
}
