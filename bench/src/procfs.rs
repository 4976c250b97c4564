//! CPU time and resident memory of the processes under test, read from `/proc`.

use std::fs;

/// Errors reading a process's figures.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The file could not be read (the process is gone, most likely).
    #[error("read /proc/{pid}/{file}: {source}")]
    Read {
        /// Process id.
        pid: u32,
        /// File under `/proc/<pid>/`.
        file: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file did not have the expected shape.
    #[error("unexpected format of /proc/{pid}/{file}")]
    Format {
        /// Process id.
        pid: u32,
        /// File under `/proc/<pid>/`.
        file: &'static str,
    },
}

/// User plus system CPU time in clock ticks, from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`: utime and stime are fields 14 and 15 of the line.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    // After the command: state is field 3, so utime (14) is the 12th field from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value in KiB of a `Key:   123 kB` line of `/proc/<pid>/status`.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this runs on).
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

fn read(pid: u32, file: &'static str) -> Result<String, ProcError> {
    fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|source| ProcError::Read {
        pid,
        file,
        source,
    })
}

/// CPU seconds (user + system, all threads) the process has used so far.
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Result<f64, ProcError> {
    let stat = read(pid, "stat")?;
    let ticks = parse_stat_ticks(&stat).ok_or(ProcError::Format { pid, file: "stat" })?;
    Ok(ticks as f64 / ticks_per_second)
}

/// Current resident memory (VmRSS) in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, ProcError> {
    let status = read(pid, "status")?;
    parse_status_kib(&status, "VmRSS").ok_or(ProcError::Format {
        pid,
        file: "status",
    })
}

/// Peak resident memory (VmHWM) in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64, ProcError> {
    let status = read(pid, "status")?;
    parse_status_kib(&status, "VmHWM").ok_or(ProcError::Format {
        pid,
        file: "status",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime_even_with_odd_command_names() {
        let stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 1234 0 0 0 150 25 0 0 20 0 3 0";
        assert_eq!(parse_stat_ticks(stat), Some(175));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn status_values_are_read_by_key() {
        let status = "Name:\tnginx\nVmHWM:\t   20480 kB\nVmRSS:\t   18432 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(18_432));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(20_480));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(cpu_seconds(pid, clock_ticks_per_second()).unwrap() >= 0.0);
    }
}
