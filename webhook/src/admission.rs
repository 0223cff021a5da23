//! From AdmissionReview bytes to the AdmissionReview answer, as a plain function: decode, check
//! it is a pod creation, call [`inject`], encode the outcome. A body that is not a valid
//! `admission.k8s.io/v1` AdmissionReview is an error (the server answers 400); everything else
//! gets an answer.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::Config;
use crate::inject::{InjectError, Injection, JsonPatch, inject};
use crate::metrics::Outcome;
use crate::pod::PodFacts;
use crate::recent::Recent;
use crate::shape::{Fit, Shape, span_in};
use crate::view::{ClusterView, Found};

const API_VERSION: &str = "admission.k8s.io/v1";
const KIND: &str = "AdmissionReview";

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("body is not a JSON AdmissionReview: {0}")]
    Decode(serde_json::Error),
    #[error("AdmissionReview has apiVersion {0:?} and kind {1:?}; expected {API_VERSION} {KIND}")]
    Version(String, String),
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("request.object is not a valid Pod: {0}")]
    NotAPod(serde_json::Error),
}

/// The answer to one review, in the `admission.k8s.io/v1` shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    api_version: &'static str,
    kind: &'static str,
    pub response: Response,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<Base64Patch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A JSON Patch as the answer carries it: its JSON in base64. Made only from patch bytes, so
/// the text is base64's alphabet and never needs escaping in JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base64Patch(Arc<str>);

impl Base64Patch {
    pub fn of(json: &[u8]) -> Self {
        Base64Patch(BASE64.encode(json).into())
    }

    /// The patch's JSON.
    #[cfg(test)]
    fn decode(&self) -> Vec<u8> {
        BASE64
            .decode(self.0.as_bytes())
            .expect("made from bytes, so valid base64")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for Base64Patch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl Answer {
    /// The answer as JSON: what its `Serialize` writes, written here directly. The patch's
    /// base64 needs no escaping, and `serde_json` looking at each of its characters for one was
    /// the largest part of encoding a patched answer.
    pub fn to_json(&self) -> Vec<u8> {
        let r = &self.response;
        let patch_len = r.patch.as_ref().map_or(0, |p| p.as_str().len());
        let mut out = Vec::with_capacity(256 + patch_len);
        out.extend_from_slice(b"{");
        member(&mut out, "apiVersion", &self.api_version);
        out.push(b',');
        member(&mut out, "kind", &self.kind);
        out.extend_from_slice(br#","response":{"#);
        member(&mut out, "uid", &r.uid);
        out.push(b',');
        member(&mut out, "allowed", &r.allowed);
        if let Some(status) = &r.status {
            out.push(b',');
            member(&mut out, "status", status);
        }
        if let Some(patch) = &r.patch {
            out.extend_from_slice(br#","patch":""#);
            out.extend_from_slice(patch.as_str().as_bytes());
            out.push(b'"');
        }
        if let Some(patch_type) = &r.patch_type {
            out.push(b',');
            member(&mut out, "patchType", patch_type);
        }
        if !r.warnings.is_empty() {
            out.push(b',');
            member(&mut out, "warnings", &r.warnings);
        }
        out.extend_from_slice(b"}}");
        out
    }
}

/// `"name":value` into `out`.
fn member(out: &mut Vec<u8>, name: &str, value: &impl Serialize) {
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    serde_json::to_writer(&mut *out, value).expect("strings, numbers and flags always encode");
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub status: &'static str,
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Debug)]
pub struct Reviewed {
    pub answer: Answer,
    pub outcome: Outcome,
    /// Answered from a remembered review, as a replica's of it, nothing decoded.
    pub remembered: bool,
}

impl Reviewed {
    fn new(uid: &str, outcome: Outcome) -> Self {
        Reviewed {
            answer: Answer {
                api_version: API_VERSION,
                kind: KIND,
                response: Response {
                    uid: uid.to_string(),
                    allowed: true,
                    status: None,
                    patch: None,
                    patch_type: None,
                    warnings: Vec::new(),
                },
            },
            outcome,
            remembered: false,
        }
    }
}

/// The parts of an AdmissionReview a review reads, its text borrowed from the body where it
/// has no escapes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Incoming<'a> {
    #[serde(borrow)]
    api_version: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    request: Option<Request<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request<'a> {
    #[serde(borrow)]
    uid: Cow<'a, str>,
    #[serde(borrow)]
    kind: Kind<'a>,
    #[serde(borrow)]
    operation: Cow<'a, str>,
    sub_resource: Option<String>,
    namespace: Option<String>,
    #[serde(borrow)]
    object: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(borrow, default)]
    group: Cow<'a, str>,
    #[serde(borrow)]
    version: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
}

impl<'a> Incoming<'a> {
    fn request(self) -> Result<Request<'a>, ReviewError> {
        if self.api_version != API_VERSION || self.kind != KIND {
            return Err(ReviewError::Version(
                self.api_version.into_owned(),
                self.kind.into_owned(),
            ));
        }
        self.request.ok_or(ReviewError::NoRequest)
    }
}

