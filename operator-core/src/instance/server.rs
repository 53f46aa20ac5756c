//! The instance manager's HTTP API (axum): probes, metrics, status and
//! actions. Network IO (serving) and reads of the token file; the pure
//! pieces ([`authorize`], [`render_metrics`]) are unit-tested.
//!
//! Paths and the authentication scheme are defined in
//! [`super::protocol`].

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use super::manager::{Control, Shared};
use super::protocol::{
    ACTION_FAILSAFE, ACTION_FENCE, ACTION_LEASE, ACTION_REVOKE, ACTION_UNFENCE, BODY_LEASE,
    FailsafeAck, FailsafeRequest, HEADER_CLUSTER_ID, LeaseGrant, MemberStatus, PATH_ACTIONS,
    PATH_HEALTHZ, PATH_METRICS, PATH_READYZ, PATH_STATUS, Position, ProcessState, RevokeRequest,
    Role,
};
use crate::engine::{AfterAction, InstanceError};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Name of the built-in action that restarts the database server.
pub const ACTION_RESTART: &str = "restart";
/// How long `POST /v1/actions/restart` waits for the new server process.
const RESTART_WAIT: Duration = Duration::from_secs(60);

/// Why a request to `/v1/*` is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header (401).
    #[error("missing bearer token")]
    Missing,
    /// A token that is not the instance API token (403).
    #[error("wrong bearer token")]
    Wrong,
    /// `x-stratum-cluster-id` names another cluster (409).
    #[error("this instance belongs to cluster id {expected}, the request is for {got}")]
    OtherCluster {
        /// The manager's cluster id.
        expected: String,
        /// The header's.
        got: String,
    },
}

impl AuthError {
    /// The HTTP status to answer with.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::Missing => StatusCode::UNAUTHORIZED,
            Self::Wrong => StatusCode::FORBIDDEN,
            Self::OtherCluster { .. } => StatusCode::CONFLICT,
        }
    }
}

/// Check a `/v1/*` request: `Authorization: Bearer <token>` must carry
/// `token` (compared in constant time), and `x-stratum-cluster-id`, when
/// present, must equal `cluster_id`. `token` must not be empty. Pure.
pub fn authorize(headers: &HeaderMap, token: &str, cluster_id: &str) -> Result<(), AuthError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)?;
    if token.is_empty() || !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        return Err(AuthError::Wrong);
    }
    if let Some(got) = headers.get(HEADER_CLUSTER_ID) {
        let got = String::from_utf8_lossy(got.as_bytes());
        if got != cluster_id {
            return Err(AuthError::OtherCluster {
                expected: cluster_id.to_string(),
                got: got.into_owned(),
            });
        }
    }
    Ok(())
}

/// Compare two secrets in time independent of where they differ (and of
/// their lengths: both are hashed first). Pure.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The Prometheus text exposition of a status: `up` (server process runs),
/// `ready`, one `role` series per role (1 for the current one), the
/// position as numbers, and the restart count. Pure.
pub fn render_metrics(status: &MemberStatus, running: bool, restarts: u64) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, lines: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP stratum_instance_{name} {help}");
        let _ = writeln!(out, "# TYPE stratum_instance_{name} {kind}");
        for (labels, value) in lines {
            let _ = writeln!(out, "stratum_instance_{name}{labels} {value}");
        }
    };
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    gauge(
        "up",
        "Whether the database server process is running.",
        "gauge",
        &[(String::new(), flag(running))],
    );
    gauge(
        "ready",
        "Whether the database serves traffic.",
        "gauge",
        &[(String::new(), flag(status.ready))],
    );
    let roles = [
        Role::Primary,
        Role::Replica,
        Role::Member,
        Role::Arbiter,
        Role::Fenced,
        Role::Unknown,
    ];
    let role_lines: Vec<_> = roles
        .iter()
        .map(|r| {
            (
                format!("{{role=\"{}\"}}", r.as_str()),
                flag(*r == status.role),
            )
        })
        .collect();
    gauge(
        "role",
        "Current role (1 for the current role).",
        "gauge",
        &role_lines,
    );
    gauge(
        "on_failsafe",
        "Whether this primary writes on a lease it extended with its replicas' acknowledgements (the operator's renewals missing).",
        "gauge",
        &[(String::new(), flag(status.on_failsafe))],
    );
    if let Some(ms) = status.failsafe_kept_ms {
        gauge(
            "failsafe_kept_seconds",
            "How long this primary has kept writes on failsafe in the current (else the last) episode.",
            "gauge",
            &[(String::new(), ms as f64 / 1000.0)],
        );
    }
    gauge(
        "restarts_total",
        "Unexpected exits of the database server.",
        "counter",
        &[(String::new(), restarts as f64)],
    );
    match &status.position {
        Position::None => {}
        Position::Wal {
            timeline,
            received_lsn,
            replayed_lsn,
        } => {
            gauge(
                "timeline",
                "PostgreSQL timeline.",
                "gauge",
                &[(String::new(), f64::from(*timeline))],
            );
            if let Some(lsn) = received_lsn {
                gauge(
                    "received_lsn_bytes",
                    "Primary: current WAL write position; replica: last received.",
                    "gauge",
                    &[(String::new(), *lsn as f64)],
                );
            }
            if let Some(lsn) = replayed_lsn {
                gauge(
                    "replayed_lsn_bytes",
                    "Last replayed WAL position.",
                    "gauge",
                    &[(String::new(), *lsn as f64)],
                );
            }
        }
        Position::Galera { seqno, .. } => gauge(
            "seqno",
            "Galera last committed seqno.",
            "gauge",
            &[(String::new(), *seqno as f64)],
        ),
        Position::Oplog { term, seconds, .. } => {
            gauge(
                "term",
                "MongoDB election term.",
                "gauge",
                &[(String::new(), *term as f64)],
            );
            gauge(
                "optime_seconds",
                "MongoDB last optime (seconds).",
                "gauge",
                &[(String::new(), f64::from(*seconds))],
            );
        }
    }
    out
}

