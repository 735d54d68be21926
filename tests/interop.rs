//! Runs the JavaScript interop suite (real `yjs` + `y-websocket` clients in
//! Node, `tests/interop/*.test.mjs`) against this build's `concord` binary.
//! `scripts/test` installs its packages with `npm ci`; missing packages fail
//! the test rather than skip it.

use std::path::Path;
use std::process::Command;

#[test]
fn javascript_clients_interoperate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/y-websocket").exists(),
        "tests/interop/node_modules is missing: run `npm ci` there (scripts/test does it)"
    );
    let status = Command::new("npm")
        .arg("test")
        .current_dir(&dir)
        .env("CONCORD_BIN", env!("CARGO_BIN_EXE_concord"))
        .env("REDIS_URL_SHARED", "redis://127.0.0.1:6379")
        .status()
        .expect("npm must be installed");
    assert!(status.success(), "interop suite failed");
}
