//! telemetry: process-wide tracing setup. Installs the global
//! `tracing` subscriber (logs to stderr) and, only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, an OpenTelemetry exporter that
//! sends spans over OTLP/HTTP (protobuf, plain HTTP) to that endpoint. No
//! other IO.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The standard OpenTelemetry variable that turns the exporter on.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Keeps the exporter alive; dropping it flushes buffered spans and shuts
/// the exporter down. Hold it for the life of `main`.
#[must_use = "dropping the guard shuts tracing export down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.exporting())
            .finish()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        // The batch processor runs as a task on the Tokio runtime and
        // shutdown blocks until that task has flushed. On a worker thread
        // of a multi-thread runtime, let other workers run it meanwhile; on
        // a current-thread runtime flushing would deadlock, so spans still
        // buffered are dropped.
        let result = match tokio::runtime::Handle::try_current() {
            Ok(handle) => match handle.runtime_flavor() {
                tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(|| provider.shutdown())
                }
                _ => {
                    eprintln!(
                        "telemetry: not flushing spans from a current-thread runtime; use a multi-thread runtime"
                    );
                    return;
                }
            },
            // The runtime is gone: shutdown fails fast, nothing to flush.
            Err(_) => provider.shutdown(),
        };
        if let Err(e) = result {
            eprintln!("telemetry: failed to flush spans: {e}");
        }
    }
}

/// The OTLP endpoint from the value of [`OTLP_ENDPOINT_ENV`]: `None` (no
/// export) when unset or blank.
pub fn otlp_endpoint(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Install the global subscriber: an env filter from `RUST_LOG` (default
/// `info`), a formatter (JSON lines when `json`, else human-readable), and,
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, an OpenTelemetry layer
/// exporting spans as `service_name` (the exporter also honours the other
/// standard `OTEL_EXPORTER_OTLP_*` variables).
///
/// Call once, inside a multi-thread Tokio runtime when exporting (the
/// batch exporter runs as a Tokio task). Fails when a global subscriber is
/// already installed or the exporter cannot be built.
pub fn init(service_name: &str, json: bool) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };

    let provider = match otlp_endpoint(std::env::var(OTLP_ENDPOINT_ENV).ok()) {
        None => None,
        Some(_) => Some(tracer_provider(service_name)?),
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service_name.to_string())));

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("failed to install the tracing subscriber: {e}"))?;
    Ok(TelemetryGuard { provider })
}

fn tracer_provider(service_name: &str) -> anyhow::Result<SdkTracerProvider> {
    if tokio::runtime::Handle::try_current().is_err() {
        anyhow::bail!(
            "failed to start the OTLP exporter: {OTLP_ENDPOINT_ENV} is set but telemetry::init was called outside a Tokio runtime"
        );
    }
    // The endpoint (plus `/v1/traces`), headers and timeout come from the
    // standard OTEL_EXPORTER_OTLP_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| anyhow::anyhow!("failed to build the OTLP/HTTP span exporter: {e}"))?;
    // The async-runtime batch processor: the exporter's reqwest client
    // needs a Tokio reactor, which the default (thread-based) processor
    // does not provide.
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_is_off_unless_the_endpoint_is_set() {
        assert_eq!(otlp_endpoint(None), None);
        assert_eq!(otlp_endpoint(Some("  ".into())), None);
        assert_eq!(
            otlp_endpoint(Some("http://collector:4318".into())).as_deref(),
            Some("http://collector:4318")
        );
    }

    #[test]
    fn guard_without_exporter_drops_quietly() {
        let guard = TelemetryGuard { provider: None };
        assert!(!guard.exporting());
        drop(guard);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exporter_builds_and_flushes_on_drop() {
        // No collector listens here: building must not connect, and the
        // flush on drop must return (with an export error) rather than hang.
        let provider = tracer_provider("stratum-test").unwrap();
        let tracer = provider.tracer("stratum-test");
        drop(opentelemetry::trace::Tracer::start(&tracer, "span"));
        let guard = TelemetryGuard {
            provider: Some(provider),
        };
        assert!(guard.exporting());
        drop(guard);
    }
}
