//! Any bytes as an IP packet: the userspace stack's door, the forwarded-flow
//! tracker, the router's TTL handling, the DNS answer parser and the kernel
//! engine's TUN frame splitter (offloads) never panic.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use meshgate::core::engine::userspace::inspect_packet;
use meshgate::core::metrics::Metrics;
use meshgate::core::net::dns::{parse_response, TYPE_A};
use meshgate::core::spine::flow::FlowTable;
use meshgate::core::spine::ipflow::{hop, time_exceeded, IpFlows};

fn flows() -> &'static IpFlows {
    static F: OnceLock<IpFlows> = OnceLock::new();
    F.get_or_init(|| {
        let m = Metrics::new();
        IpFlows::new(
            "fuzz",
            "wg0",
            Arc::new(FlowTable::new(vec![])),
            m.instance("fuzz", "wg0"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = inspect_packet(data);
    let _ = flows().packet(data, "peer", Instant::now());
    if flows().len() > 10_000 {
        flows().clear();
    }
    let _ = meshgate::core::engine::kernel::offload::split(data, &mut Vec::new(), |_| {});
    let mut copy = data.to_vec();
    let _ = hop(&mut copy);
    let _ = time_exceeded(data, "10.0.0.1".parse().unwrap());
    let _ = time_exceeded(data, "fd00::1".parse().unwrap());
    let _ = parse_response(
        data,
        u16::from_be_bytes([*data.first().unwrap_or(&0), *data.get(1).unwrap_or(&0)]),
        TYPE_A,
    );
});
