//! `th-helper`: the few things the nested test host's shell scenarios cannot do with busybox.
//!
//! Built by `build-image.sh` with plain `rustc` (std only, static) so it is not a workspace
//! crate and needs no dependencies:
//!
//! * `spawn-until`: start a VMM, timestamp the first output line containing a marker
//!   (guest-ready time measured from process start, the same way for every VMM), sample the
//!   VMM's RSS at that moment, then kill it or wait for it to exit by itself.
//! * `wait-log`: wait until a log file contains a marker (for VMMs left running in the
//!   background while a scenario talks to them).
//! * `hvsock`: the hybrid-vsock handshake (`CONNECT <port>\n` → `OK <n>\n`) on a VMM's Unix
//!   socket — busybox `nc` has no Unix-socket mode.
//! * `ttrpc`: one unary ttrpc call through that socket with a hand-encoded protobuf payload,
//!   printing the response status and payload (hex).
//!
//! Output is `key=value` words on one line so shell scripts can `eval`/grep them.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const USAGE: &str = "usage:
  th-helper spawn-until --marker STR --timeout SECS --log FILE (--kill | --wait SECS) -- CMD [ARG...]
  th-helper wait-log FILE MARKER TIMEOUT_SECS
  th-helper hvsock SOCKET PORT
  th-helper ttrpc SOCKET PORT SERVICE METHOD [PAYLOAD_HEX]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("spawn-until") => spawn_until(&args[1..]),
        Some("wait-log") => wait_log(&args[1..]),
        Some("hvsock") => hvsock_cmd(&args[1..]),
        Some("ttrpc") => ttrpc_cmd(&args[1..]),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("th-helper: {e}");
            ExitCode::from(1)
        }
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("not a positive number of seconds: {s:?}"))
}

/// VmRSS of a live process in KiB (None once it has exited).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

enum AfterReady {
    Kill,
    Wait(Duration),
}

fn spawn_until(args: &[String]) -> Result<ExitCode, String> {
    let mut marker = None;
    let mut timeout = None;
    let mut log = None;
    let mut after = None;
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| args.get(i + 1).cloned().ok_or_else(|| USAGE.to_string());
        match args[i].as_str() {
            "--marker" => marker = Some(value(i)?),
            "--timeout" => timeout = Some(parse_secs(&value(i)?)?),
            "--log" => log = Some(value(i)?),
            "--wait" => after = Some(AfterReady::Wait(parse_secs(&value(i)?)?)),
            "--kill" => {
                after = Some(AfterReady::Kill);
                i += 1;
                continue;
            }
            "--" => {
                i += 1;
                break;
            }
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
        i += 2;
    }
    let (Some(marker), Some(timeout), Some(log), Some(after)) = (marker, timeout, log, after)
    else {
        return Err(USAGE.to_string());
    };
    let cmd = args.get(i..).filter(|c| !c.is_empty()).ok_or(USAGE)?;

    // stdout (the serial console) is read here line by line; stderr (the VMM's own log) goes
    // straight to the same append-mode log file.
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("open {log}: {e}"))?;
    let stderr_file = log_file.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr_file))
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", cmd[0]))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("child stdout missing")?;

    let (ready_tx, ready_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut log_file = log_file;
        let mut ready_tx = Some(ready_tx);
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        // Raw bytes: a guest may print anything, including invalid UTF-8.
        while reader
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            let _ = log_file.write_all(&line);
            if ready_tx.is_some() && contains(&line, marker.as_bytes()) {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send((start.elapsed(), rss_kib(pid)));
                }
            }
            line.clear();
        }
    });

    let ready = ready_rx.recv_timeout(timeout);
    let code = match ready {
        Ok((elapsed, rss)) => {
            let rss = rss.map_or("unknown".to_string(), |r| r.to_string());
            print!("ready_ms={} rss_kib={rss} pid={pid}", elapsed.as_millis());
            match after {
                AfterReady::Kill => {
                    let _ = child.kill();
                    let _ = child.wait();
                    println!();
                    0
                }
                AfterReady::Wait(limit) => match wait_with_timeout(&mut child, limit) {
                    Some(status) => {
                        println!(
                            " exit={} total_ms={}",
                            status
                                .code()
                                .map_or("signal".to_string(), |c| c.to_string()),
                            start.elapsed().as_millis()
                        );
                        0
                    }
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        println!(" exit=timeout");
                        3
                    }
                },
            }
        }
        Err(_) => {
            // Timed out, or the process closed its output (exited) before the marker.
            let status = match child.try_wait() {
                Ok(Some(status)) => status.code().map_or("signal".into(), |c| c.to_string()),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    "killed-after-timeout".into()
                }
            };
            println!(
                "ready_ms=none exit={status} elapsed_ms={}",
                start.elapsed().as_millis()
            );
            2
        }
    };
    let _ = reader.join();
    Ok(ExitCode::from(code))
}

