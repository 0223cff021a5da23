//! The pod rows: pods created through the real apiserver on the cluster with a real node, in a
//! namespace labelled for injection (the webhook is called) and in one that is not (baseline),
//! the same pod spec in both, one pod at a time; and, to tell the webhook's call from the cost of
//! the larger pod it leaves, that pod as the webhook left it, created where no webhook is called
//! and where the webhook is called and leaves it unchanged.

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::de::DeserializeOwned;
use serde_json::json;
use servicekeel_api::{Protocol, keys};
use servicekeel_webhook::exports::named_port;
use servicekeel_webhook::fixtures::first_pod;
use servicekeel_webhook::inject::SidecarMode;
use servicekeel_webhook::pod::PodFacts;
use servicekeel_webhook::shape::is_token_volume;

use crate::bench::caches::CacheMemory;
use crate::bench::webhook::{http1_client, review_fixture};
use crate::cluster::{NodeCluster, WEBHOOK_DEPLOYMENT};
use crate::images::Profile;
use crate::process::Lifetime;
use crate::webhook::{SYSTEM_NAMESPACE, is_injected, manifest_configuration, sidecar_mode};
use crate::{node, paths};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The webhook's name in the MutatingWebhookConfiguration of `manifests/`.
const WEBHOOK_NAME: &str = "sidecar-injector.servicekeel.io";

/// The cluster with a node, and a namespace of each kind.
pub struct PodBench {
    client: kube::Client,
    cluster: NodeCluster,
    dir: PathBuf,
    /// The pod of [`Kind::Prefilled`], its name, namespace and node selector set per create.
    prefilled: Pod,
    /// The webhook's replicas running once the cluster answered the dry run, by name.
    replicas: Vec<String>,
    /// The port they serve on (their container port `https`).
    port: u16,
    /// The benchmark's own exchange with the first of them.
    exchange: Exchange,
}

/// What the benchmark needs to make the apiserver's exchange with a webhook replica itself.
struct Exchange {
    /// HTTP/1.1 over TLS, trusting the webhook's CA, its Service's name resolved to the replica.
    client: reqwest::Client,
    url: String,
    /// The review fixture the reviews sent are made from.
    review: Vec<u8>,
}

impl std::fmt::Debug for PodBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodBench")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Which namespace a pod goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not labelled: the apiserver does not call the webhook.
    Plain,
    /// Labelled `servicekeel.io/inject=enabled`: the pod gets the sidecar, a native one (the
    /// webhook's default).
    Injected,
    /// Labelled, and the pod sent asks for the classic sidecar (`servicekeel.io/sidecar-mode:
    /// classic`): the sidecar is its first app container.
    InjectedClassic,
    /// Not labelled, and the pod sent is the one the webhook returned for [`Kind::Injected`]
    /// (sidecar, volumes, DNS settings, annotations): the larger pod without the call.
    Prefilled,
    /// The pod of [`Kind::Prefilled`] sent to the labelled namespace: the apiserver calls the
    /// webhook, which finds the pod injected already and allows it unchanged, with no patch.
    PrefilledCalled,
}

impl Kind {
    fn namespace(self) -> &'static str {
        match self {
            Kind::Plain => "bench-plain",
            Kind::Injected | Kind::InjectedClassic | Kind::PrefilledCalled => "bench-injected",
            Kind::Prefilled => "bench-prefilled",
        }
    }

    /// What the pod is, in the reports.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Plain => "plain, no call",
            Kind::Prefilled => "as the webhook leaves it, no call",
            Kind::PrefilledCalled => "as the webhook leaves it, called, no patch",
            Kind::Injected => "plain, called and injected",
            Kind::InjectedClassic => "plain asking for the classic sidecar, called and injected",
        }
    }

    /// How the pod stored carries the sidecar, if at all.
    fn sidecar(self) -> Option<SidecarMode> {
        match self {
            Kind::Plain => None,
            Kind::InjectedClassic => Some(SidecarMode::Classic),
            Kind::Injected | Kind::Prefilled | Kind::PrefilledCalled => Some(SidecarMode::Native),
        }
    }
}

