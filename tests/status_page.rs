//! The status page at `/`, rendered by a real headless Chromium: the table
//! the page's script builds from `/projections`, and a screenshot of it.

mod util;

use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use util::*;

fn chromium() -> String {
    let path = std::env::var("PROJECTOR_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&path).exists(), "{path} is missing: install Debian's chromium (scripts/test does)");
    path
}

/// Headless Chromium with the flags a closed network needs, and `args`.
fn headless(profile: &Path, args: &[&str]) -> String {
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "chromium failed:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_status_page_shows_every_projection_in_a_real_browser() {
    let ws = Workspace::new();
    ws.write_config(&[
        ("wallet-allowlist", &guest("wallet_allowlist"), &["wallets"]),
        ("recorder", &guest("event_recorder"), &["wallets"]),
    ]);
    let host = ws.start();
    let seed = root().join("projections/wallet-allowlist/fixtures/seed.jsonl");
    ws.append("wallets", seed.to_str().unwrap());
    let poison = ws.write_events("poison.jsonl", &[cloud_event("bad-1", "poison", json!(null))]);
    ws.append("wallets", &poison);
    ws.wait_caught_up(11, Duration::from_secs(60));
    let url = format!("{}/", host.url());

    let dom = headless(&ws.path("profile-dom"), &["--dump-dom", &url]);
    let row = |name: &str| -> String {
        let start = dom
            .find(&format!("data-projection=\"{name}\""))
            .unwrap_or_else(|| panic!("no row for {name}:\n{dom}"));
        dom[start..].split("</tr>").next().unwrap().to_string()
    };
    let allowlist = row("wallet-allowlist");
    assert!(allowlist.contains(">running<"), "{allowlist}");
    assert!(allowlist.contains(">11 / 11<"), "checkpoint / head: {allowlist}");
    let module = sha256_file(&guest("wallet_allowlist"));
    assert!(allowlist.contains(&module[..12]), "module hash: {allowlist}");
    let recorder = row("recorder");
    assert!(recorder.contains("poison event bad-1"), "last error: {recorder}");
    assert!(dom.contains("2 projections · updated"), "the page refreshed itself from /projections");

    let screenshot = ws.path("status.png");
    headless(
        &ws.path("profile-shot"),
        &[&format!("--screenshot={}", screenshot.display()), "--window-size=1280,480", &url],
    );
    let png = std::fs::read(&screenshot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 480));
    assert!(png.len() > 10_000, "a rendered page, not a blank one ({} bytes)", png.len());
    if let Ok(keep) = std::env::var("PROJECTOR_KEEP_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
}
