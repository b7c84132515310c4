//! CPU accounting from `/proc`: a process's CPU time, and the whole machine's busy and
//! stolen time, so each measurement window can say who used the two cores.

/// Linux `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat`.
pub const TICKS_PER_S: f64 = 100.0;

/// CPU time (user + system, all threads) process `pid` has used so far, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is the first, utime the 12th.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU counters at one instant, in ticks: a process (the server), the bench itself, and
/// the whole machine (`/proc/stat`: busy = all but idle, iowait and steal).
#[derive(Default)]
pub struct CpuSnap {
    pub server: Option<u64>,
    pub bench: Option<u64>,
    pub nats: Option<u64>,
    pub busy: Option<u64>,
    pub steal: Option<u64>,
}

impl CpuSnap {
    pub fn take(pid: Option<u32>, nats_pid: Option<u32>) -> CpuSnap {
        let (busy, steal) = machine_ticks().unzip();
        CpuSnap {
            server: pid.and_then(cpu_ticks),
            bench: cpu_ticks(std::process::id()),
            nats: nats_pid.and_then(cpu_ticks),
            busy,
            steal,
        }
    }

    /// Busy CPU not used by the server, the bench or nats-server.
    pub fn other(&self) -> Option<u64> {
        let ours = self.server.unwrap_or(0) + self.bench.unwrap_or(0) + self.nats.unwrap_or(0);
        self.busy.map(|b| b.saturating_sub(ours))
    }

    pub fn since(&self, earlier: &CpuSnap) -> CpuSnap {
        let d = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?));
        CpuSnap {
            server: d(self.server, earlier.server),
            bench: d(self.bench, earlier.bench),
            nats: d(self.nats, earlier.nats),
            busy: d(self.busy, earlier.busy),
            steal: d(self.steal, earlier.steal),
        }
    }
}

/// (busy, steal) ticks of all CPUs together, from the first line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let field = |i: usize| v.get(i).copied().unwrap_or(0);
    let total: u64 = (0..8).map(field).sum();
    let (idle, steal) = (field(3) + field(4), field(7));
    Some((total - idle - steal, steal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process_and_machine() {
        let me = CpuSnap::take(Some(std::process::id()), None);
        assert!(me.server.is_some() && me.bench.is_some() && me.nats.is_none());
        let (busy, _) = machine_ticks().unwrap();
        assert!(busy > 0);
        let later = CpuSnap::take(Some(std::process::id()), None).since(&me);
        assert!(later.busy.is_some() && later.other().is_some());
    }
}
