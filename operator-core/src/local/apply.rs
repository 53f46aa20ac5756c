//! Applying a changed CR to a running local cluster, as `kubectl apply`
//! does on Kubernetes. Filesystem IO (the state directory's `apply.yaml`,
//! `cluster.yaml` and `state.json`).
//!
//! `stratum local up -f FILE` while an `up` runs on the same state
//! directory validates FILE against the accepted CR (schema, CEL rules
//! including transition rules, the engine's checks) and, only if it
//! passes, hands it to the running `up` (`apply.yaml`) and waits for the
//! outcome, an `Applied` or `ApplyRefused` event. The running `up` checks
//! it again and applies what it can change live; anything else is refused
//! naming the fields, and the running cluster stays as it was.
//!
//! Changed live today: the fencing annotation
//! `stratum.dev/fencedInstances`, `spec.postgresql.parameters` (every
//! instance's configuration is rewritten and reloaded; instances that need
//! a restart for it restart one at a time: replicas first, the primary
//! last, or the primary first when a lowered parameter requires it, see
//! `ha::Orchestrator`), and
//! `spec.instances` with `spec.pvcRetentionPolicy` (the running loop adds
//! or removes instances, see `ha::Resize`; the Galera loop one member at a
//! time, see `galera`), and a PxcCluster's `spec.configuration` (a rolling
//! restart, one member at a time, the writer last). Other spec changes are
//! refused on a running cluster for now.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use super::ha::HaState;
use super::input::{self, Accepted};
use super::state::{self, StateDir};
use crate::registry::EngineRegistry;

/// The hand-over file in the state directory.
pub const APPLY_FILE: &str = "apply.yaml";
/// The annotation that fences instances: a JSON list of instance names, or
/// `["*"]` for every instance (as CloudNativePG's `cnpg.io/fencedInstances`).
pub const FENCED_ANNOTATION: &str = "stratum.dev/fencedInstances";
/// How long `up -f` waits for the running `up` to take the file.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(30);

/// The instances the fencing annotation of `object` names (all of them for
/// `"*"`). Pure. The error names the annotation and says what to change.
pub fn fenced_instances(object: &Value, instances: &[String]) -> Result<BTreeSet<String>, String> {
    let field = format!("metadata.annotations[{FENCED_ANNOTATION}]");
    let Some(raw) = object
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(FENCED_ANNOTATION))
    else {
        return Ok(BTreeSet::new());
    };
    let text = raw
        .as_str()
        .ok_or_else(|| format!("{field}: must be a string holding a JSON list"))?;
    let names: Vec<String> = serde_json::from_str(text).map_err(|e| {
        format!(
            "{field}: {text:?} is not a JSON list of instance names ({e}); write e.g. '[\"{}\"]' or '[\"*\"]'",
            instances.first().map(String::as_str).unwrap_or("NAME")
        )
    })?;
    let mut out = BTreeSet::new();
    for name in names {
        if name == "*" {
            out.extend(instances.iter().cloned());
        } else if instances.contains(&name) {
            out.insert(name);
        } else {
            return Err(format!(
                "{field}: there is no instance {name:?}; instances are {}",
                instances.join(", ")
            ));
        }
    }
    Ok(out)
}

/// Dotted paths of the fields that differ between `old` and `new` (leaves
/// of objects; arrays compared whole). Pure.
pub fn changed_fields(old: &Value, new: &Value, path: &str) -> Vec<String> {
    // A missing object is an empty one: name the leaves that appear.
    let empty = Value::Object(Default::default());
    let (old, new) = match (old, new) {
        (Value::Null, Value::Object(_)) => (&empty, new),
        (Value::Object(_), Value::Null) => (old, &empty),
        other => other,
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter()
                .flat_map(|k| {
                    let child = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    changed_fields(
                        a.get(k).unwrap_or(&Value::Null),
                        b.get(k).unwrap_or(&Value::Null),
                        &child,
                    )
                })
                .collect()
        }
        (a, b) if a == b => Vec::new(),
        _ => vec![path.to_string()],
    }
}

/// Spec fields a running local cluster takes: server configuration (rolled
/// out by reloading or restarting the instances one at a time), the number of
/// instances and what happens to a removed instance's data.
const LIVE_SPEC_FIELDS: [&str; 4] = [
    "spec.postgresql.parameters.",
    "spec.configuration",
    "spec.instances",
    "spec.pvcRetentionPolicy.",
];
/// Of those, the ones that change the instances' configuration:
/// PostgreSQL's `postgresql.parameters`, the my.cnf text `configuration`
/// of engines that have one (PxcCluster).
const RECONFIGURE_SPEC_FIELDS: [&str; 2] = ["spec.postgresql.parameters.", "spec.configuration"];

