//! VM configuration: command-line flags and/or a JSON file, validated into a [`VmConfig`].
//!
//! Flags override values from `--config-file`. Everything is checked here, before any
//! resource is created, so a bad configuration fails with a message naming the field.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::arch::x86_64::layout::{IRQ_BASE, IRQ_MAX, MAX_MEM_SIZE, MIN_MEM_SIZE};
use crate::arch::x86_64::mptable;
use crate::devices::virtio::net::tap::{valid_ifname, IFNAME_MAX};
use crate::devices::virtio::net::{format_mac, MIN_MTU};
use crate::loader::DEFAULT_CMDLINE;

/// Longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const BLOCK_ID_MAX: usize = 20;
/// virtio-mmio devices the IOAPIC pins can serve.
pub const MAX_VIRTIO_DEVICES: usize = (IRQ_MAX - IRQ_BASE + 1) as usize;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// File path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON for this schema.
    #[error("invalid config file {path}: {source}")]
    ParseFile {
        /// File path.
        path: PathBuf,
        /// serde's description (names the field and position).
        #[source]
        source: serde_json::Error,
    },
    /// A field has an invalid value.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field (flag / JSON key).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A required field is absent.
    #[error("missing {0}")]
    Missing(&'static str),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Where guest serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout.
    Stdout,
    /// Discarded.
    None,
    /// Appended to a file (created if missing).
    File(PathBuf),
}

impl std::str::FromStr for SerialOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(SerialOutput::Stdout),
            "none" => Ok(SerialOutput::None),
            "" => Err("empty serial output".into()),
            path => Ok(SerialOutput::File(PathBuf::from(path))),
        }
    }
}

impl<'de> Deserialize<'de> for SerialOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A virtio-vsock device in hybrid mode.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// The guest's context id (≥ 3).
    pub guest_cid: u32,
    /// Host Unix socket: host peers connect here and send `CONNECT <port>\n`; guest-initiated
    /// connections to port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// A virtio-blk device.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockSpec {
    /// Raw disk image.
    pub path: PathBuf,
    /// Expose read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Serial the guest reads with `VIRTIO_BLK_T_GET_ID` (≤ 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
}

impl std::str::FromStr for BlockSpec {
    type Err = String;
    /// `path=<PATH>[,ro][,id=<ID>]`, or just `<PATH>`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = None;
        let mut read_only = false;
        let mut id = None;
        for (i, part) in s.split(',').enumerate() {
            match part.split_once('=') {
                Some(("path", p)) => path = Some(PathBuf::from(p)),
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("ro", v)) => {
                    read_only = v
                        .parse()
                        .map_err(|_| format!("ro={v}: expected true or false"))?
                }
                None if part == "ro" => read_only = true,
                None if i == 0 && !part.is_empty() => path = Some(PathBuf::from(part)),
                _ => return Err(format!("unknown block option {part:?}")),
            }
        }
        let path = path.ok_or("block device needs path=<PATH>")?;
        Ok(BlockSpec {
            path,
            read_only,
            id,
        })
    }
}

/// A virtio-net device on an existing tap interface (in the VMM's network namespace).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// Name of the tap interface; it must already exist.
    pub tap: String,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff` (unicast). Without it the guest
    /// picks a random one.
    #[serde(default, deserialize_with = "deserialize_mac")]
    pub mac: Option<[u8; 6]>,
    /// MTU offered to the guest (68..=65535).
    #[serde(default)]
    pub mtu: Option<u16>,
}

/// Parse `aa:bb:cc:dd:ee:ff` (hex, colon-separated, six octets).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for octet in mac.iter_mut() {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn deserialize_mac<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<[u8; 6]>, D::Error> {
    match Option::<String>::deserialize(d)? {
        Some(s) => parse_mac(&s).map(Some).map_err(serde::de::Error::custom),
        None => Ok(None),
    }
}

impl std::str::FromStr for NetSpec {
    type Err = String;
    /// `tap=<IFNAME>[,mac=<aa:bb:cc:dd:ee:ff>][,mtu=<N>]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        let mut mtu = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(parse_mac(v)?),
                Some(("mtu", v)) => {
                    mtu = Some(
                        v.parse()
                            .map_err(|_| format!("mtu={v}: expected a number in 68..=65535"))?,
                    )
                }
                _ => return Err(format!("unknown net option {part:?}")),
            }
        }
        let tap = tap.ok_or("net device needs tap=<IFNAME>")?;
        Ok(NetSpec { tap, mac, mtu })
    }
}

