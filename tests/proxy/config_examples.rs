//! The config file's error messages, checked from the outside: each mistake an admin can
//! make must come back with the file, the line and column, and the field to fix.

use std::path::Path;

use imapgate::config::{Config, ConfigError, Location, LogFormat};

const MINIMAL: &str = "[[listener]]\nbind = \"127.0.0.1:1993\"\n";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str_named(text, "/etc/imapgate/test.toml")
}

/// Returns the field and full message of an `Invalid` error, failing otherwise.
fn invalid(text: &str) -> (String, Option<Location>, String) {
    match parse(text) {
        Err(err @ ConfigError::Invalid { .. }) => {
            let message = err.to_string();
            match err {
                ConfigError::Invalid {
                    field, location, ..
                } => (field, location, message),
                _ => unreachable!(),
            }
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

#[test]
fn the_full_documented_shape_parses() {
    let text = r#"
[[listener]]
name = "imaps"
bind = "127.0.0.1:1993"
tls = "implicit"
cert = "cert.pem"
key = "/abs/key.pem"
[upstream]
address = "imap.example.com:993"
tls = "implicit"
ca = "ca.pem"
verify = false
connect_timeout_s = 5
[log]
format = "json"
level = "info,imapgate=debug"
[[policy]]
script = "policies/require_tls.lua"
options = { allow = ["127.0.0.1"], nested = { n = 1 } }
[[policy]]
script = "/opt/p.lua"
[metrics]
"#;
    let c = parse(text).unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.name, "imaps");
    assert_eq!(l.cert.as_deref(), Some(Path::new("/etc/imapgate/cert.pem")));
    assert_eq!(l.key.as_deref(), Some(Path::new("/abs/key.pem")));
    assert_eq!(
        c.upstreams[0].server_name.as_deref(),
        Some("imap.example.com")
    );
    assert_eq!(
        c.upstreams[0].ca.as_deref(),
        Some(Path::new("/etc/imapgate/ca.pem"))
    );
    assert!(!c.upstreams[0].verify);
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(
        c.policies[0].script,
        Path::new("/etc/imapgate/policies/require_tls.lua")
    );
    assert!(c.policies[0].options["nested"].is_table());
    assert!(c.policies[1].options.is_empty());
    assert_eq!(c.metrics.unwrap().bind, "127.0.0.1:9143".parse().unwrap());
}

#[test]
fn a_relative_config_path_keeps_relative_paths() {
    let text = format!("{MINIMAL}cert = \"c.pem\"\nkey = \"k.pem\"\n");
    let c = Config::from_str_named(&text, "imapgate.toml").unwrap();
    assert_eq!(c.listeners[0].cert.as_deref(), Some(Path::new("c.pem")));
}

#[test]
fn unknown_key_names_file_line_column_and_key() {
    let text = format!("{MINIMAL}\n[limits]\nline = 9000\nlitteral = 5\n");
    let err = parse(&text).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("/etc/imapgate/test.toml:6:1: `limits.litteral`: "),
        "{msg}"
    );
    assert!(msg.contains("unknown field `litteral`"), "{msg}");
}

#[test]
fn unknown_key_in_second_listener_names_its_index() {
    let text = format!("{MINIMAL}[[listener]]\nbind = \"127.0.0.1:1143\"\ntsl = \"none\"\n");
    let msg = parse(&text).unwrap_err().to_string();
    assert!(
        msg.contains(":5:1: `listener[1].tsl`: unknown field `tsl`"),
        "{msg}"
    );
}

#[test]
fn wrong_type_names_the_field() {
    let text = format!("{MINIMAL}[limits]\nline = \"big\"\n");
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.contains(":4:8: `limits.line`: invalid type"), "{msg}");
}

#[test]
fn bad_enum_value_names_the_field() {
    let text = "[[listener]]\nbind = \"127.0.0.1:1993\"\ntls = \"yes\"\n";
    let msg = parse(text).unwrap_err().to_string();
    assert!(
        msg.contains(":3:7: `listener[0].tls`: unknown variant `yes`"),
        "{msg}"
    );
}

