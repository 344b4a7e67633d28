//! The console's shared markup: the page frame, navigation, problem boxes
//! and the small formatting helpers every page uses.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::session::{CSRF_FIELD, Session};
use crate::store::UnixMillis;

/// A tenant session's navigation, as (path, label).
const TENANT_NAV: &[(&str, &str)] = &[
    ("/console/functions", "Functions"),
    ("/console/jobs", "Jobs"),
    ("/console/schedules", "Schedules"),
    ("/console/models", "Models"),
    ("/console/usage", "Usage"),
    ("/console/keys", "Keys"),
];
/// The admin session's navigation.
const ADMIN_NAV: &[(&str, &str)] = &[("/console/tenants", "Tenants")];

/// What a page needs of its session to draw the frame.
pub(super) struct Frame<'a> {
    /// Who is signed in, `None` on the sign-in page.
    pub(super) session: Option<&'a Session>,
    /// The CSRF token of the page's forms.
    pub(super) csrf: &'a str,
    /// Which navigation entry is this page's.
    pub(super) current: &'a str,
}

/// A whole page: head, navigation, `title` as its heading, `body`.
pub(super) fn page(frame: &Frame<'_>, title: &str, body: &Markup) -> Markup {
    let nav: &[(&str, &str)] = match frame.session {
        Some(session) if session.is_admin() => ADMIN_NAV,
        Some(_) => TENANT_NAV,
        None => &[],
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // htmx swaps error answers too (they carry the problem, for
                // the page), and adds no inline styles (the CSP has none).
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"responseHandling":[{"code":"204","swap":false},{"code":"...","swap":true}]}"#;
                title { (title) " · Gust console" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/htmx.min.js" defer {}
                script src="/console/assets/console.js" defer {}
            }
            body hx-headers=(format!(r#"{{"x-csrf-token":"{}"}}"#, frame.csrf)) {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/console/" { "Gust" }
                    @if let Some(session) = frame.session {
                        nav aria-label="Console" {
                            ul {
                                @for (path, label) in nav {
                                    li {
                                        a href=(path) aria-current=[(frame.current == *path).then_some("page")] { (label) }
                                    }
                                }
                            }
                        }
                        form.sign-out method="post" action="/console/sign-out" {
                            (csrf_input(frame.csrf))
                            span.who { (session.tenant().unwrap_or("admin")) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main #main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field of a form.
pub(super) fn csrf_input(token: &str) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(token); }
}

/// A problem, shown on the page: status, code and detail, as the API
/// gives them.
pub(super) fn problem_box(status: u16, code: &str, detail: &str) -> Markup {
    html! {
        div.problem role="alert" {
            p { strong { "Error " (status) } " " code { (code) } }
            p.detail { (detail) }
        }
    }
}

/// A Unix-milliseconds time, as UTC.
pub(super) fn time(at: UnixMillis) -> Markup {
    let text = chrono::DateTime::from_timestamp_millis(i64::try_from(at).unwrap_or(i64::MAX))
        .map_or_else(
            || at.to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        );
    html! { time datetime=(text) { (text) } }
}

/// An optional time; a dash without one.
pub(super) fn maybe_time(at: Option<UnixMillis>) -> Markup {
    match at {
        Some(at) => time(at),
        None => html! { "–" },
    }
}

/// Microseconds, in the unit that reads best.
pub(super) fn micros(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{us} µs")
    }
}

/// Milliseconds with two decimals; a dash for none.
pub(super) fn millis(ms: Option<f64>) -> String {
    ms.map_or_else(|| "–".to_owned(), |ms| format!("{ms:.2} ms"))
}

/// Bytes, in binary units.
pub(super) fn bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// An outcome code, styled by whether it succeeded.
pub(super) fn outcome(code: &str) -> Markup {
    let class = if code == "ok" { "ok" } else { "bad" };
    html! { span class=(format!("outcome {class}")) { (code) } }
}

/// An SVG chart, drawn by `charts`, inline with its caption.
pub(super) fn figure(caption: &str, svg: &str) -> Markup {
    html! {
        figure.chart {
            (PreEscaped(svg))
            figcaption { (caption) }
        }
    }
}
