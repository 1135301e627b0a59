//! The shim's log: records go to the `log` FIFO containerd opens in the bundle directory
//! (containerd copies each line into its own log), in logrus' text format like Go shims.
//!
//! Our own sink rather than containerd-shim's: that one serialises writers with a
//! mutex, and the runtime library forks children from a multi-threaded shim — a child
//! that logs while the fork snapshot has the mutex locked waits forever. This sink takes
//! no lock (one `write` per record; FIFO writes up to PIPE_BUF are atomic) and drops
//! records from any process other than the shim itself.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct FifoLog {
    file: File,
    pid: u32,
    level: LevelFilter,
}

impl Log for FifoLog {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        // A forked child (before exec) must not allocate or write here.
        if std::process::id() != self.pid || !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        let message = record
            .args()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        let line = format!(
            "time=\"{}\" level={level} msg=\"{message}\" runtime=io.containerd.palisade.v2 target={}\n",
            rfc3339_now(),
            record.target()
        );
        let _ = (&self.file).write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Logs to the FIFO at `path` (containerd's `log` in the bundle directory).
pub fn init(path: &Path, debug: bool) -> std::io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    let level = if debug {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    log::set_boxed_logger(Box::new(FifoLog {
        file,
        pid: std::process::id(),
        level,
    }))
    .map_err(std::io::Error::other)?;
    log::set_max_level(level);
    Ok(())
}

/// UTC now as RFC 3339 with nanoseconds.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(rfc3339_now().len(), "2026-11-24T09:00:00.000000000Z".len());
    }
}
