//! The checked-in CRDs under deploy/crds/ match the Rust types, and the CEL
//! rules the API relies on are in them.

use std::collections::BTreeSet;
use std::path::Path;

fn crd_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crds"))
}

#[test]
fn checked_in_crds_match_the_code() {
    let generated = stratum::crds();
    let mut drifted = Vec::new();
    for (file, yaml) in &generated {
        let on_disk = std::fs::read_to_string(crd_dir().join(file)).unwrap_or_default();
        if &on_disk != yaml {
            drifted.push(file.clone());
        }
    }
    let expected: BTreeSet<String> = generated.iter().map(|(f, _)| f.clone()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(crd_dir())
        .expect("deploy/crds exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let stale: Vec<_> = present.difference(&expected).collect();
    assert!(
        drifted.is_empty() && stale.is_empty(),
        "deploy/crds is out of date (changed: {drifted:?}, not generated any more: {stale:?}); \
         regenerate with `cargo run -- crds --out deploy` and delete stale files"
    );
    let bundle = std::fs::read_to_string(crd_dir().join("../stratum.yaml")).unwrap_or_default();
    assert!(
        bundle == stratum::bundle(),
        "deploy/stratum.yaml is out of date; regenerate with `cargo run -- crds --out deploy`"
    );
}

fn all_rules() -> String {
    stratum::crds()
        .into_iter()
        .map(|(_, y)| y)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn cel_rules_are_present() {
    let rules = all_rules();
    for needle in [
        // storage never shrinks (transition rule)
        "quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0",
        // storage size is a quantity
        "isQuantity(self)",
        // synchronous number < instances
        "self.postgresql.synchronous.number < self.instances",
        // a Backup is immutable
        "self.spec == oldSelf.spec",
    ] {
        assert!(
            rules.contains(needle),
            "CEL rule missing from the CRDs: {needle}"
        );
    }
}

#[test]
fn every_kind_has_status_subresource_and_printer_columns() {
    for (file, yaml) in stratum::crds() {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let version = &crd["spec"]["versions"][0];
        assert_eq!(crd["spec"]["scope"], "Namespaced", "{file}");
        assert!(
            version["subresources"]["status"].is_object(),
            "{file}: no status subresource"
        );
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: no printer columns"))
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(columns.contains(&"Age"), "{file}: {columns:?}");
        if file.contains("clusters") {
            for c in ["Ready", "Primary", "Phase"] {
                assert!(
                    columns.contains(&c),
                    "{file}: missing column {c}: {columns:?}"
                );
            }
        }
    }
}

fn descriptions_missing(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (k, v) in props {
            let p = format!("{path}.{k}");
            if v.get("description").is_none()
                && !["apiVersion", "kind", "metadata"].contains(&k.as_str())
            {
                out.push(p.clone());
            }
            descriptions_missing(v, &p, out);
        }
    }
    if let Some(items) = schema.get("items") {
        descriptions_missing(items, &format!("{path}[]"), out);
    }
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    let mut missing = Vec::new();
    for (file, yaml) in stratum::crds() {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        descriptions_missing(schema, &file, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without a doc comment: {missing:#?}"
    );
}