#[test]
fn host_name_bind_is_refused() {
    let msg = parse("[[listener]]\nbind = \"localhost:1993\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(":2:8: `listener[0].bind`: invalid socket address"),
        "{msg}"
    );
}

#[test]
fn missing_bind_is_reported() {
    let msg = parse("[[listener]]\ntls = \"none\"\n")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing field `bind`"), "{msg}");
}

#[test]
fn toml_syntax_error_has_a_location() {
    let msg = parse("[[listener]\n").unwrap_err().to_string();
    assert!(msg.starts_with("/etc/imapgate/test.toml:1:"), "{msg}");
}

#[test]
fn missing_file_names_it() {
    let msg = Config::load("/nonexistent/imapgate.toml")
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("/nonexistent/imapgate.toml: cannot read"),
        "{msg}"
    );
}

#[test]
fn no_listener() {
    let (field, _, msg) = invalid("[upstream]\naddress = \"127.0.0.1:143\"\n");
    assert_eq!(field, "");
    assert!(msg.contains("at least one [[listener]]"), "{msg}");
}

#[test]
fn cert_without_key() {
    let (field, loc, msg) = invalid(&format!("{MINIMAL}cert = \"c.pem\"\n"));
    assert_eq!(field, "listener[0].cert");
    assert_eq!(loc, Some(Location { line: 3, column: 8 }));
    assert!(msg.contains("`key` is not"), "{msg}");
}

#[test]
fn key_without_cert() {
    let (field, _, _) = invalid(&format!("{MINIMAL}key = \"k.pem\"\n"));
    assert_eq!(field, "listener[0].key");
}

#[test]
fn sni_certificate_name_errors_point_at_the_name() {
    let text = "[[listener]]\nbind = \"127.0.0.1:1\"\n\
                [[listener]]\nbind = \"127.0.0.1:2\"\n\
                [[listener.certificate]]\nnames = [\"a.example\"]\ncert = \"a.pem\"\nkey = \"a.key\"\n\
                [[listener.certificate]]\nnames = [\"b.example\", \"*.b.*.example\"]\n\
                cert = \"b.pem\"\nkey = \"b.key\"\n";
    let (field, loc, msg) = invalid(text);
    assert_eq!(field, "listener[1].certificate[1].names[1]");
    assert_eq!(
        loc,
        Some(Location {
            line: 10,
            column: 23
        })
    );
    assert!(
        msg.contains("\"*.b.*.example\": a wildcard is a whole first label"),
        "{msg}"
    );
    let parsed = parse(&text.replace("*.b.*.example", "*.b.example")).unwrap();
    assert_eq!(
        parsed.listeners[1].certificates[1].cert,
        Path::new("/etc/imapgate/b.pem")
    );
}

#[test]
fn proxy_protocol_without_trusted_sources() {
    let (field, loc, msg) = invalid(&format!(
        "{MINIMAL}proxy_protocol = true\nproxy_from = []\n"
    ));
    assert_eq!(field, "listener[0].proxy_from");
    assert_eq!(loc, Some(Location { line: 4, column: 1 }));
    assert!(msg.contains("required with proxy_protocol = true"), "{msg}");
}

#[test]
fn a_trusted_source_that_is_not_a_network() {
    let text = format!("{MINIMAL}proxy_protocol = true\nproxy_from = [\"10.0.0.0/8\", \"lb1\"]\n");
    let msg = parse(&text).unwrap_err().to_string();
    assert!(
        msg.contains(":4:") && msg.contains("\"lb1\" is not a network"),
        "{msg}"
    );
}

#[test]
fn duplicate_bind() {
    let (field, loc, msg) = invalid(&format!("{MINIMAL}name = \"a\"\n{MINIMAL}"));
    assert_eq!(field, "listener[1].bind");
    assert_eq!(loc, Some(Location { line: 5, column: 8 }));
    assert!(msg.contains("also bound by listener[0]"), "{msg}");
}

#[test]
fn duplicate_name() {
    let text = "[[listener]]\nbind = \"127.0.0.1:1\"\nname = \"x\"\n\
                [[listener]]\nbind = \"127.0.0.1:2\"\nname = \"x\"\n";
    let (field, loc, _) = invalid(text);
    assert_eq!(field, "listener[1].name");
    assert_eq!(loc, Some(Location { line: 6, column: 8 }));
}

