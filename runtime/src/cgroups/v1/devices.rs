//! v1 `devices` controller: the rule list is written as `devices.deny`/`devices.allow`
//! lines. It starts with `a` to `devices.deny`, which resets the cgroup to "deny everything"
//! (so an update replaces, rather than adds to, the previous list).

use crate::cgroups::{devices::DeviceRule, fs::Setting};

pub(crate) fn settings(rules: &[DeviceRule]) -> Vec<Setting> {
    rules
        .iter()
        .flat_map(|r| {
            let file = if r.allow {
                "devices.allow"
            } else {
                "devices.deny"
            };
            r.v1_lines()
                .into_iter()
                .map(move |line| Setting::new(file, line))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::devices::effective_rules;

    #[test]
    fn deny_all_then_defaults() {
        let s = settings(&effective_rules(&[]).unwrap());
        assert_eq!(s[0], Setting::new("devices.deny", "a"));
        assert!(s.contains(&Setting::new("devices.allow", "c 1:3 rwm")));
        assert!(s.contains(&Setting::new("devices.allow", "c 136:* rwm")));
        assert!(s.contains(&Setting::new("devices.allow", "b *:* m")));
    }
}
