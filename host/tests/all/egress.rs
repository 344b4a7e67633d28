//! Functions' outgoing requests end to end: HTTPS to a real TLS server on
//! loopback (a test CA made here, given to the host with `--ca-file`), the
//! private-address guard, scheme rules and the guest's timeouts, through a
//! real server and the `http-hello` fixture.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gust_test_artifacts as artifacts;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::server::{TestServer, invocation_status, request, tenant};

/// A certificate authority made for one test.
pub(crate) struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub(crate) pem: String,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let certificate = params.self_signed(&key).unwrap();
        Self {
            issuer: Issuer::new(params, key),
            pem: certificate.pem(),
        }
    }

    /// A server configuration for `localhost` and `127.0.0.1`, signed by
    /// this CA.
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![CertificateDer::from(certificate.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }
}

/// An HTTPS server on loopback answering `secure {path}`, then on lines of
/// their own the `authorization` header and the body it was sent, if any.
pub(crate) async fn tls_upstream(ca: &TestCa) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake.
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt as _;
                    let mut text = format!("secure {}", req.uri().path());
                    if let Some(auth) = req.headers().get("authorization") {
                        text.push_str(&format!("\nauth={}", auth.to_str().unwrap_or("?")));
                    }
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    if let Ok(body) = body
                        && !body.is_empty()
                    {
                        text.push_str(&format!("\nbody={}", String::from_utf8_lossy(&body)));
                    }
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A plain-HTTP server that reads a request and then answers with
/// `reply` and holds the connection open without another byte.
async fn stalling_upstream(reply: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let _ = stream.write_all(reply).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(stream);
            });
        }
    });
    addr
}

/// A server that trusts a test CA (`--ca-file`), an HTTPS upstream that
/// CA signed, and tenants with the policies given.
pub(crate) struct HttpsHost {
    pub(crate) server: TestServer,
    pub(crate) ca: TestCa,
    pub(crate) upstream: SocketAddr,
    _dir: TempDir,
}