/// The API router over the manager's shared state.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(PATH_HEALTHZ, get(healthz))
        .route(PATH_READYZ, get(readyz))
        .route(PATH_METRICS, get(metrics))
        .route(PATH_STATUS, get(status))
        .route(&format!("{PATH_ACTIONS}{{name}}"), post(action))
        .with_state(shared)
}

fn error_response(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

/// The response refusing the request, or `None` when it may proceed.
fn refusal(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    // Read on every request so that a rotated Secret takes effect without
    // a restart.
    let token = match shared.ctx.config.read_token() {
        Ok(token) => token,
        Err(e) => {
            return Some(error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "cannot read the API token file {}: {e}",
                    shared.ctx.config.token_file.display()
                ),
            ));
        }
    };
    authorize(headers, &token, &shared.ctx.config.cluster_id)
        .err()
        .map(|e| error_response(e.status_code(), e.to_string()))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let (status, _) = shared.status().await;
    if status.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = status.message.unwrap_or_else(|| "not ready".into());
        (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let (status, state) = shared.status().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&status, state.running, state.restarts),
    )
        .into_response()
}

async fn status(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&shared, &headers) {
        return refused;
    }
    Json(shared.status().await.0).into_response()
}

async fn action(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refusal(&shared, &headers) {
        return refused;
    }
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}"));
            }
        }
    };
    // A lease in any body is applied first, so that a promotion holds its
    // lease from the moment it accepts writes.
    let mut failsafe_ended = None;
    if let Some(grant) = body.get(BODY_LEASE).filter(|v| !v.is_null()) {
        let grant: LeaseGrant = match serde_json::from_value(grant.clone()) {
            Ok(g) => g,
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, format!("invalid lease: {e}"));
            }
        };
        match shared.grant_lease(&grant) {
            Ok((_, ended)) => failsafe_ended = ended,
            Err(e) => return error_response(StatusCode::CONFLICT, e),
        }
    }
    match name.as_str() {
        ACTION_FAILSAFE => {
            let req: FailsafeRequest = match serde_json::from_value(body) {
                Ok(r) => r,
                Err(e) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "a failsafe action needs {{\"primary\", \"term\", \"ttlMs\"}}: {e}"
                        ),
                    );
                }
            };
            return match shared.failsafe_ack(&req) {
                Ok(()) => Json(FailsafeAck {
                    ack: true,
                    replica: shared.ctx.config.instance.clone(),
                })
                .into_response(),
                Err(why) => error_response(StatusCode::CONFLICT, why),
            };
        }
        ACTION_REVOKE => {
            let req: RevokeRequest = match serde_json::from_value(body) {
                Ok(r) => r,
                Err(e) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        format!("a revoke action needs {{\"term\"}}: {e}"),
                    );
                }
            };
            return match shared.failsafe_revoke(req.term) {
                Ok(reply) => Json(reply).into_response(),
                Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e),
            };
        }
        ACTION_RESTART => return restart(&shared).await,
        ACTION_FENCE => return fence(&shared).await,
        ACTION_UNFENCE => {
            if let Err(e) = shared.clear_fence() {
                return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            }
            let _ = shared.control_tx.try_send(Control::Wake);
            return Json(json!({ "fenced": false })).into_response();
        }
        ACTION_LEASE => {
            return match body.get(BODY_LEASE) {
                // The supervisor's view rides along (no server
                // connection): the operator renews often and notices a
                // crashed or stopped primary from the answer.
                Some(_) => {
                    let state = shared.snapshot();
                    // `failsafeKeptMs`: this grant ended a failsafe
                    // episode that long (the operator reports it).
                    Json(json!({
                        "lease": true,
                        "process": state.process,
                        "restarts": state.restarts,
                        "failsafeKeptMs": failsafe_ended,
                    }))
                    .into_response()
                }
                None => error_response(
                    StatusCode::BAD_REQUEST,
                    "a lease action needs {\"lease\": {\"holder\", \"term\", \"ttlMs\"}}",
                ),
            };
        }
        _ => {}
    }
    match shared.driver.action(&shared.ctx, &name, body).await {
        Ok(Some(reply)) => {
            let mut body = reply.body;
            match reply.then {
                AfterAction::Nothing => {}
                AfterAction::Restart | AfterAction::UnfenceAndRestart => {
                    if reply.then == AfterAction::UnfenceAndRestart
                        && let Err(e) = shared.clear_fence()
                    {
                        return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                    }
                    match shared.request(Control::Restart, RESTART_WAIT).await {
                        Ok(done) => {
                            if let Some(obj) = body.as_object_mut() {
                                obj.insert("restarted".into(), json!(done));
                            }
                        }
                        Err(e) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, e),
                    }
                }
            }
            Json(body).into_response()
        }
        Ok(None) => error_response(StatusCode::NOT_FOUND, format!("unknown action {name:?}")),
        Err(e @ InstanceError::Settings(_)) => {
            error_response(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e @ InstanceError::Refused(_)) => error_response(StatusCode::CONFLICT, e.to_string()),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `fence`: persist the marker first (a crash after it still keeps the
/// server down), then stop the server and answer once it is stopped.
async fn fence(shared: &Shared) -> Response {
    if let Err(e) = shared.set_fence() {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to write the fence marker: {e}"),
        );
    }
    match shared.request(Control::Stop, RESTART_WAIT).await {
        Ok(true) => Json(json!({ "fenced": true, "stopped": true })).into_response(),
        Ok(false) => (
            StatusCode::ACCEPTED,
            Json(json!({ "fenced": true, "stopped": false })),
        )
            .into_response(),
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn restart(shared: &Shared) -> Response {
    let state = shared.snapshot();
    if matches!(
        state.process,
        ProcessState::Preparing | ProcessState::Stopping
    ) {
        return error_response(
            StatusCode::CONFLICT,
            format!(
                "cannot restart while the server is {}",
                serde_json::to_value(state.process)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
        );
    }
    match shared.request(Control::Restart, RESTART_WAIT).await {
        Ok(true) => Json(json!({ "restarted": true })).into_response(),
        Ok(false) => (
            StatusCode::ACCEPTED,
            Json(json!({ "restarted": false, "message": "restart requested, still in progress" })),
        )
            .into_response(),
        Err(e) if e.contains("stopping") => error_response(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: Option<&str>, cluster: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        if let Some(c) = cluster {
            h.insert(HEADER_CLUSTER_ID, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    #[test]
    fn authorize_table() {
        let cases = [
            (None, None, Err(StatusCode::UNAUTHORIZED)),
            (Some("Basic dXNlcg=="), None, Err(StatusCode::UNAUTHORIZED)),
            (Some("Bearer "), None, Err(StatusCode::UNAUTHORIZED)),
            (Some("Bearer nope"), None, Err(StatusCode::FORBIDDEN)),
            (
                Some("Bearer s3cret-longer"),
                None,
                Err(StatusCode::FORBIDDEN),
            ),
            (Some("Bearer s3cret"), None, Ok(())),
            (Some("bearer  s3cret "), None, Ok(())),
            (Some("Bearer s3cret"), Some("uid-1"), Ok(())),
            (
                Some("Bearer s3cret"),
                Some("uid-2"),
                Err(StatusCode::CONFLICT),
            ),
            // The token is checked before the cluster id.
            (
                Some("Bearer nope"),
                Some("uid-2"),
                Err(StatusCode::FORBIDDEN),
            ),
        ];
        for (auth, cluster, want) in cases {
            let got =
                authorize(&headers(auth, cluster), "s3cret", "uid-1").map_err(|e| e.status_code());
            assert_eq!(got, want, "auth {auth:?} cluster {cluster:?}");
        }
    }

    #[test]
    fn empty_configured_token_accepts_nothing() {
        let got = authorize(&headers(Some("Bearer x"), None), "", "uid-1");
        assert_eq!(got, Err(AuthError::Wrong));
    }

    #[test]
    fn constant_time_eq_compares_contents() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn metrics_render_role_and_position() {
        let status = MemberStatus {
            role: Role::Replica,
            ready: true,
            position: Position::Wal {
                timeline: 2,
                received_lsn: Some(0x3000060),
                replayed_lsn: None,
            },
            ..Default::default()
        };
        let text = render_metrics(&status, true, 3);
        for line in [
            "stratum_instance_up 1",
            "stratum_instance_ready 1",
            "stratum_instance_role{role=\"replica\"} 1",
            "stratum_instance_role{role=\"primary\"} 0",
            "stratum_instance_timeline 2",
            "stratum_instance_received_lsn_bytes 50331744",
            "stratum_instance_restarts_total 3",
            "# TYPE stratum_instance_restarts_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("replayed_lsn"));
    }
}
