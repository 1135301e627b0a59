//! `th-helper`: the few things the nested test host's shell scenarios cannot do with busybox.
//!
//! Built by `build-image.sh` with plain `rustc` (std only, static) so it is not a workspace
//! crate and needs no dependencies:
//!
//! * `spawn-until`: start a VMM, timestamp the first output line containing a marker
//!   (guest-ready time measured from process start, the same way for every VMM), sample the
//!   VMM's memory at that moment, then kill it or wait for it to exit by itself.
//! * `wait-log`: wait until a log file contains a marker (for VMMs left running in the
//!   background while a scenario talks to them).
//! * `hvsock`: the hybrid-vsock handshake (`CONNECT <port>\n` → `OK <n>\n`) on a VMM's Unix
//!   socket — busybox `nc` has no Unix-socket mode.
//! * `ttrpc`: one unary ttrpc call through that socket. The request message is written field
//!   by field on the command line (`1=c1 2@=config.json 3{ 1=/dev/vda 4=ext4 }`); the
//!   response's top-level fields are printed one per line (`f1=...`), so the scenarios can
//!   drive the agent's protocol (agent/protocol/protos/agent.proto) without a Rust client.
//!
//! * `pty-run`: run a command on a new pseudo-terminal of its own (its controlling tty), so
//!   programs that put their terminal in raw mode (`ctr ... -t`) never touch the test
//!   host's serial console; the helper relays the terminal's output to its stdout, its own
//!   stdin (a pipe) to the terminal, and can answer markers in the output by typing text or
//!   resizing the terminal (SIGWINCH to the command). Busybox has no `script`.
//!
//! Output is one `key=value` per line so shell scripts can pick values with sed.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const USAGE: &str = "usage:
  th-helper spawn-until --marker STR --timeout SECS --log FILE [--guest-mem-mib N]
                        (--kill | --wait SECS) -- CMD [ARG...]
  th-helper wait-log FILE MARKER TIMEOUT_SECS
  th-helper hvsock SOCKET PORT [--hold SECS]
  th-helper ttrpc [--save FIELD FILE] [--timeout SECS] SOCKET PORT|- SERVICE METHOD [FIELD...]
    FIELD of the request message: N=TEXT | N@=FILE (bytes) | N:=INTEGER | N{ FIELD... }
  th-helper pty-run [--size ROWSxCOLS] [--timeout SECS]
                    [--on MARKER (send=TEXT | resize=ROWSxCOLS)]... -- CMD [ARG...]
    (--on steps run in order, each once its MARKER appeared after the previous step's;
     TEXT may contain \\n; exit status = CMD's, 124 on timeout)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("spawn-until") => spawn_until(&args[1..]),
        Some("wait-log") => wait_log(&args[1..]),
        Some("hvsock") => hvsock_cmd(&args[1..]),
        Some("ttrpc") => ttrpc_cmd(&args[1..]),
        Some("pty-run") => pty_run(&args[1..]),
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// --- spawn-until ------------------------------------------------------------------------

/// Resident memory of a live process, in KiB: the total, and the part outside the guest's
/// RAM mapping(s) — the VMM's own overhead. A mapping counts as guest RAM when its size is
/// at least the guest memory size (both QEMU and palisade-vmm map guest RAM in one piece
/// below the 32-bit MMIO gap for small guests).
struct Rss {
    total_kib: u64,
    outside_guest_kib: Option<u64>,
}

fn sample_rss(pid: u32, guest_mem_kib: Option<u64>) -> Option<Rss> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut outside = 0;
    let mut mapping_kib = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            // A mapping header: "start-end perms offset dev inode [path]".
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                mapping_kib = e.saturating_sub(s) / 1024;
            }
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib;
            if guest_mem_kib.is_none_or(|g| mapping_kib < g) {
                outside += kib;
            }
        }
    }
    Some(Rss {
        total_kib: total,
        outside_guest_kib: guest_mem_kib.map(|_| outside),
    })
}

