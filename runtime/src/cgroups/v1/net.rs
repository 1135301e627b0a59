//! v1 `net_cls` and `net_prio` controllers (no v2 equivalent).

use oci_spec::runtime::LinuxNetwork;

use crate::cgroups::fs::Setting;

pub(crate) fn net_cls_settings(n: &LinuxNetwork) -> Vec<Setting> {
    n.class_id()
        .map(|id| vec![Setting::new("net_cls.classid", id)])
        .unwrap_or_default()
}

/// One `ifname priority` write per interface (the file takes one pair per write).
pub(crate) fn net_prio_settings(n: &LinuxNetwork) -> Vec<Setting> {
    n.priorities()
        .iter()
        .flatten()
        .map(|p| {
            Setting::new(
                "net_prio.ifpriomap",
                format!("{} {}", p.name(), p.priority()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxInterfacePriorityBuilder, LinuxNetworkBuilder};

    #[test]
    fn classid_and_priorities() {
        let n = LinuxNetworkBuilder::default()
            .class_id(0x100001u32)
            .priorities(vec![LinuxInterfacePriorityBuilder::default()
                .name("eth0")
                .priority(5u32)
                .build()
                .unwrap()])
            .build()
            .unwrap();
        assert_eq!(
            net_cls_settings(&n),
            [Setting::new("net_cls.classid", 1048577)]
        );
        assert_eq!(
            net_prio_settings(&n),
            [Setting::new("net_prio.ifpriomap", "eth0 5")]
        );
    }
}
