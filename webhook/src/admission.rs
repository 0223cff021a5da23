//! From AdmissionReview bytes to the AdmissionReview answer, as a plain function: decode, check
//! it is a pod creation, call [`inject`], encode the outcome. A body that is not a valid
//! `admission.k8s.io/v1` AdmissionReview is an error (the server answers 400); everything else
//! gets an answer.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::Config;
use crate::inject::Injection;
use crate::metrics::Outcome;
use crate::pod::PodFacts;
use crate::view::ClusterView;
use crate::view::inject_in_view;

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
    #[error("cannot encode the patch: {0}")]
    Encode(String),
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
    /// The JSON Patch, base64-encoded as the API server expects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
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
        }
    }
}

/// The parts of an AdmissionReview a review reads; the object is decoded only once the request
/// is known to be a pod's creation.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Incoming<'a> {
    api_version: String,
    kind: String,
    #[serde(borrow)]
    request: Option<Request<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request<'a> {
    uid: String,
    kind: Kind,
    operation: String,
    sub_resource: Option<String>,
    namespace: Option<String>,
    #[serde(borrow)]
    object: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Kind {
    #[serde(default)]
    group: String,
    version: String,
    kind: String,
}

pub fn review(
    body: &[u8],
    config: &Config,
    view: &dyn ClusterView,
) -> Result<Reviewed, ReviewError> {
    let review: Incoming = serde_json::from_slice(body).map_err(ReviewError::Decode)?;
    if review.api_version != API_VERSION || review.kind != KIND {
        return Err(ReviewError::Version(review.api_version, review.kind));
    }
    let request = review.request.ok_or(ReviewError::NoRequest)?;
    if !is_pod(&request.kind) {
        tracing::warn!(kind = %request.kind.kind, "not a pod; allowed unchanged (check the webhook's rules)");
        return Ok(Reviewed::new(&request.uid, Outcome::Ignored));
    }
    let object = match (
        request.object,
        request.operation.as_str(),
        &request.sub_resource,
    ) {
        (Some(object), "CREATE", None) => object,
        _ => return Ok(Reviewed::new(&request.uid, Outcome::Ignored)),
    };
    let pod: PodFacts = serde_json::from_str(object.get()).map_err(ReviewError::NotAPod)?;
    let metadata = pod.metadata.as_ref();
    let namespace = request
        .namespace
        .as_deref()
        .or(metadata.and_then(|m| m.namespace.as_deref()))
        .unwrap_or("default");
    let name = metadata
        .and_then(|m| m.name.as_deref().or(m.generate_name.as_deref()))
        .unwrap_or_default();

    match inject_in_view(&pod, namespace, config, view) {
        Ok(Injection::Skip(reason)) => {
            tracing::debug!(ns = namespace, name, reason = reason.as_str(), "skipped");
            Ok(Reviewed::new(&request.uid, Outcome::Skipped))
        }
        Ok(Injection::Patch { patch, warnings }) => {
            tracing::debug!(ns = namespace, name, "injected");
            let json =
                serde_json::to_vec(&patch).map_err(|e| ReviewError::Encode(e.to_string()))?;
            let mut reviewed = Reviewed::new(&request.uid, Outcome::Patched);
            let response = &mut reviewed.answer.response;
            response.patch = Some(BASE64.encode(json));
            response.patch_type = Some("JSONPatch");
            response.warnings = warnings;
            Ok(reviewed)
        }
        Err(error) => {
            tracing::info!(ns = namespace, name, %error, "denied");
            let mut reviewed = Reviewed::new(&request.uid, Outcome::Denied);
            let response = &mut reviewed.answer.response;
            response.allowed = false;
            // Kubernetes' own code for a refused, invalid object.
            response.status = Some(Status {
                status: "Failure",
                code: 422,
                reason: "Invalid",
                message: error.to_string(),
            });
            Ok(reviewed)
        }
    }
}

fn is_pod(kind: &Kind) -> bool {
    kind.group.is_empty() && kind.version == "v1" && kind.kind == "Pod"
}
