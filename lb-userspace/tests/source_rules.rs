//! Rules clippy cannot check everywhere: the packet path (lb-ebpf) is built for the BPF target,
//! outside `cargo clippy` of the workspace, so its `unsafe` blocks are checked here for the
//! `// SAFETY:` comment the workspace lint demands of the other crates. No root.

use std::path::Path;

/// `unsafe` blocks and impls (not attributes like `#[unsafe(no_mangle)]`, nor `unsafe fn`
/// declarations, which carry a `# Safety` section) without a `SAFETY:` comment on the lines
/// just above.
fn undocumented_unsafe(source: &str) -> Vec<usize> {
    let lines: Vec<&str> = source.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let is_unsafe_use = (code.contains("unsafe {") || code.contains("unsafe impl"))
            && !code.contains("#[unsafe(");
        if !is_unsafe_use {
            continue;
        }
        let documented = lines[i.saturating_sub(6)..=i]
            .iter()
            .any(|l| l.contains("SAFETY:"));
        if !documented {
            missing.push(i + 1);
        }
    }
    missing
}

#[test]
fn every_unsafe_block_of_the_packet_path_says_why_it_is_safe() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-ebpf/src");
    let mut checked = 0;
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("lb-ebpf sources") {
        let path = entry.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        checked += source.matches("unsafe {").count();
        for line in undocumented_unsafe(&source) {
            missing.push(format!("{}:{line}", path.display()));
        }
    }
    assert!(
        checked >= 10,
        "found the packet path's unsafe blocks ({checked})"
    );
    assert!(
        missing.is_empty(),
        "unsafe without a SAFETY comment: {missing:#?}"
    );
}

#[test]
fn the_check_finds_an_undocumented_block() {
    let source =
        "fn f() {\n    let x = unsafe { g() };\n}\n// SAFETY: checked.\nlet y = unsafe { h() };\n";
    assert_eq!(undocumented_unsafe(source), [2]);
}
