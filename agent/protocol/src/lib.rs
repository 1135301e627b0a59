//! The ttrpc protocol between palisade's shim (host) and `palisade-agent` (guest).
//!
//! `protos/agent.proto` is the source of truth; this crate exposes the generated protobuf
//! messages ([`agent`]) and the async ttrpc client and server stubs ([`agent_ttrpc`]), and
//! connects to an agent through a VMM's hybrid-vsock socket ([`hybrid_vsock`]).

/// Protocol revision within `palisade.agent.v1`, reported by `Check`. Bumped for compatible
/// additions; incompatible changes get a new proto package.
pub const PROTOCOL_VERSION: u32 = 2;

/// The vsock port the agent listens on by default.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;

pub mod hybrid_vsock;

/// Protobuf messages of `palisade.agent.v1`.
// Generated code: lints are the generator's business (its inner allows were stripped by build.rs).
#[allow(warnings, clippy::all)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Async ttrpc stubs: `AgentClient` and the `Agent` server trait + `create_agent`.
// Generated code: lints are the generator's business (its inner allows were stripped by build.rs).
#[allow(warnings, clippy::all)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

#[cfg(test)]
mod tests {
    use protobuf::Message;

    use super::agent::{storage, CreateContainerRequest, Storage};

    #[test]
    fn create_container_request_round_trips_with_rootfs_oneof() {
        let mut rootfs = Storage::new();
        rootfs.source = Some(storage::Source::BlockDevice("/dev/vdb".into()));
        rootfs.fstype = "ext4".into();
        rootfs.options = vec!["ro".into()];
        let request = CreateContainerRequest {
            container_id: "c1".into(),
            spec_json: br#"{"ociVersion":"1.0.2"}"#.to_vec(),
            rootfs: Some(rootfs).into(),
            stdin: true,
            ..Default::default()
        };
        let bytes = request.write_to_bytes().unwrap();
        let decoded = CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(decoded, request);
        assert_eq!(decoded.rootfs.block_device(), "/dev/vdb");
    }
}
