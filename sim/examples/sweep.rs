//! `cargo run --release -p rustci-sim --example sweep -- A B [bug]`: runs
//! seeds A..B the way `rustci sim --seeds A..B` will, and prints the summary.
//! The one place here that reads a real clock: to report wall speed.

use rustci_sim::{header, run_seeds, PlantedBug, SimOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let a: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let b: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(a + 100);
    let mut base = SimOptions::new(a);
    base.planted_bug = args.get(3).and_then(|s| PlantedBug::parse(s));
    if b == a + 1 {
        println!("{}", header(&base));
    }
    #[allow(clippy::disallowed_methods)] // wall time is the caller's to read
    let start = std::time::Instant::now();
    let mut wall = || start.elapsed().as_secs_f64();
    let verbose = b == a + 1;
    let summary = run_seeds(a..b, &base, &mut wall, &mut |r| {
        if verbose || !r.passed {
            println!("{r}");
        }
        if verbose {
            println!("{:?}", r.stats);
        }
    });
    print!("{summary}");
}
