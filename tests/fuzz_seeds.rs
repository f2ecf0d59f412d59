//! Every fuzz target's body, on stable, over its checked-in seeds
//! (`fuzz/seeds/<target>/`): a machine without nightly still runs what
//! `cargo fuzz` runs, on inputs that reach past each parser's first check
//! (the WireGuard seeds include packets from an authenticated peer).

use std::path::Path;

#[test]
fn every_fuzz_target_runs_over_its_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut ran = 0;
    for (name, run) in meshgate::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (each target needs seeds)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "{} has no seeds", dir.display());
        for seed in seeds {
            let data = std::fs::read(&seed).unwrap();
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("fuzz target {name} panicked on {}", seed.display());
            }
            ran += 1;
        }
    }
    // Every target directory is one the runner knows (no orphaned seeds).
    for entry in std::fs::read_dir(&root).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            meshgate::fuzzing::TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/seeds/{name} belongs to no target"
        );
    }
    eprintln!(
        "{ran} seeds through {} targets",
        meshgate::fuzzing::TARGETS.len()
    );
}

#[test]
fn every_fuzz_target_has_a_cargo_fuzz_binary() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .unwrap();
    for (name, _) in meshgate::fuzzing::TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] for {name}"
        );
    }
}
