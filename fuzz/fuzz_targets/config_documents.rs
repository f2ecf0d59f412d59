//! Any YAML text as a module document of every kind, and as a Cloud-Gateway
//! `conf.yaml`: a config or an error naming the source, never a panic.
#![no_main]

use configstore::format::{parse, Format};
use configstore::Document;
use libfuzzer_sys::fuzz_target;
use meshgate::modules::pipe::PipeConfig;
use meshgate::modules::vnet::VnetConfig;
use meshgate::modules::wireguard::WireGuardConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for format in [Format::Yaml, Format::Json, Format::Toml] {
        if let Ok(value) = parse(&text, format, "fuzz.yaml") {
            let doc = Document {
                source: "fuzz.yaml".into(),
                value,
            };
            let _ = PipeConfig::from_document(&doc);
            let _ = VnetConfig::from_document(&doc);
            let _ = WireGuardConfig::from_document(&doc);
        }
    }
});
