//! v2 `io` controller. Weights go to `io.bfq.weight` (BFQ scheduler, same 1..=1000 range as
//! v1) when present, otherwise to `io.weight` (1..=10000, converted); throttles to `io.max`.

use std::path::Path;

use oci_spec::runtime::{LinuxBlockIo, LinuxThrottleDevice};

use crate::cgroups::{
    fs::{self, Probe, Setting},
    stats::{BlkioEntry, BlkioStats},
    CgroupError,
};

/// v1 blkio weight (10..=1000) to v2 `io.weight` (1..=10000).
pub(crate) fn blkio_weight_to_io_weight(w: u16) -> u64 {
    let w = u64::from(w.clamp(10, 1000));
    1 + (w - 10) * 9999 / 990
}

pub(crate) fn settings(b: &LinuxBlockIo, probe: &dyn Probe) -> Vec<Setting> {
    let mut out = Vec::new();
    let bfq = probe.exists("io.bfq.weight");
    let weight = |w: u16| {
        if bfq {
            u64::from(w)
        } else {
            blkio_weight_to_io_weight(w)
        }
    };
    let weight_file = if bfq { "io.bfq.weight" } else { "io.weight" };
    if let Some(w) = b.weight() {
        out.push(Setting::new(weight_file, weight(w)));
    }
    if b.leaf_weight().is_some() {
        tracing::warn!("linux.resources.blockIO.leafWeight has no cgroup v2 equivalent; ignored");
    }
    for d in b.weight_device().iter().flatten() {
        if let Some(w) = d.weight() {
            out.push(Setting::new(
                weight_file,
                format!("{}:{} {}", d.major(), d.minor(), weight(w)),
            ));
        }
    }
    let throttles: [(&str, &Option<Vec<LinuxThrottleDevice>>); 4] = [
        ("rbps", b.throttle_read_bps_device()),
        ("wbps", b.throttle_write_bps_device()),
        ("riops", b.throttle_read_iops_device()),
        ("wiops", b.throttle_write_iops_device()),
    ];
    for (key, devices) in throttles {
        for d in devices.iter().flatten() {
            // v1 semantics: a rate of 0 removes the limit.
            let rate = if d.rate() == 0 {
                "max".to_string()
            } else {
                d.rate().to_string()
            };
            out.push(Setting::new(
                "io.max",
                format!("{}:{} {key}={rate}", d.major(), d.minor()),
            ));
        }
    }
    out
}

/// `io.stat` lines (`8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0`) as v1-style entries.
pub(crate) fn parse_io_stat(text: &str) -> BlkioStats {
    let mut out = BlkioStats::default();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some((major, minor)) = fields.next().and_then(|d| d.split_once(':')) else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else {
            continue;
        };
        for kv in fields {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Ok(value) = v.parse() else { continue };
            let (list, op) = match k {
                "rbytes" => (&mut out.io_service_bytes_recursive, "Read"),
                "wbytes" => (&mut out.io_service_bytes_recursive, "Write"),
                "dbytes" => (&mut out.io_service_bytes_recursive, "Discard"),
                "rios" => (&mut out.io_serviced_recursive, "Read"),
                "wios" => (&mut out.io_serviced_recursive, "Write"),
                "dios" => (&mut out.io_serviced_recursive, "Discard"),
                _ => continue,
            };
            list.push(BlkioEntry {
                major,
                minor,
                op: op.into(),
                value,
            });
        }
    }
    out
}

pub(crate) fn stats(dir: &Path) -> Result<BlkioStats, CgroupError> {
    Ok(fs::read_optional("io", dir, "io.stat")?
        .map(|t| parse_io_stat(&t))
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::fs::tests_support::FakeProbe;
    use oci_spec::runtime::{LinuxBlockIoBuilder, LinuxThrottleDeviceBuilder};

    #[test]
    fn weight_conversion_and_io_max() {
        assert_eq!(blkio_weight_to_io_weight(10), 1);
        assert_eq!(blkio_weight_to_io_weight(1000), 10000);
        assert_eq!(blkio_weight_to_io_weight(500), 4950);
        let dev = |rate| {
            LinuxThrottleDeviceBuilder::default()
                .major(8)
                .minor(16)
                .rate(rate)
                .build()
                .unwrap()
        };
        let b = LinuxBlockIoBuilder::default()
            .weight(500u16)
            .throttle_write_iops_device(vec![dev(100u64)])
            .throttle_read_bps_device(vec![dev(0u64)])
            .build()
            .unwrap();
        assert_eq!(
            settings(&b, &FakeProbe::new(&[])),
            [
                Setting::new("io.weight", 4950),
                Setting::new("io.max", "8:16 rbps=max"),
                Setting::new("io.max", "8:16 wiops=100"),
            ]
        );
        assert_eq!(
            settings(&b, &FakeProbe::new(&[("io.bfq.weight", "100")]))[0],
            Setting::new("io.bfq.weight", 500)
        );
    }

    #[test]
    fn io_stat_parses() {
        let s = parse_io_stat("8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(s.io_service_bytes_recursive.len(), 3);
        assert_eq!(s.io_service_bytes_recursive[1].value, 8192);
        assert_eq!(s.io_serviced_recursive[0].op, "Read");
    }
}
