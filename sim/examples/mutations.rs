//! `cargo run --release -p rustci-sim --features sim-bugs --example mutations -- [SEEDS] [bug...]`:
//! the mutation study of `docs/simulation.md`. For every planted bug (or
//! the named ones) it sweeps seeds `0..SEEDS` (default 500) and prints one
//! Markdown table row: the first failing seed, its invariant, and how many
//! seeds of the sweep failed (the plain sweep's kill rate for that bug).

use rustci_sim::{run_seed, PlantedBug, SimOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seeds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(500);
    let named: Vec<PlantedBug> = args[2.min(args.len())..]
        .iter()
        .map(|s| PlantedBug::parse(s).unwrap_or_else(|| panic!("no planted bug {s}")))
        .collect();
    let bugs = if named.is_empty() {
        PlantedBug::ALL.to_vec()
    } else {
        named
    };
    println!(
        "| bug | expected invariant | first failing seed (invariant) | seeds failing of {seeds} |"
    );
    println!("|---|---|---|---|");
    for bug in bugs {
        let mut first = None;
        let mut failing = 0u64;
        let mut by_invariant = std::collections::BTreeMap::<&str, u64>::new();
        for seed in 0..seeds {
            let report = run_seed(&SimOptions {
                planted_bug: Some(bug),
                ..SimOptions::new(seed)
            });
            if let Some(f) = report.failure {
                failing += 1;
                *by_invariant.entry(f.invariant).or_default() += 1;
                first.get_or_insert((seed, f.invariant));
            }
        }
        let first = first.map_or("never".to_string(), |(s, i)| format!("{s} ({i})"));
        let spread: Vec<String> = by_invariant
            .iter()
            .map(|(i, n)| format!("{i} {n}"))
            .collect();
        println!(
            "| `{}` | `{}` | {first} | {failing} ({}) |",
            bug.name(),
            bug.caught_by()[0],
            spread.join(", ")
        );
    }
}
