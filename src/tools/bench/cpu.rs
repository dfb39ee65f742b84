//! CPU time of keywardd and of the load generator, to split keyward's own
//! cost from the HSM's.

use std::time::Duration;

use super::{BenchError, setup};

/// CPU time (user + system) of a process from `/proc/PID/stat`.
pub(super) fn process_cpu(pid: u32) -> Result<Duration, BenchError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(setup)?;
    // Fields after the command name (which may contain spaces) start with
    // the state (field 3); utime and stime are fields 14 and 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
        return Err(setup(format!("cannot parse /proc/{pid}/stat")));
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(100);
    Ok(Duration::from_micros((utime + stime) * 1_000_000 / hz))
}

/// CPU time of this process (all threads).
pub(super) fn own_cpu() -> Duration {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn own_process_cpu_is_readable_from_proc() {
        let t0 = process_cpu(std::process::id()).expect("/proc/self/stat parses");
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        assert!(x != 1);
        let t1 = process_cpu(std::process::id()).unwrap();
        assert!(t1 > t0, "CPU time grows while spinning: {t0:?} -> {t1:?}");
    }
}
