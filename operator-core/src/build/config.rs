//! The instance config ConfigMap and the generated credentials Secret, and
//! the apply-side rule that a Secret is never overwritten. Pure apart from
//! the random Secret values.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use rand::Rng;

use super::meta::MetaBuilder;
use super::{BuildError, CONFIG_KEY, RUN_DIR, SECRETS_DIR, TLS_DIR, names};
use crate::engine::{Engine, EngineManifest, ValidatedCluster};
use crate::instance::protocol::SECRET_KEY_API_TOKEN;
use crate::plan::{self, InstancePaths, PlanInput};

/// Length of each generated credential.
pub const SECRET_VALUE_LEN: usize = 32;
const URL_SAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub(super) fn config_map(
    meta: &MetaBuilder,
    cluster: &ValidatedCluster,
    engine: &dyn Engine,
    manifest: &EngineManifest,
) -> Result<ConfigMap, BuildError> {
    let uid = cluster.meta.uid.clone().unwrap_or_default();
    let input = PlanInput {
        cluster,
        engine,
        cluster_id: uid,
        members: plan::kubernetes_members(cluster, manifest),
        listen_address: "0.0.0.0".into(),
        // The pod already runs as the database user (securityContext).
        run_as_user: None,
        bin_dir: manifest.bin_dir.as_ref().map(PathBuf::from),
    };
    let secrets_dir = PathBuf::from(SECRETS_DIR);
    let config = plan::instance_config(
        &input,
        "",
        InstancePaths {
            data_dir: PathBuf::from(&manifest.data_mount_path),
            volumes: manifest
                .extra_volumes
                .iter()
                .map(|v| (v.name.clone(), PathBuf::from(&v.mount_path)))
                .collect(),
            run_dir: PathBuf::from(RUN_DIR),
            token_file: secrets_dir.join(SECRET_KEY_API_TOKEN),
            secrets_dir,
            tls_dir: engine.tls_secret(cluster).map(|_| PathBuf::from(TLS_DIR)),
        },
    )
    .map_err(BuildError::Settings)?;
    let json = serde_json::to_string_pretty(&config).map_err(BuildError::Serialize)?;
    Ok(ConfigMap {
        metadata: meta.object_meta(names::config_map(&meta.cluster)),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), json)])),
        ..Default::default()
    })
}

/// The credentials Secret with a fresh random value for each key the engine
/// generates, plus `api-token` (the instance API token the controller
/// needs) even when the engine forgot it.
pub(super) fn credentials_secret(meta: &MetaBuilder, manifest: &EngineManifest) -> Secret {
    let mut keys: Vec<&str> = manifest
        .generated_secrets
        .iter()
        .map(String::as_str)
        .collect();
    keys.push(SECRET_KEY_API_TOKEN);
    let data = keys
        .into_iter()
        .map(|k| {
            (
                k.to_string(),
                ByteString(generate_secret_value().into_bytes()),
            )
        })
        .collect();
    Secret {
        metadata: meta.object_meta(names::credentials_secret(&meta.cluster)),
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The generated TLS Secret `name` (type `kubernetes.io/tls` plus
/// `ca.crt`): a new CA and a certificate for every member's names
/// ([`crate::tls::kubernetes_names`]).
pub(super) fn tls_secret(
    meta: &MetaBuilder,
    cluster: &ValidatedCluster,
    name: &str,
) -> Result<Secret, BuildError> {
    let files = crate::tls::generate(&cluster.meta.name, &crate::tls::kubernetes_names(cluster))
        .map_err(BuildError::Tls)?;
    let data = files
        .entries()
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    Ok(Secret {
        metadata: meta.object_meta(name.to_string()),
        type_: Some(crate::tls::SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    })
}

/// What the apply step does with a generated TLS Secret: create it when
/// absent, otherwise keep it exactly as it is. Unlike the credentials, a
/// missing key is never added: a new `ca.crt` next to an old `tls.crt`
/// would not verify, and the members already trust what is there. An
/// incomplete Secret is reported by each instance instead, naming the key.
pub fn tls_secret_action(existing: Option<&Secret>) -> SecretAction {
    match existing {
        None => SecretAction::Create,
        Some(_) => SecretAction::Keep,
    }
}

/// A random credential: [`SECRET_VALUE_LEN`] URL-safe characters
/// (`A-Za-z0-9-_`), about 192 bits.
pub fn generate_secret_value() -> String {
    let mut rng = rand::rng();
    (0..SECRET_VALUE_LEN)
        .map(|_| URL_SAFE[rng.random_range(0..URL_SAFE.len())] as char)
        .collect()
}

/// What the apply step does with the credentials Secret.
#[derive(Clone, Debug, PartialEq)]
pub enum SecretAction {
    /// No Secret of that name: create the desired one (create, not apply,
    /// so that a concurrent creator wins and nothing is overwritten).
    Create,
    /// The Secret exists with every key: leave it alone.
    Keep,
    /// The Secret exists but lacks these keys (an engine upgrade added
    /// one): add only them, never touching existing values.
    AddMissing(BTreeMap<String, ByteString>),
}

/// Decide what to do with the credentials Secret. Existing values are never
/// overwritten: they are the passwords the databases were initialised with,
/// and `desired` holds new random ones on every build.
pub fn secret_action(existing: Option<&Secret>, desired: &Secret) -> SecretAction {
    let Some(existing) = existing else {
        return SecretAction::Create;
    };
    let has = |k: &str| {
        existing.data.as_ref().is_some_and(|d| d.contains_key(k))
            || existing
                .string_data
                .as_ref()
                .is_some_and(|d| d.contains_key(k))
    };
    let missing: BTreeMap<String, ByteString> = desired
        .data
        .iter()
        .flatten()
        .filter(|(k, _)| !has(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if missing.is_empty() {
        SecretAction::Keep
    } else {
        SecretAction::AddMissing(missing)
    }
}
