//! The common question answered without decoding a message: one plain question (no compression,
//! no EDNS, nothing after it) for an imported name, from a loopback client. The answer is built
//! from the request's own bytes and is byte for byte what the full path sends for the same
//! request; everything else (other names, other shapes, anything malformed) goes the full path.

use std::net::{Ipv4Addr, SocketAddr};

use super::server::LOCAL_TTL;
use super::{Answer, Names};

const HEADER: usize = 12;
/// Longest name on the wire (RFC 1035 §3.1).
const MAX_NAME: usize = 255;
const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;

/// Writes into `out` the answer to `request` when it is the common question for an imported
/// name and returns true; returns false, `out` unspecified, when the full path must answer.
/// `name` is scratch space for the query name.
pub fn answer(
    request: &[u8],
    src: SocketAddr,
    names: &Names,
    name: &mut String,
    out: &mut Vec<u8>,
) -> bool {
    let Some((question, qtype, qclass)) = plain_question(request, name) else {
        return false;
    };
    if !src.ip().is_loopback() {
        return false;
    }
    let Answer::Local(ip) = names.lookup(name) else {
        return false;
    };
    write(
        request,
        question,
        qtype == TYPE_A && qclass == CLASS_IN,
        ip,
        out,
    );
    true
}

/// The end of the question, its type and class, with the query name (lowercase, dotted, no
/// trailing dot) in `name`, when `request` is a standard query with exactly one plain question
/// and nothing else.
fn plain_question(request: &[u8], name: &mut String) -> Option<(usize, u16, u16)> {
    let header = request.get(..HEADER)?;
    // QR 0, opcode 0 (QUERY), TC 0; AA is meaningless in a query and ignored.
    if header[2] & 0b1111_1010 != 0 {
        return None;
    }
    if header[4..12] != [0, 1, 0, 0, 0, 0, 0, 0] {
        return None;
    }
    name.clear();
    let mut at = HEADER;
    loop {
        let length = usize::from(*request.get(at)?);
        if length == 0 {
            at += 1;
            break;
        }
        // Pointers and the reserved label types go the full path.
        if length > 63 || at + 1 + length - HEADER >= MAX_NAME {
            return None;
        }
        let label = request.get(at + 1..at + 1 + length)?;
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
        at += 1 + length;
    }
    let tail = request.get(at..)?;
    if tail.len() != 4 || name.is_empty() {
        return None;
    }
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let qclass = u16::from_be_bytes([tail[2], tail[3]]);
    Some((at + 4, qtype, qclass))
}

/// The authoritative answer: the request's id and question, RD and CD kept, and one A record
/// when `with_record`, its name the question's in lowercase and not compressed, as the full path
/// writes it (length bytes are at most 63, below every uppercase letter).
fn write(request: &[u8], question_end: usize, with_record: bool, ip: Ipv4Addr, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&request[..2]);
    // QR 1, opcode 0, AA 1, TC 0, RD as asked; RA 0, Z 0, AD 0, CD as asked, NOERROR.
    out.push(0b1000_0100 | (request[2] & 0b0000_0001));
    out.push(request[3] & 0b0001_0000);
    out.extend_from_slice(&[0, 1, 0, u8::from(with_record), 0, 0, 0, 0]);
    out.extend_from_slice(&request[HEADER..question_end]);
    if with_record {
        let name = &request[HEADER..question_end - 4];
        out.extend(name.iter().map(u8::to_ascii_lowercase));
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&LOCAL_TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
}