pub fn review(
    body: &[u8],
    config: &Config,
    view: &dyn ClusterView,
) -> Result<Reviewed, ReviewError> {
    // A replica's review is a recent one's text with another uid and token volume: nothing in
    // it is read again, once another token volume's name is known to leave the pod the same.
    let known = match known_review(body) {
        Some((Fit::Same(uid), known)) => {
            let mut reviewed = created(uid, known.namespace.as_deref(), &known.pod, config, view);
            reviewed.remembered = true;
            return Ok(reviewed);
        }
        other => other,
    };
    // The object is read as its text first: a pod is decoded only when it is one being
    // created.
    let request = serde_json::from_slice::<Incoming>(body)
        .map_err(ReviewError::Decode)?
        .request()?;
    let uid = span_in(body, request.uid.as_bytes());
    let namespace: Option<Arc<str>> = request.namespace.as_deref().map(Into::into);
    answer(
        request,
        |object| {
            let pod = decoded(object)?;
            match known {
                Some((Fit::Check(renaming), remembered)) => renaming.learn(&remembered.pod, &pod),
                // Its other token volume's name is known to change the pod (`Read`; `Same` was
                // answered above): read in full, its shape remembered already.
                Some(_) => {}
                None => {
                    if let (Some(uid), Some(object)) = (uid, span_in(body, object.get().as_bytes()))
                    {
                        REVIEWS.remember(
                            Shape::of(body, uid, object, &pod),
                            Created {
                                namespace,
                                pod: pod.clone(),
                            },
                            |a, b| a == b,
                        );
                    }
                }
            }
            Ok(pod)
        },
        config,
        view,
    )
}

/// The answer to `request`, its object decoded by `decode` when it is a pod being created.
fn answer<'a>(
    request: Request<'a>,
    decode: impl FnOnce(&'a RawValue) -> Result<Arc<PodFacts>, ReviewError>,
    config: &Config,
    view: &dyn ClusterView,
) -> Result<Reviewed, ReviewError> {
    if !is_pod(&request.kind) {
        return Ok(ignored(&request));
    }
    let object = match (request.object, &*request.operation, &request.sub_resource) {
        (Some(object), "CREATE", None) => object,
        _ => return Ok(Reviewed::new(&request.uid, Outcome::Ignored)),
    };
    let pod = decode(object)?;
    Ok(created(
        &request.uid,
        request.namespace.as_deref(),
        &pod,
        config,
        view,
    ))
}