enum AfterReady {
    Kill,
    Wait(Duration),
}

struct SpawnOptions {
    marker: String,
    timeout: Duration,
    log: String,
    guest_mem_kib: Option<u64>,
    after: AfterReady,
    cmd: Vec<String>,
}

fn parse_spawn_options(args: &[String]) -> Result<SpawnOptions, String> {
    let (mut marker, mut timeout, mut log, mut after, mut guest_mem_kib) =
        (None, None, None, None, None);
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).cloned().ok_or_else(|| USAGE.to_string());
        match args[i].as_str() {
            "--marker" => marker = Some(value()?),
            "--timeout" => timeout = Some(parse_secs(&value()?)?),
            "--log" => log = Some(value()?),
            "--wait" => after = Some(AfterReady::Wait(parse_secs(&value()?)?)),
            "--guest-mem-mib" => {
                let mib: u64 = value()?.parse().map_err(|_| "bad --guest-mem-mib")?;
                guest_mem_kib = Some(mib * 1024);
            }
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
    let cmd = args.get(i..).unwrap_or_default().to_vec();
    match (marker, timeout, log, after) {
        (Some(marker), Some(timeout), Some(log), Some(after)) if !cmd.is_empty() => {
            Ok(SpawnOptions {
                marker,
                timeout,
                log,
                guest_mem_kib,
                after,
                cmd,
            })
        }
        _ => Err(USAGE.to_string()),
    }
}

fn exit_text(status: ExitStatus) -> String {
    status
        .code()
        .map_or_else(|| "signal".to_string(), |c| c.to_string())
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn spawn_until(args: &[String]) -> Result<ExitCode, String> {
    let opts = parse_spawn_options(args)?;
    // stdout (the serial console) is read here line by line; stderr (the VMM's own log) goes
    // straight to the same append-mode log file.
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&opts.log)
        .map_err(|e| format!("open {}: {e}", opts.log))?;
    let stderr_file = log_file.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child = Command::new(&opts.cmd[0])
        .args(&opts.cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr_file))
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", opts.cmd[0]))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("child stdout missing")?;

    let (ready_tx, ready_rx) = mpsc::channel();
    let marker = opts.marker.clone();
    let guest_mem_kib = opts.guest_mem_kib;
    let reader = std::thread::spawn(move || {
        let mut log_file = log_file;
        let mut ready_tx = Some(ready_tx);
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        // Raw bytes: a guest may print anything, including invalid UTF-8.
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let _ = log_file.write_all(&line);
            if ready_tx.is_some() && contains(&line, marker.as_bytes()) {
                let elapsed = start.elapsed();
                let rss = sample_rss(pid, guest_mem_kib);
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send((elapsed, rss));
                }
            }
            line.clear();
        }
    });

    let code = match ready_rx.recv_timeout(opts.timeout) {
        Ok((elapsed, rss)) => {
            println!("ready_ms={}", elapsed.as_millis());
            println!("pid={pid}");
            if let Some(rss) = rss {
                println!("rss_kib={}", rss.total_kib);
                if let Some(outside) = rss.outside_guest_kib {
                    println!("rss_outside_guest_kib={outside}");
                }
            }
            match opts.after {
                AfterReady::Kill => {
                    kill_and_reap(&mut child);
                    0
                }
                AfterReady::Wait(limit) => match wait_with_timeout(&mut child, limit) {
                    Some(status) => {
                        println!("exit={}", exit_text(status));
                        println!("total_ms={}", start.elapsed().as_millis());
                        0
                    }
                    None => {
                        kill_and_reap(&mut child);
                        println!("exit=timeout");
                        3
                    }
                },
            }
        }
        Err(_) => {
            // Timed out, or the process closed its output (exited) before the marker.
            let exit = match child.try_wait() {
                Ok(Some(status)) => exit_text(status),
                _ => {
                    // Give a process that is just exiting a moment before calling it a hang.
                    match wait_with_timeout(&mut child, Duration::from_millis(200)) {
                        Some(status) => exit_text(status),
                        None => {
                            kill_and_reap(&mut child);
                            "killed-after-timeout".to_string()
                        }
                    }
                }
            };
            println!("ready_ms=none");
            println!("exit={exit}");
            println!("elapsed_ms={}", start.elapsed().as_millis());
            2
        }
    };
    let _ = reader.join();
    Ok(ExitCode::from(code))
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}

