//! The imapgate binary with policies: SIGHUP reloads them under live connections, a broken
//! policy never takes the proxy down.

use crate::support;
use support::proxy::{ProxyProcess, toml_path};
use support::{Client, Dovecot};

fn config(dc: &Dovecot, script: &std::path::Path) -> String {
    format!(
        r#"
[[listener]]
name = "plain"
bind = "127.0.0.1:0"
tls = "none"

[upstream]
address = "{upstream}"

[[policy]]
script = {script}
"#,
        upstream = dc.addr(),
        script = toml_path(script),
    )
}

#[tokio::test]
async fn sighup_swaps_policies_for_live_connections() {
    let dc = Dovecot::shared();
    let dir = support::temp_dir();
    let script = dir.path().join("policy.lua");
    std::fs::write(
        &script,
        "return { commands = { 'SELECT' }, on_command = function() end }",
    )
    .expect("write");
    let proxy = ProxyProcess::start(&config(dc, &script), "info");
    let (user, pass) = dc.fresh_user();
    let mut c1 = Client::connect(proxy.addr("plain")).await;
    c1.read_greeting().await;
    c1.login(&user, &pass).await;
    let mut c2 = Client::connect(proxy.addr("plain")).await;
    c2.read_greeting().await;
    c2.login(&user, &pass).await;
    c1.ok("a1 SELECT INBOX").await;

    std::fs::write(
        &script,
        "return { commands = { 'SELECT' }, on_command = function() \
         return imap.reject{ code = 'CANNOT', text = 'version two' } end }",
    )
    .expect("write");
    proxy.signal("HUP");
    proxy.wait_for_log("policies reloaded", 1).await;
    let r = c1.no("a2 SELECT INBOX").await;
    assert_eq!(r[0], "a2 NO [CANNOT] version two");
    let r = c2.no("b1 SELECT INBOX").await;
    assert_eq!(r[0], "b1 NO [CANNOT] version two");

    // A reload that fails keeps the live set and says why.
    std::fs::write(&script, "return { on_command = ").expect("write");
    proxy.signal("HUP");
    proxy.wait_for_log("keeping the current policies", 1).await;
    assert!(proxy.log().contains("policy.lua:1:"), "{}", proxy.log());
    let r = c1.no("a3 SELECT INBOX").await;
    assert_eq!(r[0], "a3 NO [CANNOT] version two");
    c1.ok("a4 NOOP").await;
    c2.logout().await;
}

#[tokio::test]
async fn a_runaway_policy_does_not_stop_other_connections() {
    let dc = Dovecot::shared();
    let dir = support::temp_dir();
    let script = dir.path().join("runaway.lua");
    std::fs::write(
        &script,
        "return { commands = { 'STATUS' }, on_command = function() while true do end end }",
    )
    .expect("write");
    let proxy = ProxyProcess::start(&config(dc, &script), "info");
    let (user, pass) = dc.fresh_user();
    let mut looping = Client::connect(proxy.addr("plain")).await;
    looping.read_greeting().await;
    looping.login(&user, &pass).await;
    let mut other = Client::connect(proxy.addr("plain")).await;
    other.read_greeting().await;
    other.login(&user, &pass).await;
    for i in 0..5 {
        let r = looping.no(&format!("l{i} STATUS INBOX (MESSAGES)")).await;
        assert!(r[0].starts_with(&format!("l{i} NO [UNAVAILABLE]")), "{r:?}");
        other.ok(&format!("o{i} SELECT INBOX")).await;
    }
    looping.ok("l9 NOOP").await;
    // Logged before the NO is sent, but read from the process's stderr by another thread.
    proxy.wait_for_log("instruction budget exceeded", 1).await;
}

#[test]
fn check_reports_policy_errors_with_file_and_line() {
    let dc = Dovecot::shared();
    let dir = support::temp_dir();
    let script = dir.path().join("broken.lua");
    std::fs::write(
        &script,
        "return {\n  on_command = function(ctx, cmd)\n    if then end\n  end,\n}\n",
    )
    .expect("write");
    let cfg = dir.path().join("imapgate.toml");
    std::fs::write(&cfg, config(dc, &script)).expect("write");
    let out = std::process::Command::new(support::proxy::binary())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("imapgate check runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.lua:3:"), "{err}");
    std::fs::write(&script, "return { name = 'fine' }").expect("write");
    let out = std::process::Command::new(support::proxy::binary())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("imapgate check runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 policies: fine"));
}
