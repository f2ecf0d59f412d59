//! Any datagram into a WireGuard hub's socket-free core: dropped and
//! counted, never a panic. The first byte picks the source address.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use meshgate::core::keys::PrivateKey;
use meshgate::core::metrics::Metrics;
use meshgate::core::spine::flow::FlowTable;
use meshgate::modules::wireguard::device::{Device, Wire};
use meshgate::modules::wireguard::WireGuardConfig;

struct Null;
impl Wire for Null {
    fn send_to(&self, _: &[u8], _: std::net::SocketAddr) -> bool {
        true
    }
    fn deliver(&self, _: &[u8]) -> bool {
        true
    }
}

fn hub() -> &'static Arc<Device> {
    static HUB: OnceLock<Arc<Device>> = OnceLock::new();
    HUB.get_or_init(|| {
        let peer = PrivateKey::generate().public_key().to_string();
        let doc = configstore::Document {
            source: "fuzz".into(),
            value: serde_json::json!({
                "kind": "wireguard",
                "private_key": PrivateKey::generate().to_base64(),
                "address": "10.192.0.1/24",
                "peers": [{"name": "p", "public_key": peer, "allowed_ips": ["10.192.0.2/32"]}],
            }),
        };
        let cfg = WireGuardConfig::from_document(&doc).unwrap();
        Device::simulated(
            "fuzz",
            "wg0",
            &cfg,
            Arc::new(Metrics::new()),
            Arc::new(FlowTable::new(vec![])),
            Arc::new(Null),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let (first, rest) = data.split_first().unwrap_or((&0, &[]));
    let src = std::net::SocketAddr::from(([192, 0, 2, *first], 51820));
    let mut out = vec![0u8; 70_000];
    hub().handle_datagram(rest, src, &mut out);
});
