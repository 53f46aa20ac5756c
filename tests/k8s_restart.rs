//! The operator (the `stratum controller` binary, under its own
//! ServiceAccount) stops hard and starts again: it resumes from the API
//! server alone — a spec change made while it was down takes effect, the
//! credentials Secret is not regenerated, status catches up.
//!
//! Needs the control plane of scripts/test.sh (`STRATUM_TEST_KUBECONFIG`);
//! fails without it.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn operator_restarts_and_resumes() {
    let client = admin().await;
    let ns = TestNamespace::create(&client, "restart").await;
    let mut operator = OperatorProcess::start(&client, Some(&ns.name)).await;

    let doc = yaml_docs(&repo_path("deploy/examples/postgres-single.yaml")).remove(0);
    apply(&client, &doc, &ns.name).await.unwrap();
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    eventually("the StatefulSet and the Secret", WAIT, || async {
        sts_api.get("pg-single").await.map_err(|e| e.to_string())?;
        secrets
            .get("pg-single-credentials")
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    let secret = secrets.get("pg-single-credentials").await.unwrap().data;

    // Down hard; the spec changes meanwhile; nothing reconciles it.
    operator.kill();
    let clusters: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &stratum_resource("PostgresCluster"),
    );
    let changed = clusters
        .patch(
            "pg-single",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"instances": 2}})),
        )
        .await
        .unwrap();
    let generation = changed.metadata.generation.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sts = sts_api.get("pg-single").await.unwrap();
    assert_eq!(sts.spec.unwrap().replicas, Some(1), "who reconciled?");

    // Up again: it catches up from the API server.
    let operator = OperatorProcess::start(&client, Some(&ns.name)).await;
    eventually("2 replicas after the restart", WAIT, || async {
        let sts = sts_api.get("pg-single").await.map_err(|e| e.to_string())?;
        match sts.spec.and_then(|s| s.replicas) {
            Some(2) => Ok(()),
            other => Err(format!("replicas {other:?}; log: {}", operator.log())),
        }
    })
    .await;
    eventually("the new generation observed", WAIT, || async {
        let c = clusters.get("pg-single").await.map_err(|e| e.to_string())?;
        let status = c.data.get("status").cloned().unwrap_or_default();
        if status["observedGeneration"] == generation {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
    assert_eq!(
        secrets.get("pg-single-credentials").await.unwrap().data,
        secret,
        "the credentials were regenerated after the restart"
    );
    assert_no_failures(&client, &ns.name).await;
}