/// The answer to the review `uid` of `pod` being created, in the review's `namespace` if it
/// names one.
fn created(
    uid: &str,
    namespace: Option<&str>,
    pod: &Arc<PodFacts>,
    config: &Config,
    view: &dyn ClusterView,
) -> Reviewed {
    let metadata = pod.metadata.as_ref();
    let namespace = namespace
        .or(metadata.and_then(|m| m.namespace.as_deref()))
        .unwrap_or("default");
    let name = metadata
        .and_then(|m| m.name.as_deref().or(m.generate_name.as_deref()))
        .unwrap_or_default();

    let (found, mut warnings) = Found::look(pod, namespace, config, view);
    match made(pod, namespace, &found, config) {
        Ok(Injection::Skip(reason)) => {
            tracing::debug!(ns = namespace, name, reason = reason.as_str(), "skipped");
            Reviewed::new(uid, Outcome::Skipped)
        }
        Ok(Injection::Patch {
            patch,
            warnings: inject_warnings,
        }) => {
            tracing::debug!(ns = namespace, name, "injected");
            let mut reviewed = Reviewed::new(uid, Outcome::Patched);
            let response = &mut reviewed.answer.response;
            response.patch = Some(patch);
            response.patch_type = Some("JSONPatch");
            warnings.extend(inject_warnings);
            response.warnings = warnings;
            reviewed
        }
        Err(error) => {
            tracing::info!(ns = namespace, name, %error, "denied");
            let mut reviewed = Reviewed::new(uid, Outcome::Denied);
            let response = &mut reviewed.answer.response;
            response.allowed = false;
            // Kubernetes' own code for a refused, invalid object.
            response.status = Some(Status {
                status: "Failure",
                code: 422,
                reason: "Invalid",
                message: error.to_string(),
            });
            reviewed
        }
    }
}

/// What the answer to a remembered review needs besides its uid.
#[derive(Clone)]
struct Created {
    namespace: Option<Arc<str>>,
    pod: Arc<PodFacts>,
}

/// Reviews of pods being created, recently decoded, by their [`Shape`]: the reviews of a
/// controller's replicas created within the same second have one.
static REVIEWS: Recent<Shape, Created> = Recent::new(8);

/// A remembered review that `body` is a replica's of, and how it fits.
fn known_review(body: &[u8]) -> Option<(Fit<'_>, Created)> {
    REVIEWS.find_map(|shape, created| Some((shape.fit(body)?, created.clone())))
}

/// The pod `object` holds.
fn decoded(object: &RawValue) -> Result<Arc<PodFacts>, ReviewError> {
    serde_json::from_str(object.get())
        .map(Arc::new)
        .map_err(ReviewError::NotAPod)
}

/// [`inject`] and the patch's encoding, remembered by everything injection reads for the last
/// pods reviewed: a workload's replicas answered as a remembered review are its pod, in the
/// same namespace with the same Services, so a scale-up injects once.
/// A pod that differs in anything injection reads, or whose view changed (a Service added, a
/// namespace default edited), is injected anew. Refusals are not remembered.
fn made(
    pod: &Arc<PodFacts>,
    namespace: &str,
    found: &Found,
    config: &Config,
) -> Result<Injection<Base64Patch>, InjectError> {
    type Key = (Arc<PodFacts>, String, Found, Config);
    static RECENT: Recent<Key, Injection<Base64Patch>> = Recent::new(8);
    let same_pod = |p: &Arc<PodFacts>| Arc::ptr_eq(p, pod) || p == pod;
    RECENT.get_or_try(
        |(p, ns, f, c)| ns == namespace && same_pod(p) && f == found && c == config,
        || {
            (
                pod.clone(),
                namespace.to_string(),
                found.clone(),
                config.clone(),
            )
        },
        || inject(pod, &found.target(namespace), config).map(|made| made.map_patch(encoded)),
    )
}

/// The patch for the answer, remembered for the last patches made: pods that differ only in
/// what the patch does not carry (the pods of a StatefulSet, each with its own name) get the
/// same one, so its JSON and base64 are written once for all of them.
fn encoded(patch: JsonPatch) -> Base64Patch {
    static RECENT: Recent<JsonPatch, Base64Patch> = Recent::new(8);
    RECENT.get_or_owned(patch, JsonPatch::encodes_as, |patch| {
        Base64Patch::of(&patch.to_vec())
    })
}

fn ignored(request: &Request<'_>) -> Reviewed {
    tracing::warn!(kind = %request.kind.kind, "not a pod; allowed unchanged (check the webhook's rules)");
    Reviewed::new(&request.uid, Outcome::Ignored)
}