/// An error unless `created`, the pod the apiserver stored for one of `kind`, has the sidecar
/// where that kind has it.
fn stored_as_asked(kind: Kind, created: &Pod) -> anyhow::Result<()> {
    let found = sidecar_mode(created);
    if found != kind.sidecar() {
        bail!(
            "{} in {}: the sidecar is {found:?}, not {:?} as for {kind:?}",
            created.metadata.name.as_deref().unwrap_or_default(),
            kind.namespace(),
            kind.sidecar()
        );
    }
    Ok(())
}

impl PodBench {
    /// Starts the cluster with a node (root, a few minutes the first time) and the namespaces;
    /// its images are release builds, as users run them.
    pub async fn start() -> anyhow::Result<PodBench> {
        let dir = paths::run_dir("servicekeel-bench-node");
        let cluster =
            NodeCluster::start_with(&dir, Lifetime::TiedToThisProcess, Profile::Release).await?;
        let client = cluster.client().await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for kind in [Kind::Plain, Kind::Injected, Kind::Prefilled] {
            let mut labels = serde_json::Map::new();
            if kind == Kind::Injected {
                labels.insert(
                    keys::NAMESPACE_INJECT_LABEL.into(),
                    keys::NAMESPACE_INJECT_ENABLED.into(),
                );
            }
            let namespace: Namespace = serde_json::from_value(json!({
                "metadata": {"name": kind.namespace(), "labels": labels},
            }))?;
            namespaces
                .create(&PostParams::default(), &namespace)
                .await
                .with_context(|| format!("cannot create namespace {}", kind.namespace()))?;
        }
        let prefilled = as_injected(&client).await?;
        let running = running_pods(&client, Workload::Deployment(WEBHOOK_DEPLOYMENT)).await?;
        let first = running.first().context("no webhook replica is running")?;
        let address: std::net::IpAddr = first
            .status
            .as_ref()
            .and_then(|status| status.pod_ip.as_deref())
            .context("the webhook replica has no address")?
            .parse()?;
        let port = named_container_port(first, "https", Protocol::Tcp)?;
        let exchange = Exchange::to(&client, (address, port).into()).await?;
        let replicas = running
            .into_iter()
            .filter_map(|pod| pod.metadata.name)
            .collect();
        Ok(PodBench {
            client,
            cluster,
            dir,
            prefilled,
            replicas,
            port,
            exchange,
        })
    }