impl HttpsHost {
    /// Starts the upstream, writes the policies `policies(upstream)` names
    /// (tenant, policy text; beside the server fixture's own), then the
    /// server.
    pub(crate) async fn start(
        policies: impl FnOnce(SocketAddr) -> Vec<(&'static str, String)>,
    ) -> Self {
        let dir = TempDir::new().unwrap();
        let ca = TestCa::new("Gust egress test CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let upstream = tls_upstream(&ca).await;
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        for (tenant, policy) in policies(upstream) {
            std::fs::write(policy_dir.join(format!("{tenant}.toml")), policy).unwrap();
        }
        let server = TestServer::start_configured(dir.path(), |config| {
            config.runtime.ca_file = Some(ca_file);
        })
        .await;
        Self {
            server,
            ca,
            upstream,
            _dir: dir,
        }
    }

    /// Sets the tenant's secret `API_TOKEN` to `token` and deploys
    /// `component` as `name` with it.
    pub(crate) async fn deploy_with_token(
        &self,
        key: &str,
        name: &str,
        component: &Path,
        token: &str,
    ) {
        let set = request(
            "PUT",
            &self.server.url("/v1/secrets/API_TOKEN"),
            Some(key),
            token.to_owned(),
        )
        .await;
        assert_eq!(set.status, 201, "{}", set.text());
        let deployed = request(
            "PUT",
            &self
                .server
                .url(&format!("/v1/functions/{name}?secrets=API_TOKEN")),
            Some(key),
            std::fs::read(component).unwrap(),
        )
        .await;
        assert_eq!(deployed.status, 201, "{}", deployed.text());
    }
}

/// The tenants of these tests, by their policies.
fn egress_policies() -> Vec<(&'static str, String)> {
    [
        // Names may lead to private addresses. A long deadline: the
        // guest's own timeouts must fire long before it.
        (
            "secure",
            "outbound_http = [\"localhost\"]\noutbound_private = true\ntimeout_ms = 6000\n",
        ),
        // Names only: `localhost` resolves to loopback, which is refused.
        ("named", "outbound_http = [\"localhost\"]\n"),
        // HTTPS only, to that host.
        (
            "tlsonly",
            "outbound_http = [\"https://localhost\"]\noutbound_private = true\n",
        ),
    ]
    .into_iter()
    .map(|(tenant, policy)| (tenant, policy.to_owned()))
    .collect()
}

struct Egress {
    https: HttpsHost,
    keys: Vec<(String, String)>,
}

impl Egress {
    async fn start() -> Self {
        let https = HttpsHost::start(|_| egress_policies()).await;
        let server = &https.server;
        let bytes = std::fs::read(artifacts::HTTP_HELLO_COMPONENT).unwrap();
        let mut keys = Vec::new();
        for name in ["secure", "named", "tlsonly"] {
            let key = tenant(server, name).await;
            let reply = request(
                "PUT",
                &server.url("/v1/functions/web?public=true"),
                Some(&key),
                bytes.clone(),
            )
            .await;
            assert_eq!(reply.status, 201, "{}", reply.text());
            keys.push((name.to_owned(), key));
        }
        Self { https, keys }
    }

    fn key(&self, tenant: &str) -> &str {
        &self.keys.iter().find(|(name, _)| name == tenant).unwrap().1
    }

    /// `GET /http/{tenant}/web/{path}`: status, body and invocation id.
    async fn get(&self, tenant: &str, path: &str) -> (u16, String, String) {
        let reply = request(
            "GET",
            &self.https.server.url(&format!("/http/{tenant}/web/{path}")),
            None,
            "",
        )
        .await;
        let id = reply
            .headers
            .get("gust-invocation-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (reply.status, reply.text(), id)
    }

    /// The invocation record `id` of `tenant`, once written.
    async fn record(&self, tenant: &str, id: &str) -> serde_json::Value {
        for _ in 0..100 {
            let (status, record) =
                invocation_status(&self.https.server, self.key(tenant), id).await;
            if status == 200 {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no record {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_egress_trusts_the_ca_file_and_checks_certificates() {
    let egress = Egress::start().await;
    let upstream = tls_upstream(&egress.https.ca).await;
    let port = upstream.port();
    // By name, verified against the CA given with --ca-file.
    let (status, body, _) = egress
        .get("secure", &format!("fetchs/localhost:{port}/hello"))
        .await;
    assert_eq!((status, body.as_str()), (200, "200 secure /hello"));
    // A server whose certificate another CA signed is refused.
    let stranger = TestCa::new("Someone else's CA");
    let other = tls_upstream(&stranger).await;
    let (status, body, _) = egress
        .get(
            "secure",
            &format!("fetchs/localhost:{}/hello", other.port()),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("TlsCertificateError"), "{body}");
    // Plain text to a TLS port is not TLS: a protocol failure, not a hang.
    let (status, body, _) = egress
        .get("secure", &format!("fetch/localhost:{port}/hello"))
        .await;
    assert_eq!(status, 502, "{body}");
    // The scheme rule: HTTPS allowed, plain HTTP to the same host denied.
    let (status, body, _) = egress
        .get("tlsonly", &format!("fetchs/localhost:{port}/x"))
        .await;
    assert_eq!((status, body.as_str()), (200, "200 secure /x"));
    let (status, body, id) = egress
        .get("tlsonly", &format!("fetch/localhost:{port}/x"))
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    let record = egress.record("tlsonly", &id).await;
    let denied = record["egress_denied"].to_string();
    assert!(denied.contains("only https"), "{record}");
    egress.https.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_resolve_to_private_addresses_are_refused_unless_allowed() {
    let egress = Egress::start().await;
    let upstream = tls_upstream(&egress.https.ca).await;
    let port = upstream.port();
    // `localhost` is listed, but it resolves to loopback.
    let (status, body, id) = egress
        .get("named", &format!("fetchs/localhost:{port}/hello"))
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    let record = egress.record("named", &id).await;
    let denied = record["egress_denied"][0].as_str().unwrap_or_default();
    assert!(
        denied.contains("localhost resolves to") && denied.contains("loopback"),
        "{record}"
    );
    // The address itself is not listed either.
    let (status, body, id) = egress
        .get("named", &format!("fetchs/127.0.0.1:{port}/hello"))
        .await;
    assert_eq!(status, 502, "{body}");
    let record = egress.record("named", &id).await;
    assert!(
        record["egress_denied"][0]
            .as_str()
            .is_some_and(|d| d.contains("not in outbound_http")),
        "{record}"
    );
    // Nor is the metadata service, even for a tenant allowed private
    // addresses (it is an address, and no rule names it).
    let (status, body, _) = egress
        .get("secure", "fetch/169.254.169.254/latest/meta-data")
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    // `outbound_private = true` lets the same name through.
    let (status, body, id) = egress
        .get("secure", &format!("fetchs/localhost:{port}/hello"))
        .await;
    assert_eq!((status, body.as_str()), (200, "200 secure /hello"));
    let record = egress.record("secure", &id).await;
    assert!(record.get("egress_denied").is_none(), "{record}");
    egress.https.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guests_connect_first_byte_and_between_bytes_timeouts_fire() {
    let egress = Egress::start().await;
    // A listener that never accepts, its backlog filled: a connect to it
    // waits for an answer that does not come.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(1).unwrap();
    let full_port = full.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(("127.0.0.1", full_port)),
        )
        .await
        {
            fillers.push(stream);
        }
    }
    // Each fires at its 200 ms, far from the call's 6 s deadline (which
    // would answer 504 instead).
    let fast = |started: std::time::Instant| {
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    };
    let started = std::time::Instant::now();
    let (status, body, _) = egress
        .get(
            "secure",
            &format!("fetch/localhost:{full_port}/x?connect-ms=200"),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("ConnectionTimeout"), "{body}");
    fast(started);
    // Accepted, never answered: the first byte does not come.
    let silent = stalling_upstream(b"").await;
    let started = std::time::Instant::now();
    let (status, body, _) = egress
        .get(
            "secure",
            &format!("fetch/localhost:{}/x?first-byte-ms=200", silent.port()),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("ConnectionReadTimeout"), "{body}");
    fast(started);
    // The head and part of the body, then nothing.
    let partial = stalling_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial").await;
    let started = std::time::Instant::now();
    let (status, body, _) = egress
        .get(
            "secure",
            &format!("fetch/localhost:{}/x?between-bytes-ms=200", partial.port()),
        )
        .await;
    // The body fails (Wasmtime 48 passes a body's error to the guest
    // without its `error-code`), well before the call's deadline would
    // have ended it with a 504.
    assert_eq!(status, 502, "{body}");
    assert!(body.starts_with("body: "), "{body}");
    fast(started);
    drop(fillers);
    egress.https.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_api_example_calls_https_with_its_secret() {
    let https = HttpsHost::start(|upstream| {
        vec![(
            "caller",
            format!(
                "outbound_http = [\"https://localhost\"]\noutbound_private = true\n[env]\nAPI_URL = \"https://localhost:{}/v1/echo\"\n",
                upstream.port()
            ),
        )]
    })
    .await;
    let server = &https.server;
    let key = tenant(server, "caller").await;
    let component = Path::new(artifacts::EXAMPLE_CALL_API_COMPONENT);
    https
        .deploy_with_token(&key, "call-api", component, "tok-9f8e7d6c")
        .await;
    let reply = request(
        "POST",
        &server.url("/v1/functions/call-api/invoke"),
        Some(&key),
        "hello API",
    )
    .await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (
            200,
            "secure /v1/echo\nauth=Bearer tok-9f8e7d6c\nbody=hello API"
        )
    );
    // Without the secret, the example says what is missing.
    let bare = request(
        "PUT",
        &server.url("/v1/functions/bare"),
        Some(&key),
        std::fs::read(component).unwrap(),
    )
    .await;
    assert_eq!(bare.status, 201);
    let reply = request(
        "POST",
        &server.url("/v1/functions/bare/invoke"),
        Some(&key),
        "x",
    )
    .await;
    let problem = reply.problem(500, "not-configured");
    assert!(
        problem["detail"].as_str().unwrap().contains("API_TOKEN"),
        "{problem}"
    );
    https.server.stop().await;
}
