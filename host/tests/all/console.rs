//! The web console (`/console/`): sessions, CSRF, tenant isolation and
//! every page against a real server, on sled and on PostgreSQL, and the
//! whole tour in headless Chromium (Debian's `chromium` and
//! `chromium-driver`; skipped with a message without them, required in CI).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gust_test_artifacts::{
    EXAMPLE_HELLO_COMPONENT, HELLO_COMPONENT, MODELS_COMPONENT, PANICS_COMPONENT, TENSORS_COMPONENT,
};
use tempfile::TempDir;

use crate::server::{ADMIN_KEY, Reply, TestServer, deploy, request, request_with, tenant};

/// A browser in miniature: a cookie jar over plain requests, no redirects
/// followed (the tests look at them).
struct Browser<'a> {
    server: &'a TestServer,
    cookies: HashMap<String, String>,
}

impl<'a> Browser<'a> {
    fn new(server: &'a TestServer) -> Self {
        Self {
            server,
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Keeps what `Set-Cookie` says (a `Max-Age=0` cookie is dropped).
    fn remember(&mut self, reply: &Reply) {
        for value in reply.headers.get_all("set-cookie") {
            let text = value.to_str().unwrap();
            assert!(
                text.contains("HttpOnly") && text.contains("SameSite=Strict"),
                "{text}"
            );
            let (pair, _) = text.split_once(';').unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            if text.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Reply {
        let cookie = self.cookie_header();
        let mut all = headers.to_vec();
        if !cookie.is_empty() {
            all.push(("cookie", &cookie));
        }
        let reply = request_with(method, &self.server.url(path), None, body, &all).await;
        self.remember(&reply);
        reply
    }

    async fn get(&mut self, path: &str) -> Reply {
        self.send("GET", path, Bytes::new(), &[]).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Reply {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        self.send(
            "POST",
            path,
            body.into(),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await
    }

    /// Uploads `bytes` as the deploy form does (multipart).
    async fn upload(&mut self, name: &str, bytes: &[u8], csrf: &str) -> Reply {
        let boundary = "gust-test-boundary-5f2c";
        let mut body = Vec::new();
        for (field, value) in [("_csrf", csrf), ("name", name)] {
            body.extend_from_slice(
                format!("--{boundary}\r\ncontent-disposition: form-data; name=\"{field}\"\r\n\r\n{value}\r\n").as_bytes(),
            );
        }
        body.extend_from_slice(
            format!("--{boundary}\r\ncontent-disposition: form-data; name=\"component\"; filename=\"{name}.wasm\"\r\ncontent-type: application/wasm\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let content_type = format!("multipart/form-data; boundary={boundary}");
        self.send(
            "POST",
            "/console/functions",
            body.into(),
            &[("content-type", &content_type)],
        )
        .await
    }

    /// Signs in with `key`; returns where the console sent the browser.
    async fn sign_in(&mut self, key: &str) -> String {
        let form = self.get("/console/sign-in").await;
        assert_eq!(form.status, 200);
        let token = csrf(&form);
        let reply = self
            .post("/console/sign-in", &[("key", key), ("_csrf", &token)])
            .await;
        assert_eq!(reply.status, 303, "{}", reply.text());
        assert!(self.cookies.contains_key("gust_session"));
        location(&reply)
    }
}

fn location(reply: &Reply) -> String {
    reply.headers["location"].to_str().unwrap().to_owned()
}

/// The CSRF token on a page (every form carries the same one).
fn csrf(page: &Reply) -> String {
    let text = page.text();
    let at = text
        .find(r#"name="_csrf" value=""#)
        .unwrap_or_else(|| panic!("no CSRF field on the page: {text}"))
        + r#"name="_csrf" value=""#.len();
    text[at..].split('"').next().unwrap().to_owned()
}

/// The problem box of a page: (status, code, detail).
fn problem_on(page: &Reply) -> (String, String, String) {
    let text = page.text();
    let boxed = text
        .split(r#"<div class="problem" role="alert">"#)
        .nth(1)
        .unwrap_or_else(|| panic!("no problem on the page: {text}"));
    let between = |from: &str, to: &str| {
        let start = boxed.find(from).unwrap() + from.len();
        boxed[start..][..boxed[start..].find(to).unwrap()].to_owned()
    };
    (
        between("<strong>Error ", "</strong>"),
        between("<code>", "</code>"),
        between(r#"<p class="detail">"#, "</p>"),
    )
}

/// HTML-escapes `text` as maud does, to find an API detail on a page.
fn escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A session cookie for `payload`, signed the way the host signs them,
/// with the secrets key from its data directory.
fn forged_session(data_dir: &Path, payload: &str) -> String {
    use base64::Engine as _;
    let text = std::fs::read_to_string(data_dir.join("secrets.key")).unwrap();
    let key: [u8; 32] = hex::decode(text.trim()).unwrap().try_into().unwrap();
    let session_key = blake3::derive_key("gust console session v1", &key);
    let mac = blake3::keyed_hash(&session_key, &[b"session\0", payload.as_bytes()].concat());
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("{}.{}", b64.encode(payload), b64.encode(mac.as_bytes()))
}

fn now_millis() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_signed_expire_and_end_with_their_key() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let demo = server.demo_key.clone().unwrap();
    let mut browser = Browser::new(&server);

    // No session: every page goes to the sign-in page.
    for path in ["/console/", "/console/functions", "/console/keys"] {
        let reply = browser.get(path).await;
        assert_eq!(
            (reply.status, location(&reply)),
            (303, "/console/sign-in".into())
        );
    }
    // htmx requests are told where to go instead.
    let reply = browser
        .send(
            "GET",
            "/console/functions",
            Bytes::new(),
            &[("hx-request", "true")],
        )
        .await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.headers["hx-redirect"], "/console/sign-in");

    // A wrong key: the form again, with the API's problem.
    let form = browser.get("/console/sign-in").await;
    let reply = browser
        .post(
            "/console/sign-in",
            &[("key", "gust_nope"), ("_csrf", &csrf(&form))],
        )
        .await;
    assert_eq!(reply.status, 401);
    assert_eq!(problem_on(&reply).1, "unauthorized");
    assert!(!browser.cookies.contains_key("gust_session"));
    // A sign-in form from elsewhere (no sign-in cookie to pair with).
    let mut stranger = Browser::new(&server);
    let reply = stranger
        .post(
            "/console/sign-in",
            &[("key", &demo), ("_csrf", &csrf(&form))],
        )
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(problem_on(&reply).1, "csrf-refused");
    assert!(!stranger.cookies.contains_key("gust_session"));

    // A form without its fields: a problem page, not a bare rejection.
    let reply = browser
        .post("/console/sign-in", &[("nothing", "here")])
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(problem_on(&reply).1, "invalid-request");

    // The right key: a session cookie, not the key.
    assert_eq!(browser.sign_in(&demo).await, "/console/functions");
    let session = browser.cookies["gust_session"].clone();
    assert!(!session.contains(&demo), "the key is never in the cookie");
    let page = browser.get("/console/functions").await;
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains("No functions yet"));
    for header in [
        "content-security-policy",
        "x-frame-options",
        "cache-control",
    ] {
        assert!(page.headers.contains_key(header), "{header}");
    }

    // A forged or tampered cookie: sign in again, and the cookie is dropped.
    let mut tampered = session.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [tampered.as_str(), "djE.xyz", "garbage"] {
        let mut forged = Browser::new(&server);
        forged.cookies.insert("gust_session".into(), bad.to_owned());
        let reply = forged.get("/console/functions").await;
        assert_eq!(
            (reply.status, location(&reply)),
            (303, "/console/sign-in".into()),
            "{bad}"
        );
        assert!(
            !forged.cookies.contains_key("gust_session"),
            "cleared: {bad}"
        );
    }

    // Cookies signed with the host's own key: the payload decides. A live
    // one is accepted (so the refusals below are for the reason given)...
    let keys = request("GET", &server.url("/v1/keys"), Some(&demo), "")
        .await
        .json();
    let key_id = keys["keys"][0]["id"].as_str().unwrap().to_owned();
    let later = now_millis() + 60_000;
    let payload = |tenant: &str, key: &str, expires: u64| {
        format!("v1\ntenant\n{tenant}\n{key}\n{expires}\n00112233445566778899aabbccddeeff")
    };
    let mut signed = Browser::new(&server);
    signed.cookies.insert(
        "gust_session".into(),
        forged_session(&server.data_dir, &payload("demo", &key_id, later)),
    );
    assert_eq!(signed.get("/console/functions").await.status, 200);
    // ...an expired one, or one naming a key that is no key of the tenant, is not.
    for (tenant, key, expires) in [
        ("demo", key_id.as_str(), now_millis() - 1000),
        ("demo", "key_00000000", later),
    ] {
        let mut old = Browser::new(&server);
        old.cookies.insert(
            "gust_session".into(),
            forged_session(&server.data_dir, &payload(tenant, key, expires)),
        );
        let reply = old.get("/console/functions").await;
        assert_eq!(reply.status, 303, "{tenant} {key} {expires}");
    }

    // Sign-out needs the session's CSRF token, and clears the cookie.
    let reply = browser.post("/console/sign-out", &[]).await;
    assert_eq!(reply.status, 403);
    assert!(browser.cookies.contains_key("gust_session"));
    let token = csrf(&browser.get("/console/functions").await);
    let reply = browser
        .post("/console/sign-out", &[("_csrf", &token)])
        .await;
    assert_eq!(
        (reply.status, location(&reply)),
        (303, "/console/sign-in".into())
    );
    assert!(!browser.cookies.contains_key("gust_session"));

    // Revoking a key ends its sessions: a second key signs in, revokes it.
    let second = request("POST", &server.url("/v1/keys"), Some(&demo), "")
        .await
        .json();
    let (second_id, second_key) = (
        second["id"].as_str().unwrap().to_owned(),
        second["key"].as_str().unwrap().to_owned(),
    );
    let mut other = Browser::new(&server);
    other.sign_in(&second_key).await;
    let keys_page = other.get("/console/keys").await;
    assert!(
        keys_page
            .text()
            .contains(&format!("{second_id}</code> (this session"))
    );
    let reply = other
        .post(
            &format!("/console/keys/{second_id}/revoke"),
            &[("_csrf", &csrf(&keys_page))],
        )
        .await;
    assert_eq!(reply.status, 303);
    let reply = other.get("/console/keys").await;
    assert_eq!(
        (reply.status, location(&reply)),
        (303, "/console/sign-in".into())
    );

    // Creating a key shows it once; it works for the API.
    let mut browser = Browser::new(&server);
    browser.sign_in(&demo).await;
    let keys_page = browser.get("/console/keys").await;
    let created = browser
        .post("/console/keys", &[("_csrf", &csrf(&keys_page))])
        .await;
    assert_eq!(created.status, 200);
    let text = created.text();
    let start = text.find(r#"<pre class="output" id="new-key">"#).unwrap() + 33;
    let new_key = &text[start..start + text[start..].find("</pre>").unwrap()];
    let listed = request("GET", &server.url("/v1/functions"), Some(new_key), "").await;
    assert_eq!(listed.status, 200, "the shown key works: {new_key}");
    assert!(!browser.get("/console/keys").await.text().contains(new_key));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_need_the_sessions_token_and_tenants_see_only_their_own() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let demo = server.demo_key.clone().unwrap();
    let other_key = tenant(&server, "other").await;
    assert_eq!(
        deploy(&server, &demo, "hello", HELLO_COMPONENT)
            .await
            .status,
        201
    );
    let called = request(
        "POST",
        &server.url("/v1/functions/hello/invoke"),
        Some(&demo),
        "x",
    )
    .await;
    let id = called.headers["gust-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();

    let mut owner = Browser::new(&server);
    owner.sign_in(&demo).await;
    let mut other = Browser::new(&server);
    other.sign_in(&other_key).await;
    let other_token = csrf(&other.get("/console/functions").await);

    // No token, or another session's: refused, and nothing is deleted.
    for form in [
        vec![],
        vec![("_csrf", other_token.as_str())],
        vec![("_csrf", "00")],
    ] {
        let reply = owner.post("/console/functions/hello/delete", &form).await;
        assert_eq!(reply.status, 403, "{form:?}");
        assert_eq!(problem_on(&reply).1, "csrf-refused");
    }
    let reply = owner
        .send(
            "POST",
            "/console/functions/hello/invoke",
            "body=x".into(),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("x-csrf-token", &other_token),
            ],
        )
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        request("GET", &server.url("/v1/functions/hello"), Some(&demo), "")
            .await
            .status,
        200
    );

    // Another tenant's function, invocation or form: 404, as the API.
    for path in [
        "/console/functions/hello".to_owned(),
        format!("/console/invocations/{id}"),
    ] {
        let reply = other.get(&path).await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(problem_on(&reply).1, "not-found");
    }
    let reply = other
        .post(
            "/console/functions/hello/delete",
            &[("_csrf", &other_token)],
        )
        .await;
    assert_eq!(reply.status, 404);
    let reply = other
        .post(
            "/console/functions/hello/invoke",
            &[("_csrf", &other_token), ("body", "x")],
        )
        .await;
    assert_eq!(reply.status, 404);
    assert_eq!(problem_on(&reply).1, "not-found");
    // The owner still has it and sees its invocation.
    let page = owner.get(&format!("/console/invocations/{id}")).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("/console/functions/hello"));

    // The admin's pages are the admin's; the tenants' pages are tenants'.
    assert_eq!(other.get("/console/tenants").await.status, 404);
    let mut admin = Browser::new(&server);
    assert_eq!(admin.sign_in(ADMIN_KEY).await, "/console/tenants");
    let page = admin.get("/console/tenants").await;
    assert!(page.text().contains(">other</th>") && page.text().contains(">demo</th>"));
    assert_eq!(admin.get("/console/functions").await.status, 404);
    let made = admin
        .post(
            "/console/tenants",
            &[("_csrf", &csrf(&page)), ("name", "fresh")],
        )
        .await;
    assert_eq!(made.status, 200, "{}", made.text());
    assert!(made.text().contains("Tenant <code>fresh</code> created"));
    let bad = admin
        .post(
            "/console/tenants",
            &[("_csrf", &csrf(&page)), ("name", "Not A Name")],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(problem_on(&bad).1, "invalid-name");

    // Uploads refused as the API refuses them, with the API's detail on the page.
    let token = csrf(&owner.get("/console/functions").await);
    let junk = b"not a component".to_vec();
    let oversized = vec![0u8; 4 * 1024 * 1024 + 1];
    // Past axum's default 2 MiB body limit, within the policy's 4 MiB.
    let big = [b"\0asm\x0d\0\x01\0".as_slice(), &[0u8; 3 << 20]].concat();
    for (bytes, status) in [(&junk, 400), (&big, 400), (&oversized, 413)] {
        let api = request(
            "PUT",
            &server.url("/v1/functions/upload"),
            Some(&demo),
            bytes.clone(),
        )
        .await;
        let api = api.json();
        let page = owner.upload("upload", bytes, &token).await;
        assert_eq!(page.status, status);
        let (shown_status, code, detail) = problem_on(&page);
        assert_eq!(shown_status, status.to_string());
        assert_eq!(code, api["code"].as_str().unwrap());
        assert_eq!(detail, escaped(api["detail"].as_str().unwrap()));
        assert!(
            page.text().contains(r#"id="deploy""#),
            "the form is still there"
        );
    }
    assert_eq!(
        request("GET", &server.url("/v1/functions/upload"), Some(&demo), "")
            .await
            .status,
        404
    );
    // A good upload deploys; a bad token refuses it.
    let hello = std::fs::read(HELLO_COMPONENT).unwrap();
    let reply = owner.upload("uploaded", &hello, "00").await;
    assert_eq!(reply.status, 403);
    let reply = owner.upload("uploaded", &hello, &token).await;
    assert_eq!(
        (reply.status, location(&reply)),
        (303, "/console/functions/uploaded".into())
    );
    let called = request(
        "POST",
        &server.url("/v1/functions/uploaded/invoke"),
        Some(&demo),
        "web",
    )
    .await;
    assert_eq!(called.text(), "Hello, web!");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_shows_gpu_use_against_the_quota() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    // The `models` policy: 600 000 ms of device time per minute.
    let key = tenant(&server, "models").await;
    assert_eq!(
        deploy(&server, &key, "tensors", TENSORS_COMPONENT)
            .await
            .status,
        201
    );
    let mut browser = Browser::new(&server);
    browser.sign_in(&key).await;
    let before = browser.get("/console/usage").await.text();
    assert!(before.contains("600000 ms per minute"), "{before}");
    assert!(
        before.contains(", 0 µs in use"),
        "no bridge use yet: {before}"
    );
    let chain = request(
        "POST",
        &server.url("/v1/functions/tensors/invoke"),
        Some(&key),
        "chain",
    )
    .await;
    assert_eq!(chain.status, 200, "{}", chain.text());
    let after = browser.get("/console/usage").await.text();
    // The CPU backend charges memory, not device time (a GPU's is).
    assert!(before.contains("0 B now, 0 B at peak"), "{before}");
    assert!(!after.contains("now, 0 B at peak"), "{after}");
    assert!(after.contains("device time, last minute"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_models_page_shows_residency_and_batches() {
    use gust_gpu_bridge::models::testing::write_tiny_bert;
    let dir = TempDir::new().unwrap();
    let models = dir.path().join("data").join("models");
    write_tiny_bert(&models, "tiny-bert", "", 7).unwrap();
    let batching = "\n[batching]\nmax_batch = 8\nmax_delay_ms = 5\nmax_queue = 8\n";
    write_tiny_bert(&models, "queue-bert", batching, 11).unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "models").await;
    assert_eq!(
        deploy(&server, &key, "models", MODELS_COMPONENT)
            .await
            .status,
        201
    );
    let mut browser = Browser::new(&server);
    browser.sign_in(&key).await;
    let before = browser.get("/console/models").await.text();
    assert!(
        before.contains("None: a model loads at its first use."),
        "{before}"
    );
    for model in ["tiny-bert", "queue-bert"] {
        let reply = request(
            "POST",
            &server.url("/v1/functions/models/invoke"),
            Some(&key),
            format!("embed {model}\nthe cat"),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let page = browser.get("/console/models").await.text();
    let residents = page
        .split(r#"<table id="residents">"#)
        .nth(1)
        .unwrap_or_else(|| panic!("{page}"));
    let row = |model: &str| {
        let start = residents
            .find(&format!("<th scope=\"row\">{model}</th>"))
            .unwrap_or_else(|| panic!("{model}: {page}"));
        residents[start..][..residents[start..].find("</tr>").unwrap()].to_owned()
    };
    // Batching: one pass answered the one call; without: no counts.
    let queue = row("queue-bert");
    assert!(
        queue.contains("<td>cpu") && queue.contains("<td>1</td><td>1</td>"),
        "{queue}"
    );
    let tiny = row("tiny-bert");
    assert!(tiny.contains("<td>–</td><td>–</td>"), "{tiny}");
    assert!(page.contains("Mean batch size"), "{page}");
    assert!(
        page.contains("This tenant's loads</dt><dd>2</dd>"),
        "{page}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_feeds_send_new_invocations_and_count_as_streams() {
    use http_body_util::BodyExt as _;
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let demo = server.demo_key.clone().unwrap();
    assert_eq!(
        deploy(&server, &demo, "hello", HELLO_COMPONENT)
            .await
            .status,
        201
    );
    let mut browser = Browser::new(&server);
    browser.sign_in(&demo).await;
    let cookie = browser.cookie_header();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let open = || {
        let request = hyper::Request::get(server.url("/console/functions/hello/live"))
            .header("cookie", &cookie)
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        client.request(request)
    };
    // The first feed: a call made now arrives as a table row.
    let mut feed = open().await.unwrap();
    assert_eq!(feed.status(), 200);
    assert_eq!(feed.headers()["content-type"], "text/event-stream");
    let called = request(
        "POST",
        &server.url("/v1/functions/hello/invoke"),
        Some(&demo),
        "live",
    )
    .await;
    let id = called.headers["gust-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(&format!(r#"data-id="{id}""#)) {
        let frame = tokio::time::timeout_at(deadline.into(), feed.body_mut().frame())
            .await
            .expect("the new invocation arrives")
            .unwrap()
            .unwrap();
        if let Some(data) = frame.data_ref() {
            seen.push_str(&String::from_utf8_lossy(data));
        }
    }
    assert!(seen.starts_with("event: invocation\ndata: <tr"), "{seen}");
    // Feeds are the tenant's streams (default `max_streams`: 16).
    let mut feeds = vec![feed];
    for _ in 1..16 {
        let feed = open().await.unwrap();
        assert_eq!(feed.status(), 200);
        feeds.push(feed);
    }
    let refused = open().await.unwrap();
    assert_eq!(refused.status(), 429);
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("too-many-streams"));
    // A closed page gives its place back (the feed notices within a poll).
    drop(feeds.pop());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let again = open().await.unwrap();
        if again.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed feed's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(feeds);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_can_be_turned_off() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start_configured(dir.path(), |config| config.console = false).await;
    let reply = request("GET", &server.url("/console/sign-in"), None, "").await;
    reply.problem(404, "not-found");
    server.stop().await;
}

/// Every tenant page with data on it, on the store `configure` picks.
async fn every_page_renders(dir: &Path, configure: impl FnOnce(&mut gust_host::api::ServeConfig)) {
    let server = TestServer::start_configured(dir, configure).await;
    let key = match &server.demo_key {
        Some(key) => key.clone(),
        None => tenant(&server, "demo").await,
    };
    assert_eq!(
        deploy(&server, &key, "hello", HELLO_COMPONENT).await.status,
        201
    );
    assert_eq!(
        deploy(&server, &key, "panics", PANICS_COMPONENT)
            .await
            .status,
        201
    );
    let schedule = request(
        "PUT",
        &server.url("/v1/functions/hello/schedule"),
        Some(&key),
        r#"{"cron": "0 0 1 1 *"}"#,
    )
    .await;
    assert_eq!(schedule.status, 201, "{}", schedule.text());
    let job = request(
        "POST",
        &server.url("/v1/functions/hello/spawn"),
        Some(&key),
        "job",
    )
    .await;
    assert_eq!(job.status, 202, "{}", job.text());
    let job_id = job.json()["job_id"].as_str().unwrap().to_owned();

    let mut browser = Browser::new(&server);
    browser.sign_in(&key).await;
    let token = csrf(&browser.get("/console/functions").await);
    // Calls from the page: one answer, one failure.
    let ok = browser
        .post(
            "/console/functions/hello/invoke",
            &[
                ("_csrf", &token),
                ("content_type", "text/plain"),
                ("body", "console"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200);
    assert!(ok.text().contains("Hello, console!"), "{}", ok.text());
    let failed = browser
        .send(
            "POST",
            "/console/functions/panics/invoke",
            "body=x".into(),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("x-csrf-token", &token),
                ("hx-request", "true"),
            ],
        )
        .await;
    assert_eq!(failed.status, 200);
    assert!(failed.text().contains("trap"), "{}", failed.text());
    let text = failed.text();
    let at = text
        .find("/console/invocations/")
        .unwrap_or_else(|| panic!("{text}"))
        + "/console/invocations/".len();
    let failed_id = text[at..].split('"').next().unwrap().to_owned();

    // On a shared store (PostgreSQL) a call's record is queued for the
    // writer, not awaited by the answer: the failed call shows once written.
    let deadline = Instant::now() + Duration::from_secs(20);
    let list = loop {
        let list = browser.get("/console/functions").await.text();
        if list.contains("100.0 %") || Instant::now() >= deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(list.contains(r#"href="/console/functions/hello""#) && list.contains("0 0 1 1 *"));
    assert!(list.contains("100.0 %"), "panics fails every call: {list}");
    let page = browser.get("/console/functions/hello").await.text();
    assert!(
        page.matches("<svg").count() >= 3 && page.contains("<polyline"),
        "charts"
    );
    assert!(page.contains("Hello") || page.contains("inv_"));
    // The outcome filter.
    let traps = browser
        .get("/console/functions/panics?outcome=trap")
        .await
        .text();
    assert!(traps.contains(&failed_id));
    let oks = browser
        .get("/console/functions/panics?outcome=ok")
        .await
        .text();
    assert!(!oks.contains(&format!(r#"data-id="{failed_id}""#)));
    // The failure's message, in full.
    let invocation = browser
        .get(&format!("/console/invocations/{failed_id}"))
        .await;
    assert_eq!(invocation.status, 200);
    assert!(
        invocation.text().contains("panicked on purpose"),
        "{}",
        invocation.text()
    );

    // The job finishes; its page shows it, and a finished job can be deleted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = browser.get("/console/jobs").await.text();
        if jobs.contains(&job_id) && jobs.contains("succeeded") {
            break;
        }
        assert!(Instant::now() < deadline, "the job did not finish: {jobs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deleted = browser
        .post(
            &format!("/console/jobs/{job_id}/cancel"),
            &[("_csrf", &token)],
        )
        .await;
    assert_eq!(deleted.status, 303);
    assert!(!browser.get("/console/jobs").await.text().contains(&job_id));
    let schedules = browser.get("/console/schedules").await.text();
    assert!(schedules.contains("0 0 1 1 *") && schedules.contains("/console/functions/hello"));
    for path in ["/console/models", "/console/usage", "/console/keys"] {
        let page = browser.get(path).await;
        assert_eq!(page.status, 200, "{path}: {}", page.text());
    }
    assert!(browser.get("/console/usage").await.text().contains("<svg"));
    // Deleting from the page.
    let reply = browser
        .post("/console/functions/panics/delete", &[("_csrf", &token)])
        .await;
    assert_eq!(reply.status, 303);
    assert_eq!(
        request("GET", &server.url("/v1/functions/panics"), Some(&key), "")
            .await
            .status,
        404
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_renders_on_sled() {
    let dir = TempDir::new().unwrap();
    every_page_renders(dir.path(), |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_renders_on_postgres() {
    let Some(database) = crate::store::test_database() else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let url = database.url.clone();
    every_page_renders(dir.path(), move |config| {
        config.store = gust_host::service::StoreLocation::Postgres(url);
    })
    .await;
}

// The browser test: chromedriver and headless Chromium.

/// chromedriver, in a process group of its own so that dropping it kills
/// the Chromium it started too, with its profile under a private TMPDIR.
struct ChromeDriver {
    child: std::process::Child,
    port: u16,
    /// Chromium's profile and scratch files, removed with it.
    _tmp: TempDir,
}

impl ChromeDriver {
    /// `None` (with a message) where chromedriver is not installed; in CI
    /// it must be (`.ci/run` installs it).
    fn start() -> Option<Self> {
        use std::os::unix::process::CommandExt as _;
        let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.exists());
        let Some(driver) = driver else {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "CI=true but chromedriver is missing: .ci/run installs chromium-driver"
            );
            eprintln!(
                "skipping the console's browser test: chromedriver is not installed (apt install chromium chromium-driver)"
            );
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tmp = TempDir::new().unwrap();
        let mut child = std::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .env("TMPDIR", tmp.path())
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "chromedriver exited");
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self {
            child,
            port,
            _tmp: tmp,
        })
    }

    async fn connect(&self) -> fantoccini::Client {
        let binary = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .expect("chromium is installed beside chromedriver");
        let serde_json::Value::Object(capabilities) = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                // Root in CI needs --no-sandbox.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"],
            },
        }) else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        fantoccini::ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a headless Chromium session")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process.
        let _ = std::process::Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .status();
        // chromedriver itself, should the group kill have missed it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the browser test leaves its screenshots.
fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_headless_chromium() {
    let Some(driver) = ChromeDriver::start() else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let demo = server.demo_key.clone().unwrap();
    assert_eq!(
        deploy(&server, &demo, "panics", PANICS_COMPONENT)
            .await
            .status,
        201
    );
    let client = driver.connect().await;
    // On a task of its own, so that a failed check still lets the browser,
    // chromedriver and the server be shut down before the test fails.
    let tour = tokio::spawn(tour(client.clone(), server.url(""), demo));
    let result = tour.await;
    let _ = client.close().await;
    drop(driver);
    server.stop().await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("the browser tour failed: {error}"),
        Err(panicked) => std::panic::resume_unwind(panicked.into_panic()),
    }
}

type Tour = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Where `path` is on the server at `base`.
struct Base(String);

impl Base {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.0)
    }
}

async fn tour(c: fantoccini::Client, base: String, demo: String) -> Tour {
    let (c, server, demo) = (&c, &Base(base), demo.as_str());
    use fantoccini::Locator::{Css, Id};
    let shots = screenshots();
    let shot = |name: &'static str| {
        let shots = shots.clone();
        async move {
            let png = c.screenshot().await?;
            std::fs::write(shots.join(format!("{name}.png")), png)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
    };
    let wait = Duration::from_secs(20);

    // Sign in with the demo key.
    c.goto(&server.url("/console/")).await?;
    c.wait().at_most(wait).for_element(Id("key")).await?;
    shot("sign-in").await?;
    c.find(Id("key")).await?.send_keys(demo).await?;
    c.find(Css("form.sign-in button")).await?.click().await?;
    c.wait().at_most(wait).for_element(Id("deploy")).await?;
    assert_eq!(c.current_url().await?.path(), "/console/functions");

    // Deploy the hello example by upload.
    let hello = std::fs::canonicalize(EXAMPLE_HELLO_COMPONENT)?;
    c.find(Id("component"))
        .await?
        .send_keys(hello.to_str().unwrap())
        .await?;
    // The file names the function unless a name is typed.
    let name = c.find(Id("name")).await?;
    assert_eq!(name.prop("value").await?.as_deref(), Some("hello-example"));
    name.clear().await?;
    name.send_keys("hello").await?;
    c.find(Css("#deploy button[type=submit]"))
        .await?
        .click()
        .await?;
    c.wait().at_most(wait).for_element(Id("invoke")).await?;
    assert_eq!(c.current_url().await?.path(), "/console/functions/hello");

    // Invoke it from the page (htmx puts the answer under the form).
    let body = c.find(Id("body")).await?;
    body.clear().await?;
    body.send_keys(r#"{"name": "browser"}"#).await?;
    c.find(Css("#invoke button")).await?.click().await?;
    let result = c
        .wait()
        .at_most(wait)
        .for_element(Css("#invoke-result .result.ok"))
        .await?;
    let answer = result.text().await?;
    assert!(answer.contains("Answered 200"), "{answer}");
    shot("function-invoked").await?;

    // Live: a call from elsewhere shows up on the open page.
    c.wait()
        .at_most(wait)
        .for_element(Css("#live-status[data-connected=true]"))
        .await?;
    let called = request(
        "POST",
        &server.url("/v1/functions/hello/invoke"),
        Some(demo),
        "live",
    )
    .await;
    let id = called.headers["gust-invocation-id"].to_str()?.to_owned();
    c.wait()
        .at_most(wait)
        .for_element(Css(&format!("#invocation-rows tr.new[data-id='{id}']")))
        .await?;

    // The invocation the page made, with its output.
    c.find(Css("#invoke-result a")).await?.click().await?;
    c.wait().at_most(wait).for_element(Id("stdout")).await?;
    assert!(
        c.find(Css("main h1"))
            .await?
            .text()
            .await?
            .starts_with("inv_")
    );
    shot("invocation").await?;
    // The function's page again, its charts with these calls on them.
    c.goto(&server.url("/console/functions/hello")).await?;
    c.wait()
        .at_most(wait)
        .for_element(Css("figure.chart svg"))
        .await?;
    shot("function").await?;

    // A failing function: invoke it, open its traceback.
    c.goto(&server.url("/console/functions/panics")).await?;
    c.wait().at_most(wait).for_element(Id("invoke")).await?;
    c.find(Css("#invoke button")).await?.click().await?;
    c.wait()
        .at_most(wait)
        .for_element(Css("#invoke-result .problem"))
        .await?;
    c.find(Css("#invoke-result a")).await?.click().await?;
    let message = c.wait().at_most(wait).for_element(Id("message")).await?;
    let text = message.text().await?;
    assert!(text.contains("panicked on purpose"), "{text}");
    shot("traceback").await?;

    // The charts render: non-empty SVG with drawn series.
    c.goto(&server.url("/console/functions/panics")).await?;
    c.wait()
        .at_most(wait)
        .for_element(Css("figure.chart svg"))
        .await?;
    let charts = c
        .execute(
            "return Array.from(document.querySelectorAll('figure.chart svg'))
                .map(s => [s.getBoundingClientRect().width, s.querySelectorAll('polyline, rect').length]);",
            vec![],
        )
        .await?;
    let charts = charts.as_array().ok_or("charts")?;
    assert!(charts.len() >= 3, "{charts:?}");
    for chart in charts {
        assert!(chart[0].as_f64().unwrap_or(0.0) > 100.0, "{charts:?}");
        assert!(chart[1].as_u64().unwrap_or(0) > 0, "{charts:?}");
    }
    // The outcome filter (htmx swaps the table): every call trapped.
    let rows = "return document.querySelectorAll('#invocation-rows tr').length;";
    assert!(c.execute(rows, vec![]).await?.as_u64() > Some(0));
    c.find(Id("outcome")).await?.select_by_value("ok").await?;
    let deadline = Instant::now() + wait;
    while c.execute(rows, vec![]).await?.as_u64() != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the filter left the trapped calls listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.find(Id("outcome")).await?.select_by_value("trap").await?;
    while c.execute(rows, vec![]).await?.as_u64() == Some(0) {
        assert!(
            Instant::now() < deadline,
            "the filter did not list the trapped calls"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shot("function-failing").await?;

    // The other pages, one screenshot each.
    c.goto(&server.url("/console/functions")).await?;
    c.wait().at_most(wait).for_element(Id("functions")).await?;
    shot("functions").await?;
    for (path, name) in [
        ("/console/jobs", "jobs"),
        ("/console/schedules", "schedules"),
        ("/console/models", "models"),
        ("/console/usage", "usage"),
        ("/console/keys", "keys"),
    ] {
        c.goto(&server.url(path)).await?;
        c.wait().at_most(wait).for_element(Css("main h1")).await?;
        shot(name).await?;
    }

    // On a phone's screen nothing runs off the side of the page (wide
    // tables scroll in their own box).
    c.set_window_size(390, 844).await?;
    for path in ["/console/functions", "/console/functions/panics"] {
        c.goto(&server.url(path)).await?;
        c.wait().at_most(wait).for_element(Css("main h1")).await?;
        let overflow = c
            .execute(
                "return document.documentElement.scrollWidth - window.innerWidth;",
                vec![],
            )
            .await?;
        assert!(
            overflow.as_i64() <= Some(0),
            "{path} overflows by {overflow}"
        );
    }
    shot("phone").await?;
    c.set_window_size(1280, 1000).await?;

    // Delete, confirmed in the dialog.
    c.goto(&server.url("/console/functions/panics")).await?;
    c.wait().at_most(wait).for_element(Id("delete")).await?;
    c.find(Css("#delete button")).await?.click().await?;
    assert!(c.get_alert_text().await?.contains("Delete panics"));
    c.accept_alert().await?;
    c.wait().at_most(wait).for_element(Id("functions")).await?;
    assert!(
        c.find(Css("a[href='/console/functions/panics']"))
            .await
            .is_err()
    );

    // Sign out.
    c.find(Css("form.sign-out button")).await?.click().await?;
    c.wait().at_most(wait).for_element(Id("key")).await?;
    c.goto(&server.url("/console/functions")).await?;
    c.wait().at_most(wait).for_element(Id("key")).await?;
    Ok(())
}