    /// What the apiserver has measured so far of pods' create calls and their admission, by
    /// its own metrics.
    pub async fn apiserver_times(&self) -> anyhow::Result<ApiserverTimes> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = self.client.request_text(request).await?;
        // Not the dry run that made the ready-made pod.
        let creates = [
            ("verb", "POST"),
            ("resource", "pods"),
            ("subresource", ""),
            ("dry_run", ""),
        ];
        let admit_creates = [("type", "admit"), ("operation", "CREATE")];
        Ok(ApiserverTimes {
            handling: self.webhook_handling().await?,
            creates: Totals::of(&text, "apiserver_request_duration_seconds", &creates),
            creates_but_exchanges: Totals::of(
                &text,
                "apiserver_request_sli_duration_seconds",
                &creates,
            ),
            mutating: Totals::of(
                &text,
                "apiserver_admission_step_admission_duration_seconds",
                &admit_creates,
            ),
            webhook_plugin: Totals::of(
                &text,
                "apiserver_admission_controller_admission_duration_seconds",
                &[
                    ("name", "MutatingAdmissionWebhook"),
                    ("type", "admit"),
                    ("operation", "CREATE"),
                ],
            ),
            calls: Totals::of(
                &text,
                "apiserver_admission_webhook_admission_duration_seconds",
                &[("name", WEBHOOK_NAME), ("type", "admit")],
            ),
        })
    }

    /// The webhook's own handling of the reviews so far, summed over the replicas running when
    /// the bench started (`servicekeel_webhook_admission_duration_seconds`, through the
    /// apiserver's proxy to each pod): from a review's body received to the answer built. A
    /// replica gone since is an error, not a reading from its replacement starting at zero.
    pub async fn webhook_handling(&self) -> anyhow::Result<Totals> {
        let mut handling = Totals::default();
        let port = self.port;
        for replica in &self.replicas {
            let request = http::Request::get(format!(
                "/api/v1/namespaces/{SYSTEM_NAMESPACE}/pods/https:{replica}:{port}/proxy/metrics"
            ))
            .body(Vec::new())?;
            let text = self
                .client
                .request_text(request)
                .await
                .with_context(|| format!("the metrics of webhook replica {replica}"))?;
            handling += Totals::of(&text, "servicekeel_webhook_admission_duration_seconds", &[]);
        }
        Ok(handling)
    }

    /// The exchange the apiserver makes with the webhook, made by this process: `count` reviews
    /// sent one at a time to the first replica, at its address on the pod network, over one
    /// kept-alive HTTP/1.1 connection with TLS (a review sent first, not timed, opens it or
    /// finds it open), as the apiserver sends them. Each review is of a pod not seen before (the
    /// review fixture, renamed, numbered on from the rounds before `round`), so the webhook
    /// reads and injects each in full, as it does the apiserver's creates. How long each exchange took,
    /// from the request sent to the whole answer read; each answer must allow the pod with a
    /// patch.
    pub async fn direct_exchanges(
        &self,
        round: usize,
        count: usize,
    ) -> anyhow::Result<Vec<Duration>> {
        // Each round sends one review more than it times.
        let first = (round * (count + 1)) as u64;
        let Exchange {
            client,
            url,
            review,
        } = &self.exchange;
        let mut latencies = Vec::with_capacity(count);
        for n in 0..=count as u64 {
            let body = first_pod(review, first + n)
                .context("the review fixture is not of a pod importing services")?;
            let started = Instant::now();
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?
                .error_for_status()?;
            let answer = response.bytes().await?;
            let elapsed = started.elapsed();
            let answer: serde_json::Value = serde_json::from_slice(&answer)?;
            if answer["response"]["allowed"] != true || answer["response"]["patch"].is_null() {
                bail!("the webhook did not allow the review with a patch: {answer}");
            }
            // The first opened the connection.
            if n > 0 {
                latencies.push(elapsed);
            }
        }
        Ok(latencies)
    }

    /// What the webhook's replicas and the node's router keep of the cluster's pods, measured
    /// as [`CacheMemory::measure`] tells with `batch` pods of each kind.
    pub async fn cache_memory(&self, batch: usize) -> anyhow::Result<CacheMemory> {
        CacheMemory::measure(&self.client, batch).await
    }

    /// Stops the cluster, gives the host back and removes its files.
    pub fn finish(self) {
        let PodBench { cluster, dir, .. } = self;
        drop(cluster);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The pod measured; `runs: false` gives it a node selector no node has, so that it stays
    /// Pending: create calls are measured without a node starting pods underneath (on a small
    /// node a burst of starting pods starves the webhook's own pods past its 5 s timeout).
    fn pod(&self, kind: Kind, name: &str, runs: bool) -> anyhow::Result<Pod> {
        let mut pod = match kind {
            Kind::Prefilled | Kind::PrefilledCalled => self.prefilled.clone(),
            Kind::Plain | Kind::Injected | Kind::InjectedClassic => Self::sent()?,
        };
        if kind == Kind::InjectedClassic {
            pod.metadata.annotations.get_or_insert_default().insert(
                keys::SIDECAR_MODE.into(),
                SidecarMode::Classic.as_str().into(),
            );
        }
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some(kind.namespace().into());
        let spec = pod.spec.as_mut().context("a pod without a spec")?;
        spec.node_selector = (!runs).then(|| {
            [(
                "servicekeel.io/bench".to_string(),
                "no-such-node".to_string(),
            )]
            .into()
        });
        Ok(pod)
    }

    /// The pod as sent, before admission, without a name or namespace.
    fn sent() -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": {
                "annotations": {
                    keys::IMPORTED_SERVICES: r#"{"services":[{"name":"echo","ports":[{"port":7000}]}]}"#,
                },
            },
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532},
                "containers": [{
                    "name": "app",
                    "image": "servicekeel/demo:0.1.0",
                    "imagePullPolicy": "IfNotPresent",
                    "args": ["sleep"],
                }],
            },
        }))?)
    }

    /// CPU time (user and system) the apiserver has spent so far.
    pub fn apiserver_cpu(&self) -> anyhow::Result<Duration> {
        let apiserver = &self.cluster.control_plane.apiserver;
        let pid = apiserver.pid().context("the apiserver is not running")?;
        crate::bench::cpu_of(pid)
    }

    /// Creates `count` pods one at a time and returns how long each create call took
    /// (admission, the webhook where labelled, and storage), and the apiserver's CPU time over
    /// those calls; the pods stay Pending, and are deleted afterwards.
    pub async fn creates(
        &self,
        kind: Kind,
        count: usize,
    ) -> anyhow::Result<(Vec<Duration>, Duration)> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), kind.namespace());
        let mut latencies = Vec::with_capacity(count);
        let mut names = Vec::with_capacity(count);
        let cpu_before = self.apiserver_cpu()?;
        for index in 0..count {
            let name = format!("create-{}-{index}", unique());
            let pod = self.pod(kind, &name, false)?;
            let started = Instant::now();
            let created = pods.create(&PostParams::default(), &pod).await?;
            latencies.push(started.elapsed());
            stored_as_asked(kind, &created)?;
            names.push(name);
        }
        let cpu = self.apiserver_cpu()?.saturating_sub(cpu_before);
        for name in names {
            let _ = pods
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
        }
        Ok((latencies, cpu))
    }

    /// Creates `count` pods one at a time and returns how long each took from the create call
    /// until the pod was Ready on the node; deletes each. Each must have the sidecar where its
    /// kind has it.
    pub async fn to_ready(&self, kind: Kind, count: usize) -> anyhow::Result<Vec<Duration>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), kind.namespace());
        let mut latencies = Vec::with_capacity(count);
        for index in 0..count {
            let name = format!("ready-{}-{index}", unique());
            let pod = self.pod(kind, &name, true)?;
            let started = Instant::now();
            let created = pods.create(&PostParams::default(), &pod).await?;
            stored_as_asked(kind, &created)?;
            loop {
                if node::pod_ready(&pods.get(&name).await?) {
                    break;
                }
                if started.elapsed() > READY_TIMEOUT {
                    bail!("{name} was not Ready within {READY_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            latencies.push(started.elapsed());
            let _ = pods
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
        }
        Ok(latencies)
    }
}

/// A workload of ServiceKeel's, in its namespace, by name.
#[derive(Debug, Clone, Copy)]
pub enum Workload {
    Deployment(&'static str),
    DaemonSet(&'static str),
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Deployment(name) => write!(f, "Deployment {SYSTEM_NAMESPACE}/{name}"),
            Workload::DaemonSet(name) => write!(f, "DaemonSet {SYSTEM_NAMESPACE}/{name}"),
        }
    }
}

/// The running pods of `workload` (those its selector's labels select), none of them an error.
pub async fn running_pods(client: &kube::Client, workload: Workload) -> anyhow::Result<Vec<Pod>> {
    let selector = match workload {
        Workload::Deployment(name) => get::<Deployment>(client, name)
            .await
            .map(|deployment| deployment.spec.map(|spec| spec.selector)),
        Workload::DaemonSet(name) => get::<DaemonSet>(client, name)
            .await
            .map(|daemon_set| daemon_set.spec.map(|spec| spec.selector)),
    };
    let labels = selector
        .with_context(|| format!("cannot read {workload}"))?
        .and_then(|selector| selector.match_labels)
        .with_context(|| format!("{workload} selects by no labels"))?;
    let selector = labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let listed = pods.list(&ListParams::default().labels(&selector)).await?;
    let running: Vec<Pod> = listed
        .items
        .into_iter()
        .filter(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect();
    if running.is_empty() {
        bail!("no pod of {workload} is running");
    }
    Ok(running)
}

/// The object of kind `K` called `name` in ServiceKeel's namespace.
async fn get<K>(client: &kube::Client, name: &str) -> kube::Result<K>
where
    K: kube::Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .get(name)
        .await
}

/// The number of `pod`'s container port named `name`, of `protocol`.
fn named_container_port(pod: &Pod, name: &str, protocol: Protocol) -> anyhow::Result<u16> {
    let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
    named_port(&PodFacts::from(pod), name, protocol)
        .with_context(|| format!("pod {pod_name} has no {protocol} port named {name}"))
}

impl Exchange {
    /// The exchange with the replica at `address`, as the webhook configuration of
    /// `manifests/` calls it (its Service's name and path), trusting the CA the installed
    /// configuration carries.
    async fn to(client: &kube::Client, address: std::net::SocketAddr) -> anyhow::Result<Exchange> {
        let manifest = manifest_configuration()?;
        let name = manifest["metadata"]["name"]
            .as_str()
            .context("the webhook configuration has no name")?;
        let service = &manifest["webhooks"][0]["clientConfig"]["service"];
        let field = |key: &str| {
            service[key]
                .as_str()
                .with_context(|| format!("the webhook configuration's service has no {key}"))
        };
        let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let configuration = configurations.get(name).await?;
        let ca_bundle = configuration
            .webhooks
            .iter()
            .flatten()
            .find_map(|webhook| webhook.client_config.ca_bundle.clone())
            .context("the webhook configuration has no caBundle yet")?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(&ca_bundle.0) {
            roots.add(certificate?)?;
        }
        // The Service's name, which the serving certificate carries, resolved to the replica
        // as the apiserver resolves the Service to an endpoint.
        let host = format!("{}.{}.svc", field("name")?, field("namespace")?);
        let client = http1_client(roots, |builder| {
            builder.resolve(&host, address).pool_max_idle_per_host(1)
        })?;
        Ok(Exchange {
            client,
            url: format!("https://{host}:{}{}", address.port(), field("path")?),
            review: review_fixture()?,
        })
    }
}

/// The pod of [`Kind::Injected`] as the webhook leaves it, for [`Kind::Prefilled`]: created with
/// a dry run in the labelled namespace (the webhook declares no side effects), and what the
/// webhook changed taken from it into the pod as sent: the annotations, the containers it added,
/// the volumes, the DNS settings and the pod's security context. Fields the apiserver fills in
/// (defaults, the service account's token volume and its mounts, tolerations) are left for it
/// to fill in again, as it does for the others; those of the added containers stay.
async fn as_injected(client: &kube::Client) -> anyhow::Result<Pod> {
    let injected: Api<Pod> = Api::namespaced(client.clone(), Kind::Injected.namespace());
    let mut sent = PodBench::sent()?;
    sent.metadata.name = Some("dry-run".into());
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let stored = injected
        .create(&dry_run, &sent)
        .await
        .context("cannot dry-run a pod in the labelled namespace")?;
    if !is_injected(&stored) {
        bail!(
            "the dry run in {} was not injected",
            Kind::Injected.namespace()
        );
    }
    let stored_spec = stored.spec.context("the dry run returned no spec")?;
    let mut pod = PodBench::sent()?;
    pod.metadata.annotations = stored.metadata.annotations;
    let spec = pod.spec.as_mut().context("a pod without a spec")?;
    let without_token = |mut container: Container| {
        if let Some(mounts) = container.volume_mounts.as_mut() {
            mounts.retain(|mount| !is_token_volume(&mount.name));
        }
        container
    };
    let sent_names: Vec<String> = spec.containers.iter().map(|c| c.name.clone()).collect();
    spec.containers.extend(
        stored_spec
            .containers
            .into_iter()
            .filter(|c| !sent_names.contains(&c.name))
            .map(without_token),
    );
    spec.init_containers = stored_spec
        .init_containers
        .map(|added| added.into_iter().map(without_token).collect());
    spec.volumes = stored_spec.volumes.map(|volumes| {
        volumes
            .into_iter()
            .filter(|volume| !is_token_volume(&volume.name))
            .collect()
    });
    spec.dns_config = stored_spec.dns_config;
    spec.dns_policy = stored_spec.dns_policy;
    spec.security_context = stored_spec.security_context;
    Ok(pod)
}

/// A count of observations and their total, from a histogram of the apiserver's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub count: u64,
    pub seconds: f64,
}