#[test]
fn literal_over_u32() {
    let (field, loc, msg) = invalid(&format!("{MINIMAL}[limits]\nliteral = 4294967296\n"));
    assert_eq!(field, "limits.literal");
    assert_eq!(
        loc,
        Some(Location {
            line: 4,
            column: 11
        })
    );
    assert!(msg.contains("32-bit"), "{msg}");
    parse(&format!("{MINIMAL}[limits]\nliteral = 4294967295\n")).unwrap();
}

#[test]
fn preauth_line_over_line() {
    let (field, _, _) = invalid(&format!(
        "{MINIMAL}[limits]\nline = 4096\npreauth_line = 8192\n"
    ));
    assert_eq!(field, "limits.preauth_line");
}

#[test]
fn preauth_line_over_default_line_is_found_even_if_line_is_implicit() {
    let (field, loc, _) = invalid(&format!("{MINIMAL}[limits]\npreauth_line = 70000\n"));
    assert_eq!(field, "limits.preauth_line");
    assert_eq!(
        loc,
        Some(Location {
            line: 4,
            column: 16
        })
    );
}

#[test]
fn line_too_small() {
    let (field, _, _) = invalid(&format!(
        "{MINIMAL}[limits]\nline = 1023\npreauth_line = 1000\n"
    ));
    assert_eq!(field, "limits.line");
    let (field, _, _) = invalid(&format!("{MINIMAL}[limits]\npreauth_line = 100\n"));
    assert_eq!(field, "limits.preauth_line");
}

#[test]
fn zero_timeouts_and_limits() {
    for key in [
        "preauth_timeout_s",
        "idle_timeout_s",
        "drain_timeout_s",
        "max_connections",
    ] {
        let (field, _, _) = invalid(&format!("{MINIMAL}[limits]\n{key} = 0\n"));
        assert_eq!(field, format!("limits.{key}"));
    }
    let (field, _, _) = invalid(&format!("{MINIMAL}[upstream]\nconnect_timeout_s = 0\n"));
    assert_eq!(field, "upstream.connect_timeout_s");
    for key in ["interval_s", "timeout_s"] {
        let (field, location, message) = invalid(&format!("{MINIMAL}[health]\n{key} = 0\n"));
        assert_eq!(field, format!("health.{key}"));
        assert_eq!(location.map(|l| l.line), Some(4), "{message}");
    }
    let (field, _, message) = invalid(&format!(
        "{MINIMAL}[health]\ninterval_s = 2\ntimeout_s = 3\n"
    ));
    assert_eq!(field, "health.timeout_s");
    assert!(message.contains("before the next is due"), "{message}");
}

