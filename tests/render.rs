//! `stratum render` prints, for every cluster example, the objects the
//! controller would apply, and refuses files without a cluster.

use std::process::Command;

fn render(file: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stratum"))
        .args(["render", "-f"])
        .arg(format!(
            "{}/deploy/examples/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .output()
        .unwrap()
}

#[test]
fn every_cluster_example_renders() {
    // The examples leave podManagementPolicy unset: each engine's default.
    // A PxcCluster also gets its generated TLS Secret.
    for (file, container, policy, secrets) in [
        ("postgres-ha.yaml", "postgres", "OrderedReady", 1),
        ("pxc.yaml", "pxc", "Parallel", 2),
        ("mongo.yaml", "mongod", "Parallel", 1),
    ] {
        let out = render(file);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&stdout)
            .map(|d| {
                let v: serde_json::Value = serde::Deserialize::deserialize(d).unwrap();
                v["kind"].as_str().unwrap().to_string()
            })
            .collect();
        let mut want = vec![
            "StatefulSet",
            "ConfigMap",
            "Service",
            "Service",
            "Service",
            "Service",
            "PodDisruptionBudget",
        ];
        want.extend(std::iter::repeat_n("Secret", secrets));
        assert_eq!(kinds, want, "{file}");
        assert!(
            stdout.contains(&format!("name: {container}")),
            "{file}: no container {container}"
        );
        assert!(
            stdout.contains(&format!("podManagementPolicy: {policy}")),
            "{file}: expected podManagementPolicy {policy}"
        );
    }
}

#[test]
fn a_file_without_a_cluster_is_refused() {
    let out = render("backup.yaml");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no cluster"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
