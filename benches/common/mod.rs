//! What the benchmark binaries share: where results go and how they are dated.

/// Appends a report section to BENCHMARKS.md (created with its title if missing).
pub fn append_report(report: &str) {
    println!("{report}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let mut existing = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    existing.push_str(report);
    std::fs::write(path, existing).unwrap();
}

/// Today's date, for section headings.
pub fn today() -> String {
    let out = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
