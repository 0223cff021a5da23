//! Helpers shared by the control-plane tests: namespaces, golden inputs, kubectl, polling.

use super::*;

pub(crate) static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

/// A fresh namespace, labelled for injection or not.
pub(crate) async fn namespace(
    client: &kube::Client,
    prefix: &str,
    inject: bool,
) -> anyhow::Result<String> {
    let name = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NAMESPACES.fetch_add(1, Ordering::SeqCst)
    );
    let labels: BTreeMap<String, String> = if inject {
        [("servicekeel.io/inject".to_string(), "enabled".to_string())].into()
    } else {
        BTreeMap::new()
    };
    create_namespace(client, &name, labels).await?;
    Ok(name)
}

pub(crate) async fn create_namespace(
    client: &kube::Client,
    name: &str,
    labels: BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    match namespaces.create(&PostParams::default(), &namespace).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The config the cluster's webhook runs with.
pub(crate) fn shipped_config() -> Config {
    Config::load(&servicekeel_e2e::webhook::config_file()).unwrap()
}

pub(crate) fn golden_inputs() -> Vec<PathBuf> {
    let dir = paths::repo().join("webhook/tests/golden/input");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    inputs
}

pub(crate) fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Every field of `expected` is in `actual` with the same value (arrays element by element);
/// what the apiserver adds by defaulting is ignored.
pub(crate) fn differences(expected: &Value, actual: &Value, path: &str, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, value) in e {
                match a.get(key) {
                    Some(stored) => differences(value, stored, &format!("{path}/{key}"), out),
                    None if value.is_null() => {}
                    None => out.push(format!("{path}/{key}: missing from the stored object")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (index, (value, stored)) in e.iter().zip(a).enumerate() {
                differences(value, stored, &format!("{path}/{index}"), out);
            }
        }
        _ if expected == actual => {}
        _ => out.push(format!("{path}: expected {expected}, stored {actual}")),
    }
}

/// kubectl's success, standard output and standard error.
pub(crate) fn kubectl(
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<(bool, String, String)> {
    let output = servicekeel_e2e::webhook::run_kubectl(kubeconfig, args, stdin)?;
    Ok((output.success, output.stdout, output.stderr))
}

pub(crate) fn pod_value(pod: &Pod) -> Value {
    serde_json::to_value(pod).unwrap()
}

pub(crate) use servicekeel_e2e::process::POLL;
pub(crate) const WITHIN: std::time::Duration = std::time::Duration::from_secs(20);

/// Polls `check` until it returns `Some`, failing with `what` after `WITHIN`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    servicekeel_e2e::process::poll_until(what, WITHIN, check).await
}

pub(crate) fn exported(pod: &Pod) -> Option<Value> {
    let text = pod
        .metadata
        .annotations
        .as_ref()?
        .get("servicekeel.io/exported-services")?;
    serde_json::from_str(text).ok()
}

pub(crate) async fn apply(shared: &Shared, ns: &str, yaml: &str) -> anyhow::Result<()> {
    let (ok, _, stderr) = kubectl(
        &shared.kubeconfig,
        &["apply", "-n", ns, "-f", "-"],
        Some(yaml),
    )?;
    ensure!(ok, "kubectl apply failed: {stderr}");
    Ok(())
}

/// Create options for a server-side dry run.
pub(crate) fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..Default::default()
    }
}
