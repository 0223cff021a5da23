//! From AdmissionReview bytes to the AdmissionReview answer, as a plain function: decode, check
//! it is a pod creation, call [`inject`], encode the outcome. A body that is not a valid
//! `admission.k8s.io/v1` AdmissionReview is an error (the server answers 400); everything else
//! gets an answer.

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionResponse, AdmissionReview, Operation};
use kube::core::response::StatusSummary;
use kube::core::{DynamicObject, GroupVersionKind};

use crate::config::Config;
use crate::inject::{Injection, Target, inject};
use crate::metrics::Outcome;

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

#[derive(Debug)]
pub struct Reviewed {
    pub review: AdmissionReview<DynamicObject>,
    pub outcome: Outcome,
}

pub fn review(body: &[u8], config: &Config) -> Result<Reviewed, ReviewError> {
    // Pods are what the webhook is registered for, so decode straight into one; only when that
    // fails look closer, to tell another kind of object (let through) from a malformed body.
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(pod_error) => {
            let review: AdmissionReview<DynamicObject> =
                serde_json::from_slice(body).map_err(ReviewError::Decode)?;
            check_version(&review.types)?;
            let request = review.request.ok_or(ReviewError::NoRequest)?;
            if is_pod(&request.kind) {
                return Err(ReviewError::NotAPod(pod_error));
            }
            tracing::warn!(kind = %request.kind.kind, "not a pod; allowed unchanged (check the webhook's rules)");
            return Ok(answer(AdmissionResponse::from(&request), Outcome::Ignored));
        }
    };
    check_version(&review.types)?;
    let request = review.request.ok_or(ReviewError::NoRequest)?;
    let response = AdmissionResponse::from(&request);

    let pod = match (&request.object, &request.operation, &request.sub_resource) {
        (Some(pod), Operation::Create, None) if is_pod(&request.kind) => pod,
        _ => return Ok(answer(response, Outcome::Ignored)),
    };
    let namespace = request
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref())
        .unwrap_or("default");
    let name = pod
        .metadata
        .name
        .as_deref()
        .or(pod.metadata.generate_name.as_deref())
        .unwrap_or_default();

    match inject(pod, &Target { namespace }, config) {
        Ok(Injection::Skip(reason)) => {
            tracing::debug!(ns = namespace, name, reason = reason.as_str(), "skipped");
            Ok(answer(response, Outcome::Skipped))
        }
        Ok(Injection::Patch { patch, warnings }) => {
            tracing::debug!(ns = namespace, name, "injected");
            let mut response = response
                .with_patch(patch)
                .map_err(|e| ReviewError::Encode(e.to_string()))?;
            if !warnings.is_empty() {
                response.warnings = Some(warnings);
            }
            Ok(answer(response, Outcome::Patched))
        }
        Err(error) => {
            tracing::info!(ns = namespace, name, %error, "denied");
            let mut response = response.deny(error.to_string());
            // Kubernetes' own code for a refused, invalid object.
            response.result.status = Some(StatusSummary::Failure);
            response.result.code = 422;
            response.result.reason = "Invalid".into();
            Ok(answer(response, Outcome::Denied))
        }
    }
}

fn answer(response: AdmissionResponse, outcome: Outcome) -> Reviewed {
    Reviewed {
        review: response.into_review(),
        outcome,
    }
}

fn check_version(types: &kube::core::TypeMeta) -> Result<(), ReviewError> {
    if types.api_version == API_VERSION && types.kind == KIND {
        Ok(())
    } else {
        Err(ReviewError::Version(
            types.api_version.clone(),
            types.kind.clone(),
        ))
    }
}

fn is_pod(kind: &GroupVersionKind) -> bool {
    kind.group.is_empty() && kind.version == "v1" && kind.kind == "Pod"
}
