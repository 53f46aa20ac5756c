//! The controller's Prometheus metrics and its HTTP endpoint (`/metrics`,
//! `/healthz`). IO: serves HTTP on the metrics address only.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
    category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    kind: String,
    /// A step of a reconcile that waits on the API server (see
    /// [`Step`]), or `event` for an Event published off the reconcile.
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: String,
    /// The child's kind (`StatefulSet`, `Service`, …).
    child: String,
    /// `apply`, `get`, `create`, `delete`.
    verb: String,
}

type HistogramFamily = Family<KindLabels, Histogram, fn() -> Histogram>;
type StepFamily = Family<StepLabels, Histogram, fn() -> Histogram>;
type RequestFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// What a reconcile waits on, timed separately: each step is one round
/// trip to the API server (the requests of one step run concurrently),
/// so these histograms show the API server's latency as the operator
/// sees it, apart from the operator's own work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Adding the finalizer (a JSON patch of the cluster object).
    Finalizer,
    /// Server-side applies of the children, the Secret, orphan deletes.
    Apply,
    /// Moving the routing labels of pods.
    PodLabels,
    /// The merge patch of the status subresource.
    Status,
    /// Publishing one Event (off the reconcile path).
    Event,
}

impl Step {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Finalizer => "finalizer",
            Step::Apply => "apply",
            Step::PodLabels => "pod_labels",
            Step::Status => "status",
            Step::Event => "event",
        }
    }
}

/// Reconcile metrics of every controller in the process.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: HistogramFamily,
    steps: StepFamily,
    requests: RequestFamily,
    applies: Family<ApplyLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApplyLabels {
    kind: String,
    /// `sent` or `unchanged` (skipped).
    result: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    // 10 ms … ~40 s: a reconcile waits on instance managers with a short
    // timeout, so anything slower is an outlier.
    Histogram::new(exponential_buckets(0.01, 2.0, 13))
}

fn step_histogram() -> Histogram {
    // 2.5 ms … ~20 s: one round trip on loopback is a few milliseconds.
    Histogram::new(exponential_buckets(0.0025, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register the metrics in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stratum");
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        registry.register(
            "reconciles",
            "Reconciles run, by cluster kind",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by cluster kind and error category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile, by cluster kind",
            duration.clone(),
        );
        let steps: StepFamily = Family::new_with_constructor(step_histogram);
        registry.register(
            "reconcile_step_duration_seconds",
            "Time a reconcile waited on the API server, by cluster kind and step (event: published off the reconcile)",
            steps.clone(),
        );
        let requests: RequestFamily = Family::new_with_constructor(step_histogram);
        registry.register(
            "child_request_duration_seconds",
            "Duration of one API request about a child during apply, by cluster kind, child kind and verb",
            requests.clone(),
        );
        let applies = Family::<ApplyLabels, Counter>::default();
        registry.register(
            "child_applies",
            "Server-side applies of children, by cluster kind: sent, or skipped as unchanged",
            applies.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            steps,
            requests,
            applies,
        }
    }

    /// Count the children of one `kind` reconcile: `sent` applied,
    /// `unchanged` skipped.
    pub fn record_applies(&self, kind: &str, sent: usize, unchanged: usize) {
        for (result, n) in [("sent", sent), ("unchanged", unchanged)] {
            self.applies
                .get_or_create(&ApplyLabels {
                    kind: kind.to_string(),
                    result: result.to_string(),
                })
                .inc_by(n as u64);
        }
    }

    /// Count one reconcile of `kind` that took `elapsed`, failed with
    /// `error_category` if any.
    pub fn record(&self, kind: &str, elapsed: Duration, error_category: Option<&str>) {
        let labels = KindLabels {
            kind: kind.to_string(),
        };
        self.reconciles.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if let Some(category) = error_category {
            self.errors
                .get_or_create(&ErrorLabels {
                    kind: kind.to_string(),
                    category: category.to_string(),
                })
                .inc();
        }
    }

    /// Record that a reconcile of `kind` waited `elapsed` on `step`.
    pub fn record_step(&self, kind: &str, step: Step, elapsed: Duration) {
        self.steps
            .get_or_create(&StepLabels {
                kind: kind.to_string(),
                step: step.as_str().to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Record one API request about a `child` of a `kind` cluster.
    pub fn record_request(&self, kind: &str, child: &str, verb: &str, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                kind: kind.to_string(),
                child: child.to_string(),
                verb: verb.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The router: `/metrics` and `/healthz`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics)
}

async fn serve_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

/// Serve [`router`] on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    axum::serve(listener, router(metrics))
        .await
        .map_err(|e| anyhow::anyhow!("metrics server failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_counts_errors_and_durations() {
        let m = Metrics::new();
        m.record("FakeCluster", Duration::from_millis(30), None);
        m.record(
            "FakeCluster",
            Duration::from_millis(30),
            Some("ApplyFailed"),
        );
        let text = m.encode();
        assert!(
            text.contains(r#"stratum_reconciles_total{kind="FakeCluster"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stratum_reconcile_errors_total{kind="FakeCluster",category="ApplyFailed"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"stratum_reconcile_duration_seconds_count{kind="FakeCluster"} 2"#),
            "{text}"
        );
        m.record_step("FakeCluster", Step::Status, Duration::from_millis(4));
        assert!(m.encode().contains(
            r#"stratum_reconcile_step_duration_seconds_count{kind="FakeCluster",step="status"} 1"#
        ),);
        m.record_applies("FakeCluster", 2, 5);
        let text = m.encode();
        assert!(
            text.contains(
                r#"stratum_child_applies_total{kind="FakeCluster",result="unchanged"} 5"#
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn serves_metrics_and_healthz() {
        let metrics = Arc::new(Metrics::new());
        metrics.record("FakeCluster", Duration::from_millis(1), None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let health = http
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let body = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.contains("stratum_reconciles_total"), "{body}");
        server.abort();
    }
}