// --- wait-log ---------------------------------------------------------------------------

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

// --- hybrid vsock -----------------------------------------------------------------------

/// Connects to a hybrid-vsock Unix socket and performs Firecracker's handshake.
fn hvsock_connect(
    socket: &str,
    port: u32,
    io_timeout: Duration,
) -> Result<(UnixStream, String), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    stream
        .set_read_timeout(Some(io_timeout))
        .and_then(|_| stream.set_write_timeout(Some(io_timeout)))
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
    let (socket, port, hold) = match args {
        [socket, port] => (socket, port, None),
        [socket, port, flag, secs] if flag == "--hold" => (socket, port, Some(parse_secs(secs)?)),
        _ => return Err(USAGE.to_string()),
    };
    let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let (mut stream, reply) = hvsock_connect(socket, port, Duration::from_secs(10))?;
    println!("handshake={reply}");
    let Some(hold) = hold else {
        return Ok(ExitCode::SUCCESS);
    };
    // Keep the connection open and report when the other side goes away (e.g. the VMM was
    // killed): a peer must see EOF or a reset, never hang.
    let _ = std::io::stdout().flush();
    stream
        .set_read_timeout(Some(hold))
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let outcome = loop {
        match stream.read(&mut buf) {
            Ok(0) => break "eof".to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset".into(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break "no".into()
            }
            Err(e) => break format!("error:{e}"),
            Ok(_) if start.elapsed() >= hold => break "no".into(),
            // Bytes from the guest side: keep holding.
            Ok(_) => continue,
        }
    };
    println!("peer_closed={outcome}");
    if outcome == "no" {
        return Ok(ExitCode::from(2));
    }
    println!("held_ms={}", start.elapsed().as_millis());
    Ok(ExitCode::SUCCESS)
}

// --- minimal protobuf -------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// Encodes `N=TEXT`, `N@=FILE`, `N:=INTEGER` and `N{ ... }` words into a message, consuming
/// words until the end or an unmatched `}`.
fn encode_fields(words: &mut std::slice::Iter<'_, String>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(word) = words.next() {
        if word == "}" {
            return Ok(out);
        }
        let field_no = |n: &str| -> Result<u64, String> {
            n.parse::<u64>()
                .ok()
                .filter(|&n| n > 0 && n < (1 << 29))
                .ok_or_else(|| format!("bad field number in {word:?}"))
        };
        if let Some(n) = word.strip_suffix('{') {
            let nested = encode_fields(words)?;
            put_len_field(&mut out, field_no(n)?, &nested);
        } else if let Some((n, path)) = word.split_once("@=") {
            let data = std::fs::read(path).map_err(|e| format!("read {path}: {e}"))?;
            put_len_field(&mut out, field_no(n)?, &data);
        } else if let Some((n, int)) = word.split_once(":=") {
            let v: i64 = int
                .parse()
                .map_err(|_| format!("bad integer in {word:?}"))?;
            put_varint(&mut out, field_no(n)? << 3);
            // Negative int32/int64 values are sign-extended to 64 bits on the wire.
            put_varint(&mut out, v as u64);
        } else if let Some((n, text)) = word.split_once('=') {
            put_len_field(&mut out, field_no(n)?, text.as_bytes());
        } else {
            return Err(format!("cannot parse field {word:?}\n{USAGE}"));
        }
    }
    Ok(out)
}

/// One decoded protobuf field value.
enum PbValue<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
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

