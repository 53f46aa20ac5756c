//! Every manifest in deploy/examples/ passes the same checks the API server
//! (schema + CEL) and the engines apply.

use kube::CustomResourceExt;
use operator_core::api::backup::{Backup, ScheduledBackup};
use operator_core::validate::check_against_crd;

#[test]
fn every_example_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples");
    let registry = stratum::registry();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let object: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            let kind = object["kind"].as_str().unwrap_or_default().to_string();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let result = match kind.as_str() {
                "Backup" => check_against_crd(&Backup::crd(), &object, None).map(|_| ()),
                "ScheduledBackup" => {
                    check_against_crd(&ScheduledBackup::crd(), &object, None).map(|_| ())
                }
                "Secret" => continue,
                k => {
                    let engine = registry
                        .get(k)
                        .unwrap_or_else(|| panic!("{file}: no engine serves kind {k}"));
                    engine.validate(&object).map(|_| ()).map_err(|e| vec![e])
                }
            };
            assert!(result.is_ok(), "{file} ({kind}) is invalid: {result:?}");
            checked.push(kind);
        }
    }
    for kind in [
        "PostgresCluster",
        "PxcCluster",
        "MongoCluster",
        "Backup",
        "ScheduledBackup",
    ] {
        assert!(
            checked.iter().any(|k| k == kind),
            "no example of {kind} in deploy/examples"
        );
    }
}
