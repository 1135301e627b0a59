//! `rdma` controller: the same `rdma.max` format in v1 and v2.

use std::collections::HashMap;

use oci_spec::runtime::LinuxRdma;

use crate::cgroups::fs::Setting;

/// One `device hca_handle=N hca_object=M` line per device (sorted for determinism).
pub(crate) fn settings(rdma: &HashMap<String, LinuxRdma>) -> Vec<Setting> {
    let mut devices: Vec<_> = rdma.iter().collect();
    devices.sort_by(|a, b| a.0.cmp(b.0));
    devices
        .into_iter()
        .map(|(dev, l)| {
            let v = |n: Option<u32>| n.map_or_else(|| "max".to_string(), |n| n.to_string());
            Setting::new(
                "rdma.max",
                format!(
                    "{dev} hca_handle={} hca_object={}",
                    v(l.hca_handles()),
                    v(l.hca_objects())
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxRdmaBuilder;

    #[test]
    fn rdma_lines() {
        let mut m = HashMap::new();
        m.insert(
            "mlx5_0".to_string(),
            LinuxRdmaBuilder::default()
                .hca_handles(3u32)
                .build()
                .unwrap(),
        );
        assert_eq!(
            settings(&m),
            [Setting::new(
                "rdma.max",
                "mlx5_0 hca_handle=3 hca_object=max"
            )]
        );
    }
}
