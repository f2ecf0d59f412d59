//! The W3C trace context (`traceparent`, `baggage`) a client sends with a
//! request (HTTP/2 CONNECT), checked before it is kept: it goes into the
//! audit record, and a gateway link passes it on to the other side.

use serde::Serialize;

/// A W3C trace context as a client sent it: kept only when well-formed
/// ([`Trace::parse`]), for the audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Trace {
    /// `traceparent`: `version-traceid-parentid-flags` in lower-case hex.
    pub traceparent: Option<String>,
    /// `baggage`: at most [`Trace::MAX_BAGGAGE`] bytes of printable ASCII.
    pub baggage: Option<String>,
}

impl Trace {
    /// The largest `baggage` kept (longer ones are dropped, not cut).
    pub const MAX_BAGGAGE: usize = 512;

    /// The trace context in a request's `traceparent` and `baggage`
    /// headers (the values of each, joined by `,`); `None` if neither is
    /// well-formed. Never panics (`fuzz/fuzz_targets/h2_request.rs`).
    pub fn parse<'a>(
        traceparent: impl IntoIterator<Item = &'a [u8]>,
        baggage: impl IntoIterator<Item = &'a [u8]>,
    ) -> Option<Trace> {
        let mut tp = traceparent.into_iter();
        // One traceparent: a second makes both doubtful.
        let traceparent = match (tp.next(), tp.next()) {
            (Some(v), None) if is_traceparent(v) => std::str::from_utf8(v).ok().map(str::to_string),
            _ => None,
        };
        let mut joined = Vec::new();
        for v in baggage {
            if !joined.is_empty() {
                joined.push(b',');
            }
            joined.extend_from_slice(v);
            if joined.len() > Self::MAX_BAGGAGE {
                break;
            }
        }
        let baggage = (!joined.is_empty()
            && joined.len() <= Self::MAX_BAGGAGE
            && joined.iter().all(|&c| (0x20..0x7f).contains(&c)))
        .then(|| String::from_utf8(joined).ok())
        .flatten();
        (traceparent.is_some() || baggage.is_some()).then_some(Trace {
            traceparent,
            baggage,
        })
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>` (W3C Trace Context, version 00; a later
/// version's longer value is kept only if it starts that way), with a
/// trace id and parent id that are not all zeros.
fn is_traceparent(v: &[u8]) -> bool {
    let hex = |s: &[u8]| !s.is_empty() && s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |s: &[u8]| s.iter().all(|&c| c == b'0');
    if v.len() < 55 || (v.len() > 55 && v[55] != b'-') || v.len() > 256 {
        return false;
    }
    let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(version)
        && version != b"ff"
        && (version != b"00" || v.len() == 55)
        && hex(trace)
        && !zero(trace)
        && hex(parent)
        && !zero(parent)
        && hex(flags)
        && v.iter().all(|&c| (0x21..0x7f).contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_is_kept_only_when_well_formed() {
        let tp: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = Trace::parse([tp], [&b"k=v"[..], b"a=b"]).unwrap();
        assert_eq!(
            t.traceparent.as_deref(),
            Some(std::str::from_utf8(tp).unwrap())
        );
        assert_eq!(t.baggage.as_deref(), Some("k=v,a=b"));
        let bad: [&[u8]; 7] = [
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ];
        for b in bad {
            assert_eq!(
                Trace::parse([b], []),
                None,
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        // A later version may carry more after a dash.
        assert!(Trace::parse(
            [&b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-ab"[..]],
            []
        )
        .is_some());
        // Two traceparents: neither is believed.
        assert_eq!(Trace::parse([tp, tp], []), None);
        // Baggage: printable and short, or dropped whole.
        let long = vec![b'a'; Trace::MAX_BAGGAGE + 1];
        assert_eq!(Trace::parse([], [&long[..]]), None);
        assert_eq!(Trace::parse([], [&b"k=\x01"[..]]), None);
        assert_eq!(
            Trace::parse([], [&b"k=<script>"[..]])
                .unwrap()
                .baggage
                .as_deref(),
            Some("k=<script>")
        );
    }
}
