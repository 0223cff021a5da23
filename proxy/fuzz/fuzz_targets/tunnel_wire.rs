//! The tunnel's wire decoders, both directions: the flow headers a router reads (target,
//! protocol, source, version), the registration body, the datagram framing both ends read and
//! the handoff lines a router reads on its socket, fed in arbitrary chunks. Any bytes decode or
//! are refused; what decodes re-encodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use servicekeel_api::tunnel::handoff::{Handoff, Kind, Lines, MAX_LINE};
use servicekeel_api::tunnel::registration::Registration;
use servicekeel_api::tunnel::{
    DatagramDecoder, FlowTarget, Source, check_version, encode_datagram,
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 5 {
        0 => {
            // Headers: authority, protocol, source, version separated by newlines.
            let text = String::from_utf8_lossy(rest);
            let mut fields = text.split('\n');
            let authority = fields.next().unwrap_or_default();
            let protocol = fields.next().unwrap_or_default();
            if let Ok(target) = FlowTarget::parse(authority, protocol) {
                let again = FlowTarget::parse(&target.authority(), target.protocol.as_str())
                    .expect("a parsed target's authority parses");
                assert_eq!(again, target);
            }
            if let Ok(source) = fields.next().unwrap_or_default().parse::<Source>() {
                let again: Source = source.to_string().parse().expect("source round trip");
                assert_eq!(again, source);
            }
            let _ = check_version(fields.next());
        }
        1 => {
            if let Ok(registration) = Registration::parse(rest) {
                let again = Registration::parse(&registration.to_json())
                    .expect("a parsed registration re-encodes to one that parses");
                assert_eq!(again, registration);
                let _ = registration.endpoints();
            }
        }
        2 => {
            // Handoff lines in chunks whose sizes the input chooses, of the kind it chooses.
            let kind = if (selector / 5) % 2 == 0 {
                Kind::Tcp
            } else {
                Kind::Udp
            };
            let mut lines = Lines::default();
            let mut rest = rest;
            while let Some((&size, tail)) = rest.split_first() {
                let take = usize::from(size).min(tail.len());
                let (chunk, tail) = tail.split_at(take);
                rest = tail;
                let Ok(complete) = lines.push(chunk) else {
                    return;
                };
                assert!(lines.pending() < MAX_LINE);
                for line in complete {
                    if let Ok(handoff) = Handoff::parse(kind, &line) {
                        assert_eq!(handoff.kind(), kind);
                        let encoded = handoff.encode().expect("a parsed handoff encodes");
                        let again = Handoff::parse(kind, &encoded[..encoded.len() - 1])
                            .expect("an encoded handoff parses");
                        assert_eq!(again, handoff);
                    }
                }
            }
        }
        _ => {
            // Datagram framing in chunks whose sizes the input chooses.
            let mut decoder = DatagramDecoder::default();
            let mut rest = rest;
            while let Some((&size, tail)) = rest.split_first() {
                let take = usize::from(size).min(tail.len());
                let (chunk, tail) = tail.split_at(take);
                rest = tail;
                match decoder.push(chunk) {
                    Ok(datagrams) => {
                        for datagram in datagrams {
                            let mut framed = Vec::new();
                            encode_datagram(&datagram, &mut framed)
                                .expect("a decoded datagram re-frames");
                            let mut check = DatagramDecoder::default();
                            assert_eq!(
                                check.push(&framed).expect("re-framed decodes"),
                                vec![datagram]
                            );
                        }
                    }
                    Err(_) => return,
                }
            }
        }
    }
});