/// What a running `up` does with a new, valid CR. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The instances fenced from now on.
    pub fenced: BTreeSet<String>,
    /// The spec fields that changed the instances' configuration: they
    /// reload it, and those that need a restart restart one at a time.
    pub reconfigure_for: Vec<String>,
    /// Whether `spec.instances` changed: the caller adds or removes
    /// instances (an engine's loop that cannot must refuse the change).
    pub resized: bool,
}

/// [`Change`] when only what can change live changed, else why not. Pure.
pub fn review(old: &Accepted, new: &Accepted, new_object: &Value) -> Result<Change, String> {
    let spec = changed_fields(&old.cluster.spec, &new.cluster.spec, "spec");
    let refused: Vec<&String> = spec
        .iter()
        .filter(|f| !LIVE_SPEC_FIELDS.iter().any(|p| f.starts_with(p)))
        .collect();
    if !refused.is_empty() {
        return Err(format!(
            "changing {} on a running local cluster is not supported yet; stop it (`stratum local down`) and start it with the new file",
            refused
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(Change {
        fenced: fenced_instances(new_object, &new.cluster.instance_names())?,
        resized: spec.iter().any(|f| f == "spec.instances"),
        reconfigure_for: spec
            .into_iter()
            .filter(|f| RECONFIGURE_SPEC_FIELDS.iter().any(|p| f.starts_with(p)))
            .collect(),
    })
}

/// Rewrite every instance's `instance.json` for `cluster` (the engine
/// block: parameters), so that a restarted manager runs with it. Instances
/// not laid out yet (a scale-up in the same change) are skipped: they are
/// laid out with the new CR.
pub fn rewrite_instance_configs(
    dir: &StateDir,
    engine: &dyn crate::engine::Engine,
    cluster: &crate::engine::ValidatedCluster,
    names: &[String],
) -> anyhow::Result<()> {
    let block = engine
        .instance_settings(cluster)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for name in names {
        let path = dir.instance_config_file(name);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let mut config: crate::instance::config::InstanceConfig =
            serde_json::from_slice(&text).with_context(|| format!("parse {}", path.display()))?;
        config.engine = block.clone();
        let mut json = serde_json::to_vec_pretty(&config)?;
        json.push(b'\n');
        state::write_atomic(&path, &json, 0o644)?;
    }
    Ok(())
}

/// CLI side: `file` passed validation against the accepted CR; hand it to
/// the `up` running as `pid` and wait for its answer.
pub async fn hand_over(dir: &StateDir, accepted: &Accepted, pid: u32) -> anyhow::Result<()> {
    let object = input::parse_yaml("", &accepted.text)?;
    if let Err(e) = fenced_instances(&object, &accepted.cluster.instance_names()) {
        anyhow::bail!("{e}");
    }
    let before = state::read_state(dir)?.map(|s| s.ha).unwrap_or_default();
    let path = dir.root().join(APPLY_FILE);
    state::write_atomic(&path, accepted.text.as_bytes(), 0o600)
        .with_context(|| format!("failed to write {}", path.display()))?;
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(st) = state::read_state(dir)?
            && let Some(outcome) = new_outcome(&before, &st.ha)
        {
            if outcome.contains("ApplyRefused") {
                anyhow::bail!("the running cluster refused the change: {outcome}");
            }
            println!("applied to the running cluster (up pid {pid}): {outcome}");
            return Ok(());
        }
        if started.elapsed() > HAND_OVER_TIMEOUT {
            let _ = std::fs::remove_file(&path);
            anyhow::bail!(
                "the running `up` (pid {pid}) did not take the change within {}s",
                HAND_OVER_TIMEOUT.as_secs()
            );
        }
    }
}

/// The first `Applied`/`ApplyRefused` event in `now` that `before` did not
/// have (the list is bounded, so compare from the last event seen).
fn new_outcome(before: &HaState, now: &HaState) -> Option<String> {
    let start = before
        .events
        .last()
        .and_then(|l| now.events.iter().rposition(|e| e == l).map(|i| i + 1))
        .unwrap_or(0);
    now.events[start.min(now.events.len())..]
        .iter()
        .find(|e| e.contains(" Applied: ") || e.contains(" ApplyRefused: "))
        .cloned()
}

/// Running side: take a handed-over CR, if any. Validates it again against
/// `current`; returns the new accepted CR and its fenced instances when it
/// may be applied, records `ApplyRefused` in `ha` otherwise (nothing
/// changes).
pub fn take(
    registry: &EngineRegistry,
    dir: &StateDir,
    current: &Accepted,
    ha: &mut HaState,
) -> Option<(Accepted, Change)> {
    let path = dir.root().join(APPLY_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    let label = path.display().to_string();
    let result = input::parse_yaml("", &current.text)
        .map_err(|e| e.to_string())
        .and_then(|old| {
            let new =
                input::accept(registry, &label, &text, Some(&old)).map_err(|e| e.to_string())?;
            let object = input::parse_yaml(&label, &text).map_err(|e| e.to_string())?;
            let change = review(current, &new, &object)?;
            if !change.reconfigure_for.is_empty() {
                rewrite_instance_configs(
                    dir,
                    new.engine.as_ref(),
                    &new.cluster,
                    &new.cluster.instance_names(),
                )
                .map_err(|e| format!("could not rewrite the instance configurations: {e:#}"))?;
            }
            Ok((new, change))
        });
    match result {
        Ok((new, change)) => {
            if let Err(e) = state::write_atomic(&dir.cluster_file(), new.text.as_bytes(), 0o644) {
                ha.event("ApplyRefused", format!("could not save the CR: {e:#}"));
                return None;
            }
            ha.event(
                "Applied",
                format!(
                    "fenced instances: {}; {}",
                    if change.fenced.is_empty() {
                        "none".to_string()
                    } else {
                        change.fenced.iter().cloned().collect::<Vec<_>>().join(", ")
                    },
                    if change.reconfigure_for.is_empty() {
                        "configuration unchanged".to_string()
                    } else {
                        format!(
                            "reload (restarts where needed) for {}",
                            change.reconfigure_for.join(", ")
                        )
                    }
                ) + &if change.resized {
                    format!("; instances: {}", new.cluster.instance_names().join(", "))
                } else {
                    String::new()
                },
            );
            Some((new, change))
        }
        Err(why) => {
            ha.event("ApplyRefused", why);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names() -> Vec<String> {
        ["pg-0", "pg-1", "pg-2"].map(String::from).to_vec()
    }

    fn annotated(v: &str) -> Value {
        json!({ "metadata": { "annotations": { FENCED_ANNOTATION: v } } })
    }

    #[test]
    fn fencing_annotation() {
        assert!(fenced_instances(&json!({}), &names()).unwrap().is_empty());
        assert_eq!(
            fenced_instances(&annotated(r#"["pg-1"]"#), &names()).unwrap(),
            BTreeSet::from(["pg-1".to_string()])
        );
        assert_eq!(
            fenced_instances(&annotated(r#"["*"]"#), &names())
                .unwrap()
                .len(),
            3
        );
        assert!(
            fenced_instances(&annotated("[]"), &names())
                .unwrap()
                .is_empty()
        );
        let e = fenced_instances(&annotated(r#"["pg-9"]"#), &names()).unwrap_err();
        assert!(
            e.starts_with(
                "metadata.annotations[stratum.dev/fencedInstances]: there is no instance \"pg-9\""
            ),
            "{e}"
        );
        let e = fenced_instances(&annotated("pg-1"), &names()).unwrap_err();
        assert!(e.contains("is not a JSON list"), "{e}");
    }

    #[test]
    fn review_takes_scaling_and_refuses_other_fields() {
        use crate::local::input::tests::{manifest, registry};
        let accept = |text: &str| input::accept(&registry(), "c.yaml", text, None).unwrap();
        let old = accept(&manifest("3", "1Gi"));
        let object = |text: &str| input::parse_yaml("c.yaml", text).unwrap();

        let five = manifest("5", "1Gi");
        let change = review(&old, &accept(&five), &object(&five)).unwrap();
        assert!(change.resized);
        assert!(change.reconfigure_for.is_empty());
        assert!(change.fenced.is_empty());

        let same = manifest("3", "1Gi");
        let change = review(&old, &accept(&same), &object(&same)).unwrap();
        assert!(!change.resized);

        let bigger = manifest("3", "2Gi");
        let e = review(&old, &accept(&bigger), &object(&bigger)).unwrap_err();
        assert!(
            e.starts_with("changing spec.storage.size on a running local cluster"),
            "{e}"
        );
    }

    #[test]
    fn changed_fields_are_leaf_paths() {
        let old = json!({ "instances": 3, "postgresql": { "parameters": { "a": "1" } } });
        let new = json!({ "instances": 5, "postgresql": { "parameters": { "a": "1", "b": "2" } } });
        assert_eq!(
            changed_fields(&old, &new, "spec"),
            ["spec.instances", "spec.postgresql.parameters.b"]
        );
        assert!(changed_fields(&old, &old, "spec").is_empty());
        assert_eq!(
            changed_fields(&json!({}), &json!({ "p": { "a": "1" } }), "spec"),
            ["spec.p.a"]
        );
    }
}
