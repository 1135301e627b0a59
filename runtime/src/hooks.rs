//! OCI lifecycle hooks: each hook is executed with the container's state JSON on stdin,
//! its own argv/env, and killed when its `timeout` (seconds) expires.
//!
//! Who runs which hook (runtime-spec "Lifecycle"):
//! * `prestart`, `createRuntime`: the creating process, after the namespaces and mounts
//!   exist, before `pivot_root`, in the runtime's namespaces;
//! * `createContainer`: the container init, same point, in the container's namespaces;
//! * `startContainer`: the container init, after `start`, before `execve`;
//! * `poststart`: the `start` caller after the init executed the user's program;
//! * `poststop`: `delete`, after the container stopped.

use std::{
    io::{Read, Write},
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use oci_spec::runtime::Hook;

use crate::error::{Error, Result};

/// Runs `hooks` in order; the first failure stops the sequence.
pub fn run(kind: &'static str, hooks: &[Hook], state_json: &str) -> Result<()> {
    for hook in hooks {
        run_one(hook, state_json).map_err(|msg| Error::Hook {
            kind,
            path: hook.path().clone(),
            msg,
        })?;
    }
    Ok(())
}

fn run_one(hook: &Hook, state_json: &str) -> Result<(), String> {
    let mut cmd = Command::new(hook.path());
    if let Some([argv0, rest @ ..]) = hook.args().as_deref() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for var in hook.env().iter().flatten() {
        if let Some((k, v)) = var.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("executing: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin closes the pipe: not an error.
        let _ = stdin.write_all(state_json.as_bytes());
    }
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t as u64));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting: {e}")),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "timed out after {} s",
                hook.timeout().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    Err(format!("{status}: {}", stderr.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::HookBuilder;

    fn sh(script: &str, timeout: Option<i64>) -> Hook {
        let b = HookBuilder::default().path("/bin/sh").args(vec![
            "sh".to_string(),
            "-c".into(),
            script.into(),
        ]);
        match timeout {
            Some(t) => b.timeout(t).build().unwrap(),
            None => b.build().unwrap(),
        }
    }

    #[test]
    fn hook_reads_state_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hook = sh(&format!("cat > {}", out.display()), None);
        run("poststop", &[hook], "{\"id\":\"x\"}").unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), "{\"id\":\"x\"}");
    }

    #[test]
    fn failing_hook_reports_status_and_stderr() {
        let err = run("prestart", &[sh("echo boom >&2; exit 3", None)], "{}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "prestart hook \"/bin/sh\": exit status: 3: boom"
        );
    }

    #[test]
    fn hook_timeout_is_enforced() {
        let start = Instant::now();
        let err = run("poststart", &[sh("sleep 10", Some(1))], "{}").unwrap_err();
        assert!(err.to_string().contains("timed out after 1 s"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
