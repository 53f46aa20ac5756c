//! The API side of deploy/ on a real kube-apiserver (no operator running):
//! everything in deploy/ applies with server-side apply, the CRDs are
//! structural and Established, every example is accepted, and every CEL
//! rule of the CRDs rejects a bad object with a message naming the field.
//!
//! Needs the control plane of scripts/test.sh (`STRATUM_TEST_KUBECONFIG`);
//! fails without it.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use support::*;

#[tokio::test]
async fn deploy_applies_and_crds_are_established() {
    let client = admin().await;
    install_deploy(&client).await;

    // The pieces apply on their own too, and applying again changes nothing.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let before: Vec<_> = deploy_crds()
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    let mut versions = Vec::new();
    for name in &before {
        versions.push(crds.get(name).await.unwrap().metadata.resource_version);
    }
    for dir in ["deploy/crds", "deploy/operator"] {
        for entry in std::fs::read_dir(repo_path(dir)).unwrap() {
            let path = entry.unwrap().path();
            for doc in yaml_docs(&path) {
                if let Err(e) = apply(&client, &doc, "default").await {
                    panic!("{}: {}", path.display(), api_message(&e));
                }
            }
        }
    }
    for (name, version) in before.iter().zip(&versions) {
        let crd = crds.get(name).await.unwrap();
        assert_eq!(
            &crd.metadata.resource_version, version,
            "CRD {name} changed when the same manifest was applied again"
        );
        let conditions = crd.status.unwrap().conditions.unwrap_or_default();
        let is = |t: &str, s: &str| conditions.iter().any(|c| c.type_ == t && c.status == s);
        assert!(is("Established", "True"), "{name}: {conditions:?}");
        assert!(is("NamesAccepted", "True"), "{name}: {conditions:?}");
        assert!(
            !is("NonStructuralSchema", "True"),
            "{name} is not structural: {conditions:?}"
        );
    }

    // The operator's identity and its least-privilege RBAC.
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    sa.get(OPERATOR_SERVICE_ACCOUNT).await.unwrap();
    let role = Api::<ClusterRole>::all(client.clone())
        .get("stratum-operator")
        .await
        .unwrap();
    assert!(!role.rules.unwrap_or_default().is_empty());
    let binding = Api::<ClusterRoleBinding>::all(client.clone())
        .get("stratum-operator")
        .await
        .unwrap();
    assert_eq!(
        binding.subjects.unwrap_or_default()[0].name,
        OPERATOR_SERVICE_ACCOUNT
    );
    Api::<Deployment>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .get("stratum-operator")
        .await
        .unwrap();
}

#[tokio::test]
async fn every_example_is_accepted() {
    let client = admin().await;
    install_deploy(&client).await;
    let ns = TestNamespace::create(&client, "examples").await;
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(repo_path("deploy/examples")).unwrap() {
        let path = entry.unwrap().path();
        for doc in yaml_docs(&path) {
            let applied = apply(&client, &doc, &ns.name)
                .await
                .unwrap_or_else(|e| panic!("{}: {}", path.display(), api_message(&e)));
            let kind = doc["kind"].as_str().unwrap().to_string();
            if kind != "Secret" {
                // The server's structural defaults were applied.
                assert!(
                    applied.data["spec"].as_object().map_or(0, |m| m.len())
                        >= doc["spec"].as_object().map_or(0, |m| m.len()),
                    "{}: {applied:?}",
                    path.display()
                );
            }
            kinds.push(kind);
        }
    }
    for kind in [
        "PostgresCluster",
        "PxcCluster",
        "MongoCluster",
        "Backup",
        "ScheduledBackup",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no example of {kind}");
    }
}

/// One bad object: how it is made from an example, and what the API server
/// must answer.
struct Case {
    what: &'static str,
    example: &'static str,
    /// Create the example first and make the change an update
    /// (transition rules).
    update: bool,
    change: fn(&mut Value),
    /// The field the message must name (`<field>: `).
    field: &'static str,
    /// The CEL rule's message (a prefix of it is enough).
    message: &'static str,
}

fn example(file: &str, kind: &str) -> Value {
    yaml_docs(&repo_path(&format!("deploy/examples/{file}")))
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"))
}