impl Totals {
    /// The sum of `metric`'s series, in the Prometheus text `text`, whose labels include each
    /// of `labels` with its value (a missing label counts as empty, as Prometheus reads it).
    pub fn of(text: &str, metric: &str, labels: &[(&str, &str)]) -> Totals {
        let mut totals = Totals::default();
        for line in text.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, series_labels) = series.split_once('{').unwrap_or((series, "}"));
            let series_labels = series_labels.strip_suffix('}').unwrap_or(series_labels);
            let label = |key: &str| {
                series_labels
                    .split("\",")
                    .filter_map(|pair| pair.split_once("=\""))
                    .find(|(k, _)| *k == key)
                    .map_or("", |(_, v)| v.trim_end_matches('"'))
            };
            if !labels.iter().all(|(key, wanted)| label(key) == *wanted) {
                continue;
            }
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            match name.strip_prefix(metric) {
                Some("_count") => totals.count += value as u64,
                Some("_sum") => totals.seconds += value,
                _ => {}
            }
        }
        totals
    }

    /// Mean milliseconds per `per` (the pods of a batch, say).
    pub fn ms_per(self, per: u64) -> f64 {
        self.seconds * 1e3 / per.max(1) as f64
    }
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, more: Totals) {
        self.count += more.count;
        self.seconds += more.seconds;
    }
}

