//! The self-managed certificate (rotation under load, caBundle healing, replicas racing) and
//! leader election.

use super::*;
/// The webhook started with no certificate made its own (Secret, caBundle). With a lifetime of
/// seconds it renews at least three times while pods are created one after another, every
/// creation succeeding; a caBundle reset (as a manifest re-apply does) heals within seconds.
pub(crate) async fn certificate_rotation(shared: Arc<Shared>) -> anyhow::Result<()> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::Secret;
    let mut cluster = shared.cluster.write().await;
    let client = &shared.client;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "servicekeel-system");
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let ca_of = |secret: &Secret| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .map(|b| b.0.clone())
    };
    let bundle = |c: &MutatingWebhookConfiguration| {
        c.webhooks
            .as_ref()
            .and_then(|w| w[0].client_config.ca_bundle.as_ref())
            .map(|b| b.0.clone())
    };
    let secret = secrets
        .get("servicekeel-webhook-tls")
        .await
        .context("the webhook made no Secret")?;
    ensure!(
        secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/managed-by"))
            .map(String::as_str)
            == Some("servicekeel-webhook"),
        "the Secret was not made by the webhook"
    );
    let configuration = configurations.get("servicekeel-sidecar-injector").await?;
    ensure!(
        bundle(&configuration).is_some() && bundle(&configuration) == ca_of(&secret),
        "caBundle is not the Secret's CA"
    );

    cluster
        .restart_webhook(&["--certificate-lifetime=6s"])
        .await?;
    let ns = namespace(client, "rotation", true).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "rotation-"},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))?;
    let issued = |secret: &Secret| {
        secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("servicekeel.io/issued-at"))
            .cloned()
    };
    let mut seen = std::collections::BTreeSet::new();
    let (mut created, mut failures) = (0, Vec::new());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.len() < 4 && std::time::Instant::now() < deadline {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(stored) if is_injected(&stored) => created += 1,
            Ok(_) => failures.push("a pod was stored without the sidecar".to_string()),
            Err(error) => failures.push(error.to_string()),
        }
        if let Some(at) = issued(&secrets.get("servicekeel-webhook-tls").await?) {
            seen.insert(at);
        }
    }
    let rotation = (|| {
        ensure!(
            failures.is_empty(),
            "{} of {} creations failed during rotation: {:?}",
            failures.len(),
            created + failures.len(),
            &failures[..failures.len().min(3)]
        );
        ensure!(
            seen.len() >= 4,
            "only {} certificates seen in 60s",
            seen.len()
        );
        Ok(())
    })();

    // A re-apply of the manifests' configuration drops caBundle; the webhook puts it back.
    let reset = kubectl(
        &shared.kubeconfig,
        &[
            "patch",
            "mutatingwebhookconfiguration",
            "servicekeel-sidecar-injector",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/webhooks/0/clientConfig/caBundle"}]"#,
        ],
        None,
    )?;
    let healed = eventually("caBundle restored and pods injected again", || async {
        let secret = secrets.get("servicekeel-webhook-tls").await?;
        let configuration = configurations.get("servicekeel-sidecar-injector").await?;
        if bundle(&configuration) != ca_of(&secret) {
            return Ok(None);
        }
        Ok(pods
            .create(&PostParams::default(), &pod)
            .await
            .ok()
            .filter(is_injected)
            .map(|_| ()))
    })
    .await;
    cluster.restart_webhook(&[]).await?;
    ensure!(reset.0, "cannot reset caBundle: {}", reset.2);
    rotation?;
    healed
}

/// Two contenders for one Lease: exactly one leads at a time, and when it stops the other takes
/// over at once (the lease is released, not left to expire).
pub(crate) async fn leader_election(shared: Arc<Shared>) -> anyhow::Result<()> {
    use servicekeel_webhook::leader::{self, Leadership};
    let _cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "election", false).await?;
    let mut contenders = Vec::new();
    for identity in ["replica-a", "replica-b"] {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let leadership = Leadership::default();
        let task = tokio::spawn(leader::run(
            shared.client.clone(),
            ns.clone(),
            "election".into(),
            identity.into(),
            leadership.clone(),
            stopped,
        ));
        contenders.push((stop, leadership, task));
    }
    let leaders = |c: &[(
        tokio::sync::watch::Sender<bool>,
        Leadership,
        tokio::task::JoinHandle<()>,
    )]| { c.iter().filter(|(_, l, _)| l.is_leader()).count() };
    eventually("a leader elected", || async {
        Ok((leaders(&contenders) == 1).then_some(()))
    })
    .await?;
    // Over several renewals, never two leaders and never none.
    for _ in 0..15 {
        tokio::time::sleep(POLL).await;
        ensure!(
            leaders(&contenders) == 1,
            "{} leaders",
            leaders(&contenders)
        );
    }
    let index = contenders
        .iter()
        .position(|(_, l, _)| l.is_leader())
        .unwrap();
    let stopped_identity = ["replica-a", "replica-b"][index];
    let (stop, _, task) = contenders.remove(index);
    stop.send(true)?;
    task.await?;
    // Released, not left to expire: the Lease no longer names the stopped replica.
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(shared.client.clone(), &ns)
            .get("election")
            .await?;
    let holder = lease.spec.and_then(|s| s.holder_identity);
    ensure!(
        holder.as_deref() != Some(stopped_identity),
        "the stopped replica still holds the lease"
    );
    eventually("the other replica taking over", || async {
        Ok(contenders[0].1.is_leader().then_some(()))
    })
    .await?;
    let (stop, _, task) = contenders.remove(0);
    stop.send(true)?;
    task.await?;
    Ok(())
}

/// Two replicas creating (and then renewing) the certificate Secret at the same moment end up
/// serving the same pair from one Secret.
pub(crate) async fn certificate_race(shared: Arc<Shared>) -> anyhow::Result<()> {
    use servicekeel_webhook::certificates::{Manager, Settings};
    let cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "cert-race", false).await?;
    // Inside the run's directory, which goes with the cluster.
    let dir = cluster.control_plane.dir.join(&ns);
    let manager = |replica: &str, lifetime: u64| {
        Manager::new(
            shared.client.clone(),
            Settings {
                namespace: ns.clone(),
                secret: "race-tls".into(),
                service: "servicekeel-webhook".into(),
                webhook_configuration: "none".into(),
                lifetime: std::time::Duration::from_secs(lifetime),
                extra_names: vec![],
                cert_file: dir.join(replica).join("tls.crt"),
                key_file: dir.join(replica).join("tls.key"),
            },
        )
    };
    let read = |replica: &str| -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        Ok((
            std::fs::read(dir.join(replica).join("tls.crt"))?,
            std::fs::read(dir.join(replica).join("tls.key"))?,
        ))
    };
    // First the race to create, then (with a lifetime that forces it) the race to renew.
    for lifetime in [3600, 30] {
        let (a, b) = (manager("a", lifetime), manager("b", lifetime));
        // As two replicas starting (or renewing) at once: each returns only once it serves a
        // pair, and the loser of the race serves the winner's.
        tokio::join!(a.ensure_until_ready(), b.ensure_until_ready());
        ensure!(
            read("a")? == read("b")?,
            "the replicas serve different pairs"
        );
        let secret =
            Api::<k8s_openapi::api::core::v1::Secret>::namespaced(shared.client.clone(), &ns)
                .get("race-tls")
                .await?;
        let stored = secret
            .data
            .unwrap_or_default()
            .get("tls.crt")
            .map(|b| b.0.clone());
        ensure!(
            stored == Some(read("a")?.0),
            "the served pair is not the Secret's"
        );
    }
    Ok(())
}