fn is_pod(kind: &Kind<'_>) -> bool {
    kind.group.is_empty() && kind.version == "v1" && kind.kind == "Pod"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// What `to_json` writes decodes to what the derived `Serialize` gives, for every shape
    /// of answer, with text that needs escaping.
    #[test]
    fn written_answers_match_the_serialized_ones() {
        let plain = Reviewed::new("uid-1", Outcome::Ignored).answer;
        let mut patched = Reviewed::new("a\"b\\c\u{1}é", Outcome::Patched).answer;
        let patch = br#"[{"op":"add","path":"/a","value":"\"x\""}]"#;
        patched.response.patch_type = Some("JSONPatch");
        patched.response.warnings = vec!["one \"quoted\"".into(), "two\nlines".into()];
        let mut denied = Reviewed::new("uid-3", Outcome::Denied).answer;
        denied.response.allowed = false;
        denied.response.status = Some(Status {
            status: "Failure",
            code: 422,
            reason: "Invalid",
            message: "metadata.annotations[x]: \"y\"\tmust be\n\u{7f}".into(),
        });
        patched.response.patch = Some(Base64Patch::of(patch));
        for answer in [plain, denied, patched] {
            let written: Value = serde_json::from_slice(&answer.to_json()).expect("valid JSON");
            assert_eq!(written, serde_json::to_value(&answer).unwrap());
        }
    }

    /// The patch of `body`'s review, as JSON.
    fn patch_of(body: &[u8]) -> Value {
        let reviewed = review(body, &Config::default(), &crate::view::NoCluster).unwrap();
        let patch = reviewed.answer.response.patch.expect("a patch");
        serde_json::from_slice(&patch.decode()).unwrap()
    }

    /// Patches are remembered, but each pod gets its own: a pod that differs only in an
    /// annotation, reviewed between two replicas, gets a patch with its annotation.
    #[test]
    fn a_remembered_patch_goes_only_to_pods_it_was_made_for() {
        let body = include_bytes!("../tests/fixtures/review-create-pod.json");
        let mut other: Value = serde_json::from_slice(body).unwrap();
        other["request"]["object"]["metadata"]["annotations"]["servicekeel.io/imported-services"] =
            "services: [{name: ledger, ports: [{port: 7000}]}]".into();
        let other = serde_json::to_vec(&other).unwrap();
        let imported = |patch: &Value| {
            patch
                .as_array()
                .unwrap()
                .iter()
                .find(|op| op["path"] == "/metadata/annotations/servicekeel.io~1imported-services")
                .map(|op| op["value"].as_str().unwrap().to_string())
                .unwrap()
        };
        let first = patch_of(body);
        let second = patch_of(&other);
        assert!(imported(&first).contains("payments"), "{first}");
        assert!(imported(&second).contains("ledger"), "{second}");
        assert!(!imported(&second).contains("payments"), "{second}");
        assert_eq!(patch_of(body), first);
        assert_eq!(patch_of(&other), second);
    }

    /// A view whose Services and namespace default can change between reviews.
    #[derive(Debug, Default)]
    struct Changing {
        services: std::sync::Mutex<Vec<Arc<k8s_openapi::api::core::v1::Service>>>,
        default: std::sync::Mutex<Option<String>>,
    }

    impl ClusterView for Changing {
        fn namespace_defaults(
            &self,
            namespace: &str,
        ) -> Result<Option<servicekeel_api::ServiceList>, String> {
            let text = self.default.lock().unwrap().clone();
            text.map(|text| crate::view::parse_namespace_defaults(namespace, &text))
                .transpose()
        }

        fn services(
            &self,
            _namespace: &str,
        ) -> Option<Vec<Arc<k8s_openapi::api::core::v1::Service>>> {
            Some(self.services.lock().unwrap().clone())
        }

        fn forbids_host_path(&self, _namespace: &str) -> bool {
            false
        }
    }

    /// The same replica reviewed again after its view changed gets a patch for the new view,
    /// not the one remembered for the old; the view's warnings come with every answer,
    /// remembered or not.
    #[test]
    fn a_remembered_injection_follows_the_view() {
        let body = include_bytes!("../tests/fixtures/review-create-pod.json");
        let config = Config::default();
        let view = Changing::default();
        let reviewed = |view: &Changing| {
            let answer = review(body, &config, view).unwrap().answer.response;
            let patch: Value =
                serde_json::from_slice(&answer.patch.expect("a patch").decode()).unwrap();
            let exported = patch
                .as_array()
                .unwrap()
                .iter()
                .find(|op| op["path"] == "/metadata/annotations/servicekeel.io~1exported-services")
                .map(|op| op["value"].as_str().unwrap().to_string());
            (exported, answer.warnings)
        };
        let (none, warnings) = reviewed(&view);
        assert_eq!(none, None, "no Service selects the pod");
        assert!(warnings.is_empty(), "{warnings:?}");

        let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "checkout", "namespace": "shop"},
            "spec": {"selector": {"app": "checkout"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap();
        view.services.lock().unwrap().push(Arc::new(service));
        for _ in 0..2 {
            let (exported, _) = reviewed(&view);
            assert!(
                exported.as_deref().is_some_and(|e| e.contains("checkout")),
                "{exported:?}"
            );
        }

        *view.default.lock().unwrap() = Some("services: [{name: }]".into());
        for _ in 0..2 {
            let (_, warnings) = reviewed(&view);
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(warnings[0].contains("namespace shop"), "{warnings:?}");
        }
        view.services.lock().unwrap().clear();
        assert_eq!(reviewed(&view).0, None, "the Service is gone");
    }

    /// The fixture, reviewed once so that it is remembered, and the spans of its uid's text and
    /// of its object.
    struct Remembered {
        body: &'static [u8],
        uid: std::ops::Range<usize>,
        object: std::ops::Range<usize>,
    }

    fn remembered() -> Remembered {
        let body: &'static [u8] = include_bytes!("../tests/fixtures/review-create-pod.json");
        review(body, &Config::default(), &crate::view::NoCluster).unwrap();
        let request = serde_json::from_slice::<Incoming>(body)
            .unwrap()
            .request
            .unwrap();
        let uid = span_in(body, request.uid.as_bytes()).expect("a plain uid");
        let object = span_in(body, request.object.unwrap().get().as_bytes()).unwrap();
        Remembered { body, uid, object }
    }

    /// `body` with `insert` put at `at`.
    fn with_inserted(body: &[u8], at: usize, insert: &str) -> Vec<u8> {
        [&body[..at], insert.as_bytes(), &body[at..]].concat()
    }

    /// A remembered review's object under another key is not that review: the review's own
    /// object is read.
    #[test]
    fn a_remembered_reviews_object_under_another_key_is_not_taken_for_it() {
        let Remembered { body, object, .. } = remembered();
        let key = body[..object.start]
            .windows(8)
            .rposition(|w| w == b"\"object\"")
            .unwrap();
        let mut renamed = body.to_vec();
        renamed[key..key + 8].copy_from_slice(b"\"objecx\"");
        let moved = with_inserted(
            &renamed,
            object.end,
            r#","object":{"metadata":{"namespace":"shop"},"spec":{"containers":[{"name":"other"}]}}"#,
        );
        assert!(known_review(&moved).is_none(), "not the remembered review");
        let patch = patch_of(&moved).to_string();
        assert!(!patch.contains("payments"), "{patch}");
        assert!(patch_of(body).to_string().contains("payments"));
        // The review's object a `0` too, elsewhere: not a pod.
        let zero = with_inserted(&renamed, object.end, r#","object":0"#);
        assert!(known_review(&zero).is_none(), "not the remembered review");
        let error = review(&zero, &Config::default(), &crate::view::NoCluster).unwrap_err();
        assert!(matches!(error, ReviewError::NotAPod(_)), "{error}");
    }

    /// A body that is not JSON is refused though a review like it is remembered: bytes after
    /// the object, or a broken rest.
    #[test]
    fn a_body_like_a_remembered_review_but_broken_is_refused() {
        let Remembered { body, object, .. } = remembered();
        for broken in [
            with_inserted(body, object.end, ".5"),
            with_inserted(body, object.end, "e1"),
            with_inserted(body, object.end, ","),
            body[..body.len() - 3].to_vec(),
        ] {
            assert!(known_review(&broken).is_none(), "not the remembered review");
            let error = review(&broken, &Config::default(), &crate::view::NoCluster).unwrap_err();
            assert!(matches!(error, ReviewError::Decode(_)), "{error}");
        }
    }

    /// Text with escapes in the review's own fields reads as the same text without them.
    #[test]
    fn escaped_text_in_the_review_reads_as_its_value() {
        let body = include_bytes!("../tests/fixtures/review-create-pod.json");
        let mut review_value: Value = serde_json::from_slice(body).unwrap();
        review_value["request"]["uid"] = "quote \" and é".into();
        let text = serde_json::to_string(&review_value)
            .unwrap()
            .replace(r#""operation":"CREATE""#, r#""operation":"CR\u0045ATE""#)
            .replace(
                r#""group":"","kind":"Pod","version":"v1""#,
                r#""group":"","kind":"P\u006fd","version":"v\u0031""#,
            );
        assert!(text.contains(r#"CR\u0045ATE"#) && text.contains(r#"P\u006fd"#));
        let reviewed =
            review(text.as_bytes(), &Config::default(), &crate::view::NoCluster).unwrap();
        assert_eq!(reviewed.outcome, Outcome::Patched);
        assert_eq!(reviewed.answer.response.uid, "quote \" and é");
    }

    /// `body` with `uid` (bytes, written as given) in place of its uid's text at `span`.
    fn with_uid(body: &[u8], span: &std::ops::Range<usize>, uid: &[u8]) -> Vec<u8> {
        [&body[..span.start], uid, &body[span.end..]].concat()
    }

    /// A replica's review, a remembered one with another uid (any length, any plain text),
    /// is answered from what was remembered, with its own uid and the same patch.
    #[test]
    fn a_review_with_another_uid_is_answered_as_remembered() {
        let Remembered {
            body, uid: span, ..
        } = remembered();
        let first = review(body, &Config::default(), &crate::view::NoCluster).unwrap();
        assert_eq!(first.outcome, Outcome::Patched);
        let long = "u".repeat(300);
        for uid in [
            "0b7c1e2d-0000-4a8f-9d0b-7c1f2e3a4b5c",
            "",
            "x",
            "été ✓",
            &long,
        ] {
            let other = with_uid(body, &span, uid.as_bytes());
            let found = known_uid(&other);
            assert_eq!(found.as_deref(), Some(uid), "the review is remembered");
            let reviewed = review(&other, &Config::default(), &crate::view::NoCluster).unwrap();
            assert_eq!(reviewed.outcome, Outcome::Patched);
            assert!(reviewed.remembered, "{uid:?} is counted as remembered");
            assert_eq!(reviewed.answer.response.uid, uid);
            assert_eq!(reviewed.answer.response.patch, first.answer.response.patch);
        }
    }

    /// `body` with `from` replaced by `to` wherever it stands.
    fn replaced(body: &[u8], from: &str, to: &str) -> Vec<u8> {
        String::from_utf8(body.to_vec())
            .unwrap()
            .replace(from, to)
            .into_bytes()
    }

    /// The uid of `body` when it is known as a replica's review of a remembered one, with
    /// nothing to check.
    fn known_uid(body: &[u8]) -> Option<String> {
        match known_review(body)? {
            (Fit::Same(uid), _) => Some(uid.to_string()),
            (Fit::Check(_) | Fit::Read, _) => None,
        }
    }

    /// Whether `body` is known as a replica's review whose token volume's name is to be checked.
    fn to_check(body: &[u8]) -> bool {
        matches!(known_review(body), Some((Fit::Check(_), _)))
    }

    /// The fixture's review with its pod in `namespace`: a namespace of the test's own, where no
    /// other test's reviews are remembered.
    fn fixture_in(namespace: &str) -> Vec<u8> {
        replaced(
            include_bytes!("../tests/fixtures/review-create-pod.json"),
            "\"shop\"",
            &format!("\"{namespace}\""),
        )
    }

    /// Replicas' reviews as the apiserver sends them: another uid, and another random end of
    /// the token volume's name (in the volume and in its mount). The first is decoded, and shows
    /// that another name leaves the pod the same; those after it are answered from what was
    /// remembered, with their own uid and the same patch.
    #[test]
    fn a_replicas_review_with_its_own_token_volume_is_answered_as_remembered() {
        let body = fixture_in("replicas");
        let first = review(&body, &Config::default(), &crate::view::NoCluster).unwrap();
        assert!(!first.remembered);
        let renamed = crate::fixtures::replica(&body, 0).unwrap();
        assert!(to_check(&renamed));
        let checked = review(&renamed, &Config::default(), &crate::view::NoCluster).unwrap();
        assert!(!checked.remembered, "decoded, to check the renamed volume");
        assert_eq!(checked.answer.response.patch, first.answer.response.patch);
        let mut uids = std::collections::BTreeSet::new();
        for n in [0, 1, 26, 27, 1 << 40] {
            let other = crate::fixtures::replica(&body, n).unwrap();
            assert!(known_uid(&other).is_some(), "replica {n}");
            let reviewed = review(&other, &Config::default(), &crate::view::NoCluster).unwrap();
            assert!(reviewed.remembered, "replica {n}");
            assert_eq!(reviewed.answer.response.patch, first.answer.response.patch);
            uids.insert(reviewed.answer.response.uid);
        }
        assert_eq!(uids.len(), 5, "each replica has its own uid: {uids:?}");
        for suffix in ["b9c4d", "00000", "zzzzz", "x7k2p"] {
            let other = replaced(
                &replaced(&body, "x7k2p", suffix),
                "5b2d6a10-3e1f-4a8f-9d0b-7c1f2e3a4b5c",
                suffix,
            );
            assert_eq!(known_uid(&other).as_deref(), Some(suffix));
            let reviewed = review(&other, &Config::default(), &crate::view::NoCluster).unwrap();
            assert!(reviewed.remembered, "{suffix}");
            assert_eq!(reviewed.answer.response.patch, first.answer.response.patch);
        }
    }

    /// The first pods of other workloads like a remembered one's, each importing a service of
    /// its own, are not taken for a replica's: each is decoded and injected, with its own list.
    #[test]
    fn the_first_pods_of_other_workloads_are_each_read_in_full() {
        let body = fixture_in("firsts");
        let first = review(&body, &Config::default(), &crate::view::NoCluster).unwrap();
        assert_eq!(first.outcome, Outcome::Patched);
        for n in [1, 2, 1 << 40] {
            let other = crate::fixtures::first_pod(&body, n).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&other).unwrap();
            let imports = value["request"]["object"]["metadata"]["annotations"]
                ["servicekeel.io/imported-services"]
                .as_str()
                .unwrap();
            let list = servicekeel_api::services::ServiceList::parse(imports).unwrap();
            assert_eq!(list.services.len(), 3, "{imports}");
            assert_eq!(list.services[0].name, format!("s{n}"));
            assert!(known_review(&other).is_none(), "workload {n}");
            let reviewed = review(&other, &Config::default(), &crate::view::NoCluster).unwrap();
            assert!(!reviewed.remembered, "workload {n}");
            assert_eq!(reviewed.outcome, Outcome::Patched, "workload {n}");
        }
    }

    /// The token volume's name changed in one place and not the other, or to text of another
    /// kind (another length, capitals, a quote), is not a replica's: such a body is read in full.
    #[test]
    fn a_token_volume_renamed_otherwise_is_read_in_full() {
        let Remembered {
            body, uid: span, ..
        } = remembered();
        let body = with_uid(body, &span, b"renamed");
        let mount = body
            .windows(23)
            .rposition(|w| w == b"\"kube-api-access-x7k2p\"")
            .unwrap();
        let mut apart = body.clone();
        apart[mount + 17..mount + 22].copy_from_slice(b"aaaaa");
        for (what, other) in [
            ("volume and mount apart", apart),
            ("six characters", replaced(&body, "x7k2p", "x7k2pq")),
            ("capitals", replaced(&body, "x7k2p", "X7K2P")),
            ("a dash", replaced(&body, "x7k2p", "x7-2p")),
        ] {
            assert!(known_review(&other).is_none(), "{what}");
            let reviewed = review(&other, &Config::default(), &crate::view::NoCluster).unwrap();
            assert!(!reviewed.remembered, "{what}");
            assert_eq!(reviewed.answer.response.uid, "renamed", "{what}");
        }
        let quoted = replaced(&body, "x7k2p", "x7k2\"");
        assert!(known_review(&quoted).is_none());
        review(&quoted, &Config::default(), &crate::view::NoCluster).unwrap_err();
    }

    /// Where the token volume's name also stands for something injection reads (here a
    /// container's name), another name there changes the pod: the first review with another
    /// name shows it, and from then on only the uid may change.
    #[test]
    fn a_token_volume_name_that_injection_reads_elsewhere_stays_read() {
        let Remembered {
            body, uid: span, ..
        } = remembered();
        let body = replaced(
            &with_uid(body, &span, b"first"),
            "\"checkout\"",
            "\"kube-api-access-x7k2p\"",
        );
        let first = review(&body, &Config::default(), &crate::view::NoCluster).unwrap();
        assert!(!first.remembered);
        let uid_only = replaced(&body, "\"first\"", "\"second\"");
        let reviewed = review(&uid_only, &Config::default(), &crate::view::NoCluster).unwrap();
        assert!(reviewed.remembered, "the uid alone may change");
        for (suffix, checked) in [("b9c4d", true), ("c8d5f", false)] {
            let renamed = replaced(&uid_only, "x7k2p", suffix);
            assert_eq!(to_check(&renamed), checked, "{suffix}");
            assert_eq!(
                matches!(known_review(&renamed), Some((Fit::Read, _))),
                !checked,
                "{suffix}: once checked, known to be read in full"
            );
            assert!(known_uid(&renamed).is_none(), "{suffix}");
            let reviewed = review(&renamed, &Config::default(), &crate::view::NoCluster).unwrap();
            assert!(!reviewed.remembered, "{suffix}");
        }
    }

    /// Uid text that would change how the body reads does not stand for another uid: an escape,
    /// a quote that ends the text early, a control character, bytes that are not UTF-8. Such a
    /// body is read in full: escapes are decoded, broken JSON refused. Nor does a body that
    /// differs anywhere else.
    #[test]
    fn only_plain_uid_text_stands_in_for_a_remembered_one() {
        let Remembered {
            body, uid: span, ..
        } = remembered();
        let read = |uid: &[u8]| {
            let other = with_uid(body, &span, uid);
            assert!(
                known_review(&other).is_none(),
                "{:?}",
                String::from_utf8_lossy(uid)
            );
            review(&other, &Config::default(), &crate::view::NoCluster)
        };
        let escaped = read(br"a\u0041b").unwrap();
        assert_eq!(escaped.answer.response.uid, "aAb");
        assert!(!escaped.remembered, "read in full");
        for broken in [&b"a\tb"[..], br#"x","uid":"y"#, b"a\xffb", br"a\"] {
            let error = read(broken).unwrap_err();
            assert!(matches!(error, ReviewError::Decode(_)), "{error}");
        }
        let mut elsewhere = with_uid(body, &span, b"other");
        let at = elsewhere.windows(6).position(|w| w == b"\"shop\"").unwrap();
        elsewhere[at + 1..at + 5].copy_from_slice(b"mall");
        assert!(known_review(&elsewhere).is_none());
        let reviewed = review(&elsewhere, &Config::default(), &crate::view::NoCluster).unwrap();
        assert_eq!(reviewed.answer.response.uid, "other");
        assert!(!reviewed.remembered, "read in full");
        let patch = serde_json::from_slice::<Value>(
            &reviewed.answer.response.patch.expect("a patch").decode(),
        )
        .unwrap()
        .to_string();
        assert!(patch.contains("mall.svc.cluster.local"), "{patch}");
    }

    #[test]
    fn the_patch_is_sent_in_base64() {
        let mut answer = Reviewed::new("u", Outcome::Patched).answer;
        answer.response.patch = Some(Base64Patch::of(b"[]"));
        let written: Value = serde_json::from_slice(&answer.to_json()).unwrap();
        assert_eq!(written["response"]["patch"], "W10=");
    }
}