impl std::ops::Sub for Totals {
    type Output = Totals;
    fn sub(self, earlier: Totals) -> Totals {
        Totals {
            count: self.count.saturating_sub(earlier.count),
            seconds: self.seconds - earlier.seconds,
        }
    }
}

/// The apiserver's own measures of what a pod's create call goes through, each nested in the
/// one before it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ApiserverTimes {
    /// Create calls for pods, whole (`apiserver_request_duration_seconds`, POST to pods).
    pub creates: Totals,
    /// The same less their HTTPS exchanges with mutating webhooks
    /// (`apiserver_request_sli_duration_seconds`), so the exchanges alone are the difference.
    pub creates_but_exchanges: Totals,
    /// The mutating admission step of every create call, of any resource
    /// (`apiserver_admission_step_admission_duration_seconds`, admit, CREATE).
    pub mutating: Totals,
    /// The mutating webhook plugin in it: matching each webhook's rules and conditions,
    /// converting the object, and the calls
    /// (`apiserver_admission_controller_admission_duration_seconds`, MutatingAdmissionWebhook).
    pub webhook_plugin: Totals,
    /// The webhook's own handling of the reviews, summed over its replicas: from a review's
    /// body received to the answer built (`servicekeel_webhook_admission_duration_seconds`).
    pub handling: Totals,
    /// Its calls to our webhook: encoding the review, the HTTPS exchange, applying the patch,
    /// if any, and decoding the patched pod (`apiserver_admission_webhook_admission_duration_seconds`).
    pub calls: Totals,
}

