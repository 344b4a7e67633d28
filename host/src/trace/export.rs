//! The export of the host's spans: OTLP over HTTP (protobuf) to a
//! collector, batched by the OpenTelemetry SDK, sent with hyper and rustls
//! (the system's roots plus `--ca-file`) on the host's own runtime.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// How long one export may take before it is given up (the SDK retries
/// nothing; the next batch goes on).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why span export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The endpoint is not an `http://` or `https://` URL.
    #[error("--otlp-endpoint {0:?} is not an http:// or https:// URL")]
    Endpoint(String),
    /// The CA file could not be used.
    #[error("--ca-file {0}")]
    CaFile(String),
    /// The OTLP exporter refused its configuration.
    #[error("the OTLP exporter: {0}")]
    Exporter(String),
}

/// The span pipeline: hand [`Telemetry::tracer`] to a
/// `tracing-opentelemetry` layer; [`Telemetry::shutdown`] sends what is
/// still batched.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// The exporter's HTTP client: requests run on the host's runtime (the
/// SDK's batch thread has none of its own to drive hyper).
#[derive(Debug, Clone)]
struct OtlpClient {
    runtime: tokio::runtime::Handle,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let request = request.map(Full::new);
        let sent = self.runtime.spawn(async move {
            let response = tokio::time::timeout(EXPORT_TIMEOUT, client.request(request))
                .await
                .map_err(|_| "the collector did not answer in time")??;
            let (parts, body) = response.into_parts();
            let body = tokio::time::timeout(EXPORT_TIMEOUT, body.collect())
                .await
                .map_err(|_| "the collector's answer did not arrive in time")??
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        });
        sent.await?
    }
}

/// `endpoint` (the collector's base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`
/// gives it) with the traces path.
fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    let uri: http::Uri = trimmed
        .parse()
        .map_err(|_| TelemetryError::Endpoint(endpoint.to_owned()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(TelemetryError::Endpoint(endpoint.to_owned()));
    }
    Ok(if trimmed.ends_with("/v1/traces") {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    })
}

impl Telemetry {
    /// Spans exported to the collector at `endpoint` (its base URL: traces
    /// go to `{endpoint}/v1/traces`), as service `gust` of host `instance`,
    /// over connections run on `runtime`. Batching follows the SDK's
    /// `OTEL_BSP_*` variables; headers `OTEL_EXPORTER_OTLP_HEADERS`.
    ///
    /// # Errors
    /// A malformed endpoint or CA file.
    pub fn otlp(
        endpoint: &str,
        ca_file: Option<&Path>,
        instance: &str,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, TelemetryError> {
        let url = traces_url(endpoint)?;
        let tls = crate::tls_roots::client_config(ca_file).map_err(TelemetryError::CaFile)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = OtlpClient {
            runtime,
            client: Client::builder(TokioExecutor::new()).build(connector),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let resource = Resource::builder()
            .with_service_name("gust")
            .with_attribute(opentelemetry::KeyValue::new(
                "service.instance.id",
                instance.to_owned(),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The tracer a `tracing-opentelemetry` layer records into.
    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("gust")
    }

    /// Sends the spans still batched and stops exporting.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "could not send the last spans");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_base_urls_that_get_the_traces_path() {
        assert_eq!(
            traces_url("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example.com/").unwrap(),
            "https://otel.example.com/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        for bad in ["collector:4318", "ftp://c", "", "http://"] {
            assert!(traces_url(bad).is_err(), "{bad}");
        }
    }
}