fn take<'a>(data: &'a [u8], pos: &mut usize, len: usize) -> Result<&'a [u8], String> {
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= data.len())
        .ok_or("field runs past the end of the message")?;
    let v = &data[*pos..end];
    *pos = end;
    Ok(v)
}

fn pb_fields(data: &[u8]) -> Result<Vec<(u64, PbValue<'_>)>, String> {
    let mut pos = 0;
    let mut fields = Vec::new();
    while pos < data.len() {
        let key = get_varint(data, &mut pos)?;
        let value = match key & 7 {
            0 => PbValue::Varint(get_varint(data, &mut pos)?),
            1 => {
                let b = take(data, &mut pos, 8)?;
                PbValue::Fixed64(u64::from_le_bytes(b.try_into().map_err(|_| "fixed64")?))
            }
            2 => {
                let len =
                    usize::try_from(get_varint(data, &mut pos)?).map_err(|e| e.to_string())?;
                PbValue::Bytes(take(data, &mut pos, len)?)
            }
            5 => {
                let b = take(data, &mut pos, 4)?;
                PbValue::Fixed32(u32::from_le_bytes(b.try_into().map_err(|_| "fixed32")?))
            }
            t => return Err(format!("unsupported wire type {t}")),
        };
        fields.push((key >> 3, value));
    }
    Ok(fields)
}