impl ApiserverTimes {
    /// The HTTPS exchanges with mutating webhooks: the whole calls less what they took without
    /// them. The two are separate timers of each call, so for calls without an exchange their
    /// difference is a few microseconds either way; an exchange takes no time below zero.
    pub fn exchanges(&self) -> Totals {
        let difference = self.creates - self.creates_but_exchanges;
        Totals {
            seconds: difference.seconds.max(0.0),
            ..difference
        }
    }

    /// Each measure of `self` and `other` put together by `f`.
    fn each(self, other: ApiserverTimes, f: impl Fn(Totals, Totals) -> Totals) -> ApiserverTimes {
        ApiserverTimes {
            creates: f(self.creates, other.creates),
            creates_but_exchanges: f(self.creates_but_exchanges, other.creates_but_exchanges),
            mutating: f(self.mutating, other.mutating),
            webhook_plugin: f(self.webhook_plugin, other.webhook_plugin),
            calls: f(self.calls, other.calls),
            handling: f(self.handling, other.handling),
        }
    }
}

impl std::ops::Sub for ApiserverTimes {
    type Output = ApiserverTimes;
    fn sub(self, earlier: ApiserverTimes) -> ApiserverTimes {
        self.each(earlier, |later, earlier| later - earlier)
    }
}