/// The JSON configuration file (`--config-file`). Every key is optional here; the merged
/// result is validated as a whole.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Kernel image.
    pub kernel: Option<PathBuf>,
    /// Initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// vCPU count.
    pub vcpus: Option<u8>,
    /// Memory in MiB.
    pub mem_mib: Option<u64>,
    /// vsock device.
    pub vsock: Option<VsockSpec>,
    /// Block devices.
    #[serde(default)]
    pub block: Vec<BlockSpec>,
    /// Network devices.
    #[serde(default)]
    pub net: Vec<NetSpec>,
    /// Serial output: "stdout", "none" or a file path.
    pub serial_output: Option<SerialOutput>,
    /// Feed the VMM's stdin to the guest serial console.
    pub serial_input: Option<bool>,
    /// Control socket path.
    pub api_socket: Option<PathBuf>,
    /// Disable seccomp filters (debugging only).
    pub no_seccomp: Option<bool>,
}

/// palisade-vmm: boot a Linux guest in a KVM microVM.
///
/// Exit status: 0 when the guest resets (`reboot`; put `reboot=k` on its command line so
/// the i8042 reset is used) or powers off, or after an API `shutdown`; 1 on a VMM or
/// configuration error; 2 when the guest fails (triple fault, KVM emulation failure, crash
/// event); 128+N when stopped by signal N (SIGTERM, SIGINT, SIGHUP).
///
/// Devices: COM1 (0x3f8, IRQ 4), i8042 (0x60/0x64, IRQ 1), then virtio-mmio devices from
/// 0xd0000000 (4 KiB apart, IRQ 5 upwards): the vsock device first, then the block
/// devices, then the net devices, each in the order given.
#[derive(Debug, Default, Parser)]
#[command(name = "palisade-vmm", version, about, long_about)]
pub struct Cli {
    /// JSON configuration file (keys: kernel, initrd, cmdline, vcpus, mem_mib,
    /// vsock {guest_cid, uds_path}, block [{path, read_only, id}], net [{tap, mac, mtu}],
    /// serial_output,
    /// serial_input, api_socket, no_seccomp). Flags given on the command line override it.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Guest kernel: PVH ELF vmlinux (preferred), ELF vmlinux without PVH note (64-bit
    /// entry), or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initrd / initramfs image, placed at the top of memory below 3.25 GiB.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. A `virtio_mmio.device=` entry is appended for every virtio
    /// device. [default: "console=ttyS0 reboot=k panic=1 pci=off"]
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1-32). [default: 1]
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u8>,
    /// Guest memory in MiB (≥ 16). [default: 128]
    #[arg(long, value_name = "MIB", visible_alias = "memory-mib")]
    pub mem_mib: Option<u64>,
    /// Guest context id of the virtio-vsock device (≥ 3). Requires --vsock-uds.
    #[arg(long, value_name = "CID", requires = "vsock_uds")]
    pub vsock_cid: Option<u32>,
    /// Host Unix socket of the hybrid vsock device: connect and send "CONNECT <port>\n" to
    /// reach a guest port; guest connections to port P go to "<PATH>_P". Requires --vsock-cid.
    #[arg(
        long,
        value_name = "PATH",
        requires = "vsock_cid",
        visible_alias = "vsock-socket"
    )]
    pub vsock_uds: Option<PathBuf>,
    /// Add a virtio-blk device backed by a raw image: "path=<PATH>[,ro][,id=<ID>]"
    /// (id: ≤ 20-byte serial). Repeat for more disks; the guest sees them as vda, vdb, ...
    #[arg(long = "block", value_name = "SPEC")]
    pub block: Vec<BlockSpec>,
    /// Add a virtio-net device on an existing tap interface of the VMM's network
    /// namespace: "tap=<IFNAME>[,mac=<aa:bb:cc:dd:ee:ff>][,mtu=<N>]". Repeatable; the
    /// guest sees eth0, eth1, ...
    #[arg(long = "net", value_name = "SPEC")]
    pub net: Vec<NetSpec>,
    /// Guest serial (COM1) output: "stdout", "none", or a file path. [default: stdout]
    #[arg(long, value_name = "stdout|none|PATH")]
    pub serial_output: Option<SerialOutput>,
    /// Feed the VMM's stdin to the guest serial console.
    #[arg(long)]
    pub serial_input: bool,
    /// Control socket (JSON lines): {"cmd":"status"|"pause"|"resume"|"shutdown"}.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Do not install seccomp filters (debugging only: a guest escape is then unconfined).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Log filter (tracing env-filter syntax), logs go to stderr. Also read from RUST_LOG.
    #[arg(long, value_name = "FILTER", default_value = "warn")]
    pub log_level: String,
}

