//! v1 `hugetlb` controller: `hugetlb.<size>.limit_in_bytes` (and the reservation limit
//! `hugetlb.<size>.rsvd.limit_in_bytes` where the kernel has it, Linux ≥ 5.7, as runc).

use std::path::Path;

use oci_spec::runtime::LinuxHugepageLimit;

use crate::cgroups::{
    fs::{self, Probe, Setting},
    stats::HugetlbStats,
    CgroupError,
};

/// Checks a page size such as `2MB` or `1GB` (it becomes part of a file name).
pub(crate) fn validate_page_size(index: usize, size: &str) -> Result<(), CgroupError> {
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &size[digits.len()..];
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || !["KB", "MB", "GB"].contains(&unit)
    {
        return Err(CgroupError::Resource {
            field: format!("linux.resources.hugepageLimits[{index}].pageSize"),
            msg: format!("{size:?} is not a page size like 2MB or 1GB"),
        });
    }
    Ok(())
}

pub(crate) fn settings(
    limits: &[LinuxHugepageLimit],
    probe: &dyn Probe,
) -> Result<Vec<Setting>, CgroupError> {
    let mut out = Vec::new();
    for (i, l) in limits.iter().enumerate() {
        validate_page_size(i, l.page_size())?;
        let file = format!("hugetlb.{}.limit_in_bytes", l.page_size());
        if !probe.exists(&file) {
            return Err(CgroupError::Resource {
                field: format!("linux.resources.hugepageLimits[{i}].pageSize"),
                msg: format!("page size {} is not supported by this host", l.page_size()),
            });
        }
        out.push(Setting::new(file, l.limit()));
        let rsvd = format!("hugetlb.{}.rsvd.limit_in_bytes", l.page_size());
        if probe.exists(&rsvd) {
            out.push(Setting::new(rsvd, l.limit()));
        }
    }
    Ok(out)
}

/// Page sizes the controller knows, from its file names.
pub(crate) fn page_sizes(dir: &Path, suffix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sizes: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let size = name.strip_prefix("hugetlb.")?.strip_suffix(suffix)?;
            (!size.contains('.')).then(|| size.to_string())
        })
        .collect();
    sizes.sort();
    sizes
}

pub(crate) fn stats(
    dir: &Path,
) -> Result<std::collections::BTreeMap<String, HugetlbStats>, CgroupError> {
    let mut out = std::collections::BTreeMap::new();
    for size in page_sizes(dir, ".limit_in_bytes") {
        let get =
            |what: &str| fs::read_u64_optional("hugetlb", dir, &format!("hugetlb.{size}.{what}"));
        out.insert(
            size.clone(),
            HugetlbStats {
                usage: get("usage_in_bytes")?.unwrap_or(0),
                max_usage: get("max_usage_in_bytes")?.unwrap_or(0),
                limit: get("limit_in_bytes")?.unwrap_or(u64::MAX),
                failcnt: get("failcnt")?.unwrap_or(0),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::fs::tests_support::FakeProbe;
    use oci_spec::runtime::LinuxHugepageLimitBuilder;

    #[test]
    fn limits_and_page_size_validation() {
        let l = |size: &str| {
            LinuxHugepageLimitBuilder::default()
                .page_size(size)
                .limit(1 << 21)
                .build()
                .unwrap()
        };
        let probe = FakeProbe::new(&[
            ("hugetlb.2MB.limit_in_bytes", "0"),
            ("hugetlb.2MB.rsvd.limit_in_bytes", "0"),
        ]);
        assert_eq!(
            settings(&[l("2MB")], &probe).unwrap(),
            [
                Setting::new("hugetlb.2MB.limit_in_bytes", 2097152),
                Setting::new("hugetlb.2MB.rsvd.limit_in_bytes", 2097152),
            ]
        );
        assert!(settings(&[l("1GB")], &probe).is_err(), "unsupported size");
        let e = settings(&[l("2MB"), l("../x")], &probe)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("linux.resources.hugepageLimits[1].pageSize"),
            "{e}"
        );
    }
}