impl std::ops::AddAssign for ApiserverTimes {
    fn add_assign(&mut self, more: ApiserverTimes) {
        *self = self.each(more, |mut sum, more| {
            sum += more;
            sum
        });
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(name: &str, init: &[&str], app: &[&str]) -> Pod {
        let containers = |names: &[&str]| -> Vec<serde_json::Value> {
            names
                .iter()
                .map(|name| json!({"name": name, "image": "i"}))
                .collect()
        };
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"initContainers": containers(init), "containers": containers(app)},
        }))
        .expect("a pod")
    }

    /// The sidecar is found where the webhook puts it for each mode, and a pod stored with it
    /// elsewhere than its kind asks, or without it, is an error naming the pod.
    #[test]
    fn each_kind_is_checked_for_the_sidecar_where_it_asks_for_it() {
        let sidecar = servicekeel_api::defaults::SIDECAR_CONTAINER;
        let native = stored("n", &[sidecar], &["app"]);
        let classic = stored("c", &[], &[sidecar, "app"]);
        let plain = stored("p", &["setup"], &["app"]);
        assert_eq!(sidecar_mode(&native), Some(SidecarMode::Native));
        assert_eq!(sidecar_mode(&classic), Some(SidecarMode::Classic));
        assert_eq!(sidecar_mode(&plain), None);
        assert!(stored_as_asked(Kind::Injected, &native).is_ok());
        assert!(stored_as_asked(Kind::PrefilledCalled, &native).is_ok());
        assert!(stored_as_asked(Kind::InjectedClassic, &classic).is_ok());
        assert!(stored_as_asked(Kind::Plain, &plain).is_ok());
        let error =
            stored_as_asked(Kind::InjectedClassic, &native).expect_err("native for classic");
        assert!(error.to_string().contains("n in bench-injected"), "{error}");
        assert!(stored_as_asked(Kind::Injected, &plain).is_err());
        assert!(stored_as_asked(Kind::Plain, &classic).is_err());
    }

    /// A pod's port is its container port of that name, whatever its other ports.
    #[test]
    fn a_container_port_is_found_by_its_name() {
        let pod = |ports: serde_json::Value| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "w"},
                "spec": {"containers": [{"name": "webhook", "image": "i", "ports": ports}]},
            }))
            .expect("a pod")
        };
        let served = pod(json!([
            {"name": "metrics", "containerPort": 9090},
            {"name": "https", "containerPort": 8443},
        ]));
        let https = |pod: &Pod| named_container_port(pod, "https", Protocol::Tcp);
        assert_eq!(https(&served).expect("a port"), 8443);
        assert_eq!(
            named_container_port(&served, "metrics", Protocol::Tcp).expect("a port"),
            9090
        );
        assert!(named_container_port(&served, "https", Protocol::Udp).is_err());
        let unnamed = pod(json!([{"containerPort": 8443}]));
        let error = https(&unnamed).expect_err("no port named https");
        assert!(
            error.to_string().contains("no TCP port named https"),
            "{error}"
        );
    }

    /// A metric's series are summed where every wanted label has its value (a label a series
    /// lacks, or a series without labels, counting as empty), its other series and other
    /// metrics with the same prefix left out.
    #[test]
    fn totals_sum_the_series_with_the_labels_asked_for() {
        let text = r#"# HELP apiserver_request_duration_seconds [STABLE] Response latency
# TYPE apiserver_request_duration_seconds histogram
apiserver_request_duration_seconds_bucket{component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1",le="0.005"} 3
apiserver_request_duration_seconds_sum{component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 0.25
apiserver_request_duration_seconds_count{component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 40
apiserver_request_duration_seconds_sum{component="apiserver",dry_run="All",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 0.5
apiserver_request_duration_seconds_count{component="apiserver",dry_run="All",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 2
apiserver_request_duration_seconds_sum{component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="binding",verb="POST",version="v1"} 9
apiserver_request_duration_seconds_count{component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="binding",verb="POST",version="v1"} 9
apiserver_request_duration_seconds_sum{component="apiserver",dry_run="",group="",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 7
apiserver_request_duration_seconds_count{component="apiserver",dry_run="",group="",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 7
apiserver_request_duration_seconds_sum{component="apiserver",resource="pods",verb="POST"} 0.125
apiserver_request_duration_seconds_count{component="apiserver",resource="pods",verb="POST"} 1
apiserver_request_duration_seconds_total_sum{resource="pods",subresource="",verb="POST"} 100
apiserver_request_sli_duration_seconds_sum{resource="pods",subresource="",verb="POST"} 100
apiserver_request_duration_seconds_sum 0.5
apiserver_request_duration_seconds_count 4
# EOF
"#;
        let creates = [("verb", "POST"), ("resource", "pods"), ("subresource", "")];
        let totals = Totals::of(text, "apiserver_request_duration_seconds", &creates);
        assert_eq!(
            totals,
            Totals {
                count: 43,
                seconds: 0.875
            }
        );
        assert_eq!(totals.ms_per(7), 125.0);
        let dry_runs = Totals::of(
            text,
            "apiserver_request_duration_seconds",
            &[("dry_run", "All")],
        );
        assert_eq!(
            dry_runs,
            Totals {
                count: 2,
                seconds: 0.5
            }
        );
        let none = Totals::of(
            text,
            "apiserver_request_duration_seconds",
            &[("verb", "GET")],
        );
        assert_eq!(none, Totals::default());
        assert_eq!(none.ms_per(0), 0.0);
    }

    /// A batch's measures are what its later reading adds to its earlier one, and batches of a
    /// kind add up.
    #[test]
    fn apiserver_times_subtract_and_add_measure_by_measure() {
        let at = |count, seconds| Totals { count, seconds };
        let earlier = ApiserverTimes {
            creates: at(10, 1.0),
            creates_but_exchanges: at(10, 0.5),
            mutating: at(12, 0.25),
            webhook_plugin: at(12, 0.125),
            calls: at(5, 0.0625),
            handling: at(5, 0.0078125),
        };
        let later = ApiserverTimes {
            creates: at(30, 4.0),
            creates_but_exchanges: at(30, 2.0),
            mutating: at(40, 1.0),
            webhook_plugin: at(40, 0.5),
            calls: at(25, 0.25),
            handling: at(25, 0.03125),
        };
        let batch = later - earlier;
        assert_eq!(
            batch,
            ApiserverTimes {
                creates: at(20, 3.0),
                creates_but_exchanges: at(20, 1.5),
                mutating: at(28, 0.75),
                webhook_plugin: at(28, 0.375),
                calls: at(20, 0.1875),
                handling: at(20, 0.0234375),
            }
        );
        let mut sum = earlier;
        sum += batch;
        assert_eq!(sum, later);
    }

    /// The exchanges are the whole calls less the calls without them; where the two timers
    /// disagree the other way, by a hair, there were none.
    #[test]
    fn exchanges_are_what_the_calls_took_beyond_the_calls_without_them() {
        let at = |count, seconds| Totals { count, seconds };
        let times = |creates, but| ApiserverTimes {
            creates: at(20, creates),
            creates_but_exchanges: at(20, but),
            ..ApiserverTimes::default()
        };
        assert_eq!(times(0.125, 0.0625).exchanges(), at(0, 0.0625));
        let none = times(0.0625, 0.0625 + 1e-6).exchanges();
        assert_eq!(none, at(0, 0.0));
        assert_eq!(format!("{:.2}", none.ms_per(20)), "0.00");
    }
}
