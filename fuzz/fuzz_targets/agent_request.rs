//! The agent's request decoding: an arbitrary ttrpc frame (10-byte header + payload) is read
//! the way the agent's ttrpc server reads it, the `Request` envelope is decoded, and the
//! payload is parsed as the message type of the method it names; the JSON documents a
//! request carries (OCI spec, exec process, resources) then go through the same
//! `palisade-runtime` parsing/validation the agent applies. Inputs whose first byte is
//! below 0x20 skip the envelope and pick the method directly, so the per-message decoders
//! get fuzzed efficiently too.
//!
//! Not covered: the agent's own field checks (`validate_id`, storage plans, sandbox
//! hostname/sysctl checks) live in the `palisade-agent` binary crate, which has no library
//! target to call them from.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxResources, Process};
use palisade_agent_protocol::agent::*;
use protobuf::Message;
use ttrpc::proto::{GenMessage, Request};

const SERVICE: &str = "palisade.agent.v1.Agent";

/// Every method of the Agent service, in proto order.
const METHODS: &[&str] = &[
    "Check",
    "GuestInfo",
    "CreateSandbox",
    "DestroySandbox",
    "CreateContainer",
    "StartContainer",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "WriteStdin",
    "CloseStdin",
    "ReadStdout",
    "ReadStderr",
    "TtyWinResize",
    "PauseContainer",
    "ResumeContainer",
    "UpdateContainer",
    "StatsContainer",
    "ListProcesses",
    "RemoveContainer",
    "GetOomEvent",
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("building a current-thread runtime")
    })
}

/// The JSON documents the agent decodes, with the runtime checks it applies.
fn spec_json(bytes: &[u8]) {
    if let Ok(spec) = palisade_runtime::spec::parse(bytes) {
        let _ = palisade_runtime::spec::validate(&spec);
    }
}

fn process_json(bytes: &[u8], tty: bool) {
    if let Ok(mut process) = serde_json::from_slice::<Process>(bytes) {
        process.set_terminal(Some(tty));
        let _ = palisade_runtime::spec::validate_process(&process, "process_json");
    }
}

fn resources_json(bytes: &[u8]) {
    let _ = serde_json::from_slice::<LinuxResources>(bytes);
}

/// Decode `payload` as the request type of `method`, as the generated server stub does.
fn decode(method: &str, payload: &[u8]) {
    macro_rules! parse {
        ($t:ty) => {
            match <$t>::parse_from_bytes(payload) {
                Ok(m) => m,
                Err(_) => return,
            }
        };
    }
    match method {
        "Check" => drop(parse!(CheckRequest)),
        "GuestInfo" => drop(parse!(GuestInfoRequest)),
        "CreateSandbox" => drop(parse!(CreateSandboxRequest)),
        "DestroySandbox" => drop(parse!(DestroySandboxRequest)),
        "CreateContainer" => {
            let req = parse!(CreateContainerRequest);
            spec_json(&req.spec_json);
            // Re-encoding what was decoded must work (the shim side does this).
            let bytes = req
                .write_to_bytes()
                .expect("re-encoding a decoded CreateContainerRequest");
            let again = CreateContainerRequest::parse_from_bytes(&bytes)
                .expect("decoding a re-encoded CreateContainerRequest");
            assert_eq!(again, req, "CreateContainerRequest does not round-trip");
        }
        "StartContainer" | "PauseContainer" | "ResumeContainer" | "StatsContainer"
        | "ListProcesses" => drop(parse!(ContainerRequest)),
        "ExecProcess" => {
            let req = parse!(ExecProcessRequest);
            process_json(&req.process_json, req.tty);
        }
        "SignalProcess" => drop(parse!(SignalProcessRequest)),
        "WaitProcess" | "CloseStdin" => drop(parse!(ProcessRequest)),
        "WriteStdin" => drop(parse!(WriteStdinRequest)),
        "ReadStdout" | "ReadStderr" => drop(parse!(ReadStreamRequest)),
        "TtyWinResize" => drop(parse!(TtyWinResizeRequest)),
        "UpdateContainer" => {
            let req = parse!(UpdateContainerRequest);
            resources_json(&req.resources_json);
        }
        "RemoveContainer" => drop(parse!(RemoveContainerRequest)),
        "GetOomEvent" => drop(parse!(GetOomEventRequest)),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&selector, payload)) if selector < 0x20 => {
            decode(METHODS[usize::from(selector) % METHODS.len()], payload);
        }
        _ => {
            // A whole frame off the wire.
            let Ok(frame) = runtime().block_on(GenMessage::read_from(data)) else {
                return;
            };
            let Ok(request) = Request::parse_from_bytes(&frame.payload) else {
                return;
            };
            if request.service == SERVICE {
                decode(&request.method, &request.payload);
            }
        }
    }
});
