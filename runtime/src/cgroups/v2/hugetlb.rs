//! v2 `hugetlb` controller: `hugetlb.<size>.max` (+ `.rsvd.max` where present).

use std::{collections::BTreeMap, path::Path};

use oci_spec::runtime::LinuxHugepageLimit;

use crate::cgroups::{
    fs::{self, Probe, Setting},
    stats::HugetlbStats,
    v1::hugetlb::{page_sizes, validate_page_size},
    CgroupError,
};

pub(crate) fn settings(
    limits: &[LinuxHugepageLimit],
    probe: &dyn Probe,
) -> Result<Vec<Setting>, CgroupError> {
    let mut out = Vec::new();
    for (i, l) in limits.iter().enumerate() {
        validate_page_size(i, l.page_size())?;
        let file = format!("hugetlb.{}.max", l.page_size());
        if !probe.exists(&file) {
            return Err(CgroupError::Resource {
                field: format!("linux.resources.hugepageLimits[{i}].pageSize"),
                msg: format!("page size {} is not supported by this host", l.page_size()),
            });
        }
        let value = if l.limit() < 0 {
            "max".to_string()
        } else {
            l.limit().to_string()
        };
        out.push(Setting::new(file, &value));
        let rsvd = format!("hugetlb.{}.rsvd.max", l.page_size());
        if probe.exists(&rsvd) {
            out.push(Setting::new(rsvd, value));
        }
    }
    Ok(out)
}

pub(crate) fn stats(dir: &Path) -> Result<BTreeMap<String, HugetlbStats>, CgroupError> {
    let mut out = BTreeMap::new();
    for size in page_sizes(dir, ".max") {
        let get =
            |what: &str| fs::read_u64_optional("hugetlb", dir, &format!("hugetlb.{size}.{what}"));
        let events = fs::read_flat_keyed("hugetlb", dir, &format!("hugetlb.{size}.events"))?;
        out.insert(
            size.clone(),
            HugetlbStats {
                usage: get("current")?.unwrap_or(0),
                max_usage: 0,
                limit: get("max")?.unwrap_or(u64::MAX),
                failcnt: events.get("max").copied().unwrap_or(0),
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
    fn max_files() {
        let l = LinuxHugepageLimitBuilder::default()
            .page_size("2MB")
            .limit(4194304)
            .build()
            .unwrap();
        let probe = FakeProbe::new(&[("hugetlb.2MB.max", "max")]);
        assert_eq!(
            settings(&[l], &probe).unwrap(),
            [Setting::new("hugetlb.2MB.max", 4194304)]
        );
    }
}