/// Bytes as text with anything unprintable (and `\`) escaped, so each field stays on one line.
fn escape(data: &[u8]) -> String {
    let mut s = String::new();
    for &b in data {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'\n' => s.push_str("\\n"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

// --- ttrpc ------------------------------------------------------------------------------

const TTRPC_HEADER_LEN: usize = 10;
const TTRPC_TYPE_REQUEST: u8 = 1;
const TTRPC_TYPE_RESPONSE: u8 = 2;
const TTRPC_MAX_MESSAGE: usize = 4 << 20;

fn ttrpc_cmd(args: &[String]) -> Result<ExitCode, String> {
    let mut saves: Vec<(u64, String)> = Vec::new();
    let mut timeout = Duration::from_secs(30);
    let mut rest = args;
    loop {
        match rest {
            [flag, n, file, tail @ ..] if flag == "--save" => {
                let n = n.parse().map_err(|_| format!("bad --save field {n:?}"))?;
                saves.push((n, file.clone()));
                rest = tail;
            }
            [flag, secs, tail @ ..] if flag == "--timeout" => {
                timeout = parse_secs(secs)?;
                rest = tail;
            }
            _ => break,
        }
    }
    let [socket, port, service, method, fields @ ..] = rest else {
        return Err(USAGE.to_string());
    };
    let payload = encode_fields(&mut fields.iter())?;
    // PORT "-": a plain Unix socket without the hybrid-vsock handshake (an agent run on the
    // build host with `--listen unix:PATH`), to check this client against the real server.
    let mut stream = if port == "-" {
        let s = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s
    } else {
        let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
        hvsock_connect(socket, port, timeout)?.0
    };

    // ttrpc.Request { service = 1; method = 2; payload = 3; timeout_nano = 4; }
    let mut request = Vec::new();
    put_len_field(&mut request, 1, service.as_bytes());
    put_len_field(&mut request, 2, method.as_bytes());
    put_len_field(&mut request, 3, &payload);
    put_varint(&mut request, 4 << 3);
    put_varint(&mut request, timeout.as_nanos() as u64);

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
        .map_err(|e| format!("{service}/{method}: read response header: {e}"))?;
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
    let mut payload: &[u8] = &[];
    for (field, value) in pb_fields(&body)? {
        match (field, value) {
            (1, PbValue::Bytes(status)) => {
                for (f, v) in pb_fields(status)? {
                    match (f, v) {
                        (1, PbValue::Varint(c)) => code = c,
                        (2, PbValue::Bytes(m)) => message = escape(m),
                        _ => {}
                    }
                }
            }
            (2, PbValue::Bytes(p)) => payload = p,
            _ => {}
        }
    }
    println!("status={code}");
    println!("message={message}");
    for (field, value) in pb_fields(payload)? {
        match value {
            PbValue::Varint(v) => println!("f{field}={v}"),
            // Fixed64 in agent.proto is a double (GuestInfo.uptime_seconds).
            PbValue::Fixed64(v) => println!("f{field}={}", f64::from_bits(v)),
            PbValue::Fixed32(v) => println!("f{field}={v}"),
            PbValue::Bytes(b) => {
                println!("f{field}={}", escape(b));
                for (_, file) in saves.iter().filter(|(n, _)| *n == field) {
                    let mut f = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(file)
                        .map_err(|e| format!("open {file}: {e}"))?;
                    f.write_all(b).map_err(|e| format!("write {file}: {e}"))?;
                }
            }
        }
    }
    Ok(if code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    })
}

// --- pty-run ----------------------------------------------------------------------------

mod pty {
    //! The few libc calls a pseudo-terminal needs (std has none; no crates here).
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::raw::{c_char, c_int, c_ulong};
    use std::os::unix::fs::OpenOptionsExt;

    const O_RDWR: c_int = 0o2;
    const O_NOCTTY: c_int = 0o400;
    const O_CLOEXEC: c_int = 0o2000000;
    const TIOCSWINSZ: c_ulong = 0x5414;
    const TIOCSCTTY: c_ulong = 0x540E;

    #[repr(C)]
    struct Winsize {
        rows: u16,
        cols: u16,
        xpixel: u16,
        ypixel: u16,
    }

    extern "C" {
        fn posix_openpt(flags: c_int) -> c_int;
        fn grantpt(fd: c_int) -> c_int;
        fn unlockpt(fd: c_int) -> c_int;
        fn ptsname_r(fd: c_int, buf: *mut c_char, len: usize) -> c_int;
        fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
        fn setsid() -> c_int;
    }

    fn os_error(what: &str) -> String {
        format!("{what}: {}", std::io::Error::last_os_error())
    }

    /// A new pty pair: (master, slave).
    pub fn open() -> Result<(File, File), String> {
        // SAFETY: posix_openpt takes flags and returns a new fd or -1; nothing else is touched.
        let fd = unsafe { posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC) };
        if fd < 0 {
            return Err(os_error("posix_openpt"));
        }
        // SAFETY: fd was just returned by posix_openpt and is owned by nobody else.
        let master = unsafe { File::from_raw_fd(fd) };
        let mut name = [0 as c_char; 128];
        // SAFETY: grantpt/unlockpt take the master fd; ptsname_r writes at most name.len()
        // bytes (NUL-terminated) into the buffer it is given.
        let failed = unsafe {
            grantpt(fd) != 0 || unlockpt(fd) != 0 || ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0
        };
        if failed {
            return Err(os_error("grantpt/unlockpt/ptsname_r"));
        }
        // SAFETY: ptsname_r succeeded, so name holds a NUL-terminated string.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_NOCTTY)
            .open(&path)
            .map_err(|e| format!("open {path}: {e}"))?;
        Ok((master, slave))
    }

    /// Sets the terminal's size; the kernel signals SIGWINCH to its foreground group.
    pub fn set_size(master: &File, rows: u16, cols: u16) -> Result<(), String> {
        let size = Winsize {
            rows,
            cols,
            xpixel: 0,
            ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one struct winsize from the pointer, valid for the call.
        if unsafe { ioctl(master.as_raw_fd(), TIOCSWINSZ, &size as *const Winsize) } != 0 {
            return Err(os_error("TIOCSWINSZ"));
        }
        Ok(())
    }

    /// In the child before exec: a new session whose controlling terminal is stdin (the
    /// slave).
    pub fn make_controlling_tty() -> std::io::Result<()> {
        // SAFETY: setsid and ioctl(TIOCSCTTY) take integers only and are async-signal-safe
        // (this runs between fork and exec).
        unsafe {
            if setsid() < 0 || ioctl(0, TIOCSCTTY, 0 as c_int) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

enum PtyAction {
    Send(Vec<u8>),
    Resize(u16, u16),
}

fn parse_size(s: &str) -> Result<(u16, u16), String> {
    s.split_once('x')
        .and_then(|(r, c)| Some((r.parse().ok()?, c.parse().ok()?)))
        .ok_or_else(|| format!("not a ROWSxCOLS size: {s:?}"))
}

fn pty_run(args: &[String]) -> Result<ExitCode, String> {
    use std::os::unix::process::CommandExt;

    let mut size = (24, 80);
    let mut timeout = Duration::from_secs(60);
    let mut steps: Vec<(Vec<u8>, PtyAction)> = Vec::new();
    let mut rest = args;
    let cmd = loop {
        match rest {
            [flag, v, tail @ ..] if flag == "--size" => (size, rest) = (parse_size(v)?, tail),
            [flag, v, tail @ ..] if flag == "--timeout" => (timeout, rest) = (parse_secs(v)?, tail),
            [flag, marker, action, tail @ ..] if flag == "--on" => {
                let action = if let Some(text) = action.strip_prefix("send=") {
                    PtyAction::Send(text.replace("\\n", "\n").into_bytes())
                } else if let Some(s) = action.strip_prefix("resize=") {
                    let (r, c) = parse_size(s)?;
                    PtyAction::Resize(r, c)
                } else {
                    return Err(format!("--on action must be send=TEXT or resize=RxC: {action:?}"));
                };
                steps.push((marker.as_bytes().to_vec(), action));
                rest = tail;
            }
            [dashes, cmd @ ..] if dashes == "--" && !cmd.is_empty() => break cmd,
            _ => return Err(USAGE.to_string()),
        }
    };

    let (master, slave) = pty::open()?;
    pty::set_size(&master, size.0, size.1)?;
    let mut command = Command::new(&cmd[0]);
    command
        .args(&cmd[1..])
        .stdin(slave.try_clone().map_err(|e| e.to_string())?)
        .stdout(slave.try_clone().map_err(|e| e.to_string())?)
        .stderr(slave);
    // SAFETY: make_controlling_tty only calls async-signal-safe functions.
    unsafe {
        command.pre_exec(pty::make_controlling_tty);
    }
    let mut child = command.spawn().map_err(|e| format!("spawn {}: {e}", cmd[0]))?;
    // The child holds the slave now; once it (and its children) close it, reads of the
    // master end with EIO.
    drop(command);

    // Our stdin (a pipe, never the console) goes to the terminal as it arrives.
    let mut to_tty = master.try_clone().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || to_tty.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut from_tty = master.try_clone().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_tty.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + timeout;
    let mut seen: Vec<u8> = Vec::new();
    let mut next_step = steps.into_iter().peekable();
    let mut stdout = std::io::stdout();
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(data) => {
                let _ = stdout.write_all(&data);
                let _ = stdout.flush();
                seen.extend_from_slice(&data);
                while let Some((marker, _)) = next_step.peek() {
                    let Some(at) = seen.windows(marker.len()).position(|w| w == &marker[..]) else {
                        break;
                    };
                    seen.drain(..at + marker.len());
                    let Some((_, action)) = next_step.next() else {
                        break;
                    };
                    let mut master = &master;
                    match action {
                        PtyAction::Send(text) => master.write_all(&text).map_err(|e| e.to_string())?,
                        PtyAction::Resize(r, c) => pty::set_size(master, r, c)?,
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            kill_and_reap(&mut child);
            eprintln!("th-helper: pty-run: {} did not finish within {timeout:?}", cmd[0]);
            return Ok(ExitCode::from(124));
        }
    };
    // Output written just before the exit is still in the pty: take what arrives promptly.
    while let Ok(data) = rx.recv_timeout(Duration::from_millis(200)) {
        let _ = stdout.write_all(&data);
    }
    let _ = stdout.flush();
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(code as u8))
}
