//! Gives the heap's freed pages back to the operating system after a burst.
//!
//! glibc's allocator returns freed memory only from the top of a heap. A
//! burst — a thousand agent calls at once through the egress, a saga fan-out
//! — frees its buffers interleaved with blocks that stay live, so without
//! help the process keeps its peak RSS for good, and a pod's memory is
//! sized by its worst second. `malloc_trim(0)` releases every whole free
//! page in every arena (glibc ≥ 2.8, by `madvise`), keeping the allocator's
//! bookkeeping. Every [`CHECK_EVERY`] this job reads the RSS (a file read)
//! and trims when it grew by more than [`TRIM_AFTER_GROWTH`] since the last
//! trim, and again at each next look while a trim still gave back a MiB;
//! so an idle process does one file read per check and a steady one no
//! trim at all.
//!
//! Hand-written because no allocator we measured does as well here: with
//! jemalloc purging in the background a fresh sidecar starts 3 MiB higher
//! and ends a burst 4 MiB higher than glibc trimmed (docs/benchmarks.md).
//! This module holds the workspace's only `unsafe`: one call into glibc
//! that takes no pointer and is documented as safe from any thread.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// How often the RSS is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Growth of the RSS since the last trim that makes a trim worth it.
pub const TRIM_AFTER_GROWTH: u64 = 8 << 20;

/// What a trim must give back for the next look to trim again.
const TRIM_PAYS: u64 = 1 << 20;

/// Counters of what the job did.
#[derive(Debug, Clone, Default)]
pub struct TrimMetrics {
    trims: Counter,
    released: Counter,
}

impl TrimMetrics {
    /// Registers `statefabric_memory_trims_total` and
    /// `statefabric_memory_released_bytes_total`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("statefabric_memory");
        registry.register(
            "trims",
            "Times freed heap pages were given back to the OS",
            self.trims.clone(),
        );
        registry.register(
            "released_bytes",
            "Resident bytes the trims gave back to the OS",
            self.released.clone(),
        );
    }
}

/// Runs until dropped: every [`CHECK_EVERY`], trims when the RSS grew by
/// [`TRIM_AFTER_GROWTH`] since the last trim, or when the last trim still
/// gave back [`TRIM_PAYS`].
pub async fn give_back_freed(metrics: TrimMetrics) {
    let Some(mut baseline) = resident_bytes() else {
        return;
    };
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut again = false;
    loop {
        every.tick().await;
        let Some(now) = resident_bytes() else { return };
        baseline = baseline.min(now);
        if again || now > baseline + TRIM_AFTER_GROWTH {
            let after = trim().and_then(|()| resident_bytes()).unwrap_or(now);
            let released = now.saturating_sub(after);
            metrics.trims.inc();
            metrics.released.inc_by(released);
            tracing::debug!(before = now, after, "gave freed heap pages back");
            // A burst's leftovers keep being freed after it (idle
            // connections leaving the reactor, expiring entries): look
            // again next time while a trim still pays.
            again = released >= TRIM_PAYS;
            baseline = after;
        }
    }
}

/// The process's resident set in bytes (`VmRSS` of `/proc/self/status`).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Gives every whole free page of glibc's arenas back to the OS; `None`
/// where the allocator is not glibc's.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() -> Option<()> {
    // SAFETY: `malloc_trim` takes a padding size, no pointer; glibc takes
    // each arena's lock while it trims, so any thread may call it while
    // others allocate.
    unsafe { libc::malloc_trim(0) };
    Some(())
}

/// Gives every whole free page of glibc's arenas back to the OS; `None`
/// where the allocator is not glibc's.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> Option<()> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst: many blocks, one in 64 kept, so the freed ones are
    /// interleaved with live ones (nothing at the heap's top to shrink).
    fn burst() -> Vec<Vec<u8>> {
        let mut blocks: Vec<Vec<u8>> = (0..20_000_u32).map(|i| vec![(i as u8) | 1; 4000]).collect();
        blocks
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % 64 == 0)
            .map(|(_, b)| std::mem::take(b))
            .collect()
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_job_trims_after_a_burst_and_not_when_nothing_grew() {
        let metrics = TrimMetrics::default();
        let job = tokio::spawn(give_back_freed(metrics.clone()));
        tokio::task::yield_now().await;
        tokio::time::sleep(CHECK_EVERY * 2).await;
        assert_eq!(metrics.trims.get(), 0, "nothing grew");
        let kept = burst();
        tokio::time::sleep(CHECK_EVERY).await;
        assert_eq!(metrics.trims.get(), 1);
        // Looked at again: nothing left to give back, so no more trims.
        tokio::time::sleep(CHECK_EVERY).await;
        assert_eq!(metrics.trims.get(), 2);
        assert!(
            metrics.released.get() > 40 << 20,
            "{}",
            metrics.released.get()
        );
        tokio::time::sleep(CHECK_EVERY * 2).await;
        assert_eq!(metrics.trims.get(), 2, "no growth since the trims");
        drop(kept);
        job.abort();
    }
}
