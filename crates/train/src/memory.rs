//! Peak memory of a training step: the process's resident-set high-water mark.
//!
//! Linux keeps it as `VmHWM` in `/proc/self/status`, and writing `5` to `/proc/self/clear_refs`
//! resets it, so each step can report its own peak (weights, activations and the allocator's
//! slack together, which is what a user sizing a machine needs). Elsewhere nothing is reported.
//! On an accelerator this is host memory only.

/// Starts a new peak-measuring interval; false where the platform cannot.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The resident-memory peak since the last [`reset_peak`] (or process start), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_peak_sees_an_allocation_and_resets() {
        assert!(reset_peak());
        let before = peak_rss_mib().unwrap();
        let big = vec![1u8; 256 << 20];
        std::hint::black_box(&big);
        let during = peak_rss_mib().unwrap();
        assert!(during > before + 200.0, "{before} -> {during}");
        drop(big);
        assert!(reset_peak());
        assert!(peak_rss_mib().unwrap() < during - 200.0);
    }
}
