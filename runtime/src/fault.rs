//! Test-only fault injection into strata's writes, for the fault-injection tests (`tests/faults.rs`): a disk that
//! fills up or fails at a chosen write of a chosen kind, which no unprivileged test can arrange for real.
//!
//! `STRATA_TEST_FAIL_WRITE=KIND:N[:ERROR]` makes the Nth write of KIND (counting from 1) and every later one fail with
//! ERROR: `enospc` (no space left, the default) or `eio` (an I/O error). KIND is one of [`WriteKind::name`]'s. Unset,
//! every call here is one read of a cached `None`: the hook is compiled in but inert. Never set it outside tests.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// What a write stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// An offloaded weight's file.
    Weights,
    /// An offloaded KV cache file.
    Cache,
    /// An offloaded activation file.
    Activations,
    /// A packed checkpoint.
    Packed,
    /// A hardware profile.
    Profile,
    /// `--dump-logits`.
    Logits,
}

impl WriteKind {
    /// The name `STRATA_TEST_FAIL_WRITE` uses.
    pub fn name(self) -> &'static str {
        match self {
            WriteKind::Weights => "weights",
            WriteKind::Cache => "cache",
            WriteKind::Activations => "activations",
            WriteKind::Packed => "packed",
            WriteKind::Profile => "profile",
            WriteKind::Logits => "logits",
        }
    }

    /// The kind of an offload file, from its buffer's name (`cache.*`, `act.*`; anything else is a weight).
    pub fn of_offload(name: &str) -> WriteKind {
        if name.starts_with("cache") {
            WriteKind::Cache
        } else if name.starts_with("act.") || name.starts_with("hidden.") {
            WriteKind::Activations
        } else {
            WriteKind::Weights
        }
    }
}

struct Plan {
    kind: String,
    nth: u64,
    errno: i32,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let spec = std::env::var("STRATA_TEST_FAIL_WRITE").ok()?;
        let mut parts = spec.split(':');
        let kind = parts.next()?.to_string();
        let nth = parts.next().map_or(Some(1), |n| n.parse().ok())?;
        // Linux errno values; the error kinds they map to are what the writers see on every platform that has them.
        let errno = match parts.next().unwrap_or("enospc") {
            "eio" => 5,
            _ => 28,
        };
        Some(Plan { kind, nth, errno })
    })
    .as_ref()
}

/// Counts a write of `kind` and fails it when `STRATA_TEST_FAIL_WRITE` says so; `Ok` otherwise (always, unset).
pub fn check_write(kind: WriteKind) -> io::Result<()> {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let Some(plan) = plan() else {
        return Ok(());
    };
    if plan.kind != kind.name() {
        return Ok(());
    }
    if COUNT.fetch_add(1, Ordering::Relaxed) + 1 >= plan.nth {
        return Err(io::Error::from_raw_os_error(plan.errno));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_files_are_classified_by_their_buffer_name() {
        assert_eq!(WriteKind::of_offload("cache.0.1.2.k"), WriteKind::Cache);
        assert_eq!(WriteKind::of_offload("act.0.3"), WriteKind::Activations);
        assert_eq!(
            WriteKind::of_offload("decoder.layers.0.fc1.weight[0]"),
            WriteKind::Weights
        );
    }
}
