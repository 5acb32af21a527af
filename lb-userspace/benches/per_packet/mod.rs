//! What the per-packet benches (packet_cost, ipv6_cost) share: their arguments and statistics.

/// `[rounds] [repeat]` from the command line (cargo's own `--bench` flags skipped); 5 rounds of
/// 1,000,000 runs by default.
pub fn rounds_and_repeat() -> (usize, u32) {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rounds = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let repeat = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    (rounds, repeat)
}

/// (median, min, max) of per-round figures.
pub fn median_min_max(mut ns: Vec<f64>) -> (f64, f64, f64) {
    ns.sort_by(f64::total_cmp);
    (ns[ns.len() / 2], ns[0], ns[ns.len() - 1])
}
