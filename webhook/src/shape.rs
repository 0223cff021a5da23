//! A review's body with the parts that change from one replica of a workload to the next cut
//! out, so that a replica's review is known, and answered as the one remembered, without being
//! decoded. The apiserver writes a review's fields in one order, and at admission a
//! controller's replicas have no name of their own, so the reviews of replicas created within
//! the same second (the time their managed fields carry) differ in two places: the request's
//! uid, and the name the apiserver's ServiceAccount admission gave the pod's token volume
//! (`kube-api-access-` and five random characters), which stands in the volume and in each of
//! its mounts. That another such name leaves the pod the same for injection is checked once per
//! shape, on the first review of it with another name, which is decoded in full.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::pod::PodFacts;

/// How the ServiceAccount admission names the pod's token volume: this prefix and
/// [`TOKEN_SUFFIX`] random characters.
pub(crate) const TOKEN_VOLUME: &str = "kube-api-access-";
pub(crate) const TOKEN_SUFFIX: usize = 5;

/// A place cut out of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The text of `request.uid`.
    Uid,
    /// The random end of the token volume's name.
    Suffix,
}

/// A body without its cuts: the bytes between them, in order.
#[derive(Debug)]
pub struct Shape {
    /// One more than `cuts`: what comes before each cut, and what comes after the last.
    parts: Box<[Box<[u8]>]>,
    cuts: Box<[Cut]>,
    /// The token volume's name's end in the body the shape was taken from.
    suffix: Box<[u8]>,
    renaming: Arc<Renaming>,
}

/// The same shape, whatever bodies the two were taken from.
impl PartialEq for Shape {
    fn eq(&self, other: &Shape) -> bool {
        self.parts == other.parts && self.cuts == other.cuts
    }
}

/// Whether another end of the token volume's name, in all its places, leaves a shape's pod the
/// same for injection: unknown until a review of the shape with another end was decoded.
#[derive(Debug, Default)]
pub struct Renaming(AtomicU8);

const UNKNOWN: u8 = 0;
const SAME: u8 = 1;
const CHANGES: u8 = 2;

impl Renaming {
    /// Learns it from the pod `remembered` (the shape's) and the pod `renamed`, decoded from a
    /// review of the shape with another end. The end is the same in all its places and of
    /// characters that keep the text's JSON as it was, so the places read as the same fields
    /// whatever the end: one such pod shows it for all. Injection reads the volume's name only
    /// to refuse the names the sidecar's own volumes take, never a token volume's.
    pub fn learn(&self, remembered: &PodFacts, renamed: &PodFacts) {
        let unnamed = |pod: &PodFacts| {
            let mut pod = pod.clone();
            let volumes = pod.spec.as_mut().and_then(|spec| spec.volumes.as_mut());
            for volume in volumes.into_iter().flatten() {
                if is_token_volume(&volume.name) {
                    volume.name.clear();
                }
            }
            pod
        };
        let same = unnamed(remembered) == unnamed(renamed);
        self.0
            .store(if same { SAME } else { CHANGES }, Ordering::Relaxed);
    }
}

/// How a body fits a shape.
#[derive(Debug)]
pub enum Fit<'b> {
    /// It reads as the shape's body but for its uid, given here, and maybe a token volume's
    /// name known to leave the pod the same.
    Same(&'b str),
    /// Its token volume has another name, not yet known to leave the pod the same: decode it
    /// and [`Renaming::learn`].
    Check(Arc<Renaming>),
    /// Its token volume has another name, known to change the pod: decode it; its shape is
    /// this one, remembered already.
    Read,
}