#[test]
fn negative_number_is_a_parse_error() {
    let msg = parse(&format!("{MINIMAL}[limits]\nline = -1\n"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`limits.line`"), "{msg}");
}

#[test]
fn upstream_address_without_port() {
    let (field, loc, _) = invalid(&format!(
        "{MINIMAL}[upstream]\naddress = \"imap.example.com\"\n"
    ));
    assert_eq!(field, "upstream.address");
    assert_eq!(
        loc,
        Some(Location {
            line: 4,
            column: 11
        })
    );
}

#[test]
fn upstream_tls_server_name_defaults_to_host_and_must_be_valid() {
    let c = parse(&format!(
        "{MINIMAL}[upstream]\naddress = \"[::1]:993\"\ntls = \"implicit\"\n"
    ))
    .unwrap();
    assert_eq!(c.upstreams[0].tls_server_name(), "::1");
    let (field, _, _) = invalid(&format!(
        "{MINIMAL}[upstream]\naddress = \"127.0.0.1:143\"\ntls = \"starttls\"\nserver_name = \"bad name!\"\n"
    ));
    assert_eq!(field, "upstream.server_name");
    // Without TLS the name is never used, so it is not checked.
    parse(&format!(
        "{MINIMAL}[upstream]\nserver_name = \"bad name!\"\n"
    ))
    .unwrap();
}

#[test]
fn bad_log_level() {
    let (field, _, _) = invalid(&format!("{MINIMAL}[log]\nlevel = \"inof\"\n"));
    assert_eq!(field, "log.level");
    let (field, _, _) = invalid(&format!("{MINIMAL}[log]\nlevel = \"info,x=loud\"\n"));
    assert_eq!(field, "log.level");
    parse(&format!("{MINIMAL}[log]\nlevel = \"WARN\"\n")).unwrap();
}

#[test]
fn admin_mistakes_name_the_field_and_never_the_token() {
    let (field, loc, msg) = invalid(&format!(
        "{MINIMAL}[admin]\nbind = \"127.0.0.1:9144\"\ntoken = \"not valid\"\n"
    ));
    assert_eq!(field, "admin.token");
    assert_eq!(loc.map(|l| l.line), Some(5));
    assert!(
        msg.contains("visible ASCII") && !msg.contains("not valid"),
        "{msg}"
    );
    let (field, _, msg) = invalid(&format!(
        "{MINIMAL}[admin]\ntoken = \"t\"\ntoken_file = \"admin.token\"\n"
    ));
    assert_eq!(field, "admin.token_file");
    assert!(msg.contains("not both"), "{msg}");
    let (field, _, msg) = invalid(&format!("{MINIMAL}[admin]\nbind = \"127.0.0.1:9144\"\n"));
    assert_eq!(field, "admin");
    assert!(msg.contains("`token` or `token_file` is required"), "{msg}");
    let c = parse(&format!(
        "{MINIMAL}[admin]\ntoken_file = \"secrets/admin.token\"\n"
    ))
    .unwrap();
    let admin = c.admin.unwrap();
    assert_eq!(admin.bind, "127.0.0.1:9144".parse().unwrap());
    assert_eq!(
        admin.token_file.as_deref(),
        Some(Path::new("/etc/imapgate/secrets/admin.token"))
    );
}

#[test]
fn per_user_and_per_address_limits_must_be_able_to_apply() {
    for key in ["max_connections_per_user", "max_connections_per_address"] {
        let (field, _, msg) = invalid(&format!(
            "{MINIMAL}[limits]\nmax_connections = 100\n{key} = 101\n"
        ));
        assert_eq!(field, format!("limits.{key}"));
        assert!(msg.contains("never apply"), "{msg}");
        // Equal to the total is allowed (a single-user deployment), and 0 is unlimited.
        parse(&format!(
            "{MINIMAL}[limits]\nmax_connections = 100\n{key} = 100\n"
        ))
        .unwrap();
        parse(&format!("{MINIMAL}[limits]\n{key} = 0\n")).unwrap();
    }
}

/// The commented `[[policy]]` examples of the shipped front-door policies, uncommented, load
/// (as `imapgate check` loads them) with their map file, next to three named upstreams.
#[test]
fn commented_front_door_policy_examples_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let example = std::fs::read_to_string(dir.join("imapgate.toml")).unwrap();
    let lines: Vec<&str> = example.lines().collect();
    let mut text = String::from(MINIMAL);
    for name in ["mail1", "mail2", "mail3"] {
        text.push_str(&format!(
            "[[upstream]]\nname = \"{name}\"\naddress = \"127.0.0.1:143\"\n"
        ));
    }
    for script in ["login_throttle.lua", "route.lua"] {
        let at = lines
            .iter()
            .position(|l| l.starts_with("# script = ") && l.ends_with(&format!("/{script}\"")))
            .unwrap_or_else(|| panic!("no commented example for {script}"));
        assert_eq!(lines[at - 1], "# [[policy]]");
        let options = lines[at + 1].strip_prefix("# ").expect("commented options");
        assert!(options.starts_with("options = {"), "{options}");
        text.push_str(&format!("[[policy]]\n{}\n{options}\n", &lines[at][2..]));
    }
    let config = Config::from_str_named(&text, dir.join("imapgate.toml")).unwrap();
    let names = imapgate::policy::check(&config).unwrap();
    assert_eq!(names, ["login_throttle", "route"]);
}