fn wait_with_timeout(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn wait_log(args: &[String]) -> Result<ExitCode, String> {
    let [file, marker, timeout] = args else {
        return Err(USAGE.to_string());
    };
    let timeout = parse_secs(timeout)?;
    let start = Instant::now();
    loop {
        if let Ok(data) = std::fs::read(file) {
            if contains(&data, marker.as_bytes()) {
                println!("found_ms={}", start.elapsed().as_millis());
                return Ok(ExitCode::SUCCESS);
            }
        }
        if start.elapsed() > timeout {
            println!("found_ms=none");
            return Ok(ExitCode::from(2));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects to a hybrid-vsock Unix socket and performs Firecracker's handshake.
fn hvsock_connect(socket: &str, port: u32) -> Result<(UnixStream, String), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    let io_timeout = Some(Duration::from_secs(10));
    stream
        .set_read_timeout(io_timeout)
        .and_then(|_| stream.set_write_timeout(io_timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write CONNECT: {e}"))?;
    // Read the reply byte by byte: anything after the newline belongs to the guest.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => reply.push(byte[0]),
            Err(e) => return Err(format!("read handshake reply: {e}")),
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if !reply.starts_with("OK ") {
        return Err(format!("handshake refused: {reply:?}"));
    }
    Ok((stream, reply))
}

fn hvsock_cmd(args: &[String]) -> Result<ExitCode, String> {
    let [socket, port] = args else {
        return Err(USAGE.to_string());
    };
    let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let (_, reply) = hvsock_connect(socket, port)?;
    println!("handshake={:?}", reply);
    Ok(ExitCode::SUCCESS)
}

// --- minimal protobuf + ttrpc framing --------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// One decoded protobuf field: number and either a varint or a length-delimited value.
enum PbValue<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn get_varint(data: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn pb_fields(data: &[u8]) -> Result<Vec<(u64, PbValue<'_>)>, String> {
    let mut pos = 0;
    let mut fields = Vec::new();
    while pos < data.len() {
        let key = get_varint(data, &mut pos)?;
        let value = match key & 7 {
            0 => PbValue::Varint(get_varint(data, &mut pos)?),
            2 => {
                let len =
                    usize::try_from(get_varint(data, &mut pos)?).map_err(|e| e.to_string())?;
                let end = pos.checked_add(len).filter(|&e| e <= data.len());
                let end = end.ok_or("length-delimited field past the end")?;
                let v = &data[pos..end];
                pos = end;
                PbValue::Bytes(v)
            }
            1 => {
                pos += 8;
                PbValue::Varint(0)
            }
            5 => {
                pos += 4;
                PbValue::Varint(0)
            }
            t => return Err(format!("unsupported wire type {t}")),
        };
        fields.push((key >> 3, value));
    }
    Ok(fields)
}

fn hex_decode(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 {
        return Err(format!("odd-length hex {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("bad hex {s:?}")))
        .collect()
}

fn hex_encode(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

const TTRPC_HEADER_LEN: usize = 10;
const TTRPC_TYPE_REQUEST: u8 = 1;
const TTRPC_TYPE_RESPONSE: u8 = 2;
const TTRPC_MAX_MESSAGE: usize = 4 << 20;

fn ttrpc_cmd(args: &[String]) -> Result<ExitCode, String> {
    let (socket, port, service, method, payload) = match args {
        [s, p, sv, m] => (s, p, sv, m, Vec::new()),
        [s, p, sv, m, hex] => (s, p, sv, m, hex_decode(hex)?),
        _ => return Err(USAGE.to_string()),
    };
    let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let (mut stream, _) = hvsock_connect(socket, port)?;

    // ttrpc.Request { service = 1; method = 2; payload = 3; timeout_nano = 4; }
    let mut request = Vec::new();
    put_bytes_field(&mut request, 1, service.as_bytes());
    put_bytes_field(&mut request, 2, method.as_bytes());
    put_bytes_field(&mut request, 3, &payload);
    put_varint(&mut request, 4 << 3);
    put_varint(&mut request, 10_000_000_000);

    let stream_id: u32 = 1; // clients use odd stream ids
    let mut frame = Vec::with_capacity(TTRPC_HEADER_LEN + request.len());
    frame.extend_from_slice(&(request.len() as u32).to_be_bytes());
    frame.extend_from_slice(&stream_id.to_be_bytes());
    frame.push(TTRPC_TYPE_REQUEST);
    frame.push(0);
    frame.extend_from_slice(&request);
    stream
        .write_all(&frame)
        .map_err(|e| format!("write request: {e}"))?;

    let mut header = [0u8; TTRPC_HEADER_LEN];
    stream
        .read_exact(&mut header)
        .map_err(|e| format!("read response header: {e}"))?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if header[8] != TTRPC_TYPE_RESPONSE || id != stream_id {
        return Err(format!("unexpected frame type {} stream {id}", header[8]));
    }
    if len > TTRPC_MAX_MESSAGE {
        return Err(format!("response of {len} bytes exceeds the limit"));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("read response body: {e}"))?;

    // ttrpc.Response { Status status = 1; bytes payload = 2; }, Status { code = 1; message = 2; }
    let mut code = 0;
    let mut message = String::new();
    let mut payload = &[][..];
    for (field, value) in pb_fields(&body)? {
        match (field, value) {
            (1, PbValue::Bytes(status)) => {
                for (f, v) in pb_fields(status)? {
                    match (f, v) {
                        (1, PbValue::Varint(c)) => code = c,
                        (2, PbValue::Bytes(m)) => message = String::from_utf8_lossy(m).into(),
                        _ => {}
                    }
                }
            }
            (2, PbValue::Bytes(p)) => payload = p,
            _ => {}
        }
    }
    println!(
        "status={code} message={message:?} payload={}",
        hex_encode(payload)
    );
    Ok(if code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    })
}