/// A complete, validated VM configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Base kernel command line (virtio entries are appended at boot).
    pub cmdline: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// vsock device.
    pub vsock: Option<VsockSpec>,
    /// Block devices.
    pub block: Vec<BlockSpec>,
    /// Net devices.
    pub net: Vec<NetSpec>,
    /// Serial output.
    pub serial_output: SerialOutput,
    /// Serial input from stdin.
    pub serial_input: bool,
    /// Control socket.
    pub api_socket: Option<PathBuf>,
    /// Seccomp filters on.
    pub seccomp: bool,
}

impl VmConfig {
    /// A configuration for `kernel` with every other setting at its default.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            mem_size: 128 << 20,
            vsock: None,
            block: Vec::new(),
            net: Vec::new(),
            serial_output: SerialOutput::Stdout,
            serial_input: false,
            api_socket: None,
            seccomp: true,
        }
    }

    /// Merge `--config-file` (if any) and the flags, then validate.
    pub fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config_file {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(file, cli)
    }

    fn merge(file: FileConfig, cli: &Cli) -> Result<Self, ConfigError> {
        let kernel = cli
            .kernel
            .clone()
            .or(file.kernel)
            .ok_or(ConfigError::Missing("kernel (--kernel or \"kernel\")"))?;
        let mut config = VmConfig::new(kernel);
        config.initrd = cli.initrd.clone().or(file.initrd);
        if let Some(c) = cli.cmdline.clone().or(file.cmdline) {
            config.cmdline = c;
        }
        config.vcpus = cli.vcpus.or(file.vcpus).unwrap_or(1);
        let mem_mib = cli.mem_mib.or(file.mem_mib).unwrap_or(128);
        config.mem_size = mem_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| invalid("mem_mib", format!("{mem_mib} MiB overflows")))?;
        config.vsock = match (cli.vsock_cid, &cli.vsock_uds) {
            (Some(guest_cid), Some(uds_path)) => Some(VsockSpec {
                guest_cid,
                uds_path: uds_path.clone(),
            }),
            _ => file.vsock,
        };
        config.block = if cli.block.is_empty() {
            file.block
        } else {
            cli.block.clone()
        };
        config.net = if cli.net.is_empty() {
            file.net
        } else {
            cli.net.clone()
        };
        if let Some(out) = cli.serial_output.clone().or(file.serial_output) {
            config.serial_output = out;
        }
        config.serial_input = cli.serial_input || file.serial_input.unwrap_or(false);
        config.api_socket = cli.api_socket.clone().or(file.api_socket);
        config.seccomp = !(cli.no_seccomp || file.no_seccomp.unwrap_or(false));
        config.validate()?;
        Ok(config)
    }

    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(invalid("kernel", "empty path"));
        }
        if self.vcpus == 0 || self.vcpus > mptable::MAX_CPUS {
            return Err(invalid(
                "vcpus",
                format!("{} is not in 1..={}", self.vcpus, mptable::MAX_CPUS),
            ));
        }
        if self.mem_size < MIN_MEM_SIZE || self.mem_size > MAX_MEM_SIZE {
            return Err(invalid(
                "mem_mib",
                format!(
                    "{} MiB is not in {}..={} MiB",
                    self.mem_size >> 20,
                    MIN_MEM_SIZE >> 20,
                    MAX_MEM_SIZE >> 20
                ),
            ));
        }
        if self.cmdline.len() >= crate::arch::x86_64::layout::CMDLINE_MAX_SIZE {
            return Err(invalid("cmdline", "longer than 2047 bytes"));
        }
        if let Some(v) = &self.vsock {
            // 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
            if v.guest_cid < 3 || v.guest_cid == u32::MAX {
                return Err(invalid(
                    "vsock guest_cid",
                    format!("{} is reserved (use 3..=4294967294)", v.guest_cid),
                ));
            }
            check_socket_path("vsock uds_path", &v.uds_path, VSOCK_PORT_SUFFIX_MAX)?;
        }
        let mut ids = std::collections::HashSet::new();
        for b in &self.block {
            if b.path.as_os_str().is_empty() {
                return Err(invalid("block path", "empty path"));
            }
            if let Some(id) = &b.id {
                if id.len() > BLOCK_ID_MAX {
                    return Err(invalid(
                        "block id",
                        format!("{id:?} is longer than {BLOCK_ID_MAX} bytes"),
                    ));
                }
                if !ids.insert(id.clone()) {
                    return Err(invalid("block id", format!("{id:?} is used twice")));
                }
            }
        }
        let mut taps = std::collections::HashSet::new();
        for n in &self.net {
            if !valid_ifname(&n.tap) {
                return Err(invalid(
                    "net tap",
                    format!(
                        "{:?} is not an interface name (1-{IFNAME_MAX} bytes, no '/', ':' or whitespace)",
                        n.tap
                    ),
                ));
            }
            if !taps.insert(n.tap.clone()) {
                return Err(invalid("net tap", format!("{:?} is used twice", n.tap)));
            }
            if let Some(mac) = &n.mac {
                if mac[0] & 1 != 0 || mac == &[0; 6] {
                    return Err(invalid(
                        "net mac",
                        format!("{} is not a unicast address", format_mac(mac)),
                    ));
                }
            }
            if let Some(mtu) = n.mtu {
                if mtu < MIN_MTU {
                    return Err(invalid(
                        "net mtu",
                        format!("{mtu} is not in {MIN_MTU}..=65535"),
                    ));
                }
            }
        }
        let devices = self.block.len() + self.net.len() + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "block/net",
                format!("{devices} virtio devices, at most {MAX_VIRTIO_DEVICES} are supported"),
            ));
        }
        if let Some(p) = &self.api_socket {
            check_socket_path("api_socket", p, 0)?;
        }
        Ok(())
    }
}

