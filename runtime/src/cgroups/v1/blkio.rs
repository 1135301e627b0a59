//! v1 `blkio` controller. Kernels without CFQ (all since 5.0) only have the BFQ files
//! (`blkio.bfq.weight`); the weight goes to whichever exists.

use std::path::Path;

use oci_spec::runtime::{LinuxBlockIo, LinuxThrottleDevice};

use crate::cgroups::{
    fs::{self, Probe, Setting},
    stats::{BlkioEntry, BlkioStats},
    CgroupError,
};

fn pick<'a>(probe: &dyn Probe, candidates: &[&'a str]) -> Option<&'a str> {
    candidates.iter().copied().find(|f| probe.exists(f))
}

pub(crate) fn settings(b: &LinuxBlockIo, probe: &dyn Probe) -> Vec<Setting> {
    let mut out = Vec::new();
    if let Some(w) = b.weight() {
        match pick(probe, &["blkio.weight", "blkio.bfq.weight"]) {
            Some(file) => out.push(Setting::new(file, w)),
            None => tracing::warn!("no blkio weight file on this host; blockIO.weight ignored"),
        }
    }
    if let Some(w) = b.leaf_weight() {
        match pick(probe, &["blkio.leaf_weight"]) {
            Some(file) => out.push(Setting::new(file, w)),
            None => tracing::warn!("blkio.leaf_weight is not available; ignored"),
        }
    }
    for d in b.weight_device().iter().flatten() {
        if let Some(w) = d.weight() {
            match pick(probe, &["blkio.weight_device", "blkio.bfq.weight_device"]) {
                Some(file) => out.push(Setting::new(
                    file,
                    format!("{}:{} {w}", d.major(), d.minor()),
                )),
                None => tracing::warn!("no blkio weight_device file; ignored"),
            }
        }
        if let Some(w) = d.leaf_weight() {
            match pick(probe, &["blkio.leaf_weight_device"]) {
                Some(file) => out.push(Setting::new(
                    file,
                    format!("{}:{} {w}", d.major(), d.minor()),
                )),
                None => tracing::warn!("blkio.leaf_weight_device is not available; ignored"),
            }
        }
    }
    let throttles: [(&str, &Option<Vec<LinuxThrottleDevice>>); 4] = [
        (
            "blkio.throttle.read_bps_device",
            b.throttle_read_bps_device(),
        ),
        (
            "blkio.throttle.write_bps_device",
            b.throttle_write_bps_device(),
        ),
        (
            "blkio.throttle.read_iops_device",
            b.throttle_read_iops_device(),
        ),
        (
            "blkio.throttle.write_iops_device",
            b.throttle_write_iops_device(),
        ),
    ];
    for (file, devices) in throttles {
        for d in devices.iter().flatten() {
            out.push(Setting::new(
                file,
                format!("{}:{} {}", d.major(), d.minor(), d.rate()),
            ));
        }
    }
    out
}

/// Parses `major:minor Op value` lines (the `Total` summary line has no device and is
/// skipped).
pub(crate) fn parse_entries(text: &str) -> Vec<BlkioEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (dev, op, value) = (f.next()?, f.next()?, f.next()?);
            let (major, minor) = dev.split_once(':')?;
            Some(BlkioEntry {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                op: op.to_string(),
                value: value.parse().ok()?,
            })
        })
        .collect()
}

pub(crate) fn stats(dir: &Path) -> Result<BlkioStats, CgroupError> {
    let read = |candidates: &[&str]| -> Result<Vec<BlkioEntry>, CgroupError> {
        for file in candidates {
            if let Some(text) = fs::read_optional("blkio", dir, file)? {
                let entries = parse_entries(&text);
                if !entries.is_empty() {
                    return Ok(entries);
                }
            }
        }
        Ok(Vec::new())
    };
    Ok(BlkioStats {
        io_service_bytes_recursive: read(&[
            "blkio.io_service_bytes_recursive",
            "blkio.bfq.io_service_bytes_recursive",
            "blkio.throttle.io_service_bytes_recursive",
        ])?,
        io_serviced_recursive: read(&[
            "blkio.io_serviced_recursive",
            "blkio.bfq.io_serviced_recursive",
            "blkio.throttle.io_serviced_recursive",
        ])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::fs::tests_support::FakeProbe;
    use oci_spec::runtime::{
        LinuxBlockIoBuilder, LinuxThrottleDeviceBuilder, LinuxWeightDeviceBuilder,
    };

    #[test]
    fn weight_goes_to_bfq_when_cfq_is_gone_and_throttles_map() {
        let b = LinuxBlockIoBuilder::default()
            .weight(500u16)
            .weight_device(vec![LinuxWeightDeviceBuilder::default()
                .major(8)
                .minor(0)
                .weight(300u16)
                .build()
                .unwrap()])
            .throttle_read_bps_device(vec![LinuxThrottleDeviceBuilder::default()
                .major(8)
                .minor(0)
                .rate(1_048_576u64)
                .build()
                .unwrap()])
            .build()
            .unwrap();
        let bfq = FakeProbe::new(&[("blkio.bfq.weight", "100"), ("blkio.bfq.weight_device", "")]);
        assert_eq!(
            settings(&b, &bfq),
            [
                Setting::new("blkio.bfq.weight", 500),
                Setting::new("blkio.bfq.weight_device", "8:0 300"),
                Setting::new("blkio.throttle.read_bps_device", "8:0 1048576"),
            ]
        );
        let cfq = FakeProbe::new(&[("blkio.weight", "100"), ("blkio.weight_device", "")]);
        assert_eq!(settings(&b, &cfq)[0], Setting::new("blkio.weight", 500));
    }

    #[test]
    fn entries_parse() {
        let e = parse_entries("8:0 Read 4096\n8:0 Write 0\nTotal 4096\n");
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].major, e[0].minor, e[0].op.as_str(), e[0].value),
            (8, 0, "Read", 4096)
        );
    }
}