fn cases() -> Vec<Case> {
    const SHRINK: &str = "storage size cannot be decreased";
    const QUANTITY: &str = "must be a Kubernetes quantity such as 1Gi or 500Mi";
    const ONE_TARGET: &str = "set at most one of targetTime, targetLSN";
    fn two_targets(v: &mut Value) {
        v["spec"]["bootstrap"] = json!({"recovery": {
            "backup": {"name": "some-backup"},
            "recoveryTarget": {"targetTime": "2026-01-01T00:00:00Z", "targetLSN": "0/3000000"},
        }});
    }
    vec![
        Case {
            what: "PostgresCluster storage shrinks",
            example: "postgres-single.yaml",
            update: true,
            change: |v| v["spec"]["storage"]["size"] = json!("512Mi"),
            field: "spec.storage",
            message: SHRINK,
        },
        Case {
            what: "PostgresCluster walStorage shrinks",
            example: "postgres-ha.yaml",
            update: true,
            change: |v| v["spec"]["walStorage"]["size"] = json!("100Mi"),
            field: "spec.walStorage",
            message: SHRINK,
        },
        Case {
            what: "PxcCluster storage shrinks",
            example: "pxc.yaml",
            update: true,
            change: |v| v["spec"]["storage"]["size"] = json!("1Gi"),
            field: "spec.storage",
            message: SHRINK,
        },
        Case {
            what: "MongoCluster storage shrinks",
            example: "mongo.yaml",
            update: true,
            change: |v| v["spec"]["storage"]["size"] = json!("1Gi"),
            field: "spec.storage",
            message: SHRINK,
        },
        Case {
            what: "PostgresCluster storage size is not a quantity",
            example: "postgres-single.yaml",
            update: false,
            change: |v| v["spec"]["storage"]["size"] = json!("lots"),
            field: "spec.storage.size",
            message: QUANTITY,
        },
        Case {
            what: "PostgresCluster walStorage size is not a quantity",
            example: "postgres-ha.yaml",
            update: false,
            change: |v| v["spec"]["walStorage"]["size"] = json!("1 GB"),
            field: "spec.walStorage.size",
            message: QUANTITY,
        },
        Case {
            what: "PxcCluster storage size is not a quantity",
            example: "pxc.yaml",
            update: false,
            change: |v| v["spec"]["storage"]["size"] = json!("two"),
            field: "spec.storage.size",
            message: QUANTITY,
        },
        Case {
            what: "MongoCluster storage size is not a quantity",
            example: "mongo.yaml",
            update: false,
            change: |v| v["spec"]["storage"]["size"] = json!("2GiB"),
            field: "spec.storage.size",
            message: QUANTITY,
        },
        Case {
            what: "PxcCluster with an even number of instances",
            example: "pxc.yaml",
            update: false,
            change: |v| v["spec"]["instances"] = json!(2),
            field: "spec.instances",
            message: "spec.instances must be odd and at least 3 for PxcCluster",
        },
        Case {
            what: "PostgresCluster synchronous.number not below instances",
            example: "postgres-ha.yaml",
            update: false,
            change: |v| v["spec"]["postgresql"]["synchronous"]["number"] = json!(3),
            field: "spec.postgresql.synchronous.number",
            message: "spec.postgresql.synchronous.number must be less than spec.instances",
        },
        Case {
            what: "PostgresCluster minSyncReplicas above maxSyncReplicas",
            example: "postgres-ha.yaml",
            update: false,
            change: |v| {
                v["spec"]["postgresql"]["synchronous"]["minSyncReplicas"] = json!(2);
                v["spec"]["postgresql"]["synchronous"]["maxSyncReplicas"] = json!(1);
            },
            field: "spec.postgresql.synchronous.minSyncReplicas",
            message: "minSyncReplicas must not exceed maxSyncReplicas",
        },
        Case {
            what: "PostgresCluster with both initdb and recovery",
            example: "postgres-ha.yaml",
            update: false,
            change: |v| v["spec"]["bootstrap"]["recovery"] = json!({"backup": {"name": "b"}}),
            field: "spec.bootstrap",
            message: "set only one of bootstrap.initdb and bootstrap.recovery",
        },
        Case {
            what: "PostgresCluster recovery target with two fields",
            example: "postgres-single.yaml",
            update: false,
            change: two_targets,
            field: "spec.bootstrap.recovery.recoveryTarget",
            message: ONE_TARGET,
        },
        Case {
            what: "PxcCluster recovery target with two fields",
            example: "pxc.yaml",
            update: false,
            change: two_targets,
            field: "spec.bootstrap.recovery.recoveryTarget",
            message: ONE_TARGET,
        },
        Case {
            what: "MongoCluster recovery target with two fields",
            example: "mongo.yaml",
            update: false,
            change: two_targets,
            field: "spec.bootstrap.recovery.recoveryTarget",
            message: ONE_TARGET,
        },
        Case {
            what: "MongoCluster without instances",
            example: "mongo.yaml",
            update: false,
            change: |v| v["spec"]["instances"] = json!(0),
            field: "spec.instances",
            message: "spec.instances must be at least 1 for MongoCluster",
        },
        Case {
            what: "MongoCluster with as many arbiters as instances",
            example: "mongo.yaml",
            update: false,
            change: |v| {
                v["spec"]["instances"] = json!(1);
                v["spec"]["arbiters"] = json!(1);
            },
            field: "spec.arbiters",
            message: "spec.arbiters must be less than spec.instances for MongoCluster",
        },
        Case {
            what: "MongoCluster with an even number of voters",
            example: "mongo.yaml",
            update: false,
            change: |v| v["spec"]["instances"] = json!(4),
            field: "spec.instances",
            message: "spec.instances + spec.arbiters (the voting members) must be odd",
        },
        Case {
            what: "MongoCluster with more than seven voters",
            example: "mongo.yaml",
            update: false,
            change: |v| v["spec"]["instances"] = json!(9),
            field: "spec.instances",
            message: "spec.instances + spec.arbiters must be at most 7",
        },
        Case {
            what: "Backup spec changes",
            example: "backup.yaml",
            update: true,
            change: |v| v["spec"]["cluster"]["name"] = json!("another-cluster"),
            field: "spec",
            message: "a Backup's spec is immutable",
        },
    ]
}