/// Where `part` lies in `body`, when it is a slice of `body` itself: a string read without
/// escapes, or a raw value, borrowed from the body (a decoded copy lies elsewhere in memory).
pub fn span_in(body: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let at = (part.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    (at + part.len() <= body.len()).then_some(at..at + part.len())
}

impl Shape {
    /// The shape of `body`, a review of `pod` being created, whose uid's text is at `uid` and
    /// whose pod's text is at `object`: the uid cut out, and the end of the token volume's name
    /// wherever that name stands, as a whole string, in the pod's text (the volume's name and
    /// its mounts').
    pub fn of(body: &[u8], uid: Range<usize>, object: Range<usize>, pod: &PodFacts) -> Shape {
        let suffixes = token_suffixes(body, object, pod);
        let suffix = suffixes
            .first()
            .map_or(&[][..], |s| &body[s.clone()])
            .into();
        let mut cuts = vec![(uid.clone(), Cut::Uid)];
        // The uid is not in the pod's text; were it, the uid alone is cut.
        if suffixes
            .iter()
            .all(|s| s.end <= uid.start || uid.end <= s.start)
        {
            cuts.extend(suffixes.into_iter().map(|suffix| (suffix, Cut::Suffix)));
        }
        cuts.sort_by_key(|(range, _)| range.start);
        let mut parts = Vec::with_capacity(cuts.len() + 1);
        let mut at = 0;
        for (range, _) in &cuts {
            parts.push(body[at..range.start].into());
            at = range.end;
        }
        parts.push(body[at..].into());
        Shape {
            parts: parts.into(),
            cuts: cuts.into_iter().map(|(_, cut)| cut).collect(),
            suffix,
            renaming: Arc::default(),
        }
    }

    /// How `body` fits this shape, if it does: the same bytes between the cuts; a uid of text
    /// without a quote, backslash or control character (so that it ends at the same quote),
    /// valid UTF-8; and one end of `TOKEN_SUFFIX` lowercase letters or digits in every place of
    /// the token volume's. Such a body is exactly as valid as the shape's and reads the same but
    /// for its uid and that volume's name.
    pub fn fit<'b>(&self, body: &'b [u8]) -> Option<Fit<'b>> {
        let (mut rest, mut uid, mut suffix) = (body, None, None);
        for (part, cut) in self.parts.iter().zip(self.cuts.iter()) {
            rest = rest.strip_prefix(&**part)?;
            let end = match cut {
                Cut::Uid => {
                    let end = rest
                        .iter()
                        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
                    uid = Some(&rest[..end]);
                    end
                }
                Cut::Suffix => {
                    let this = rest.get(..TOKEN_SUFFIX)?;
                    if !is_suffix(this) || suffix.is_some_and(|first| first != this) {
                        return None;
                    }
                    suffix = Some(this);
                    TOKEN_SUFFIX
                }
            };
            rest = &rest[end..];
        }
        if rest != &**self.parts.last()? {
            return None;
        }
        let uid = std::str::from_utf8(uid?).ok()?;
        if suffix.is_none_or(|suffix| *suffix == *self.suffix) {
            return Some(Fit::Same(uid));
        }
        match self.renaming.0.load(Ordering::Relaxed) {
            SAME => Some(Fit::Same(uid)),
            UNKNOWN => Some(Fit::Check(self.renaming.clone())),
            _ => Some(Fit::Read),
        }
    }
}

fn is_suffix(text: &[u8]) -> bool {
    text.len() == TOKEN_SUFFIX
        && text
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether `name` is one the ServiceAccount admission gives a pod's token volume.
pub fn is_token_volume(name: &str) -> bool {
    name.strip_prefix(TOKEN_VOLUME)
        .is_some_and(|suffix| is_suffix(suffix.as_bytes()))
}

/// Where the end of the pod's token volume's name stands, in the pod's text at `object` in
/// `body`: in each place where the name is a whole string.
fn token_suffixes(body: &[u8], object: Range<usize>, pod: &PodFacts) -> Vec<Range<usize>> {
    let volumes = pod.spec.as_ref().and_then(|spec| spec.volumes.as_deref());
    let Some(name) = volumes
        .into_iter()
        .flatten()
        .map(|volume| volume.name.as_str())
        .find(|name| is_token_volume(name))
    else {
        return Vec::new();
    };
    let needle = format!("\"{name}\"");
    let text = &body[object.clone()];
    // The end comes before each place's closing quote. Only quotes are tried, a few in a
    // hundred of the text's bytes.
    text.iter()
        .enumerate()
        .filter(|&(at, &byte)| byte == b'"' && text[at..].starts_with(needle.as_bytes()))
        .map(|(at, _)| {
            let end = object.start + at + needle.len() - 1;
            end - TOKEN_SUFFIX..end
        })
        .collect()
}
