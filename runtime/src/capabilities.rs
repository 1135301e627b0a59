//! The five capability sets of a container process (bounding, permitted, effective,
//! inheritable, ambient), applied with the `caps` crate.

use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, LinuxCapabilities};

/// Parses a capability name as the spec writes it (`CAP_SYS_ADMIN`; the `CAP_` prefix and
/// case are optional, as in runc).
pub fn parse(name: &str) -> Option<Capability> {
    Capability::from_str(&caps::to_canonical(name)).ok()
}

fn convert(set: &Option<Capabilities>) -> Option<CapsHashSet> {
    set.as_ref().map(|s| {
        s.iter()
            // `Display` of oci-spec's Capability is the name without `CAP_`.
            .filter_map(|c| parse(&c.to_string()))
            .collect()
    })
}

/// Drops every capability not in the spec's bounding set. Needs `CAP_SETPCAP`, so it runs
/// before the user switch.
pub fn drop_bounding(spec: &LinuxCapabilities) -> Result<(), String> {
    let Some(bounding) = convert(spec.bounding()) else {
        return Ok(());
    };
    let current =
        caps::read(None, CapSet::Bounding).map_err(|e| format!("reading bounding set: {e}"))?;
    for cap in current.difference(&bounding) {
        caps::drop(None, CapSet::Bounding, *cap)
            .map_err(|e| format!("dropping {cap} from the bounding set: {e}"))?;
    }
    Ok(())
}

/// Sets the effective, permitted, inheritable and ambient sets. Runs after the user switch
/// (with `PR_SET_KEEPCAPS` held across it, so the permitted set survives a non-root uid).
pub fn apply(spec: &LinuxCapabilities) -> Result<(), String> {
    let permitted = convert(spec.permitted()).unwrap_or_default();
    let effective = convert(spec.effective()).unwrap_or_default();
    let inheritable = convert(spec.inheritable()).unwrap_or_default();
    let ambient = convert(spec.ambient()).unwrap_or_default();
    // Order matters. Raising inheritable beyond the current set needs CAP_SETPCAP in the
    // effective set, raising ambient needs the capability permitted and inheritable, and
    // effective ⊆ permitted must hold after every step: so first make every permitted
    // capability effective, then set inheritable and ambient, then shrink effective and
    // finally permitted.
    let held =
        caps::read(None, CapSet::Permitted).map_err(|e| format!("reading permitted set: {e}"))?;
    caps::set(None, CapSet::Effective, &held)
        .map_err(|e| format!("setting effective capabilities: {e}"))?;
    caps::set(None, CapSet::Inheritable, &inheritable)
        .map_err(|e| format!("setting inheritable capabilities: {e}"))?;
    caps::clear(None, CapSet::Ambient)
        .map_err(|e| format!("clearing ambient capabilities: {e}"))?;
    for cap in ambient {
        // The kernel's rule, spelled out instead of a bare EPERM.
        if !inheritable.contains(&cap) || !permitted.contains(&cap) {
            return Err(format!(
                "process.capabilities.ambient: {cap} must also be inheritable and permitted"
            ));
        }
        caps::raise(None, CapSet::Ambient, cap)
            .map_err(|e| format!("raising ambient capability {cap}: {e}"))?;
    }
    let effective: CapsHashSet = effective.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Effective, &effective)
        .map_err(|e| format!("setting effective capabilities: {e}"))?;
    caps::set(None, CapSet::Permitted, &permitted)
        .map_err(|e| format!("setting permitted capabilities: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_like_runc() {
        assert_eq!(parse("CAP_SYS_ADMIN"), Some(Capability::CAP_SYS_ADMIN));
        assert_eq!(parse("net_raw"), Some(Capability::CAP_NET_RAW));
        assert_eq!(parse("CAP_FOO"), None);
    }

    #[test]
    fn converts_oci_capabilities() {
        let set: Capabilities = [oci_spec::runtime::Capability::Chown].into_iter().collect();
        let converted = convert(&Some(set)).unwrap();
        assert!(converted.contains(&Capability::CAP_CHOWN));
    }
}