/// Every `x-kubernetes-validations` rule of deploy/crds: (kind, message).
fn crd_rules() -> Vec<(String, String)> {
    fn walk(kind: &str, schema: &JSONSchemaProps, out: &mut Vec<(String, String)>) {
        for rule in schema.x_kubernetes_validations.iter().flatten() {
            out.push((kind.to_string(), rule.message.clone().unwrap_or_default()));
        }
        for p in schema.properties.iter().flat_map(|p| p.values()) {
            walk(kind, p, out);
        }
        if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) = &schema.items {
            walk(kind, items, out);
        }
    }
    let mut out = Vec::new();
    for crd in deploy_crds() {
        for v in &crd.spec.versions {
            if let Some(schema) = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
            {
                walk(&crd.spec.names.kind, schema, &mut out);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test]
async fn invalid_objects_are_rejected_naming_the_field() {
    let client = admin().await;
    install_deploy(&client).await;
    let ns = TestNamespace::create(&client, "invalid").await;
    let cases = cases();

    // Every CEL rule of every CRD is exercised by at least one case.
    let kind_of = |c: &Case| {
        yaml_docs(&repo_path(&format!("deploy/examples/{}", c.example)))
            .into_iter()
            .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
            .find(|k| k != "Secret")
            .unwrap()
    };
    for (kind, message) in crd_rules() {
        assert!(
            cases
                .iter()
                .any(|c| kind_of(c) == kind && message.starts_with(c.message)),
            "no case exercises the CEL rule of {kind}: {message:?}; add one to cases()"
        );
    }

    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let kind = kind_of(case);
        let mut doc = example(case.example, &kind);
        doc["metadata"]["name"] = json!(format!("bad-{i}"));
        let api = api_for(&client, &doc, &ns.name).await;
        let result = if case.update {
            apply(&client, &doc, &ns.name).await.unwrap_or_else(|e| {
                panic!("{}: the valid original: {}", case.what, api_message(&e))
            });
            (case.change)(&mut doc);
            api.patch(
                &format!("bad-{i}"),
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(&doc),
            )
            .await
        } else {
            (case.change)(&mut doc);
            apply(&client, &doc, &ns.name).await
        };
        match result {
            Ok(_) => failures.push(format!("{}: accepted", case.what)),
            Err(kube::Error::Api(s)) => {
                let named = s.message.contains(&format!("{}: ", case.field));
                if s.code != 422 || !named || !s.message.contains(case.message) {
                    failures.push(format!(
                        "{}: expected 422 naming {} with {:?}; got {}: {}",
                        case.what, case.field, case.message, s.code, s.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.what)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn printer_columns_show_in_kubectl_get() {
    let client = admin().await;
    install_deploy(&client).await;
    let ns = TestNamespace::create(&client, "columns").await;
    let doc = example("postgres-single.yaml", "PostgresCluster");
    apply(&client, &doc, &ns.name).await.unwrap();
    // Status as the operator writes it (no operator runs in this binary).
    let api = api_for(&client, &doc, &ns.name).await;
    let status =
        json!({"status": {"ready": "1/1", "currentPrimary": "pg-single-0", "phase": "Healthy"}});
    api.patch_status("pg-single", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let out = eventually("kubectl get", Duration::from_secs(10), || async {
        Ok::<_, String>(kubectl(&["get", "postgresclusters", "-n", &ns.name]))
    })
    .await;
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "PRIMARY", "PHASE", "AGE"],
        "{out}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..4],
        ["pg-single", "1/1", "pg-single-0", "Healthy"],
        "{out}"
    );
}
