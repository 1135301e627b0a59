//! Sandbox-wide state of the guest: hostname, DNS, sysctls (CreateSandbox) and the facts
//! GuestInfo reports.

use std::{collections::HashMap, fs, net::IpAddr, path::Path};

use palisade_agent_protocol::agent::{CreateSandboxRequest, GuestInfoResponse};

use crate::error::{AgentError, Context, Result};

const MAX_DNS_ENTRIES: usize = 32;
const MAX_SYSCTLS: usize = 256;

/// Applies a CreateSandbox request: validates everything first, then changes the guest.
/// `sandbox_dir` receives `resolv.conf`, which the shim bind-mounts into containers.
pub fn create(req: &CreateSandboxRequest, sandbox_dir: &Path) -> Result<()> {
    validate_hostname(&req.hostname)?;
    let resolv_conf = resolv_conf(req)?;
    let sysctls = sysctl_paths(&req.sysctls)?;

    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname).context(|| "sethostname".to_owned())?;
    }
    fs::create_dir_all(sandbox_dir).context(|| format!("creating {}", sandbox_dir.display()))?;
    let path = sandbox_dir.join("resolv.conf");
    fs::write(&path, resolv_conf).context(|| format!("writing {}", path.display()))?;
    for (key, path, value) in sysctls {
        fs::write(&path, value)
            .context(|| format!("sysctls[{key}]: writing {}", path.display()))?;
    }
    Ok(())
}

fn validate_hostname(hostname: &str) -> Result<()> {
    // RFC 1123 labels; the kernel limit is 64 bytes.
    let ok = hostname.len() <= 64
        && hostname.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !hostname.is_empty() && !ok {
        return Err(AgentError::invalid(
            "hostname",
            format!("{hostname:?} is not a valid hostname"),
        ));
    }
    Ok(())
}

fn resolv_conf(req: &CreateSandboxRequest) -> Result<String> {
    let mut out = String::new();
    if req.dns_servers.len() > MAX_DNS_ENTRIES
        || req.dns_searches.len() > MAX_DNS_ENTRIES
        || req.dns_options.len() > MAX_DNS_ENTRIES
    {
        return Err(AgentError::invalid(
            "dns",
            format!("at most {MAX_DNS_ENTRIES} entries each"),
        ));
    }
    for (i, server) in req.dns_servers.iter().enumerate() {
        let ip: IpAddr = server.parse().map_err(|_| {
            AgentError::invalid(
                format!("dns_servers[{i}]"),
                format!("{server:?} is not an IP address"),
            )
        })?;
        out.push_str(&format!("nameserver {ip}\n"));
    }
    for (field, words, keyword) in [
        ("dns_searches", &req.dns_searches, "search"),
        ("dns_options", &req.dns_options, "options"),
    ] {
        for (i, word) in words.iter().enumerate() {
            if word.is_empty() || word.len() > 253 || !word.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(AgentError::invalid(
                    format!("{field}[{i}]"),
                    format!("{word:?} is not a single word"),
                ));
            }
        }
        if !words.is_empty() {
            out.push_str(&format!("{keyword} {}\n", words.join(" ")));
        }
    }
    Ok(out)
}

/// `net.ipv4.ip_forward` -> `/proc/sys/net/ipv4/ip_forward`, sorted for a deterministic order.
fn sysctl_paths(
    sysctls: &HashMap<String, String>,
) -> Result<Vec<(String, std::path::PathBuf, String)>> {
    if sysctls.len() > MAX_SYSCTLS {
        return Err(AgentError::invalid(
            "sysctls",
            format!("at most {MAX_SYSCTLS} entries"),
        ));
    }
    let mut out = Vec::with_capacity(sysctls.len());
    for (key, value) in sysctls {
        let field = format!("sysctls[{key}]");
        let key_ok = !key.is_empty()
            && key.len() <= 256
            && key.split(['.', '/']).all(|part| {
                !part.is_empty()
                    && part != ".."
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            });
        if !key_ok {
            return Err(AgentError::invalid(field, "not a sysctl name"));
        }
        if value.len() > 4096 || value.contains('\n') || value.contains('\0') {
            return Err(AgentError::invalid(
                field,
                "value must be one line of at most 4096 bytes",
            ));
        }
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        out.push((key.clone(), path, value.clone()));
    }
    out.sort();
    Ok(out)
}

/// Facts about the running guest.
pub fn guest_info() -> Result<GuestInfoResponse> {
    let uname = nix::sys::utsname::uname().context(|| "uname".to_owned())?;
    let boot_id = read_trimmed("/proc/sys/kernel/random/boot_id")?;
    let meminfo = read_trimmed("/proc/meminfo")?;
    let uptime = read_trimmed("/proc/uptime")?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    Ok(GuestInfoResponse {
        kernel_release: uname.release().to_string_lossy().into_owned(),
        boot_id,
        cpus: u32::try_from(cpus).unwrap_or(0),
        memory_total_bytes: meminfo_kib(&meminfo, "MemTotal:") * 1024,
        memory_available_bytes: meminfo_kib(&meminfo, "MemAvailable:") * 1024,
        uptime_seconds: uptime
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0),
        ..Default::default()
    })
}

fn read_trimmed(path: &str) -> Result<String> {
    Ok(fs::read_to_string(path)
        .context(|| format!("reading {path}"))?
        .trim()
        .to_owned())
}

fn meminfo_kib(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_and_validation() {
        let req = CreateSandboxRequest {
            dns_servers: vec!["10.0.0.10".into(), "fd00::1".into()],
            dns_searches: vec!["svc.cluster.local".into()],
            dns_options: vec!["ndots:5".into()],
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(&req).unwrap(),
            "nameserver 10.0.0.10\nnameserver fd00::1\nsearch svc.cluster.local\noptions ndots:5\n"
        );
        let bad = CreateSandboxRequest {
            dns_servers: vec!["10.0.0.10\nsearch evil".into()],
            ..Default::default()
        };
        assert!(
            matches!(resolv_conf(&bad), Err(AgentError::InvalidArgument { field, .. }) if field == "dns_servers[0]")
        );
        assert!(validate_hostname("pod-1.example").is_ok());
        assert!(validate_hostname("bad_host").is_err());
        let mut sysctls = HashMap::new();
        sysctls.insert("net.ipv4.ip_forward".to_owned(), "1".to_owned());
        let paths = sysctl_paths(&sysctls).unwrap();
        assert_eq!(paths[0].1, Path::new("/proc/sys/net/ipv4/ip_forward"));
        sysctls.insert("kernel/../../etc".to_owned(), "1".to_owned());
        assert!(sysctl_paths(&sysctls).is_err());
    }

    #[test]
    fn guest_info_reads_the_running_kernel() {
        let info = guest_info().unwrap();
        assert!(!info.kernel_release.is_empty());
        assert_eq!(info.boot_id.len(), 36);
        assert!(info.cpus >= 1);
        assert!(
            info.memory_total_bytes >= info.memory_available_bytes && info.memory_total_bytes > 0
        );
    }
}