/// Longest suffix vsock appends for guest-initiated connections: `_4294967295`.
const VSOCK_PORT_SUFFIX_MAX: usize = 11;

/// `sockaddr_un.sun_path` holds 107 bytes plus the NUL; `suffix` bytes are reserved for
/// names derived from `path`.
fn check_socket_path(field: &'static str, path: &Path, suffix: usize) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    let max = 107 - suffix;
    if len == 0 {
        return Err(invalid(field, "empty path"));
    }
    if len > max {
        return Err(invalid(
            field,
            format!(
                "{} is {len} bytes, at most {max} fit in a Unix socket address",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn parse(args: &[&str]) -> Result<VmConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("palisade-vmm").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        VmConfig::from_cli(&cli).map_err(|e| e.to_string())
    }

    #[test]
    fn flags_with_defaults() {
        let c = parse(&["--kernel", "/k"]).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
        let c = parse(&[
            "--kernel",
            "/k",
            "--vcpus",
            "2",
            "--memory-mib",
            "256",
            "--vsock-cid",
            "3",
            "--vsock-uds",
            "/run/v.sock",
            "--block",
            "path=/a.img,ro,id=rootfs",
            "--block",
            "/b.img",
            "--serial-output",
            "/tmp/console.log",
            "--no-seccomp",
        ])
        .unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!(
            c.vsock,
            Some(VsockSpec {
                guest_cid: 3,
                uds_path: "/run/v.sock".into()
            })
        );
        assert_eq!(
            c.block,
            vec![
                BlockSpec {
                    path: "/a.img".into(),
                    read_only: true,
                    id: Some("rootfs".into())
                },
                BlockSpec {
                    path: "/b.img".into(),
                    read_only: false,
                    id: None
                }
            ]
        );
        assert_eq!(
            c.serial_output,
            SerialOutput::File("/tmp/console.log".into())
        );
        assert!(!c.seccomp);
    }

    #[test]
    fn config_file_merged_with_flags() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(
            f,
            r#"{{"kernel":"/vmlinux","vcpus":4,"mem_mib":512,"serial_output":"none",
                "vsock":{{"guest_cid":42,"uds_path":"/v"}},
                "block":[{{"path":"/r.img","read_only":true}}]}}"#
        )
        .unwrap();
        let path = f.path().to_str().unwrap();
        let c = parse(&["--config-file", path, "--vcpus", "2"]).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/vmlinux"));
        assert_eq!(c.vcpus, 2, "flag overrides file");
        assert_eq!(c.mem_size, 512 << 20);
        assert_eq!(c.serial_output, SerialOutput::None);
        assert_eq!(c.vsock.unwrap().guest_cid, 42);
        assert!(c.block[0].read_only);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "missing kernel"),
            (&["--kernel", "/k", "--vcpus", "0"], "invalid vcpus"),
            (&["--kernel", "/k", "--vcpus", "33"], "invalid vcpus"),
            (&["--kernel", "/k", "--mem-mib", "8"], "invalid mem_mib"),
            (
                &["--kernel", "/k", "--mem-mib", "99999999999999999"],
                "invalid mem_mib",
            ),
            (
                &["--kernel", "/k", "--vsock-cid", "2", "--vsock-uds", "/v"],
                "invalid vsock guest_cid",
            ),
            (&["--kernel", "/k", "--vsock-cid", "3"], "--vsock-uds"),
            (&["--kernel", "/k", "--block", "ro"], "needs path"),
            (
                &["--kernel", "/k", "--block", "path=/a,bogus"],
                "unknown block option",
            ),
            (
                &[
                    "--kernel",
                    "/k",
                    "--block",
                    "path=/a,id=aaaaaaaaaaaaaaaaaaaaa",
                ],
                "invalid block id",
            ),
            (
                &[
                    "--kernel",
                    "/k",
                    "--block",
                    "path=/a,id=x",
                    "--block",
                    "path=/b,id=x",
                ],
                "used twice",
            ),
            (
                &["--kernel", "/k", "--serial-output", ""],
                "empty serial output",
            ),
        ];
        for (args, expected) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(expected), "{args:?}: {err}");
        }
        let long = format!("/{}", "s".repeat(120));
        let err = parse(&["--kernel", "/k", "--api-socket", &long]).unwrap_err();
        assert!(err.contains("invalid api_socket"), "{err}");
        let vsock = format!("/{}", "v".repeat(100));
        let err =
            parse(&["--kernel", "/k", "--vsock-cid", "3", "--vsock-uds", &vsock]).unwrap_err();
        assert!(err.contains("at most 96"), "{err}");
    }

    #[test]
    fn net_devices_from_flags_and_file() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--net",
            "tap=tap0,mac=02:aa:bb:cc:dd:0E,mtu=1400",
            "--net",
            "tap=tap1",
        ])
        .unwrap();
        assert_eq!(
            c.net,
            vec![
                NetSpec {
                    tap: "tap0".into(),
                    mac: Some([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x0e]),
                    mtu: Some(1400)
                },
                NetSpec {
                    tap: "tap1".into(),
                    mac: None,
                    mtu: None
                }
            ]
        );
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(
            f,
            r#"{{"kernel":"/k","net":[{{"tap":"eth-tap","mac":"02:00:00:00:00:01","mtu":9000}}]}}"#
        )
        .unwrap();
        let c = parse(&["--config-file", f.path().to_str().unwrap()]).unwrap();
        assert_eq!(c.net[0].tap, "eth-tap");
        assert_eq!(c.net[0].mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(c.net[0].mtu, Some(9000));
    }

    #[test]
    fn bad_net_configs_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("mac=02:00:00:00:00:01", "needs tap="),
            ("tap=t0,speed=10", "unknown net option"),
            ("tap=t0,mac=02:00:00:00:00", "not a MAC address"),
            ("tap=t0,mac=02:00:00:00:00:01:02", "not a MAC address"),
            ("tap=t0,mac=0g:00:00:00:00:01", "not a MAC address"),
            ("tap=t0,mac=01:00:5e:00:00:01", "invalid net mac"),
            ("tap=t0,mac=00:00:00:00:00:00", "invalid net mac"),
            ("tap=t0,mtu=67", "invalid net mtu"),
            ("tap=t0,mtu=65536", "mtu=65536"),
            ("tap=", "invalid net tap"),
            ("tap=a/b", "invalid net tap"),
            ("tap=sixteen-bytes-xx", "invalid net tap"),
        ];
        for (spec, expected) in cases {
            let err = parse(&["--kernel", "/k", "--net", spec]).unwrap_err();
            assert!(err.contains(expected), "{spec}: {err}");
        }
        let err = parse(&["--kernel", "/k", "--net", "tap=t0", "--net", "tap=t0"]).unwrap_err();
        assert!(err.contains("used twice"), "{err}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(f, r#"{{"kernel":"/k","net":[{{"tap":"t0","mac":"zz"}}]}}"#).unwrap();
        let err = parse(&["--config-file", f.path().to_str().unwrap()]).unwrap_err();
        assert!(err.contains("not a MAC address"), "{err}");
    }

    #[test]
    fn bad_config_files() {
        let err = parse(&["--config-file", "/nonexistent/palisade.json"]).unwrap_err();
        assert!(err.contains("cannot read config file"), "{err}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(f, r#"{{"kernel":"/k","vcpu":2}}"#).unwrap();
        let err = parse(&["--config-file", f.path().to_str().unwrap()]).unwrap_err();
        assert!(err.contains("unknown field `vcpu`"), "{err}");
        let mut g = tempfile::NamedTempFile::new().unwrap();
        write!(g, r#"{{"kernel":"/k","vcpus":"two"}}"#).unwrap();
        let err = parse(&["--config-file", g.path().to_str().unwrap()]).unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
    }
}
