//! The status page at `/`, rendered by a real headless Chromium: the table
//! the page's script builds from `/projections` (state, checkpoint, lag,
//! events/s, dead letters, outbox, last error), and a screenshot of it.

use crate::util::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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

/// The `<td>` cells of one table row's HTML, as (class, text).
fn cells(row: &str) -> Vec<(String, String)> {
    row.split("<td")
        .skip(1)
        .map(|cell| {
            let (attributes, rest) = cell.split_once('>').unwrap();
            let class = attributes.split("class=\"").nth(1).and_then(|c| c.split('"').next()).unwrap_or("");
            let inner = rest.split("</td>").next().unwrap();
            // The text without its tags (the state badge, the module's <code>).
            let mut text = String::new();
            let mut in_tag = false;
            for c in inner.chars() {
                match c {
                    '<' => in_tag = true,
                    '>' => in_tag = false,
                    c if !in_tag => text.push(c),
                    _ => {}
                }
            }
            (class.to_string(), text)
        })
        .collect()
}

/// How many pixels of an RGB(A) image are within 2 of `rgb` in each channel.
fn pixels_of(image: &[u8], channels: usize, rgb: [u8; 3]) -> usize {
    image
        .chunks_exact(channels)
        .filter(|pixel| pixel[..3].iter().zip(rgb).all(|(&have, want)| have.abs_diff(want) <= 2))
        .count()
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
    // The recorder, paused, falls 3 events behind: a lag to show.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let paused = agent
        .post(&format!("{}/projections/recorder/pause", host.url()))
        .header("content-type", "application/json")
        .send_empty()
        .unwrap();
    assert_eq!(paused.status().as_u16(), 200);
    wait_until(Duration::from_secs(60), "recorder paused", || ws.status_of("recorder")["state"] == "paused");
    let later: Vec<String> = (0..3).map(|i| cloud_event(&format!("later-{i}"), "t", json!(i))).collect();
    ws.append("wallets", &ws.write_events("later.jsonl", &later));
    wait_until(Duration::from_secs(60), "the allowlist at 14", || {
        ws.status_of("wallet-allowlist")["checkpoint"] == 14
    });
    let url = format!("{}/", host.url());

    let dom = headless(&ws.path("profile-dom"), &["--dump-dom", &url]);
    let row = |name: &str| -> String {
        let start = dom
            .find(&format!("data-projection=\"{name}\""))
            .unwrap_or_else(|| panic!("no row for {name}:\n{dom}"));
        dom[start..].split("</tr>").next().unwrap().to_string()
    };
    // name, state, module, checkpoint / head, lag, events/s, dead letters,
    // outbox, last error
    let allowlist = cells(&row("wallet-allowlist"));
    assert_eq!(allowlist.len(), 9, "{allowlist:?}");
    assert_eq!(allowlist[1].1, "running", "{allowlist:?}");
    let module = sha256_file(&guest("wallet_allowlist"));
    assert_eq!(allowlist[2].1, module[..12], "module hash: {allowlist:?}");
    assert_eq!(allowlist[3].1, "14 / 14", "checkpoint / head: {allowlist:?}");
    assert_eq!(allowlist[4], ("num".into(), "0".into()), "no lag: {allowlist:?}");
    assert_eq!(allowlist[6], ("num".into(), "0".into()), "no dead letters: {allowlist:?}");
    assert_eq!(allowlist[7], ("num".into(), "0".into()), "nothing to publish: {allowlist:?}");
    let recorder = cells(&row("recorder"));
    assert_eq!(recorder[1].1, "paused", "{recorder:?}");
    assert_eq!(recorder[3].1, "11 / 14", "checkpoint / head: {recorder:?}");
    assert_eq!(recorder[4], ("num lagging".into(), "3".into()), "lag, highlighted: {recorder:?}");
    assert_eq!(recorder[6], ("num".into(), "1".into()), "one dead letter: {recorder:?}");
    assert_eq!(recorder[8].0, "error", "{recorder:?}");
    assert!(recorder[8].1.contains("poison event bad-1"), "last error: {recorder:?}");
    for row in [&allowlist, &recorder] {
        // events/s: a whole number, the host's rate over its last window.
        assert_eq!(row[5].0, "num", "{row:?}");
        assert!(row[5].1.parse::<u64>().is_ok(), "events/s is a number: {row:?}");
    }
    assert!(dom.contains("2 projections · updated"), "the page refreshed itself from /projections");

    let screenshot = ws.path("status.png");
    headless(
        &ws.path("profile-shot"),
        &[&format!("--screenshot={}", screenshot.display()), "--window-size=1280,480", &url],
    );
    let png = std::fs::read(&screenshot).unwrap();
    let mut decoder = png::Decoder::new(std::io::Cursor::new(&png));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut image = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut image).unwrap();
    assert_eq!((frame.width, frame.height), (1280, 480));
    let channels = frame.color_type.samples();
    assert!(channels >= 3, "a colour screenshot: {:?}", frame.color_type);
    let image = &image[..frame.buffer_size()];
    // Colours only the rendered table has (status_page.html's CSS): the
    // header row's #f0f0f3 across the page, and the green #d9f7e3 badge of
    // the running projection. An error page or a blank one has neither.
    let header = pixels_of(image, channels, [0xf0, 0xf0, 0xf3]);
    assert!(header > 10_000, "the table's header row is drawn ({header} pixels of #f0f0f3)");
    let badge = pixels_of(image, channels, [0xd9, 0xf7, 0xe3]);
    assert!(badge > 300, "the running badge is drawn ({badge} pixels of #d9f7e3)");
    if let Ok(keep) = std::env::var("PROJECTOR_KEEP_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
}
